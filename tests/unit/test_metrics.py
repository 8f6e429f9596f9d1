"""metrics.jsonl survives a kill at any moment: a resume's rewrite is atomic, a torn last line
is dropped with a warning, and a bad line elsewhere is an error naming the file and line."""

import json
import subprocess
import sys
import textwrap

import pytest

from opd.metrics import MetricsLog, read_metrics


def _lines(n):
    return "".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n" for s in range(n))


def test_resume_drops_lines_past_its_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(6))
    log = MetricsLog(path, resume_step=3)
    log.write(4, {"loss": 0.5, "bad": float("nan")})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[-1] == {"step": 4, "bad": None, "loss": 0.5}


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(4) + '{"step": 4, "lo')
    MetricsLog(path, resume_step=3)
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3]
    assert "torn last line" in capsys.readouterr().err
    assert path.read_text().endswith("\n")


def test_a_bad_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = _lines(4).splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + "garbage\n" + "".join(lines[2:]))
    with pytest.raises(Exception, match=rf"{path}, line 3"):
        MetricsLog(path, resume_step=3)
    assert path.read_text().count("\n") == 5  # left as it was


def test_a_kill_during_the_resume_rewrite_keeps_the_old_file(tmp_path):
    """SIGKILL at the rewrite's first write (before the new content is complete)."""
    path = tmp_path / "metrics.jsonl"
    before = _lines(50)
    path.write_text(before)
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from opd.metrics import MetricsLog

        def hook(frame, event, arg):
            if event == "c_call" and getattr(arg, "__name__", "") == "write":
                os.kill(os.getpid(), signal.SIGKILL)

        sys.setprofile(hook)
        MetricsLog({str(path)!r}, resume_step=20)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -9
    assert path.read_text() == before
    MetricsLog(path, resume_step=20)  # the next resume goes through
    assert [r["step"] for r in read_metrics(path)] == list(range(21))
