"""`rim bench KIND ...` (the parser lives in `rim.cli`): run one benchmark, print it."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import torch

from rim.bench.any_block import any_block_bench
from rim.bench.latency import latency_bench
from rim.bench.tables import format_any_block, format_latency, format_train
from rim.bench.training import train_bench
from rim.errors import RimError

DEFAULTS = {  # per bench kind: model, batch, question tokens, timed runs
    "latency": dict(model="gpt2", batch=1, question_tokens=100, runs=20),
    "train": dict(model="small", batch=16, question_tokens=60, runs=10),
    "any-block": dict(model="tiny", batch=64, question_tokens=30, runs=7),
}


def run_bench(args) -> dict:
    """Run `args.kind`, print a table or JSON (`args.json`), return the JSON result.

    `--threads` holds only for the run: torch's thread count is restored afterwards.
    """
    kind = args.kind
    d = DEFAULTS[kind]

    def arg(name: str, default=None):
        v = getattr(args, name, None)
        return d.get(name, default) if v is None else v

    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return _run(args, kind, arg)
    finally:
        torch.set_num_threads(threads)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(args, kind: str, arg: Callable) -> dict:
    common = dict(
        model=arg("model"),
        device=arg("device", "cpu"),
        dtype=arg("dtype", "float32"),
        batch=arg("batch"),
        question_tokens=arg("question_tokens"),
        runs=arg("runs"),
        warmup=arg("warmup", 2),
        log=_log,
    )
    if kind == "latency":
        res = latency_bench(
            cot_tokens=arg("cot_tokens", 26),
            answer_tokens=arg("answer_tokens", 3),
            thoughts=arg("thoughts", 6),
            **common,
        )
        text = format_latency(res)
    elif kind == "train":
        res = train_bench(thoughts=arg("thoughts", 6), **common)
        text = format_train(res)
    elif kind == "any-block":
        common["warmup"] = min(common["warmup"], 1)
        res = any_block_bench(answer_tokens=arg("answer_tokens", 3), **common)
        text = format_any_block(res)
    else:
        raise RimError(f"bench: unknown kind {kind!r}")
    print(json.dumps(res, indent=2) if getattr(args, "json", False) else text)
    return res
