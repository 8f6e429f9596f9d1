"""`opd validate` refuses values that would fail later or mean nothing, naming the key or file.

Every case goes through the checks `opd validate` and `opd train` both run before starting
anything (`load_config` + `check_resources`), and the CLI answers exit code 2 with one line.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from opd.cli import main
from opd.config import ConfigError, check_resources, load_config

MODELS = "student: {path: 'registry:tiny-student'}\nteacher: {path: 'registry:tiny-teacher'}\n"


def _data(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _recipe(tmp_path, data, models=MODELS, eval_="heldout_prompts: 1"):
    p = tmp_path / "r.yaml"
    p.write_text(f"{models}data: {{train_path: '{data}'}}\neval: {{{eval_}}}\n")
    return p


def _check(recipe, overrides=()):
    return check_resources(load_config(recipe, list(overrides)))


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "override",
    [
        "eval.heldout_samples=0",
        "eval.benchmark_samples=0",
        "eval.benchmark_samples=-2",
        "eval.benchmark_limit=0",
        "eval.benchmark_limit=-1",
        "eval.benchmark_max_tokens=0",
        "eval.max_new_tokens=0",
        "eval.benchmark_temperature=-0.5",
        "cluster.num_cpus=0",
        "cluster.num_cpus=-4",
        "rollout.num_cpus=0",
        "rollout.num_cpus=-1",
        "teacher.num_cpus=0",
        "learner.num_cpus=0",
        "rollout.num_gpus=-1",
        "teacher.num_gpus=-0.5",
        "learner.num_gpus=1.5",
        "teacher.logprob_chunk_tokens=0",
        "teacher.logprob_chunk_tokens=-8",
        "learner.warmup_steps=-1",
        "learner.weight_decay=-0.1",
        "learner.betas=[0.9,1.5]",
        "rollout.gpu_memory_utilization=1.5",
        "rollout.kv_cache_memory_bytes=0",
    ],
)
def test_meaningless_numbers_are_refused_naming_the_key(tmp_path, override):
    recipe = _recipe(tmp_path, _data(tmp_path, [{"question": "q"}] * 4))
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(recipe, [override])


def test_eval_budgets_must_fit_the_model_length(tmp_path):
    recipe = _recipe(tmp_path, _data(tmp_path, [{"question": "q"}] * 4))
    fits = ["rollout.max_model_len=1024", "data.max_prompt_tokens=512"]
    with pytest.raises(ConfigError, match=r"eval\.benchmark_max_tokens=1024"):
        load_config(
            recipe, fits + ["eval.benchmarks=[gsm8k-100]", "eval.benchmark_max_tokens=1024"]
        )
    with pytest.raises(ConfigError, match=r"eval\.max_new_tokens=600"):
        load_config(recipe, fits + ["eval.max_new_tokens=600"])


def test_unknown_benchmark_lists_the_valid_names(tmp_path, capsys):
    data = _data(tmp_path, [{"question": "q"}] * 4)
    recipe = _recipe(tmp_path, data, eval_="heldout_prompts: 1, benchmarks: [gsm8k]")
    with pytest.raises(ConfigError, match=r"eval\.benchmarks.*'gsm8k'.*gsm8k-100.*humaneval"):
        _check(recipe)
    err = _cli_error(capsys, ["validate", str(recipe)])
    assert "eval.benchmarks" in err and "gsm8k-100" in err
    # a benchmark may also be the user's own file
    mine = _data(tmp_path, [{"question": "1+1?", "answer": "2"}], "mine.jsonl")
    _check(recipe, [f"eval.benchmarks=[{mine}]"])


def test_empty_data_file_is_named(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    recipe = _recipe(tmp_path, empty)
    with pytest.raises(ConfigError, match=r"data\.train_path: .*empty\.jsonl.*no rows"):
        _check(recipe)
    # `opd train` refuses it the same way, before starting anything
    err = _cli_error(capsys, ["train", str(recipe)])
    assert "empty.jsonl" in err and "no rows" in err


@pytest.fixture(scope="module")
def tokenizer_only_model(tmp_path_factory):
    """A model folder validation can read: config.json and a tokenizer, no weights."""
    from opd.models.tiny import build_tokenizer

    folder = tmp_path_factory.mktemp("tok_model")
    build_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps({"vocab_size": 384}))
    return folder


def test_prompts_too_long_for_the_run_are_refused(tmp_path, tokenizer_only_model):
    model = tokenizer_only_model
    models = f"student: {{path: '{model}'}}\nteacher: {{path: '{model}'}}\n"
    long = _data(tmp_path, [{"question": "apples " * 200}] * 3, "long.jsonl")
    recipe = _recipe(tmp_path, long, models=models)
    with pytest.raises(
        ConfigError, match=r"data\.train_path: .*long\.jsonl.*none of its 3 prompts"
    ):
        _check(recipe, ["data.max_prompt_tokens=64"])
    # some fit, but eval.heldout_prompts takes them all
    mixed = _data(tmp_path, [{"question": "x"}, {"question": "apples " * 200}], "mixed.jsonl")
    with pytest.raises(ConfigError, match=r"eval\.heldout_prompts=1.*none to train on"):
        _check(recipe, [f"data.train_path={mixed}", "data.max_prompt_tokens=64"])
    ok = _data(tmp_path, [{"question": "x"}] * 3 + [{"question": "apples " * 200}], "ok.jsonl")
    notes = _check(recipe, [f"data.train_path={ok}", "data.max_prompt_tokens=64"])
    assert any("1 of 4" in n and "dropped" in n for n in notes), notes


def test_top_level_list_is_not_a_recipe(tmp_path, capsys):
    p = tmp_path / "list.yaml"
    p.write_text("- run: {seed: 1}\n- trainer: {steps: 2}\n")
    with pytest.raises(ConfigError, match=r"list\.yaml.*mapping"):
        load_config(p)
    p.write_text("just a string\n")
    with pytest.raises(ConfigError, match=r"list\.yaml.*mapping"):
        load_config(p)
    proc = subprocess.run(
        [sys.executable, "-m", "opd.cli", "validate", str(p)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "list.yaml" in proc.stderr and "mapping" in proc.stderr


@pytest.mark.parametrize(
    "import_path, says",
    [
        ("no_such_module_xyz:Loss", "no_such_module_xyz"),
        ("opd.objectives:NoSuchLoss", "NoSuchLoss"),
        ("json:dumps", "not a class"),
        ("collections:OrderedDict", "not an objective"),
        ("broken_objective_mod:Loss", "RuntimeError"),
        ("just_a_module", "pkg.mod:Class"),
    ],
)
def test_broken_import_path_names_the_key(tmp_path, monkeypatch, capsys, import_path, says):
    (tmp_path / "broken_objective_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = _recipe(tmp_path, _data(tmp_path, [{"question": "q"}] * 4))
    with pytest.raises(ConfigError, match=r"objective\.import_path") as e:
        _check(recipe, [f"objective.import_path={import_path}"])
    assert says in str(e.value)
    err = _cli_error(capsys, ["validate", str(recipe), f"objective.import_path={import_path}"])
    assert "objective.import_path" in err


@pytest.mark.parametrize("value", [None, 7, {"text": "q"}, ["q"], ""])
def test_a_prompt_that_is_not_text_names_file_line_and_field(tmp_path, capsys, value):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "fine"}\n\n' + json.dumps({"question": value}) + "\n")
    recipe = _recipe(tmp_path, path)
    with pytest.raises(ConfigError, match=r"d\.jsonl:3.*'question'"):
        _check(recipe)
    err = _cli_error(capsys, ["validate", str(recipe)])
    assert "d.jsonl:3" in err and "question" in err


def test_missing_demonstration_field_is_named(tmp_path):
    data = _data(tmp_path, [{"question": "q", "demo": "a"}, {"question": "q"}])
    recipe = _recipe(tmp_path, data)
    with pytest.raises(ConfigError, match=r"d\.jsonl:2.*'demo'.*data\.demonstration_field"):
        _check(recipe, ["data.demonstration_field=demo"])


def test_non_utf8_line_is_named(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"question": "fine"}\n{"question": "caf\xe9"}\n')
    recipe = _recipe(tmp_path, path)
    with pytest.raises(ConfigError, match=r"data\.train_path: .*d\.jsonl:2.*UTF-8"):
        _check(recipe)
    err = _cli_error(capsys, ["validate", str(recipe)])
    assert "d.jsonl:2" in err


def test_validate_cli_names_a_bad_number(tmp_path):
    recipe = _recipe(tmp_path, _data(tmp_path, [{"question": "q"}] * 4))
    proc = subprocess.run(
        [sys.executable, "-m", "opd.cli", "validate", str(recipe), "cluster.num_cpus=0"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cluster.num_cpus=0" in proc.stderr
