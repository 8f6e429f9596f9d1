"""Checks of what a recipe points at: the objective's class, the data files, the benchmarks.

`check_resources` (and so `opd validate` and `opd train`, before starting anything) runs them.
Each raises `ConfigError` naming the recipe key and the file, line or row at fault.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from opd.config.loader import ConfigError
from opd.config.schema import Config


def build_checked_objective(cfg: Config) -> Any:
    """The recipe's objective; an `import_path` that does not lead to one says why."""
    from opd.objectives import build_objective, objective_class

    o = cfg.objective
    where = f"objective.import_path={o.import_path!r}"
    try:
        cls = objective_class(o.name, o.import_path)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    except Exception as e:  # importing the user's module ran its code
        raise ConfigError(f"{where}: importing it raised {type(e).__name__}: {e}") from e
    if o.import_path:
        from opd.objectives.base import Objective

        if not isinstance(cls, type):
            raise ConfigError(f"{where} is a {type(cls).__name__}, not a class")
        if not issubclass(cls, Objective):
            raise ConfigError(
                f"{where}: {cls.__name__} is not an objective: subclass "
                "opd.objectives.Objective (docs/adding-an-objective.md)"
            )
        if not dataclasses.is_dataclass(cls.Params):
            raise ConfigError(f"{where}: {cls.__name__}.Params must be a dataclass")
    try:
        return build_objective(o.name, o.params, o.import_path)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    except Exception as e:  # the user's class raised on construction
        label = o.import_path or o.name
        raise ConfigError(f"objective {label!r}: building it raised {type(e).__name__}: {e}") from e


def check_data(cfg: Config) -> tuple[list[str], dict[str, tuple[Path, list[dict]]]]:
    """Notes, and `{key: (file, rows)}` for the local data files (registry sets are named only).

    Every row must hold text in `data.prompt_field`, and in `data.demonstration_field` and
    `data.completion_field` when set."""
    from opd.data.sources import checked_rows

    d = cfg.data
    fields = {d.prompt_field: "data.prompt_field"}
    for key in ("demonstration_field", "completion_field"):
        if getattr(d, key):
            fields[getattr(d, key)] = f"data.{key}"
    notes, local = [], {}
    for key in ("data.train_path", "data.heldout_path"):
        value = getattr(d, key.split(".")[1])
        if value is None:
            continue
        try:
            checked = checked_rows(value, fields)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from e
        if checked is None:
            notes.append(f"data: {value} (prepared on first use)")
        else:
            local[key] = checked
            notes.append(f"data: {value} ({len(checked[1])} rows)")
            notes += check_routes(cfg, key, *checked)
    return notes, local


def check_routes(cfg: Config, key: str, path: Path, rows: list[dict]) -> list[str]:
    """With several teachers, every row must pick one (`data.route_field`); a note of how
    many rows each teacher gets."""
    from opd.teacher.routing import Router

    router = Router(cfg)
    if not router.several:
        return []
    counts = [0] * len(router.names)
    for i, row in enumerate(rows):
        try:
            counts[router.teacher_of(row, f"{path}: row {i} (from 0)")] += 1
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from e
    shares = ", ".join(f"{n} {c}" for n, c in zip(router.names, counts))
    return [f"teachers of {key}'s rows: {shares}"]


def check_prompt_lengths(cfg: Config, local: dict[str, tuple[Path, list[dict]]]) -> list[str]:
    """Render the prompts with the student's tokenizer as the run does: some must fit
    `data.max_prompt_tokens`, and some must be left to train on after the held-out ones."""
    if not local or cfg.student.path.startswith("registry:"):
        return [] if not local else ["prompt lengths: checked once the student is prepared"]
    from transformers import AutoTokenizer

    from opd.data.prompts import recipe_prompts

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(cfg.student.path).expanduser()))
    except Exception as e:
        return [f"prompt lengths not checked: the student's tokenizer did not load ({e})"]
    if cfg.student.chat_template:
        tokenizer.chat_template = cfg.student.chat_template
    d, notes, fit = cfg.data, [], {}
    for key, (source, rows) in local.items():
        try:
            prompts, dropped = recipe_prompts(d, rows, tokenizer, str(source))
        except Exception as e:  # the chat template failed to render
            raise ConfigError(f"{key}: {source}: {type(e).__name__}: {e}") from e
        if not prompts:
            raise ConfigError(
                f"{key}: {source}: none of its {len(rows)} prompts fits data.max_prompt_tokens="
                f"{d.max_prompt_tokens} (rendered with the student's chat template)"
            )
        if dropped:
            notes.append(
                f"{key}: {dropped} of {len(rows)} prompts are longer than "
                f"data.max_prompt_tokens={d.max_prompt_tokens} and are dropped"
            )
        fit[key] = len(prompts)
    held = cfg.eval.heldout_prompts
    if not d.heldout_path and fit.get("data.train_path", held + 1) <= held:
        raise ConfigError(
            f"data.train_path: {fit['data.train_path']} prompts fit, and eval.heldout_prompts="
            f"{held} of them are held out (no data.heldout_path), leaving none to train on"
        )
    return notes


def check_benchmarks(cfg: Config) -> list[str]:
    """Every name in `eval.benchmarks` is a known benchmark or a readable problems file."""
    from opd.eval.benchmarks import BENCHMARKS, load_jsonl_benchmark

    notes = []
    for name in cfg.eval.benchmarks:
        if name in BENCHMARKS:
            continue
        if not Path(name).exists():
            raise ConfigError(
                f"eval.benchmarks: {name!r} is neither a benchmark nor a file; benchmarks: "
                f"{', '.join(sorted(BENCHMARKS))}"
            )
        try:
            problems = load_jsonl_benchmark(name)
        except (OSError, ValueError) as e:
            raise ConfigError(f"eval.benchmarks: {e}") from e
        if not problems:
            raise ConfigError(f"eval.benchmarks: {name}: no problems")
        notes.append(f"benchmark: {name} ({len(problems)} problems)")
    return notes
