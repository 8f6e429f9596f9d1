"""The discriminator of the AAPA anchor. The formulation is ours (docs/objectives.md#aapa): the
paper's exact one could not be read.

D(x, y) in (0, 1) says how much a response y to a prompt x reads like the expert's. A frozen
encoder (a causal LM, normally the student's starting weights) reads the prompt, under its
chat template, and the response; each sentence of the response becomes the mean of the
encoder's hidden states (`layer`) over that sentence's tokens; a logistic head on the
standardized sentence vectors gives each sentence's probability of being expert text; D is the
mean of those over the response's sentences.

`train` fits the head (scikit-learn's logistic regression) on expert vs policy responses,
split by prompt so that no held-out prompt was seen, and reports held-out accuracy and AUC.
The artifact (`save`) is a folder: `discriminator.json` (format, the encoder's identity,
layer, threshold, metrics) and `head.safetensors` (the standardization and the head). `load`
refuses an encoder whose identity differs from the recorded one: the head only means
something on the hidden states it was fitted on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = "opd-discriminator/1"
META, HEAD = "discriminator.json", "head.safetensors"
# a sentence ends at . ! or ? followed by whitespace, or at a line break
_BREAK = re.compile(r"[.!?]\s+|\n+")


def sentences(text: str) -> list[str]:
    """`text` cut after each sentence end; the pieces put together give `text` back (each
    keeps the whitespace that follows it). Whitespace-only pieces join the piece before."""
    pieces: list[str] = []
    start = 0
    for m in _BREAK.finditer(text):
        pieces.append(text[start : m.end()])
        start = m.end()
    pieces.append(text[start:])
    out: list[str] = []
    for p in pieces:
        if not p:
            continue
        if out and not p.strip():
            out[-1] += p
        else:
            out.append(p)
    return [p for p in out if p.strip()]


def _sha256_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def encoder_identity(path: str | Path) -> dict[str, str]:
    """What makes two encoders the same: hashes of the config, the tokenizer files and the
    weights (every *.safetensors, in name order)."""
    from opd.models.sources import resolve_model

    folder = resolve_model(str(path))
    weights = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not weights:
        raise ValueError(f"encoder {path}: not an HF model folder with safetensors weights")
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
    tokenizer = [folder / n for n in names if (folder / n).is_file()]
    return {
        "config_sha256": _sha256_files([folder / "config.json"]),
        "tokenizer_sha256": _sha256_files(tokenizer),
        "weights_sha256": _sha256_files(weights),
    }


class Encoder:
    """A frozen causal LM that turns (prompt, response) into one vector per sentence."""

    def __init__(
        self,
        path: str,
        device: str | torch.device = "cpu",
        layer: int = -1,
        max_tokens: int = 1024,
        batch_size: int = 8,
    ) -> None:
        from opd.modeling.loading import load_causal_lm
        from opd.models.sources import resolve_model

        self.path, self.layer = str(path), layer
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model, self.tokenizer = load_causal_lm(
            str(resolve_model(self.path)), None, dtype, self.device
        )
        n_layers = self.model.config.num_hidden_layers
        if not -(n_layers + 1) <= layer <= n_layers:
            raise ValueError(f"layer {layer}: the encoder has hidden states 0..{n_layers}")

    def _tokens(self, messages: list[dict], response: str) -> tuple[list[int], list[range]]:
        """The prompt and response tokens, and each sentence's positions among them. An empty
        response is one "sentence" at the position that would generate it."""
        from opd.data.prompts import render_ids

        ids = list(render_ids(self.tokenizer, messages))
        spans = []
        for piece in sentences(response):
            piece_ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
            room = self.max_tokens - len(ids)
            if room <= 0:
                break
            piece_ids = piece_ids[:room]
            spans.append(range(len(ids), len(ids) + len(piece_ids)))
            ids += piece_ids
        if not spans:
            spans = [range(len(ids) - 1, len(ids))]
        return ids, spans

    @torch.no_grad()
    def features(self, messages: list[list[dict]], responses: list[str]) -> list[torch.Tensor]:
        """Per response, its sentence vectors [n_sentences, hidden] (float32, on the CPU)."""
        out: list[torch.Tensor] = []
        items = [self._tokens(m, r) for m, r in zip(messages, responses, strict=True)]
        for i in range(0, len(items), self.batch_size):
            batch = items[i : i + self.batch_size]
            L = max(len(ids) for ids, _ in batch)
            input_ids = torch.zeros(len(batch), L, dtype=torch.long)
            mask = torch.zeros(len(batch), L, dtype=torch.long)
            for j, (ids, _) in enumerate(batch):  # right padding: no real position sees it
                input_ids[j, : len(ids)] = torch.tensor(ids)
                mask[j, : len(ids)] = 1
            hidden = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                output_hidden_states=True,
            ).hidden_states[self.layer]
            hidden = hidden.float().cpu()
            for j, (_, spans) in enumerate(batch):
                out.append(torch.stack([hidden[j, s.start : s.stop].mean(0) for s in spans]))
        return out


@dataclass
class Head:
    """Logistic regression on standardized sentence vectors."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: float

    def sentence_probs(self, feats: torch.Tensor) -> torch.Tensor:
        # float64, elementwise then summed: a float32 matrix-vector product may add in an
        # order that depends on where the tensors sit in memory (a loaded head scored a
        # response 1e-7 off the fitted one), and scores must repeat exactly on resume
        x = (feats.double() - self.mean.double()) / self.scale.double()
        return torch.sigmoid((x * self.weight.double()).sum(-1) + self.bias)

    def response_scores(self, feats: list[torch.Tensor]) -> list[float]:
        """D per response: the mean of its sentences' probabilities."""
        return [float(self.sentence_probs(f).mean()) for f in feats]


