"""Benchmarks: `rim bench latency | train | any-block` (docs/benchmarks.md has the numbers).

    rim bench latency --model gpt2 --device cpu --json
    rim bench train --model small --json
    rim bench any-block --model tiny

latency    TTFT and full-answer latency of direct, RiM (K=8, M=2), Coconut and CoT on a
           random-init model of a named architecture (with the real vocabulary size of its
           family: the LM head matters) or on local weights, against a plain transformers
           loop on the same inputs (`latency.py`).
train      With `--data FILE`: real tokens/s, step time and peak memory of RiM training on
           the file's examples against plain causal fine-tuning of their CoT text, RiM as
           trained before issue 29 and naive (`train_data.py`). Without: examples/s of one
           stage-1 RiM step on random words, packed against naive and Coconut (`training.py`).
any-block  `rim.evaluation.evaluate` answering after all K blocks against after the last only
           (`any_block.py`).

Random models never stop on EOS by design, so the methods' EOS is set to an id no token can
have and each method generates exactly its configured number of tokens (`models.py`).
Measurements are interleaved (round robin, rotating order) so background load hits all
methods alike; figures are medians (`stats.py`). Each bench returns its JSON as a dict;
`tables.py` renders it as Markdown, `run.py` is the command (`DEFAULTS` and `MODES`: each
kind's options with their defaults and what it measures, which `rim bench KIND --help` shows).
"""

from __future__ import annotations

from rim.bench.any_block import any_block_bench
from rim.bench.latency import (
    LATENCY_METHODS,
    LatencySpec,
    expected_passes,
    latency_bench,
    measure_latency,
    plain_loop,
)
from rim.bench.models import (
    DTYPES,
    FAMILY,
    NEVER,
    BenchModel,
    coconut_split,
    load_bench_model,
    make_method,
    parse_dtype,
    question_text,
    run_decode,
)
from rim.bench.run import DEFAULTS, MODES, run_bench
from rim.bench.tables import format_any_block, format_latency, format_train, format_train_data
from rim.bench.train_data import VARIANTS as DATA_VARIANTS
from rim.bench.train_data import DataSpec, Workload, data_train_bench
from rim.bench.training import (
    TrainSpec,
    chains,
    gsm8k_like,
    measure_train,
    naive_batches,
    naive_step,
    peak_memory_mb,
    train_bench,
)

__all__ = [
    "DATA_VARIANTS",
    "DEFAULTS",
    "DTYPES",
    "FAMILY",
    "LATENCY_METHODS",
    "MODES",
    "NEVER",
    "BenchModel",
    "DataSpec",
    "LatencySpec",
    "TrainSpec",
    "Workload",
    "any_block_bench",
    "chains",
    "coconut_split",
    "data_train_bench",
    "expected_passes",
    "format_any_block",
    "format_latency",
    "format_train",
    "format_train_data",
    "gsm8k_like",
    "latency_bench",
    "load_bench_model",
    "make_method",
    "measure_latency",
    "measure_train",
    "naive_batches",
    "naive_step",
    "parse_dtype",
    "peak_memory_mb",
    "plain_loop",
    "question_text",
    "run_bench",
    "run_decode",
    "train_bench",
]
