"""YAML + dotted overrides -> OmegaConf.structured(Config) -> a checked `Config` object.

Errors are `ConfigError`s that name the file and the key. `check_resources` goes further than
the schema: files exist, models agree on a tokenizer, objective parameters are valid and fit
the vocabulary. `opd validate` runs both without starting anything.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from opd.config.schema import Config


class ConfigError(ValueError):
    pass


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        recipe = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    top = _top_level(path)
    if top is not None and not isinstance(top, dict):
        raise ConfigError(
            f"{path}: the top level is a {type(top).__name__}, not a mapping of sections "
            "(run:, data:, student:, teacher:, ...)"
        )
    removals = [o[1:] for o in overrides if o.startswith("~")]
    overrides = [o for o in overrides if not o.startswith("~")]
    for key in removals:
        _remove(recipe, key, path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} must look like dotted.key=value (or ~dotted.key to remove)"
            )
    # `teachers.0.path=...` reaches into a list: applied one by one, after the rest
    indexed = [o for o in overrides if any(p.isdigit() for p in o.split("=", 1)[0].split("."))]
    plain = [o for o in overrides if o not in indexed]
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(Config), recipe, OmegaConf.from_dotlist(plain)
        )
        for item in indexed:
            key, value = item.split("=", 1)
            parsed = OmegaConf.from_dotlist([f"value={value}"])["value"]
            if OmegaConf.select(merged, key.rsplit(".", 1)[0]) is None:
                raise ConfigError(f"override {item!r}: {key.rsplit('.', 1)[0]} does not exist")
            OmegaConf.update(merged, key, parsed, merge=True)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_first_line(e)}") from e
    except TypeError as e:  # e.g. a mapping given where the schema has a list
        raise ConfigError(f"{path}: {e} (a list key set as a mapping, or the reverse?)") from e
    except ValueError as e:  # a __post_init__ check; the message names the key
        raise ConfigError(f"{path}: {e}") from e


def _remove(recipe, key: str, path: Path) -> None:
    """`~key`: drop `key` from the recipe, so the schema's default (or a later override)
    applies; the recipe must have it."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(recipe, parent_key) if parent_key else recipe
    if not leaf or not OmegaConf.is_dict(parent) or leaf not in parent:
        raise ConfigError(f"override ~{key}: {path} has no key {key} to remove")
    del parent[leaf]


def _top_level(path: Path) -> object:
    """The recipe's top-level YAML value (omegaconf reads a bare string as a one-key mapping)."""
    import yaml

    try:
        return yaml.safe_load(path.read_bytes())
    except Exception:  # omegaconf parsed it; its reading is the one that counts
        return None


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    key = getattr(e, "full_key", None)
    msg = lines[0] if lines else type(e).__name__
    return f"{key}: {msg}" if key and key not in msg else msg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> Config:
    return OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
    )


def check_resources(cfg: Config) -> list[str]:
    """Checks that read files but start nothing. Raises ConfigError; returns notes."""
    from opd.config.inputs import (
        build_checked_objective,
        check_benchmarks,
        check_data,
        check_prompt_lengths,
    )
    from opd.models.sources import describe_model

    notes: list[str] = []
    objective = build_checked_objective(cfg)
    data_notes, local_data = check_data(cfg)
    notes += data_notes + check_benchmarks(cfg)

    vocab = {}
    models = [("student", cfg.student), ("teacher", cfg.teacher)]
    models += [(f"teachers[{i}]", t) for i, t in enumerate(cfg.teachers)]
    for role, model in models:
        try:
            info = describe_model(model.path, model.gguf_file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{role}.path: {e}") from e
        vocab[role] = info.get("vocab_size")
        notes.append(f"{role}: {model.path} ({json.dumps(info)})")
    notes += check_prompt_lengths(cfg, local_data)

    from opd.signals import signal_of

    request = objective.teacher_request()
    if cfg.rollout.top_p < 1 and objective.uses_sampler_logprobs():
        raise ConfigError(
            f"rollout.top_p={cfg.rollout.top_p} with objective {cfg.objective.name!r}: its loss "
            "uses the ratio pi_theta / pi_old, and the learner computes pi_theta over the whole "
            "vocabulary (at the sampling temperature) while a top-p sampler renormalizes over "
            "the nucleus, so the ratio would be off from the first step; use rollout.top_p=1"
        )
    if objective.uses_rewards() and not cfg.rewards.enabled:
        raise ConfigError(
            f"objective {cfg.objective.name!r} learns from rewards: set rewards.name (e.g. "
            "math_correct) or rewards.import_path"
        )
    try:
        for i, one in enumerate(each_teacher(cfg)):  # each teacher against the signal
            role = "teacher" if i == 0 else f"teachers[{i - 1}]"
            if one.teacher.engine == "vllm" and not signal_of(request).served_by_vllm:
                raise ValueError(
                    f"{role}.engine=vllm returns the teacher's log-probs of the sampled tokens "
                    f"only; objective {cfg.objective.name!r} asks for signal "
                    f"{request.signal!r}: use {role}.engine=hf"
                )
            try:
                signal_of(request).check(one, request, {**vocab, "teacher": vocab[role]})
            except ValueError as e:
                raise ValueError(f"{e} (teacher {one.teacher.name!r})" if i else str(e)) from e
        objective.check(cfg)
        if cfg.anchor.enabled:
            from opd.anchor.step import check_anchor

            notes += check_anchor(cfg, objective)
        if cfg.rewards.enabled:
            from opd.rewards.runner import resolve_reward

            resolve_reward(cfg.rewards)
        from opd.cluster.placement import check_local_resources

        notes += check_local_resources(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return notes


def each_teacher(cfg: Config) -> list[Config]:
    """`cfg` as seen with each of its teachers in `teacher` (checks written for one teacher);
    shallow copies, not re-checked."""
    out = []
    for t in cfg.all_teachers:
        one = copy.copy(cfg)
        one.teacher, one.teachers = t, []
        out.append(one)
    return out
