"""The CLI's polish: --version, suggestions for a mistyped command, help with examples, and
overrides that remove a recipe key."""

import pytest

from opd.cli import main
from opd.config import ConfigError, check_resources, load_config

RECIPE = "recipes/reverse_kl/tiny.yaml"


def test_version_names_opd_and_its_engines(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in ("opd 0.1.0", "torch ", "vllm ", "ray ", "deepspeed "):
        assert name in out, out


@pytest.mark.parametrize(
    "argv, suggestion",
    [(["trian", "x"], "did you mean 'train'?"), (["valdate"], "did you mean 'validate'?")],
)
def test_a_mistyped_command_gets_a_suggestion(argv, suggestion, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert suggestion in capsys.readouterr().err


def test_help_shows_examples_and_the_benchmarks(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "opd train recipes/reverse_kl/tiny.yaml trainer.steps=10" in out
    assert "~dotted.key" in out
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    assert "math500-311" in capsys.readouterr().out


def test_a_key_is_removed_with_a_tilde(tiny_pair):
    paths = [
        f"student.path={tiny_pair['student']}",
        f"teacher.path={tiny_pair['teacher']}",
        f"data.train_path={tiny_pair['train']}",
        "data.completion_field=answer",
    ]
    # the reverse_kl recipe's estimator is no parameter of sft: refused, naming it
    leftover = load_config(RECIPE, [*paths, "objective.name=sft"])
    with pytest.raises(ConfigError, match="estimator"):
        check_resources(leftover)
    cfg = load_config(RECIPE, [*paths, "~objective.params", "objective.name=sft"])
    assert cfg.objective.name == "sft" and cfg.objective.params == {}
    check_resources(cfg)
    # one parameter alone, and a default restored where the recipe set it
    assert load_config(RECIPE, ["~objective.params.estimator"]).objective.params == {}
    assert load_config(RECIPE, ["~rollout.max_model_len"]).rollout.max_model_len == 1024
    with pytest.raises(ConfigError, match="has no key objective.nope to remove"):
        load_config(RECIPE, ["~objective.nope"])


def test_the_recipe_key_reference_is_the_schemas(capsys):
    """docs/recipes.md is `opd recipe keys`' output, every key of the schema with a meaning."""
    from pathlib import Path

    from opd.config.reference import keys

    assert main(["recipe", "keys"]) == 0
    printed = capsys.readouterr().out
    doc = Path(__file__).parents[2] / "docs/recipes.md"
    assert doc.read_text() == printed, "regenerate: opd recipe keys > docs/recipes.md"
    rows = keys()
    assert all(k.meaning for k in rows), [k.key for k in rows if not k.meaning]
    names = {k.key for k in rows}
    for key in ("run.seed", "teacher.route", "teachers", "rollout.max_staleness", "anchor.coef"):
        assert key in names and f"| `{key}` |" in printed
    by_key = {k.key: k for k in rows}
    assert by_key["learner.lr"].default == "1e-05"
    assert by_key["student.path"].default == "(required)"


def test_validate_checks_the_resources_of_the_machine_the_run_will_use(tiny_pair, capsys):
    paths = [
        f"student.path={tiny_pair['student']}",
        f"teacher.path={tiny_pair['teacher']}",
        f"data.train_path={tiny_pair['train']}",
    ]
    assert main(["validate", RECIPE, *paths]) == 0
    assert "resources: fit this machine" in capsys.readouterr().out
    # more CPUs than this machine gives Ray: refused before anything starts, naming the roles
    assert main(["validate", RECIPE, *paths, "learner.num_cpus=512"]) == 2
    err = capsys.readouterr().err
    assert "needs 513 CPU (rollout 0.5, teacher 0.5, learner 512)" in err, err
    assert "Traceback" not in err
    # a GPU recipe prepared on a machine without GPUs: said, not refused
    gpu = ["rollout.num_gpus=1", "teacher.num_gpus=1", "learner.num_gpus=1"]
    if not __import__("torch").cuda.is_available():
        assert main(["validate", RECIPE, *paths, *gpu]) == 0
        assert "asks for 3 GPUs and this machine has none" in capsys.readouterr().out
