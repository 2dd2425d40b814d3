"""Scoring a checkpoint into an evaluation file: `rim eval`, and a run's test files.

`rim eval` writes one JSON file per evaluation (`write_record`). A finished run's test
evaluation (`rim train --test`, what `rim sweep` and `rim demo` run for every job) scores
`RUN/best`, chosen on the valid split, on the recipe's `data.test` into `RUN/test_eval.json`
and on each `data.extra_tests` file into `RUN/test_eval.<file stem>.json`, in the process
that trained it: the same numbers as `rim eval --split test` (resp. `--data FILE`) with
`--timing-examples 0`, without a second start of Python and torch per file.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from rim.errors import RimError
from rim.io import atomic_file

TEST_EVAL = "test_eval.json"


def eval_files(extra_tests: list[str]) -> dict[str, str | None]:
    """Each test evaluation file of a run and the data it scores (None: `data.test`).

    >>> eval_files(["d/test_b.txt"])
    {'test_eval.json': None, 'test_eval.test_b.json': 'd/test_b.txt'}
    """
    return {TEST_EVAL: None} | {f"test_eval.{Path(p).stem}.json": p for p in extra_tests}


def write_record(res: dict, out: Path, checkpoint: str, data: str, decoder: str) -> None:
    """An evaluation's JSON file (atomic): its metrics, what was scored, per-example records."""
    record = {k: v for k, v in res.items() if k not in ("predictions", "records")}
    record |= {"checkpoint": checkpoint, "data": data}
    record |= {"decoder": decoder, "records": [asdict(x) for x in res["records"]]}
    atomic_file(out, json.dumps(record, indent=2))


def check_testable(cfg) -> None:
    """`rim train --test` on a recipe without `data.test`: refused before the training."""
    if cfg.data.test is None:
        raise RimError("--test: the recipe has no data.test to score best/ on (set data.test)")


def score_run(run: Path) -> dict[str, float]:
    """Score `run/best` on each test file (`eval_files`); returns accuracy by file name.

    One greedy evaluation per file with the method's default decoder, the recipe's
    `eval.batch_size` and no timing (speed is measured apart, every method in one process:
    `rim.timing`)."""
    import torch

    from rim.decoders import check_questions, default_for
    from rim.evaluation import evaluate
    from rim.reasoner import Reasoner
    from rim.sources import load_split, read_path

    r = Reasoner.load(str(run / "best"), "cuda" if torch.cuda.is_available() else "cpu")
    check_testable(r.config)
    decoder, scored = default_for(r.method), {}
    for name, path in eval_files(r.config.data.extra_tests).items():
        source = path or "data.test"
        if path is None:
            examples = load_split(r.config.data.test, "data.test")
        else:
            examples = read_path(path, key="data.extra_tests")
        where = lambda i, s=source: f"{s}: example {i + 1}"  # noqa: E731
        check_questions(r.method, r.model, [e.question for e in examples], None, False, where)
        res = evaluate(r.method, r.model, examples, r.config.eval.batch_size, None, decoder, 0)
        write_record(res, run / name, str(run / "best"), path or "test", decoder)
        print(f"[rim] test: {source}: accuracy {res['accuracy']:.3f} ({res['n']} examples)")
        scored[name] = res["accuracy"]
    return scored
