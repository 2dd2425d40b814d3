"""Facts about the machine that results are reported with (float sums differ between CPUs)."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo`), else what `platform` knows.

    Training is reproducible on one CPU model, not across them (summation order differs),
    so every reported result names it.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"
