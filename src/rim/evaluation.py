"""Evaluation: answer normalisation, accuracy (final, any, per block), cost and latency.

Greedy and deterministic. Accuracy is computed on batched decoding; latency medians on
separate batch-1 runs of the same code path (`rim.decoding.decode`), device-synchronised.
"""

from __future__ import annotations

import re
import statistics

from tqdm import tqdm

from rim.data import Example
from rim.decoding import decode, wall_clock
from rim.progress import live as live_progress

_NUM = re.compile(r"^[-+]?\d+(?:\.\d+)?$")


def normalize(text: str, marker: str = "####") -> str:
    """Canonical answer text: after the last marker, trimmed, numbers made canonical.

    >>> normalize("#### 1,000"), normalize("4.0"), normalize(" The answer is 7 . ")
    ('1000', '4', 'the answer is 7')
    >>> normalize("1 2") == normalize("12")  # digit-split tokenisers decode with spaces
    True
    """
    if marker and marker in text:
        text = text.rsplit(marker, 1)[1]
    text = text.strip().lower()
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # thousands separators
    text = re.sub(r"(?<=\d) (?=\d)", "", text)  # "1 2" -> "12"
    text = re.sub(r"\s+([.,!?;:])", r"\1", text)  # "rempus ." -> "rempus."
    text = text.rstrip(".").strip()
    if _NUM.match(text):
        value = float(text)
        text = str(int(value)) if value == int(value) else repr(value)
    return text


def token_accuracy(pred: str, gold: str) -> float:
    """Per-character agreement of normalised answers (per digit for numbers)."""
    if not gold and not pred:
        return 1.0
    n = max(len(pred), len(gold))
    return sum(a == b for a, b in zip(pred, gold)) / n


def _texts(tokenizer, rows: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def evaluate(
    method,
    model,
    examples: list[Example],
    batch_size: int = 64,
    blocks: int | None = None,
    all_blocks: bool | None = None,
    timing_examples: int = 16,
    progress: bool = True,
    truncate: bool = False,
) -> dict:
    """Accuracy and cost of `method` on `examples`; any-block fields for block methods."""
    tok = method.tokenizer
    marker = method.marker
    device = next(model.parameters()).device
    model.eval()
    all_blocks = method.uses_blocks if all_blocks is None else all_blocks
    K = (blocks or method.mem.num_blocks) if method.uses_blocks else 1
    # gold answers go through the tokenizer too, so both sides decode the same way
    golds = [
        normalize(tok.decode(list(method.text_ids(e.answer)), skip_special_tokens=True), marker)
        for e in examples
    ]
    per_block = [[] for _ in range(K)] if all_blocks else []
    finals, passes, gen_tokens = [], [], []
    bar = tqdm(
        range(0, len(examples), batch_size),
        desc="eval",
        disable=not progress or not live_progress(),
        leave=False,
    )
    for lo in bar:
        chunk = examples[lo : lo + batch_size]
        questions = [e.question for e in chunk]
        out = decode(method, model, questions, blocks, all_blocks, truncate=truncate)
        answers = [method.answer_tokens(t) for t in out.tokens]
        texts = [normalize(t, marker) for t in _texts(tok, answers)]
        if all_blocks:
            for b in range(len(chunk)):
                for k in range(K):
                    per_block[k].append(texts[b * K + k])
            rows = [b * K + K - 1 for b in range(len(chunk))]
        else:
            rows = list(range(len(chunk)))
        finals += [texts[r] for r in rows]
        passes += [out.passes[r] for r in rows]
        gen_tokens += [len(out.tokens[r]) for r in rows]
    correct = [p == g for p, g in zip(finals, golds)]
    result = {
        "n": len(examples),
        "accuracy": sum(correct) / max(len(examples), 1),
        "token_accuracy": statistics.fmean(token_accuracy(p, g) for p, g in zip(finals, golds))
        if examples
        else 0.0,
        "forward_passes": statistics.fmean(passes) if passes else 0.0,
        "generated_tokens": statistics.fmean(gen_tokens) if gen_tokens else 0.0,
    }
    if all_blocks:
        hits = [[p == g for p, g in zip(col, golds)] for col in per_block]
        result["per_block_accuracy"] = [sum(h) / max(len(examples), 1) for h in hits]
        result["any_block_accuracy"] = sum(
            any(h[i] for h in hits) for i in range(len(golds))
        ) / max(len(golds), 1)
    result.update(latency(method, model, examples[:timing_examples], blocks, device, truncate))
    result["predictions"] = finals
    return result


def latency(
    method, model, examples: list[Example], blocks: int | None, device, truncate: bool = False
) -> dict:
    """Median time to first answer token and full-answer latency, batch 1, after a warm-up."""
    if not examples:
        return {"ttft_ms": None, "latency_ms": None}
    clock = wall_clock(device)
    decode(method, model, [examples[0].question], blocks, clock=clock, truncate=truncate)
    ttft, full = [], []
    for e in examples:
        out = decode(method, model, [e.question], blocks, clock=clock, truncate=truncate)
        times = out.token_times
        first = method.first_answer_index(out.tokens[0])
        ttft.append(times[min(first, len(times) - 1)] * 1e3)
        full.append(times[-1] * 1e3)
    return {"ttft_ms": statistics.median(ttft), "latency_ms": statistics.median(full)}
