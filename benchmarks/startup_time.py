"""Seconds from `rim train`'s process start to its first optimizer step, on a big data file.

    python benchmarks/make_gsm8k_aug_385k.py runs/gsm8k_aug_385k.txt
    python benchmarks/startup_time.py --data runs/gsm8k_aug_385k.txt            # GPT-2 RiM
    python benchmarks/startup_time.py --data FILE --config configs/gsm8k/gpt2_cot.yaml

Runs the recipe with a tiny model built from its config (`model.path=null`, `model.size`,
a word-level tokenizer built from the data, fp32 on CPU) and `train.log_every=1`, so the
first metrics.jsonl record is written right after the first optimizer step; then stops the
run (SIGKILL to the process it started) and prints the seconds, with the run's own `[rim]`
lines and the machine load (`os.getloadavg`), since other work on the CPU moves the number.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(config: str, data: str, out: Path, size: str, extra: list[str]) -> list[str]:
    sets = [
        "model.path=null",
        f"model.size={size}",
        f"data.train.path={data}",
        "train.mixed_precision=no",
        "train.log_every=1",
        "train.threads=2",
        *extra,
    ]
    rim = [sys.executable, "-m", "rim", "train", "--config", config, "--out", str(out)]
    return rim + [a for s in sets for a in ("--set", s)]


def time_to_first_step(cmd: list[str], metrics: Path, timeout: float) -> tuple[float, str]:
    """(seconds until `metrics` has a line, the run's output so far)."""
    log = tempfile.TemporaryFile(mode="w+")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        while time.perf_counter() - start < timeout:
            if metrics.exists() and metrics.read_text().strip():
                return time.perf_counter() - start, _read(log)
            if proc.poll() is not None:
                raise SystemExit(f"rim train exited {proc.returncode}:\n{_read(log)}")
            time.sleep(0.05)
        raise SystemExit(f"no optimizer step within {timeout:.0f} s:\n{_read(log)}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _read(log) -> str:
    log.seek(0)
    return log.read()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="the training file (data.train.path)")
    p.add_argument("--config", default="configs/gsm8k/gpt2_rim.yaml")
    p.add_argument("--size", default="tiny", help="model.size (rim.model.SIZES)")
    p.add_argument("--set", action="append", default=[], help="more recipe overrides")
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = command(args.config, str(Path(args.data).resolve()), out, args.size, args.set)
        load = os.getloadavg()
        seconds, output = time_to_first_step(cmd, out / "metrics.jsonl", args.timeout)
    lines = [x for x in output.splitlines() if x.startswith("[rim]")]
    print("\n".join(lines))
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"start-up (process start to first optimizer step): {seconds:.1f} s")


if __name__ == "__main__":
    main()
