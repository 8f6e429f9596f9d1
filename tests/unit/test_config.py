"""Recipes load strictly; every shipped recipe validates; bad input names the key or file."""

from pathlib import Path

import pytest

from opd.anchor.discriminator import recipe_command
from opd.cli import main
from opd.config import ConfigError, check_resources, from_yaml, load_config, to_yaml

RECIPES = sorted(Path(__file__).parents[2].joinpath("recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


def _exports() -> dict[str, str]:
    """{run.output_dir/student: student.path} of every shipped recipe: the model a recipe's run
    exports, and the one it starts from."""
    from omegaconf import OmegaConf

    out = {}
    for r in RECIPES:
        y = OmegaConf.load(r)
        if "run" in y and "output_dir" in y.run and "student" in y:
            out[f"{y.run.output_dir}/student"] = y.student.path
    return out


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_recipe_loads_and_opens_with_its_command(recipe):
    cfg = load_config(recipe)
    overrides = []
    if cfg.teacher.path.startswith("runs/"):  # a teacher another shipped recipe trains
        exports = _exports()
        assert cfg.teacher.path in exports, f"{recipe}: no shipped recipe exports its teacher"
        overrides = [f"teacher.path={exports[cfg.teacher.path]}"]  # stands in for the export
        cfg = load_config(recipe, overrides)
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# opd train recipes/"), f"{recipe} must open with its command"
    assert str(recipe).endswith(first.split()[3])  # "# opd train <this file> [overrides]"
    if cfg.anchor.enabled:
        make = recipe_command(recipe)  # its header says how to make the discriminator
        assert make[make.index("--out") + 1] == cfg.anchor.path, recipe
        cfg = load_config(recipe, [*overrides, "anchor.path=null"])
    check_resources(cfg)  # registry sources are named, not fetched
    assert from_yaml(to_yaml(cfg)) == cfg


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_key_is_named_with_suggestion(tmp_path):
    p = _write(
        tmp_path,
        "student: {path: x}\nteacher: {path: y}\ndata: {train_path: z}\nlearner: {lrr: 1}\n",
    )
    with pytest.raises(ConfigError, match=r"lrr.*Did you mean"):
        load_config(p)


def test_wrong_type_is_named(tmp_path):
    p = _write(tmp_path, "trainer: {steps: many}\n")
    with pytest.raises(ConfigError, match="steps"):
        load_config(p)


def test_micro_batch_must_divide_batch(tmp_path):
    p = _write(
        tmp_path,
        "student: {path: x}\nteacher: {path: y}\ndata: {train_path: z}\n"
        "rollout: {prompts_per_step: 6}\nlearner: {micro_batch_size: 4}\n",
    )
    with pytest.raises(ConfigError, match="micro_batch_size=4"):
        load_config(p)


def test_override_and_missing_files(tmp_path, tiny_pair):
    recipe = Path(__file__).parents[2] / "recipes/reverse_kl/tiny.yaml"
    ok = [f"student.path={tiny_pair['student']}", f"teacher.path={tiny_pair['teacher']}"]
    cfg = load_config(recipe, ok + ["trainer.steps=3"])
    assert cfg.trainer.steps == 3
    check_resources(cfg)
    with pytest.raises(ConfigError, match="teacher.path: model not found"):
        check_resources(load_config(recipe, ["teacher.path=/nope"]))
    with pytest.raises(ConfigError, match="data.train_path: data not found"):
        check_resources(load_config(recipe, ok + ["data.train_path=/nope.jsonl"]))
    with pytest.raises(ConfigError, match="exceeds the student's vocabulary"):
        check_resources(
            load_config(
                recipe, ok + ["objective.params.estimator=topk", "objective.params.k=100000"]
            )
        )
    with pytest.raises(ConfigError, match="objective.name='nope' is unknown"):
        check_resources(load_config(recipe, ok + ["objective.name=nope"]))


def test_cli_validate_exit_codes(tmp_path, capsys, tiny_pair):
    recipe = "recipes/reverse_kl/tiny.yaml"
    root = Path(__file__).parents[2]
    ok = [f"student.path={tiny_pair['student']}", f"teacher.path={tiny_pair['teacher']}"]
    assert main(["validate", str(root / recipe), *ok]) == 0
    assert main(["validate", str(root / recipe), *ok, "rollout.top_p=2"]) == 2
    assert "rollout.top_p" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2


def test_colocated_nccl_is_refused_and_auto_picks_ipc_when_colocated(tmp_path):
    from opd.sync.weights import make_weight_sync

    base = "student: {path: x}\nteacher: {path: y}\ndata: {train_path: z}\n"
    p = _write(tmp_path, base + "cluster: {placement: colocated}\nrollout: {weight_sync: nccl}\n")
    with pytest.raises(ConfigError, match="NCCL cannot join two processes on one GPU"):
        load_config(p)
    # auto on GPUs: CUDA IPC when colocated; the folder on CPUs and for a following teacher
    # (no actor is contacted for these)
    pair = [], []  # learner ranks, rollout workers: only counted here
    sync = make_weight_sync("auto", "cuda", *pair, "bfloat16", colocated=True)
    assert type(sync).__name__ == "IpcWeightSync"
    for device, teacher in (("cpu", None), ("cuda", "a teacher that follows the student")):
        sync = make_weight_sync("auto", device, *pair, "bfloat16", teacher, colocated=True)
        assert type(sync).__name__ == "DirWeightSync"
        sync.close()


def test_vllm_memory_default_follows_a_fractional_gpu_share():
    from opd.config.schema import RolloutConfig

    assert RolloutConfig(num_gpus=0.4).memory_fraction(gpu=True) == 0.4  # room for the rest
    assert RolloutConfig(num_gpus=1).memory_fraction(gpu=True) == 0.85
    assert RolloutConfig(num_gpus=0.4, gpu_memory_utilization=0.3).memory_fraction(True) == 0.3
    assert RolloutConfig().memory_fraction(gpu=False) == 0.1


def test_top_p_is_refused_only_where_the_loss_uses_the_sampler_ratio(tiny_pair):
    recipe = Path(__file__).parents[2] / "recipes/reverse_kl/tiny.yaml"
    ok = [
        f"student.path={tiny_pair['student']}",
        f"teacher.path={tiny_pair['teacher']}",
        f"data.train_path={tiny_pair['train']}",
        "rollout.top_p=0.9",
    ]
    with pytest.raises(ConfigError, match=r"rollout.top_p=0.9 .*ratio"):
        check_resources(load_config(recipe, ok))
    # the analytic estimators do not read pi_old: top-p only shapes the samples
    check_resources(load_config(recipe, ok + ["objective.params.estimator=full"]))
    check_resources(load_config(recipe, ok[:3] + ["rollout.temperature=0.7"]))


def test_gkd_temperature_is_named_as_the_loss_temperature(tmp_path):
    recipe = Path(__file__).parents[2] / "recipes/gkd/tiny.yaml"
    cfg = load_config(recipe)
    from opd.objectives import build_objective

    obj = build_objective(cfg.objective.name, cfg.objective.params)
    assert obj.params.loss_temperature == 1.0  # TRL's GKDTrainer: loss at T = 1
    with pytest.raises(ValueError, match="loss_temperature.*rollout.temperature"):
        build_objective("gkd", {"temperature": 0.9})


@pytest.mark.parametrize(
    "body, message",
    [
        ("rollout: {sampler_logprobs: false, max_staleness: 1}\n", "needs on-policy batches"),
        ("rollout: {sampler_logprobs: false}\nagent: {tools: [python]}\n", "with agent.tools"),
    ],
)
def test_sampler_logprobs_off_is_refused_where_they_are_needed(tmp_path, body, message):
    head = "student: {path: x}\nteacher: {path: y}\ndata: {train_path: z}\n"
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, head + body))
