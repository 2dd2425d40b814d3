"""Progress for long work: a live bar on a terminal, a few plain lines in a log.

A tqdm bar redraws itself with carriage returns; written to a file (CI, `make demo > log`)
that becomes one line of 100,000+ characters. So the bar is shown only when both standard
streams are terminals; otherwise callers print one line per event and `Status` lets a
status line through at most every `STATUS_EVERY` seconds. `RIM_NO_PROGRESS=1` (set for
child processes and tests) turns both off.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

STATUS_EVERY = 30.0  # seconds between status lines in a log


def enabled() -> bool:
    """Progress output is wanted at all (not silenced by RIM_NO_PROGRESS=1)."""
    return os.environ.get("RIM_NO_PROGRESS") != "1"


def live() -> bool:
    """A redrawing bar is wanted: progress enabled and both streams are terminals."""
    return enabled() and sys.stdout.isatty() and sys.stderr.isatty()


class Status:
    """Rate limit for log status lines: `due()` is true at most once per `every` seconds.

    >>> t = iter([0.0, 10.0, 31.0, 40.0])
    >>> s = Status(every=30.0, clock=lambda: next(t))
    >>> [s.due(), s.due(), s.due()]
    [False, True, False]
    """

    def __init__(self, every: float = STATUS_EVERY, clock: Callable[[], float] = time.monotonic):
        self.every, self.clock = every, clock
        self.last = clock()

    def due(self) -> bool:
        now = self.clock()
        if now - self.last < self.every:
            return False
        self.last = now
        return True
