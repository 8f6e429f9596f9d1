"""`opd plot RUN_DIR`: the run's curves (loss, KL, eval scores, tokens/s) in one PNG."""

from __future__ import annotations

from pathlib import Path

from opd.metrics import read_metrics

# (key or prefix, title, y-axis label); a prefix plots every key under it
PANELS = (
    ("train/loss", "training loss", "loss (per token or sequence)"),
    ("heldout/", "held-out divergence", "nats / token"),
    ("eval/", "benchmark scores", "pass@k"),
    ("perf/tokens_per_s", "throughput", "completion tokens / s"),
)
# held-out keys that are not a divergence per token (sizes, counts)
HELDOUT_SKIP = ("heldout/completion_tokens",)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def chosen_keys(rows: list[dict], key: str) -> list[str]:
    """The keys a panel plots: `key` itself, or every key under a prefix (`heldout/`: the
    reverse KL alone where the run logs it, else the objective's held-out metrics, as simct's
    runs do; `eval/`: the pass@k scores)."""
    keys = sorted({k for r in rows for k in r})
    if not key.endswith("/"):
        return [key]
    under = [k for k in keys if k.startswith(key) and k not in HELDOUT_SKIP]
    if key == "heldout/" and "heldout/reverse_kl" in under:
        return ["heldout/reverse_kl"] + [
            k for k in under if k.endswith("/reverse_kl") and k != "heldout/reverse_kl"
        ]
    if key == "eval/":
        return [k for k in under if "/pass@" in k]
    return under


def figure(rows: list[dict], title: str):
    """The run's 2 x 2 panels (matplotlib figure), steps as whole numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, name, ylabel) in zip(axes.flat, PANELS):
        steps: set[int] = set()
        for k in chosen_keys(rows, key):
            xs, ys = series(rows, k)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=k)
                steps.update(xs)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if len(steps) < 3:  # a locator would put fractional steps between so few
            ax.set_xticks(sorted(steps))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not ax.lines:
            ax.text(0.5, 0.5, "none logged", ha="center", transform=ax.transAxes)
        elif len(ax.lines) > 1 or key.endswith("/"):
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib.pyplot as plt

    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: is {run_dir} a run directory?")
    fig = figure(read_metrics(metrics), str(run_dir))
    out = out or Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
