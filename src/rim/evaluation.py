"""Evaluation: accuracy (final, any, per block), cost and latency (answers: rim.answers).

Greedy and deterministic. Accuracy is computed on batched decoding; latency medians on
separate batch-1 runs of the same code path (`rim.decoders.decode`), device-synchronised.
Every example's outcome is kept as a `Record`; the aggregates are computed from them.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from tqdm import tqdm

from rim.answers import normalize  # one definition, shipped verbatim with lm-eval tasks
from rim.data import Example
from rim.decoders import decode, default_for
from rim.decoding import wall_clock
from rim.progress import live as live_progress


def token_accuracy(pred: str, gold: str) -> float:
    """Per-character agreement of normalised answers (per digit for numbers)."""
    if not gold and not pred:
        return 1.0
    n = max(len(pred), len(gold))
    return sum(a == b for a, b in zip(pred, gold)) / n


@dataclass(frozen=True)
class Record:
    """One example's outcome: normalised answers (one per block for the all-blocks decoder,
    else one), whether each is right, and the cost of the final answer."""

    index: int
    gold: str
    answers: tuple[str, ...]
    correct: tuple[bool, ...]
    tokens: int  # generated tokens of the final answer, EOS excluded
    passes: int  # sequential forward passes of the final answer
    blocks: int | None = None  # memory blocks the decoder used (early-exit), else None

    @property
    def final(self) -> str:
        return self.answers[-1]


def records_of(method, out, golds: list[str], first: int) -> list[Record]:
    """Records of one decoded chunk; rows b*K..b*K+K-1 belong to question b."""
    K, tok = out.rows_per_question, method.tokenizer
    answers = [method.answer_tokens(t) for t in out.tokens]
    texts = [
        normalize(t, method.marker) for t in tok.batch_decode(answers, skip_special_tokens=True)
    ]
    recs = []
    used = out.blocks_used
    for b, gold in enumerate(golds):
        rows = range(b * K, (b + 1) * K)
        mine = tuple(texts[r] for r in rows)
        last = rows[-1]
        recs.append(
            Record(first + b, gold, mine, tuple(a == gold for a in mine),
                   len(out.tokens[last]), out.passes[last], used[last] if used else None)
        )  # fmt: skip
    return recs


def summarize(records: list[Record]) -> dict:
    """Accuracy (final, token, per block, any block) and mean cost over `records`."""
    n = max(len(records), 1)
    golds = [r.gold for r in records]
    result = {
        "n": len(records),
        "accuracy": sum(r.correct[-1] for r in records) / n,
        "token_accuracy": statistics.fmean(
            token_accuracy(r.final, g) for r, g in zip(records, golds)
        )
        if records
        else 0.0,
        "forward_passes": statistics.fmean(r.passes for r in records) if records else 0.0,
        "generated_tokens": statistics.fmean(r.tokens for r in records) if records else 0.0,
    }
    if records and records[0].blocks is not None:
        result["mean_blocks"] = statistics.fmean(r.blocks for r in records)
    K = len(records[0].answers) if records else 1
    if K > 1:
        result["per_block_accuracy"] = [sum(r.correct[k] for r in records) / n for k in range(K)]
        result["any_block_accuracy"] = sum(any(r.correct) for r in records) / n
    positions = position_accuracy(records)
    if positions is not None:
        result["per_position_accuracy"] = positions
    return result


def position_accuracy(records: list[Record]) -> list[list[float]] | None:
    """(answers per record, positions): how often character i of the answer (block k's
    answer in row k) equals the gold's, when every gold has the same length; else None.

    Where depth runs out on a carry chain: a k-by-k product in iCoT's format is written least
    significant digit first, so position i is digit i of the product.

    >>> r = [Record(0, "12", ("13", "12"), (False, True), 2, 3),
    ...      Record(1, "34", ("34", "44"), (True, False), 2, 3)]
    >>> position_accuracy(r)
    [[1.0, 0.5], [0.5, 1.0]]
    """
    width, answers = {len(r.gold) for r in records}, {len(r.answers) for r in records}
    if len(width) != 1 or not width.pop() or len(answers) != 1:
        return None
    L, K, n = len(records[0].gold), len(records[0].answers), len(records)
    hit = [[0] * L for _ in range(K)]
    for r in records:
        for k, answer in enumerate(r.answers):
            for i in range(min(L, len(answer))):
                hit[k][i] += answer[i] == r.gold[i]
    return [[h / n for h in row] for row in hit]


def gold_answers(method, examples: list[Example]) -> list[str]:
    """Normalised gold answers; they go through the tokenizer too, so both sides decode the
    same way."""
    tok = method.tokenizer
    return [
        normalize(
            tok.decode(list(method.text_ids(e.answer)), skip_special_tokens=True), method.marker
        )
        for e in examples
    ]


def evaluate(
    method,
    model,
    examples: list[Example],
    batch_size: int = 64,
    blocks: int | None = None,
    decoder: str | None = None,
    timing_examples: int = 16,
    progress: bool = True,
    truncate: bool = False,
    options: dict | None = None,
) -> dict:
    """Accuracy and cost of `method` on `examples` with the decoder called `decoder` (default:
    all-blocks for block methods, else final; `options` go to it); `records` holds every
    example's `Record`. Latency is timed with the same decoder (all-blocks: with final)."""
    decoder = decoder or default_for(method)
    model.eval()
    golds = gold_answers(method, examples)
    records: list[Record] = []
    live = progress and live_progress()
    for lo in tqdm(range(0, len(examples), batch_size), desc="eval", disable=not live, leave=False):
        questions = [e.question for e in examples[lo : lo + batch_size]]
        out = decode(method, model, questions, decoder, blocks, truncate=truncate, options=options)
        records += records_of(method, out, golds[lo : lo + len(questions)], lo)
    result = summarize(records) | {"mean_prompt_tokens": _prompt_tokens(method, examples, blocks)}
    if "mean_blocks" in result and method.uses_blocks:  # early exit: only the blocks it used
        K = blocks or method.mem.num_blocks
        result["mean_prompt_tokens"] -= (K - result["mean_blocks"]) * method.mem.block_len
    device = next(model.parameters()).device
    timed = "final" if decoder == "all-blocks" else decoder
    timing = examples[:timing_examples]
    result.update(latency(method, model, timing, blocks, device, truncate, timed, options))
    result["predictions"] = [r.final for r in records]
    result["records"] = records
    return result


