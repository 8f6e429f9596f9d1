"""Teacher signals: name -> `Signal` (one module each; `opd.signals.base` says what one holds).

A new signal is a module with a `Signal` subclass, registered here."""

from __future__ import annotations

from opd.signals.aligned import Aligned
from opd.signals.at_ids import AtIds
from opd.signals.base import Scores, Signal, TeacherRequest
from opd.signals.full import Full
from opd.signals.sampled import Sampled

SIGNALS: dict[str, Signal] = {s.name: s for s in (Sampled(), AtIds(), Full(), Aligned())}

__all__ = ["SIGNALS", "Scores", "Signal", "TeacherRequest", "signal_of"]


def signal_of(request) -> Signal:
    """The `Signal` that serves `request` (a `TeacherRequest`)."""
    try:
        return SIGNALS[request.signal]
    except KeyError:
        raise ValueError(
            f"teacher signal {request.signal!r} is unknown; valid: {', '.join(SIGNALS)}"
        ) from None
