"""The `logging:` trackers write real files with the real libraries, and a resumed run goes on
in the same W&B and MLflow runs."""

import pytest

from opd.config.schema import LoggingConfig
from opd.metrics import MetricsLog
from opd.tracking import Trackers

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

CONFIG = {"dict": {"learner": {"lr": 0.001}, "run": {"seed": 3}}, "yaml": "learner: {lr: 0.001}"}
ROWS = {
    1: {"train/loss": 2.0, "eval/gsm8k-100/pass@1": 0.25, "rollout/on_policy": True},
    2: {"train/loss": 1.5, "heldout/reverse_kl": float("nan")},
}


def _run(tmp_path, steps, resume_step=None):
    cfg = LoggingConfig(tensorboard=True, wandb=True, mlflow=True, run_name="t")
    log = MetricsLog(tmp_path / "metrics.jsonl", resume_step)
    log.trackers = Trackers(cfg, tmp_path, CONFIG)
    for step in steps:
        log.write(step, ROWS[step])
    log.close()


def test_tensorboard_wandb_and_mlflow_receive_every_step(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(tmp_path, [1])
    _run(tmp_path, [2], resume_step=1)  # a resumed run: the same W&B and MLflow runs

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/gsm8k-100/pass@1")] == [(1, 0.25)]
    assert "heldout/reverse_kl" not in acc.Tags()["scalars"]  # NaN is not a number to plot
    # (each process writes its own event file; the accumulator reads the newest dir's files)

    import mlflow

    run_id = (tmp_path / "mlflow_run_id").read_text()
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    loss = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in loss) == [(1, 2.0), (2, 1.5)]
    assert client.get_run(run_id).data.params["learner.lr"] == "0.001"
    assert [m.value for m in client.get_metric_history(run_id, "eval/gsm8k-100/pass_at_1")] == [
        0.25
    ]

    wandb_id = (tmp_path / "wandb_id").read_text()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert runs  # a folder per process (one when both start within a second), one run id
    # wandb 0.31 writes its run log from a Go service and ships no Python reader of it: the
    # history records are protobuf messages holding each key and its JSON value
    data = b"".join(p.read_bytes() for f in runs for p in f.glob("*.wandb"))
    assert b"eval/gsm8k-100/pass@1" in data and b"0.25" in data and b"1.5" in data
    assert b"heldout/reverse_kl" not in data
    assert b"learner" in data  # the config


def test_a_tracker_whose_library_is_missing_is_named(tmp_path, monkeypatch):
    import builtins

    from opd.rundir import RunError

    real = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'", name="wandb")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(RunError, match=r"logging.wandb: wandb is not installed: pip install wandb"):
        Trackers(LoggingConfig(wandb=True), tmp_path, CONFIG)
