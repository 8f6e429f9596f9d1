"""A progress bar over training steps showing loss, held-out KL and tokens/s."""

from __future__ import annotations

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.bar = tqdm(
            total=total,
            initial=start,
            desc="opd",
            unit="step",
            disable=not enabled,
            dynamic_ncols=True,
        )

    def update(self, step: int, metrics: dict[str, float]) -> None:
        shown = {
            "loss": metrics.get("train/loss"),
            "tok/s": metrics.get("perf/tokens_per_s"),
            "heldout_kl": metrics.get("heldout/reverse_kl"),
        }
        self.bar.set_postfix(
            {k: f"{v:.4g}" for k, v in shown.items() if v is not None}, refresh=False
        )
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()
