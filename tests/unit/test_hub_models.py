"""Hugging Face hub ids as model paths, resolved through the standard hub cache; tested
offline against a cache built here (the machine has no route to the hub)."""

import os
import shutil
import subprocess
import sys

import pytest


def _hub_cache(root, repo: str, model_dir) -> None:
    """The hub cache's layout for `repo` at one revision: refs/main -> snapshots/<sha>/."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, base / "snapshots" / sha)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(sha)


def _run(code_or_args, env, cli=False):
    cmd = (
        [sys.executable, "-m", "opd.cli", *code_or_args]
        if cli
        else [sys.executable, "-c", code_or_args]
    )
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_a_hub_id_is_read_from_the_local_hub_cache(tiny_pair, tmp_path):
    cache = tmp_path / "hub"
    cache.mkdir()
    _hub_cache(cache, "opd-test/tiny-teacher", tiny_pair["teacher"])
    _hub_cache(cache, "opd-test/tiny-student", tiny_pair["student"])
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = _run(
        "from opd.models.sources import resolve_model;"
        "print(resolve_model('opd-test/tiny-teacher'))",
        env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    folder = out.stdout.strip().splitlines()[-1]
    assert folder.startswith(str(cache)) and os.path.isfile(os.path.join(folder, "config.json"))

    recipe = [
        "validate",
        "recipes/reverse_kl/tiny.yaml",
        "student.path=opd-test/tiny-student",
        "teacher.path=opd-test/tiny-teacher",
        f"data.train_path={tiny_pair['train']}",
    ]
    out = _run(recipe, env, cli=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "teacher: opd-test/tiny-teacher" in out.stdout and '"vocab_size"' in out.stdout

    # not in the cache, offline: named, with what to do, and no traceback
    out = _run([*recipe, "teacher.path=opd-test/absent"], env, cli=True)
    assert out.returncode == 0  # validation never downloads: it says when it will
    assert "downloaded when the run starts" in out.stdout
    out = _run(
        "from opd.models.sources import resolve_model; resolve_model('opd-test/absent')", env
    )
    assert "opd-test/absent is neither a local path nor in the Hugging Face cache" in out.stderr


def test_local_paths_are_not_taken_for_hub_ids(tmp_path, monkeypatch):
    from opd.models.sources import hub_folder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert hub_folder("runs/student") is None  # under a local folder: a local path
    assert hub_folder("registry:tiny-teacher") is None
    assert hub_folder("/abs/path") is None
    with pytest.raises(FileNotFoundError, match="model not found: runs/student"):
        from opd.models.sources import resolve_model

        resolve_model("runs/student")