def _prompt_tokens(method, examples: list[Example], blocks: int | None) -> float:
    """Mean prompt length in tokens (question and memory blocks) the decoder prefills."""
    return (
        statistics.fmean(len(method.prompt(e.question, blocks)) for e in examples)
        if examples
        else 0.0
    )


def latency(
    method, model, examples: list[Example], blocks: int | None, device, truncate: bool = False,
    decoder: str = "final", options: dict | None = None,
) -> dict:  # fmt: skip
    """Median time to first answer token and full-answer latency, batch 1, after a warm-up."""
    if not examples:
        return {"ttft_ms": None, "latency_ms": None}
    clock = wall_clock(device)
    kw = dict(decoder=decoder, blocks=blocks, truncate=truncate, options=options)
    answer_times(method, model, examples[0].question, clock, **kw)  # warm-up
    ttft, full = zip(*(answer_times(method, model, e.question, clock, **kw) for e in examples))
    return {"ttft_ms": statistics.median(ttft), "latency_ms": statistics.median(full)}


def answer_times(
    method, model, question: str, clock, decoder: str = "final", blocks: int | None = None,
    truncate: bool = False, options: dict | None = None,
) -> tuple[float, float]:  # fmt: skip
    """(time to the first answer token, to the whole answer), ms, of one batch-1 answer."""
    out = decode(method, model, [question], decoder, blocks, clock, truncate, options=options)
    times = out.token_times
    first = method.first_answer_index(out.tokens[0])
    return times[min(first, len(times) - 1)] * 1e3, times[-1] * 1e3
