"""The `anchor:` block: the AAPA discriminator anchor. Off unless `path` names a discriminator."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AnchorConfig:
    # the discriminator (`opd discriminator train --out DIR`); null: no anchor
    path: str | None = None
    # c_anchor: the group-centered log D joins the advantage with this weight (reverse_kl
    # sampled, grpo, trrd, sod); for sft, the sequences are weighted n softmax(c log D)
    coef: float = 0.1
    # the encoder's folder, if it moved since the discriminator was fitted (its identity is
    # checked); null: the path the discriminator recorded
    encoder: str | None = None
    batch_size: int = 16  # sequences per encoder forward

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def __post_init__(self) -> None:
        if not self.coef >= 0:
            raise ValueError(f"anchor.coef={self.coef} must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"anchor.batch_size={self.batch_size} must be >= 1")
