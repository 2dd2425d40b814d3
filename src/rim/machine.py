"""Facts about the machine that results are reported with (float sums differ between CPUs)."""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Machine:
    """What a timing or accuracy was measured on, read once (`describe`)."""

    cpu: str
    cores: int | None
    torch_threads: int
    device: str  # "cpu" | "cuda" (the device type)
    gpu: str | None
    torch: str
    transformers: str
    python: str
    platform: str
    load_avg: tuple[float, float, float] | None  # None where the OS has no load average

    def bench_dict(self) -> dict:
        """The `machine` entry of `rim bench --json` (tables.py and docs read these keys)."""
        info = {
            "cpu": self.cpu,
            "cores": self.cores,
            "torch_threads": self.torch_threads,
            "device": self.device,
            "torch": self.torch,
            "transformers": self.transformers,
            "python": self.python,
        }
        if self.gpu is not None:
            info["gpu"] = self.gpu
        if self.load_avg is not None:
            info["load_avg_1m"] = round(self.load_avg[0], 2)
        return info

    def demo_dict(self, workers: int) -> dict:
        """The `machine` entry of the demo's results.json, with the one-line `summary`."""
        info = {
            "platform": self.platform,
            "python": self.python,
            "torch": self.torch,
            "transformers": self.transformers,
            "cpu": self.cpu,
            "cpu_count": self.cores,
            "device": self.device,
            "gpu": self.gpu,
            "workers": workers,
            "threads_per_job": 1,
            "load_average_at_start": None if self.load_avg is None else list(self.load_avg),
        }
        where = self.gpu or (
            f"CPU {self.cpu} ({self.cores} cores, {workers} parallel jobs, 1 thread each)"
        )
        info["summary"] = (
            f"{where}; {self.platform}; Python {self.python}, torch "
            f"{self.torch}, transformers {self.transformers}"
        )
        return info

    def busy_note(self) -> list[str]:
        """A warning when other processes share the CPU (timings are then noisy).

        `load_avg` must be read before the measured work (`describe(..., load_avg=)`): the
        1-minute average read afterwards counts the run itself and calls an idle machine busy.
        """
        cores = self.cores or 1
        if self.load_avg is None or self.load_avg[0] <= 0.75 * cores:
            return []
        hint = "; threads > 1 suffer most (try --threads 1)" if self.device == "cpu" else ""
        return [
            f"machine busy: load average {self.load_avg[0]:.1f} on {cores} cores before the "
            f"run, timings are noisy{hint}"
        ]


def load_average() -> tuple[float, float, float] | None:
    """The OS load average (1, 5, 15 minutes); None where the OS has none."""
    with contextlib.suppress(OSError, AttributeError):
        return tuple(os.getloadavg())
    return None


_NOW = object()


def describe(device, load_avg=_NOW) -> Machine:
    """The machine now: CPU, library versions, torch threads, load, and the GPU of `device`.

    `load_avg`: a `load_average()` read earlier (a benchmark reads it before its own run),
    else the load now.
    """
    import torch
    import transformers

    dev = torch.device(device)
    load = load_average() if load_avg is _NOW else load_avg
    return Machine(
        cpu=cpu_model(),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        device=dev.type,
        gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        load_avg=load,
    )
