"""The anchor of a training step, computed beside the teacher's scores (the teacher actor sees a
step's samples at once, so it has every prompt's whole group).

Each sample's response (the tokens the model wrote, decoded) is scored by the discriminator;
r = log D. With `use` "advantage", a sample's term is coef (r - the mean r of its prompt's
samples), which the objective adds to every token's advantage; with "weight" (sft), the batch's
sequences get weights n softmax(coef r), whose mean is 1.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

from opd.anchor.config import AnchorConfig
from opd.objectives.advantages import group_members
from opd.samples import Sample

LOG_FLOOR = math.log(1e-6)  # log D never below this: a D of 0 would give an infinite term


def anchor_terms(
    log_d: Sequence[float], groups: Sequence[Hashable], coef: float, use: str
) -> list[float]:
    """Each sample's anchor term from its log D and its group (see the module docstring)."""
    if use == "advantage":
        terms = [0.0] * len(log_d)
        for members in group_members(groups):
            mean = sum(log_d[i] for i in members) / len(members)
            for i in members:
                terms[i] = coef * (log_d[i] - mean)
        return terms
    if use == "weight":
        top = max(coef * r for r in log_d)
        e = [math.exp(coef * r - top) for r in log_d]
        return [len(e) * x / sum(e) for x in e]
    raise ValueError(f"anchor use {use!r}: 'advantage' or 'weight'")


class StepAnchor:
    def __init__(self, cfg: AnchorConfig, use: str, device) -> None:
        self.cfg, self.use, self.device = cfg, use, device
        self.disc = None  # loaded on first use, like the rewards' pool

    def apply(self, samples: list[Sample], texts: list[str]) -> dict[str, float]:
        """Set each sample's `anchor` term from the text the model wrote (`texts`); the step's
        anchor metrics."""
        if not samples:
            return {}
        if self.disc is None:
            from opd.anchor.discriminator import Discriminator

            self.disc = Discriminator.load(
                self.cfg.path, self.device, self.cfg.encoder, self.cfg.batch_size
            )
        d = self.disc.score([s.messages for s in samples], texts)
        log_d = [max(math.log(x) if x > 0 else LOG_FLOOR, LOG_FLOOR) for x in d]
        groups = [s.prompt_index for s in samples]
        terms = anchor_terms(log_d, groups, self.cfg.coef, self.use)
        for s, t in zip(samples, terms, strict=True):
            s.anchor = t
        n = len(samples)
        return {
            "anchor/D": sum(d) / n,
            "anchor/reward": sum(log_d) / n,  # mean log D
            "anchor/abs_term": sum(abs(t) for t in terms) / n,
        }


def check_anchor(cfg, objective) -> list[str]:
    """Validation of the `anchor:` block against the objective and the discriminator on disk
    (its description, and its encoder's identity); a start-up note."""
    from opd.anchor.discriminator import check_encoder, read_meta

    use = objective.anchor_use()
    if use is None:
        raise ValueError(
            f"anchor: objective {cfg.objective.name!r} has no advantage or sequence weights for "
            "the anchor to join; it works with reverse_kl (estimator sampled), grpo, trrd, sod "
            "and sft"
        )
    if use == "advantage" and cfg.rollout.samples_per_prompt < 2:
        raise ValueError(
            "anchor: log D is centered within each prompt's samples: rollout.samples_per_prompt"
            f"={cfg.rollout.samples_per_prompt} must be >= 2"
        )
    try:
        meta = read_meta(cfg.anchor.path)
        encoder = cfg.anchor.encoder or meta["encoder"]["path"]
        check_encoder(meta, encoder, cfg.anchor.path)
    except (OSError, ValueError) as e:
        raise ValueError(f"anchor.path: {e}") from e
    held = meta["metrics"]["heldout"]
    return [
        f"anchor: {cfg.anchor.path} (encoder {encoder}; held-out accuracy "
        f"{held['accuracy']:.3f}, AUC {held['auc']}), coef {cfg.anchor.coef}, as {use}"
    ]
