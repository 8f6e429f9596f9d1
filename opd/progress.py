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


class Phases:
    """Start-up phases on stderr as they happen, each with its time, so that the minutes
    before the first step are not silent: `with phases("starting Ray"): ...` prints
    `opd: starting Ray ...` then `opd: starting Ray: 3.2 s`."""

    def __init__(self, enabled: bool = True, stream=None) -> None:
        import sys

        self.enabled, self.stream = enabled, stream or sys.stderr
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def timed():
            if self.enabled:
                print(f"opd: {name} ...", file=self.stream, flush=True)
            t0 = time.perf_counter()
            yield
            self.times[name] = time.perf_counter() - t0
            if self.enabled:
                print(f"opd: {name}: {self.times[name]:.1f} s", file=self.stream, flush=True)

        return timed()
