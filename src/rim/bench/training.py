"""`rim bench train`: one stage-1 RiM training step with every readout packed in one forward
pass (`RiM.loss`), against the naive alternative (one plain causal forward + backward per
readout, batched per readout index) and against Coconut's loss, on a GSM8K-shaped batch.

The naive trainer here is the reference the packed loss must equal (tests/test_bench.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from rim.bench import stats
from rim.bench.models import WORDS, BenchModel, load_bench_model, make_method
from rim.curriculum import Stage
from rim.data import Example
from rim.decoding import wall_clock
from rim.layout import IGNORE, Segment, pack, weighted_loss
from rim.machine import describe, load_average
from rim.methods.base import readout
from rim.methods.coconut import Latent
from rim.methods.rim import Grounding

VARIANTS = ("rim_packed", "rim_naive", "coconut")


def gsm8k_like(
    n: int,
    question_tokens: int = 60,
    steps: int = 4,
    step_tokens: int = 10,
    answer_digits: int = 3,
    seed: int = 0,
) -> list[Example]:
    """GSM8K-shaped examples of random words: a question, `steps` steps of about
    `step_tokens` words each, a number answer (one token per digit with the word tokenizer)."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    out = []
    for _ in range(n):
        q = words(question_tokens - 1)  # + BOS
        s = tuple(words(rng.randint(step_tokens - 2, step_tokens + 2)) for _ in range(steps))
        a = str(rng.randint(10 ** (answer_digits - 1), 10**answer_digits - 1))
        out.append(Example(q, s, a))
    return out


# --------------------------------------------------------------------------- naive trainer


def chains(segments: list[Segment]) -> list[tuple[tuple[int, ...], Segment]]:
    """Each readout of a packed tree as its own plain sequence: (ancestors' ids, readout)."""
    out = []
    for seg in segments:
        if seg.weight is None:
            continue
        path, p = [], seg.parent
        while p >= 0:
            path.append(segments[p])
            p = segments[p].parent
        ids = tuple(i for s in reversed(path) for i in s.ids)
        out.append((ids, seg))
    return out


def _right_padded(items: list, pad_id: int) -> SimpleNamespace:
    """Packed sequences as one right-padded batch; every tensor (B, L)."""
    L = max(len(p) for p in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(items), L, dtype=torch.long)
    labels = torch.full((len(items), L), IGNORE, dtype=torch.long)
    weights = torch.zeros(len(items), L)
    for b, p in enumerate(items):
        n = len(p)
        ids[b, :n], mask[b, :n] = torch.tensor(p.input_ids), 1
        labels[b, :n], weights[b, :n] = torch.tensor(p.labels), torch.tensor(p.weights)
    return SimpleNamespace(input_ids=ids, attention_mask=mask, labels=labels, weights=weights)


def naive_batches(method, examples: list[Example], stage: Stage, progress: float) -> list:
    """The naive alternative to packing: readout j of every example as a plain causal
    sequence `x ++ m_1..m_k ++ R_k`, right-padded, one batch per readout index j."""
    per_example = [chains(method.segments(ex, stage, progress)) for ex in examples]
    batches = []
    for j in range(max(len(c) for c in per_example)):
        items = [
            pack([Segment(ids), readout(r.ids, 0, r.weight)], method.eos_id)
            for c in per_example
            if j < len(c)
            for ids, r in [c[j]]
        ]
        batches.append(_right_padded(items, method.pad_id))
    return batches


def naive_step(method, model, examples, stage, progress, num_examples, device) -> float:
    """One forward + backward per readout index; returns the summed loss (== packed loss)."""
    total = 0.0
    for b in naive_batches(method, examples, stage, progress):
        b = SimpleNamespace(**{k: v.to(device) for k, v in vars(b).items()})
        logits = model(
            input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False
        ).logits
        loss = weighted_loss(logits, b, num_examples)
        loss.backward()
        total += loss.item()
    return total


