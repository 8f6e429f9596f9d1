"""`opd eval`: outputs are checked before any work and written atomically; `--completions`
reports its coverage and refuses what it cannot grade, naming the file and line."""

import json
import subprocess
import sys

import pytest

from opd.cli import main
from opd.eval.runner import Graded, write_report

PROBLEMS = [{"id": f"p{i}", "question": f"{i}+1?", "answer": str(i + 1)} for i in range(4)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def bench(tmp_path):
    return _jsonl(tmp_path / "mine.jsonl", PROBLEMS)


def _right(i, sample=None):
    row = {"id": f"p{i}", "completion": f"\\boxed{{{i + 1}}}"}
    return row if sample is None else {**row, "sample": sample}


def _run(capsys, bench, completions, out=None, *extra):
    argv = ["eval", "--benchmark", str(bench), "--completions", str(completions)]
    argv += ["--out", str(out)] if out is not None else []
    code = main(argv + list(extra))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.err


# ---------------------------------------------------------------- --out


def test_out_under_a_file_is_refused_before_grading(tmp_path, capsys, bench):
    completions = _jsonl(tmp_path / "c.jsonl", [_right(i) for i in range(4)])
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder\n")
    code, err = _run(capsys, bench, completions, blocker / "sub" / "eval.json")
    assert code == 2 and f"{blocker} is a file" in err
    # a bad completions file is not read: the output was refused first
    code, err = _run(capsys, bench, tmp_path / "missing.jsonl", blocker / "eval.json")
    assert code == 2 and "is a file" in err


def test_out_that_is_a_folder_is_refused(tmp_path, capsys, bench):
    completions = _jsonl(tmp_path / "c.jsonl", [_right(i) for i in range(4)])
    (tmp_path / "out.json").mkdir()
    code, err = _run(capsys, bench, completions, tmp_path / "out.json")
    assert code == 2 and "is a folder" in err


def test_existing_out_needs_overwrite_and_is_replaced_whole(tmp_path, capsys, bench):
    completions = _jsonl(tmp_path / "c.jsonl", [_right(i) for i in range(4)])
    out = tmp_path / "deep" / "er" / "eval.json"
    assert _run(capsys, bench, completions, out)[0] == 0  # missing folders are created
    out.write_text("earlier results\n")
    code, err = _run(capsys, bench, completions, out)
    assert code == 2 and str(out) in err and "--overwrite" in err
    assert out.read_text() == "earlier results\n"
    assert _run(capsys, bench, completions, out, "--overwrite")[0] == 0
    assert json.loads(out.read_text())["pass@1"] == 1.0
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval.json", "eval.records.jsonl"]


def test_a_failed_write_leaves_the_earlier_report(tmp_path):
    out = tmp_path / "eval.json"
    ok = [Graded("p0", 0, "x", True, "1")]
    write_report(out, {"pass@1": 1.0}, ok)
    before = (out.read_text(), out.with_name("eval.records.jsonl").read_text())
    unserializable = [Graded("p0", 0, object(), True, "1")]  # fails halfway through the records
    with pytest.raises(TypeError):
        write_report(out, {"pass@1": 0.0}, unserializable)
    assert (out.read_text(), out.with_name("eval.records.jsonl").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.records.jsonl"]


def test_bad_numbers_are_refused_by_the_parser(tmp_path, capsys, bench):
    completions = _jsonl(tmp_path / "c.jsonl", [_right(0)])
    for flag, value in (("--samples", "0"), ("--limit", "0"), ("--temperature", "-1")):
        with pytest.raises(SystemExit) as e:
            _run(capsys, bench, completions, None, flag, value)
        assert e.value.code == 2
        assert flag in capsys.readouterr().err


# ---------------------------------------------------------------- --completions


def test_partial_coverage_is_reported_and_warned(tmp_path, capsys, bench):
    completions = _jsonl(tmp_path / "c.jsonl", [_right(0), _right(2)])
    out = tmp_path / "eval.json"
    code, err = _run(capsys, bench, completions, out)
    assert code == 0 and "warning" in err and "2/4 problems" in err
    summary = json.loads(out.read_text())
    assert summary["coverage"] == "2/4 problems" and summary["n_problems"] == 2


def test_several_rows_per_id_are_samples_and_explicit_repeats_are_refused(tmp_path, capsys, bench):
    rows = [_right(i) for i in range(4)] + [{"id": f"p{i}", "completion": "no"} for i in range(4)]
    out = tmp_path / "eval.json"
    code, err = _run(capsys, bench, _jsonl(tmp_path / "c.jsonl", rows), out)
    assert code == 0 and "warning" not in err
    summary = json.loads(out.read_text())
    assert summary["samples_per_problem"] == 2 and summary["pass@1"] == 0.5
    assert summary["coverage"] == "4/4 problems"
    # the same (id, sample) twice
    rows = [_right(i, 0) for i in range(4)] + [_right(1, 1), _right(1, 0)]
    code, err = _run(capsys, bench, _jsonl(tmp_path / "d.jsonl", rows), tmp_path / "d.json")
    assert code == 2 and "d.jsonl:6" in err and "line 2" in err and "'p1'" in err
    # 'sample' on some rows only
    rows = [_right(0, 0), _right(1)]
    code, err = _run(capsys, bench, _jsonl(tmp_path / "e.jsonl", rows), tmp_path / "e.json")
    assert code == 2 and "e.jsonl:2" in err and "'sample'" in err


def test_exact_repeated_rows_are_warned(tmp_path, capsys, bench):
    rows = [_right(i) for i in range(4)] * 2  # e.g. a file concatenated to itself
    code, err = _run(capsys, bench, _jsonl(tmp_path / "c.jsonl", rows), tmp_path / "e.json")
    assert code == 0 and "4 rows repeat an earlier row" in err and "line 5 repeats line 1" in err


def test_unknown_ids_are_counted_with_examples(tmp_path, capsys, bench):
    rows = [_right(0)] + [{"id": f"q{i}", "completion": "x"} for i in range(5)]
    code, err = _run(capsys, bench, _jsonl(tmp_path / "c.jsonl", rows), tmp_path / "e.json")
    assert code == 2 and "c.jsonl: 5 of 6 rows" in err
    assert "line 2: 'q0'" in err and "'p0'" in err  # an example of the ids it knows


@pytest.mark.parametrize(
    "content, says",
    [
        (b'{"id": "p0", "completion": "a"}\n{"id": "p1", "completion": "caf\xe9"}\n', "c.jsonl:2"),
        (b'{"id": "p0", "completion": "a"}\n\n{"id": "p1", oops}\n', "c.jsonl:3: not valid JSON"),
        (b'{"id": "p0", "completion": null}\n', "c.jsonl:1: 'completion' must be text"),
        (b'["p0", "a"]\n', "c.jsonl:1: expected a JSON object"),
        (b"\n\n", "no completions"),
    ],
)
def test_unreadable_completions_name_file_and_line(tmp_path, capsys, bench, content, says):
    (tmp_path / "c.jsonl").write_bytes(content)
    code, err = _run(capsys, bench, tmp_path / "c.jsonl", tmp_path / "e.json")
    assert code == 2 and says in err
    assert not (tmp_path / "e.json").exists()


def test_folder_or_missing_completions_are_clear_errors(tmp_path, capsys, bench):
    code, err = _run(capsys, bench, tmp_path, tmp_path / "e.json")
    assert code == 2 and "is a folder" in err
    code, err = _run(capsys, bench, tmp_path / "nope.jsonl", tmp_path / "e.json")
    assert code == 2 and "completions file not found" in err and "nope.jsonl" in err


def test_the_entry_point_answers_without_a_traceback(tmp_path, bench):
    proc = subprocess.run(
        [sys.executable, "-m", "opd.cli", "eval", "--benchmark", str(bench)]
        + ["--completions", str(tmp_path), "--out", str(tmp_path / "e.json")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is a folder" in proc.stderr
