"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases, MLflow.

`metrics.jsonl` is always written (`opd.metrics`); the `logging:` block adds trackers, each
through its own library (an optional dependency: `pip install opd[tracking]`):

- `tensorboard`: event files under `<run dir>/tensorboard` (torch's SummaryWriter);
- `wandb`: a W&B run, `offline` by default (files under `<run dir>/wandb`, `wandb sync` later)
  or `online`; its id is kept in `<run dir>/wandb_id`, so a resumed run continues it;
- `mlflow`: an MLflow run in `logging.mlflow_tracking_uri` (default: `<run dir>/mlruns`), its
  id kept in `<run dir>/mlflow_run_id` for the same reason.

A resumed run logs again the steps after its checkpoint; W&B and MLflow keep the later value
of a step, TensorBoard shows both (its newest event file last).
"""

from __future__ import annotations

import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

from opd.cache import atomic_write_bytes
from opd.rundir import RunError


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


def _kept_id(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


class TensorBoard:
    def __init__(self, run_dir: Path, cfg, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", f"```\n{config.get('yaml', '')}\n```", 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, cfg, config: dict) -> None:
        import wandb

        keep = run_dir / "wandb_id"
        run_id = _kept_id(keep) or secrets.token_hex(4)  # W&B ids: [a-z0-9]
        self.run = wandb.init(
            project=cfg.wandb_project,
            name=cfg.run_name or run_dir.name,
            id=run_id,
            resume="allow",
            mode=cfg.wandb_mode,
            dir=str(run_dir),
            config=config["dict"],
        )
        atomic_write_bytes(keep, run_id.encode())

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path, cfg, config: dict) -> None:
        import mlflow

        uri = cfg.mlflow_tracking_uri
        if uri is None:  # a file store in the run directory: no server, no database package
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        keep = run_dir / "mlflow_run_id"
        run_id = _kept_id(keep)
        if run_id is None:
            exp = self.client.get_experiment_by_name(cfg.mlflow_experiment)
            exp_id = (
                exp.experiment_id if exp else self.client.create_experiment(cfg.mlflow_experiment)
            )
            run = self.client.create_run(exp_id, run_name=cfg.run_name or run_dir.name)
            run_id = run.info.run_id
            for k, v in _flat(config["dict"]).items():
                self.client.log_param(run_id, k, str(v)[:6000])
            atomic_write_bytes(keep, run_id.encode())
        self.run_id = run_id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k.replace("@", "_at_"), v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


class Trackers:
    """The recipe's trackers; `log` sends each step's numeric metrics to every one."""

    def __init__(self, cfg, run_dir: Path, config: dict) -> None:
        self.backends = []
        try:
            for name in cfg.backends:
                self.backends.append(BACKENDS[name](Path(run_dir), cfg, config))
        except ImportError as e:
            self.close()
            raise RunError(
                f"logging.{name}: {e.name or e} is not installed: pip install "
                f"{PACKAGES[name]} (or opd[tracking])"
            ) from e

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        numbers = _numbers(metrics)
        for b in self.backends:
            b.log(step, numbers)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []
