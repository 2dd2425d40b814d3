"""`rim bench KIND ...` (the parser lives in `rim.cli`): run one benchmark, print it."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import torch

from rim.bench.any_block import any_block_bench
from rim.bench.latency import latency_bench
from rim.bench.tables import format_any_block, format_latency, format_train, format_train_data
from rim.bench.train_data import data_train_bench
from rim.bench.training import train_bench
from rim.errors import RimError

# Per bench kind, its own options and their defaults (`rim bench KIND --help` lists these
# only, besides --device, --dtype, --threads and --json).
DEFAULTS = {
    "latency": dict(model="gpt2", batch=1, question_tokens=100, cot_tokens=26, answer_tokens=3,
                    thoughts=6, loops=0, runs=20, warmup=2),
    "train": dict(model="small", batch=16, question_tokens=60, thoughts=6, runs=10, warmup=2,
                  data="", micro_batch=8),
    "any-block": dict(model="tiny", batch=64, question_tokens=30, answer_tokens=3, runs=7,
                      warmup=1),
}  # fmt: skip
# `rim bench train --data FILE`: its own defaults where they differ (a GPT-2 step on real text
# takes seconds on a CPU); `--runs` timed steps per variant, one epoch of a pool of
# batch x runs examples
DATA_DEFAULTS = {"train": dict(batch=8, runs=8, warmup=1)}
OPTION_HELP = {  # `rim bench KIND --help`, with the kind's default
    "model": "gpt2 | llama-1b | llama-3b | tiny | small | base | a model folder",
    "batch": "batch size",
    "question_tokens": "question length in tokens",
    "cot_tokens": "CoT reasoning tokens generated",
    "answer_tokens": "answer tokens generated",
    "thoughts": "Coconut continuous thoughts",
    "loops": "RiM's memory.loops: R passes over the blocks after the prefill",
    "runs": "timed runs",
    "warmup": "untimed runs first",
    "data": "an iCoT-format (or JSON) data file: real text, five variants against plain causal "
    "fine-tuning (default: none, synthetic words)",
    "micro_batch": "examples per forward pass, with --data",
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
        "training throughput and peak memory (real text with --data)",
        "With --data FILE: real (non-padding) tokens/s, step time and peak memory of a "
        "training step (forward, backward, AdamW) on FILE's examples for causal-packed (plain "
        "causal fine-tuning of the CoT text, padding-free as HF's DataCollatorWithFlattening), "
        "RiM stage 1 and 2 on the new path, RiM stage 1 as trained before issue 29, and naive "
        "(one pass per readout). Without: examples/s of stage-1 RiM packed against naive and "
        "Coconut on a synthetic batch of random words.",
    ),
    "any-block": (
        "evaluation time answering after every block against after the last",
        "Wall time of rim.evaluation.evaluate answering after every memory block (any-block) "
        "against after the last block only, on questions of mixed lengths.",
    ),
}


def option_help(kind: str, name: str) -> str:
    """`rim bench KIND --help`'s line for option `name`, with its default(s)."""
    value, data = DEFAULTS[kind][name], DATA_DEFAULTS.get(kind, {}).get(name)
    default = "" if value == "" else f" (default {value}{f'; {data} with --data' if data else ''})"
    return OPTION_HELP[name] + default


def run_bench(args) -> dict:
    """Run `args.kind`, print a table or JSON (`args.json`), return the JSON result.

    `--threads` holds only for the run: torch's thread count is restored afterwards.
    """
    kind = args.kind
    d = DEFAULTS[kind] | (DATA_DEFAULTS.get(kind, {}) if getattr(args, "data", None) else {})

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
            loops=arg("loops"),
            **common,
        )
        text = format_latency(res)
    elif kind == "train" and arg("data"):
        del common["question_tokens"]
        res = data_train_bench(data=arg("data"), micro_batch=arg("micro_batch"), **common)
        text = format_train_data(res)
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