def fit_head(feats: list[torch.Tensor], labels: list[int], c: float, seed: int) -> Head:
    """The head fitted on every sentence, each labelled as its response."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X = torch.cat(feats).double().numpy()
    y = np.concatenate([[label] * len(f) for f, label in zip(feats, labels, strict=True)])
    scaler = StandardScaler().fit(X)
    clf = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(scaler.transform(X), y)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    return Head(
        mean=torch.tensor(scaler.mean_, dtype=torch.float32),
        scale=torch.tensor(scale, dtype=torch.float32),
        weight=torch.tensor(clf.coef_[0], dtype=torch.float32),
        bias=float(clf.intercept_[0]),
    )


def heldout(key: str, fraction: float, seed: int) -> bool:
    """Whether the prompt `key` is held out (a hash of it and the seed: stable across runs)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _metrics(scores: list[float], labels: list[int], threshold: float) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    right = [(s >= threshold) == bool(y) for s, y in zip(scores, labels, strict=True)]
    out = {"accuracy": sum(right) / len(right), "n": len(labels), "n_expert": sum(labels)}
    out["auc"] = float(roc_auc_score(labels, scores)) if 0 < sum(labels) < len(labels) else None
    out["mean_D_expert"] = _mean([s for s, y in zip(scores, labels, strict=True) if y])
    out["mean_D_policy"] = _mean([s for s, y in zip(scores, labels, strict=True) if not y])
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@dataclass
class Discriminator:
    encoder: Encoder
    head: Head
    meta: dict = field(default_factory=dict)

    def score(self, messages: list[list[dict]], responses: list[str]) -> list[float]:
        """D(x, y) for each (prompt messages, response text)."""
        return self.head.response_scores(self.encoder.features(messages, responses))

    def save(self, out: str | Path) -> Path:
        """Write the artifact to `out`, a folder that must not exist yet, all at once (a
        temporary folder beside it, renamed)."""
        from safetensors.torch import save_file

        out = Path(out)
        if out.exists():
            raise FileExistsError(f"{out} exists: a discriminator is never overwritten")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        h = self.head
        tensors = {"mean": h.mean, "scale": h.scale, "weight": h.weight}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / HEAD))
        meta = {**self.meta, "format": FORMAT, "bias": h.bias}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(tmp, out)
        return out

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        encoder: str | None = None,
        batch_size: int = 8,
    ) -> Discriminator:
        """The artifact at `path`, its encoder loaded from `encoder` (default: the recorded
        path) after checking it is the encoder the head was fitted on."""
        from safetensors.torch import load_file

        meta = read_meta(path)
        source = encoder or meta["encoder"]["path"]
        check_encoder(meta, source, path)
        enc = Encoder(source, device, meta["layer"], meta["max_tokens"], batch_size)
        t = load_file(str(Path(path) / HEAD))
        return cls(enc, Head(t["mean"], t["scale"], t["weight"], float(meta["bias"])), meta)


