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

# Per bench kind, its own options and their defaults (`rim bench KIND --help` lists these
# only, besides --device, --dtype, --threads and --json).
DEFAULTS = {
    "latency": dict(model="gpt2", batch=1, question_tokens=100, cot_tokens=26, answer_tokens=3,
                    thoughts=6, runs=20, warmup=2),
    "train": dict(model="small", batch=16, question_tokens=60, thoughts=6, runs=10, warmup=2),
    "any-block": dict(model="tiny", batch=64, question_tokens=30, answer_tokens=3, runs=7,
                      warmup=1),
}  # fmt: skip
OPTION_HELP = {  # `rim bench KIND --help`, with the kind's default
    "model": "gpt2 | llama-1b | llama-3b | tiny | small | base | a model folder",
    "batch": "batch size",
    "question_tokens": "question length in tokens",
    "cot_tokens": "CoT reasoning tokens generated",
    "answer_tokens": "answer tokens generated",
    "thoughts": "Coconut continuous thoughts",
    "runs": "timed runs",
    "warmup": "untimed runs first",
}
# What each kind measures: (the line of `rim bench --help`, `rim bench KIND --help`'s text).
MODES = {
    "latency": (
        "time to first answer token and full-answer latency per method",
        "Time to first answer token (TTFT) and full-answer latency, median ms, of direct, RiM "
        "(K=8 blocks of M=2), Coconut and CoT decoding, each against a plain transformers "
        "greedy loop on the same inputs (our code path's overhead). Random-init model of a "
        "named size with its family's real vocabulary, or a local model folder.",
    ),
    "train": (
        "examples/s and peak memory of one training step",
        "Examples/s and peak memory of one training step (forward, backward, AdamW): stage-1 "
        "RiM packed (all K readouts in one pass) against naive (one pass per readout) and "
        "against Coconut at its last stage.",
    ),
    "any-block": (
        "evaluation time answering after every block against after the last",
        "Wall time of rim.evaluation.evaluate answering after every memory block (any-block) "
        "against after the last block only, on questions of mixed lengths.",
    ),
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
        warmup=arg("warmup"),
        log=_log,
    )
    if kind == "latency":
        res = latency_bench(
            cot_tokens=arg("cot_tokens"),
            answer_tokens=arg("answer_tokens"),
            thoughts=arg("thoughts"),
            **common,
        )
        text = format_latency(res)
    elif kind == "train":
        res = train_bench(thoughts=arg("thoughts"), **common)
        text = format_train(res)
    elif kind == "any-block":
        res = any_block_bench(answer_tokens=arg("answer_tokens"), **common)
        text = format_any_block(res)
    else:
        raise RimError(f"bench: unknown kind {kind!r}")
    print(json.dumps(res, indent=2) if getattr(args, "json", False) else text)
    return res
