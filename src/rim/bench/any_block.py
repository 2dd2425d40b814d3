"""`rim bench any-block`: wall time of `rim.evaluation.evaluate` with answers after all K
blocks (shared prefill, K branches decoded as one batch) against final-block evaluation."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

from rim.bench import stats
from rim.bench.models import BenchModel, dtype_name, load_bench_model, make_method, question_text
from rim.data import Example
from rim.decoding import wall_clock
from rim.machine import describe, load_average


@dataclass
class AnyBlockResult:
    ms: dict  # "final" | "any" -> median ms of one evaluation
    ratios: dict
    machine: dict
    config: dict
    notes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def mixed_questions(tokenizer, n: int, question_tokens: int) -> tuple[list[Example], int]:
    """`n` questions of 3/4 to all of `question_tokens` tokens (batches need left padding),
    and the shortest length drawn from."""
    rng = random.Random(1)
    lo = max(2, question_tokens * 3 // 4)
    exs = [
        Example(question_text(tokenizer, rng.randint(lo, question_tokens), seed=i), (), "1")
        for i in range(n)
    ]
    return exs, lo


def any_block_bench(
    model: str | BenchModel = "tiny",
    device: str = "cpu",
    dtype: str = "float32",
    batch: int = 64,
    examples: int = 128,
    question_tokens: int = 30,
    answer_tokens: int = 3,
    blocks: int = 8,
    mem_tokens: int = 2,
    runs: int = 7,
    warmup: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Wall time of evaluating after every block against after the last block only."""
    from rim.evaluation import evaluate

    load = load_average()  # before the run: the 1-minute average read after it counts the run
    bm = model if isinstance(model, BenchModel) else load_bench_model(model, device, dtype)
    m = make_method(
        "rim", bm.tokenizer, blocks=blocks, mem_tokens=mem_tokens, answer_tokens=answer_tokens
    )
    exs, lo = mixed_questions(bm.tokenizer, examples, question_tokens)
    clock = wall_clock(bm.device)
    times: dict[str, list[float]] = {"final": [], "any": []}
    for r, keep, order in stats.rounds(["final", "any"], warmup, runs):
        for mode in order:
            t0 = clock()
            dec = "all-blocks" if mode == "any" else "final"
            evaluate(m, bm.model, exs, batch, decoder=dec, timing_examples=0, progress=False)
            if keep:
                times[mode].append((clock() - t0) * 1e3)
        if log and keep:
            log(
                f"[bench] run {r - warmup + 1}/{runs}: final {times['final'][-1]:.0f} ms, "
                f"any {times['any'][-1]:.0f} ms"
            )
    ms = {k: stats.median(v) for k, v in times.items()}
    machine = describe(bm.device, load_avg=load)
    config = {
        "model": bm.name,
        "device": str(bm.device),
        "dtype": dtype_name(bm.dtype),
        "examples": examples,
        "batch": batch,
        "question_tokens": [lo, question_tokens],
        "answer_tokens": answer_tokens,
        "blocks": blocks,
        "mem_tokens": mem_tokens,
        "runs": runs,
        "warmup": warmup,
        "path": "rim.evaluation.evaluate",
    }
    ratios = {"any/final": stats.ratio(ms["any"], ms["final"])}
    res = AnyBlockResult(ms, ratios, machine.bench_dict(), config, machine.busy_note())
    return res.to_dict()