def read_meta(path: str | Path) -> dict:
    """The artifact's description, or a ValueError naming what is wrong with it."""
    file = Path(path) / META
    if not file.is_file():
        raise ValueError(
            f"{path}: no discriminator here ({META} missing); make one with "
            "`opd discriminator train --expert FILE --policy-model DIR --out DIR`"
        )
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: damaged ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if not (Path(path) / HEAD).is_file():
        raise ValueError(f"{path}: {HEAD} missing")
    return meta


def check_encoder(meta: dict, encoder: str, where: str | Path) -> None:
    """Refuse an encoder other than the one the head was fitted on, naming what differs."""
    want, have = meta["encoder"], encoder_identity(encoder)
    differ = [k.removesuffix("_sha256") for k in have if have[k] != want.get(k)]
    if differ:
        raise ValueError(
            f"the discriminator at {where} was fitted on the hidden states of {want['path']}; "
            f"{encoder} differs in its {', '.join(differ)}: fit one for this encoder "
            "(opd discriminator train --encoder ...) or name the original"
        )


def train(
    expert: list[tuple[list[dict], str]],
    policy: list[tuple[list[dict], str]],
    encoder_path: str,
    *,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    layer: int = -1,
    c: float = 1.0,
    max_tokens: int = 1024,
    device: str = "cpu",
    threshold: float = 0.5,
) -> Discriminator:
    """Fit a discriminator on (prompt messages, response) pairs, expert = 1 and policy = 0;
    prompts are held out by a hash of their text, so a held-out prompt's responses (of both
    kinds) were never fitted on. Its `meta["metrics"]` has train and held-out accuracy and AUC."""
    items = [(m, r, 1) for m, r in expert] + [(m, r, 0) for m, r in policy]
    keys = [json.dumps(m, sort_keys=True) for m, _, _ in items]
    out = [heldout(k, heldout_fraction, seed) for k in keys]
    split = {
        name: [it for it, o in zip(items, out, strict=True) if o == (name == "heldout")]
        for name in ("train", "heldout")
    }
    for name, rows in split.items():
        kinds = {y for _, _, y in rows}
        if kinds != {0, 1}:
            raise ValueError(
                f"the {name} split has {len(rows)} responses and not both kinds (expert and "
                f"policy): give more prompts or another --heldout fraction"
            )
    enc = Encoder(encoder_path, device, layer, max_tokens)
    t0 = time.time()
    feats = {
        n: enc.features([m for m, _, _ in rows], [r for _, r, _ in rows])
        for n, rows in split.items()
    }
    labels = {n: [y for _, _, y in rows] for n, rows in split.items()}
    head = fit_head(feats["train"], labels["train"], c, seed)
    metrics = {n: _metrics(head.response_scores(feats[n]), labels[n], threshold) for n in split}
    meta = {
        "formulation": "ours (docs/objectives.md#aapa): the paper's exact one was not available",
        "encoder": {"path": str(encoder_path), **encoder_identity(encoder_path)},
        "layer": layer,
        "max_tokens": max_tokens,
        "sentence_break": _BREAK.pattern,
        "threshold": threshold,
        "c": c,
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "metrics": metrics,
        "seconds": round(time.time() - t0, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return Discriminator(enc, head, meta)


def recipe_command(recipe: str | Path) -> list[str]:
    """The `opd discriminator train ...` line in an anchored recipe's header comments (how
    the shipped recipes say to make the discriminator they name), split into words."""
    lines = [
        line.lstrip("# ").split()
        for line in Path(recipe).read_text().splitlines()
        if line.startswith("#") and line.lstrip("# ").startswith("opd discriminator train ")
    ]
    if len(lines) != 1:
        raise ValueError(f"{recipe}: {len(lines)} 'opd discriminator train' lines in its header")
    return lines[0]
