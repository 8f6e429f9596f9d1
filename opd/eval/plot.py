"""`opd plot RUN_DIR`: the run's curves (loss, KL, eval scores, tokens/s) in one PNG."""

from __future__ import annotations

from pathlib import Path

from opd.metrics import read_metrics

PANELS = (
    ("train/loss", "training loss"),
    ("heldout/reverse_kl", "held-out reverse KL (nats/token)"),
    ("eval/", "benchmark scores"),
    ("perf/tokens_per_s", "tokens / s"),
)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: is {run_dir} a run directory?")
    rows = read_metrics(metrics)
    keys = sorted({k for r in rows for k in r})
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, title) in zip(axes.flat, PANELS):
        chosen = [k for k in keys if k.startswith(key)] if key.endswith("/") else [key]
        for k in chosen:
            xs, ys = series(rows, k)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        if not ax.lines:
            ax.text(0.5, 0.5, "none logged", ha="center", transform=ax.transAxes)
        elif key.endswith("/"):
            ax.legend(fontsize=7)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = out or Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
