"""Objective registry: recipe name -> class, plus `import_path` for user-defined objectives."""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import OmegaConf

from opd.imports import import_attr
from opd.objectives.base import LossInputs, LossOutput, Objective, TeacherRequest
from opd.objectives.gkd import GKD
from opd.objectives.grpo import GRPO
from opd.objectives.reverse_kl import ReverseKL
from opd.objectives.sdft import SDFT
from opd.objectives.sft import SFT
from opd.objectives.simct import SimCT
from opd.objectives.sod import SOD
from opd.objectives.trrd import TRRD

REGISTRY: dict[str, type[Objective]] = {
    cls.name: cls for cls in (ReverseKL, GKD, SDFT, SFT, SimCT, GRPO, TRRD, SOD)
}

__all__ = [
    "REGISTRY",
    "LossInputs",
    "LossOutput",
    "Objective",
    "TeacherRequest",
    "build_objective",
    "objective_class",
]


def objective_class(name: str, import_path: str | None = None) -> type:
    """The class for `objective.name`, or the one at `objective.import_path` ("pkg.mod:Class")."""
    if import_path:
        return import_attr(import_path, "objective.import_path", "pkg.mod:Class")
    if name not in REGISTRY:
        raise ValueError(f"objective.name={name!r} is unknown; valid: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def build_params(cls: type, params: dict[str, Any]) -> Any:
    """Validate `objective.params` against the objective's own Params dataclass (strict)."""
    schema = OmegaConf.structured(cls.Params)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(dict(params)))
    except Exception as e:  # omegaconf names the key and says "Did you mean"
        raise ValueError(f"objective.params: {e}") from e
    obj = OmegaConf.to_object(merged)
    assert dataclasses.is_dataclass(obj)
    return obj


def build_objective(name: str, params: dict[str, Any], import_path: str | None = None) -> Objective:
    cls = objective_class(name, import_path)
    return cls(build_params(cls, params))
