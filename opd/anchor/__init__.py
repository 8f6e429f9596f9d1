"""The AAPA anchor (docs/objectives.md#aapa; the formulation is ours): a fixed discriminator's
log D(x, y) joins any objective's advantage, or weights SFT's sequences."""
