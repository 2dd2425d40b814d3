"""A GSM8K-Aug-*sized* training file for start-up and throughput measurements.

    python benchmarks/make_gsm8k_aug_385k.py runs/gsm8k_aug_385k.txt            # 385,620 lines
    python benchmarks/make_gsm8k_aug_385k.py OUT --n 10000 --seed 1 --distinct

RESAMPLED, NOT THE REAL AUG TRAIN SPLIT: the lines are drawn with replacement (seeded) from
the shipped `../shared/data/gsm8k_aug/valid.txt` and `test.txt` (1,819 iCoT lines in the
Aug format, `question||<<a=b>> <<c=d>> #### answer`), so the file has GSM8K-Aug's size and
per-example length distribution but only ~1.8k distinct problems. It measures how rim scales
with the number of examples (reading, tokenising, length checks); never train on it for
accuracy, and never report a score trained on it: it contains the test set.

`--distinct` appends ` (#N)` to the N-th question, so that no two questions are equal, as in
the real split (whose 385k questions are mostly distinct): a cache keyed by string then
saves nothing on questions, which is the honest case for start-up timings.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUG = ROOT.parent / "shared" / "data" / "gsm8k_aug"
N_AUG_TRAIN = 385_620  # GSM8K-Aug's train split (Deng et al. 2023)


def source_lines(folder: Path = AUG) -> list[str]:
    """The non-blank lines of the shipped valid and test files, in file order."""
    lines: list[str] = []
    for name in ("valid.txt", "test.txt"):
        text = (folder / name).read_text(encoding="utf-8")
        lines += [line for line in text.splitlines() if line.strip()]
    return lines


def resample(lines: list[str], n: int, seed: int) -> list[str]:
    """`n` lines drawn uniformly with replacement."""
    return random.Random(seed).choices(lines, k=n)


def distinct(lines: list[str]) -> list[str]:
    """Each line's question made unique by a ` (#N)` suffix (N counts from 1)."""
    return [line.replace("||", f" (#{n})||", 1) for n, line in enumerate(lines, 1)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="the file to write (iCoT text lines, .txt)")
    p.add_argument("--n", type=int, default=N_AUG_TRAIN, help="lines (default 385,620)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=AUG, help="folder with valid.txt and test.txt")
    p.add_argument("--distinct", action="store_true", help="make every question unique")
    args = p.parse_args(argv)
    lines = resample(source_lines(args.data), args.n, args.seed)
    if args.distinct:
        lines = distinct(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} resampled lines to {args.out}")


if __name__ == "__main__":
    main()