# --------------------------------------------------------------------------- peak memory


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(field)


def peak_memory_mb(step: Callable[[], None], device: torch.device) -> tuple[float | None, str]:
    """Peak memory of one call of `step` above what was held before it, and how it was measured.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats. CPU (Linux): freed
    heap is returned to the OS (malloc_trim), the kernel's peak-RSS mark is reset
    (/proc/self/clear_refs = 5), and VmHWM - VmRSS is read from /proc/self/status.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda max_memory_allocated"
    try:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _rss_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        step()
        return (_rss_kb("VmHWM") - base) / 1024, "cpu VmHWM - VmRSS (malloc_trim, clear_refs)"
    except OSError:
        return None, "unavailable (needs Linux /proc/self/clear_refs)"


# --------------------------------------------------------------------------- the bench


@dataclass
class TrainResult:
    ms: dict  # variant -> median step ms (None where not run), as every dict below
    examples_per_s: dict
    peak_mb: dict
    ratios: dict
    machine: dict
    tokens_per_batch: dict
    config: dict
    notes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


class _Variants:
    """The three losses on one batch, each a closure running forward + backward."""

    def __init__(self, bm: BenchModel, examples: list[Example], steps: int, thoughts: int):
        self.bm, self.examples = bm, examples
        self.rim = make_method("rim", bm.tokenizer, blocks=steps + 1, never_stop=False)
        self.coco = make_method("coconut", bm.tokenizer, thoughts=thoughts, never_stop=False)
        self.s1 = Stage("stage1", 0, 1, 1e-5, None, Grounding(steps))
        # Coconut's final stage: every step latent, c * max_stage thoughts
        self.last = None
        if self.coco is not None:
            k = self.coco.settings.max_stage + 1
            self.last = Stage("latent", 0, 1, 1e-5, None, Latent(k))

    def steps(self) -> dict[str, Callable[[], None]]:
        bm, exs, n, dev = self.bm, self.examples, len(self.examples), self.bm.device
        out = {
            "rim_packed": lambda: self.rim.loss(bm.model, exs, self.s1, 0.0, n, dev).backward(),
            "rim_naive": lambda: naive_step(self.rim, bm.model, exs, self.s1, 0.0, n, dev),
        }
        if self.coco is not None:
            out["coconut"] = lambda: self.coco.loss(
                bm.model, exs, self.last, 0.0, n, dev
            ).backward()
        return out

    def tokens_per_batch(self) -> dict[str, int]:
        rim, exs, s1 = self.rim, self.examples, self.s1
        naive = (chains(rim.segments(ex, s1, 0.0)) for ex in exs)
        out = {
            "rim_packed": sum(rim.train_length(ex, s1) for ex in exs),
            "rim_naive": sum(len(ids) + len(r.ids) for c in naive for ids, r in c),
        }
        if self.coco is not None:
            out["coconut"] = sum(self.coco.train_length(ex, self.last) for ex in exs)
        return out


def _optimizer_step(bm: BenchModel) -> Callable[[Callable[[], None]], None]:
    """zero_grad + `fn` (forward + backward) + AdamW, under autocast for bf16/fp16."""
    amp = bm.dtype != torch.float32
    if amp:
        bm.model.float()  # fp32 master weights, bf16/fp16 autocast (as `train.mixed_precision`)
    model = bm.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def train_step(fn: Callable[[], None]) -> None:
        with torch.autocast(bm.device.type, dtype=bm.dtype, enabled=amp):
            opt.zero_grad(set_to_none=True)
            fn()
        opt.step()

    return train_step


def _time_steps(steps: dict, train_step, clock, warmup: int, runs: int, log) -> dict:
    """Seconds per timed step of each variant, interleaved rounds."""
    times: dict[str, list[float]] = {n: [] for n in steps}
    for r, keep, order in stats.rounds(list(steps), warmup, runs):
        for name in order:
            t0 = clock()
            train_step(steps[name])
            if keep:
                times[name].append(clock() - t0)
        if log and keep:
            each = ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in steps)
            log(f"[bench] step {r - warmup + 1}/{runs}: {each}")
    return times


@dataclass
class TrainSpec:
    """What `train_bench` was asked for (its keyword arguments, less model and logging)."""

    batch: int = 16
    question_tokens: int = 60
    steps_per_example: int = 4
    step_tokens: int = 10
    thoughts: int = 6
    runs: int = 10
    warmup: int = 2
    memory: bool = True  # measure peak memory (one more step per variant)

    def config(self, bm: BenchModel, v: _Variants, how: str) -> dict:
        return bm.config(2) | {
            "batch": self.batch,
            "question_tokens": self.question_tokens,
            "steps_per_example": self.steps_per_example,
            "step_tokens": self.step_tokens,
            "readouts": self.steps_per_example + 1,
            "coconut_thoughts": self.thoughts,
            "coconut_stage": {"k": v.last.payload.k} if v.last is not None else None,
            "runs": self.runs,
            "warmup": self.warmup,
            "step": "zero_grad + forward + backward + AdamW",
            "memory": how,
            "registered_methods": _registered(),
        }


def measure_train(
    model: str | BenchModel, spec: TrainSpec, device="cpu", dtype="float32", log=None
) -> TrainResult:
    """Examples/s and peak memory of one training step (forward + backward + AdamW):
    stage-1 RiM packed, stage-1 RiM naive (one pass per readout), Coconut at its last stage."""
    s = spec
    load = load_average()  # before the run: the 1-minute average read after it counts the run
    bm = model if isinstance(model, BenchModel) else load_bench_model(model, device, dtype)
    examples = gsm8k_like(s.batch, s.question_tokens, s.steps_per_example, s.step_tokens)
    v = _Variants(bm, examples, s.steps_per_example, s.thoughts)
    steps = v.steps()
    train_step = _optimizer_step(bm)
    times = _time_steps(steps, train_step, wall_clock(bm.device), s.warmup, s.runs, log)
    peak, how = {}, "not measured"
    for name in steps:
        peak[name] = None
        if s.memory:
            peak[name], how = peak_memory_mb(lambda n=name: train_step(steps[n]), bm.device)
    ms = {n: stats.median(t) * 1e3 for n, t in times.items()}
    eps = {n: s.batch / (ms[n] / 1e3) for n in steps}
    for d in (eps, ms, peak):
        for n in VARIANTS:
            d.setdefault(n, None)
    skipped = "coconut: method not registered in rim.methods.METHODS; skipped"
    notes = [] if v.coco is not None else [skipped]
    machine = describe(bm.device, load_avg=load)
    return TrainResult(
        ms=ms,
        examples_per_s=eps,
        peak_mb=peak,
        ratios={
            "packed/naive": stats.ratio(eps["rim_packed"], eps["rim_naive"]),
            "packed/coconut": stats.ratio(eps["rim_packed"], eps["coconut"]),
            "naive/packed peak memory": stats.ratio(peak["rim_naive"], peak["rim_packed"]),
        },
        machine=machine.bench_dict(),
        tokens_per_batch=v.tokens_per_batch(),
        config=s.config(bm, v, how),
        notes=notes + machine.busy_note(),
    )


def train_bench(
    model: str | BenchModel = "small",
    device: str = "cpu",
    dtype: str = "float32",
    log: Callable[[str], None] | None = None,
    **spec,
) -> dict:
    """`measure_train` as the JSON of `rim bench train --json`; keyword arguments are the
    fields of `TrainSpec` (batch, question_tokens, ..., runs, warmup, memory)."""
    return measure_train(model, TrainSpec(**spec), device, dtype, log).to_dict()


def _registered() -> list[str]:
    from rim.methods import METHODS

    return list(METHODS)
