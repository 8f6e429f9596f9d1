"""Start-up phases are shown as they happen, each with its time."""

import io
import time

from opd.progress import Phases


def test_each_phase_prints_when_it_starts_and_its_time_when_it_ends():
    out = io.StringIO()
    phases = Phases(stream=out)
    with phases("starting Ray"):
        assert out.getvalue() == "opd: starting Ray ...\n"  # before the work, not after
        time.sleep(0.05)
    line = out.getvalue().splitlines()[1]
    assert line.startswith("opd: starting Ray: ") and line.endswith(" s")
    assert float(line.split(": ")[-1][:-2]) >= 0.05 - 1e-9 or phases.times["starting Ray"] >= 0.05
    quiet = io.StringIO()
    with Phases(enabled=False, stream=quiet)("x"):
        pass
    assert quiet.getvalue() == ""
