"""`rim bench train --data FILE`: RiM training throughput on real text, against what a user
would otherwise run (plain causal fine-tuning of the same examples' CoT text).

    rim bench train --data ../shared/data/gsm8k_aug/test.txt --model gpt2 --json

Five variants (`VARIANTS`), each a full training step (zero_grad, forward + backward per
micro-batch, AdamW) on the same model and optimizer, the same pool of examples, the same
global batch and micro-batch:

causal-packed     the anchor: causal-LM fine-tuning of each example's CoT text (question,
                  steps, marker, answer, EOS; every token a label) as HF Trainer runs it with
                  `DataCollatorWithFlattening` (a micro-batch flattened into one row, position
                  ids restarting per example, label -100 at each example's first token) and
                  the model's own loss over full-vocabulary logits. Under sdpa, transformers
                  builds the block-diagonal causal mask from the position ids; that needs
                  `use_cache=False` (with a cache it skips the detection: attention would
                  cross examples).
rim-stage1/2      RiM on the new path: length-grouped global batches (`GroupedStream`),
                  micro-batches sorted by length, the LM head only at labelled positions
                  (`Method.batch` + `batch_loss`, i.e. `Method.loss`), packing per `NEW_PATH`.
rim-stage1-today  RiM stage 1 as the trainer ran it before issue 29 (`today_loss`): random
                  order, one example per row right-padded to the micro-batch's longest, the
                  dense mask, full-vocabulary logits (upcast to fp32), `.item()` per micro-batch.
naive             one plain causal forward + backward per readout (`training.naive_batches`).

Every variant's timed steps take the same `batch x runs` examples: the first global batches
of the trainer's length-grouped order over the whole FILE (seeded), each variant in its own
order (`Workload._plan`); warm-up steps take the next ones. Tokenisation is done before
timing (`Method.pretokenize`); building rows and masks is timed, as the trainer does it. Real
tokens are the examples' own, never padding: the layout's length per example, the CoT text
plus EOS for causal-packed, each pass's unpadded sequences for naive (which recomputes the
question and blocks per readout, so its tokens/s flatters it: compare it by examples/s).
Peak memory: see `measure_peak`.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rim.batching import ExampleStream, GroupedStream, micro_batches, padding_fraction
from rim.bench import stats
from rim.bench.models import BenchModel, _special_strings, bench_config, load_bench_model
from rim.bench.training import _optimizer_step, _time_steps, chains, naive_batches, peak_memory_mb
from rim.curriculum import Stage
from rim.data import Example, read_examples
from rim.decoding import wall_clock
from rim.errors import RimError
from rim.layout import collate, pack, weighted_loss
from rim.machine import describe, load_average
from rim.methods.base import batch_loss
from rim.methods.rim import Grounding, Refinement

VARIANTS = ("causal-packed", "rim-stage1", "rim-stage2", "rim-stage1-today", "naive")
ANCHOR, NEW, TODAY = "causal-packed", "rim-stage1", "rim-stage1-today"
# The new path's packing per stage (`train.pack_tokens`; None: one example per row), chosen
# by measurement on this project's CPU (docs/benchmarks.md): with length-grouped batches a
# micro-batch pads little, and packing rows makes the dense sdpa mask quadratic in the row.
NEW_PATH: dict[str, int | None] = {"rim-stage1": None, "rim-stage2": None}
TARGETS = {  # the acceptance: (numerator, denominator, what, bound)
    "rim-stage1/causal-packed tokens/s >= 0.85": (NEW, ANCHOR, "real_tokens_per_s", 0.85),
    "rim-stage1/rim-stage1-today tokens/s >= 1.4": (NEW, TODAY, "real_tokens_per_s", 1.4),
    "rim-stage1/rim-stage1-today peak memory <= 1": (NEW, TODAY, "peak_mb", 1.0),
}


@dataclass
class DataSpec:
    """What `data_train_bench` is asked for (besides model, device and dtype)."""

    data: str
    batch: int = 8  # global batch: examples per optimizer step
    micro_batch: int = 8  # examples per forward pass
    runs: int = 8  # timed steps per variant (more: a pool of more lengths)
    warmup: int = 1
    memory: bool = True  # peak memory, one fresh process per variant
    seed: int = 0
    blocks: int = 8  # RiM's K (stage 2) and M: the GSM8K recipes'
    mem_tokens: int = 2
    new_path: dict = field(default_factory=lambda: dict(NEW_PATH))
    variants: tuple[str, ...] = VARIANTS

    def check(self) -> None:
        for key in ("batch", "micro_batch", "runs"):
            if getattr(self, key) < 1:
                raise RimError(f"--{key.replace('_', '-')} {getattr(self, key)}: must be >= 1")
        if self.warmup < 0:
            raise RimError(f"--warmup {self.warmup}: must be >= 0")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise RimError(f"variants: {unknown[0]!r} is not one of {', '.join(VARIANTS)}")


def today_loss(method, model, examples, stage, progress, num_examples, device) -> tuple:
    """`Method.loss` as it was before issue 29 (git 674ba0a): every example its own row, the
    dense mask in the model's dtype, full (B, L, V) logits, `weighted_loss` upcasting all of
    them to fp32. Returns (loss, padded tokens)."""
    packed = [pack(method.segments(ex, stage, progress), method.eos_id) for ex in examples]
    batch = collate(packed, method.pad_id, dtype=next(model.parameters()).dtype).to(device)
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits
    return weighted_loss(logits, batch, num_examples), batch.input_ids.numel()


@dataclass
class Count:
    """One step's tokens: real (the examples'), padded (the tensors'), largest pass."""

    real: int = 0
    padded: int = 0
    largest: int = 0

    def add(self, real: int, padded: int) -> None:
        self.real, self.padded = self.real + real, self.padded + padded
        self.largest = max(self.largest, padded)


class Workload:
    """The model, tokenizer, methods, pool and per-variant batches: a pure function of
    (model, spec, device, dtype), so a fresh process (`measure_peak`) rebuilds the same."""

    def __init__(self, model: str, spec: DataSpec, device="cpu", dtype="float32"):
        spec.check()
        self.spec = s = spec
        every = read_examples(s.data)
        need = (s.runs + s.warmup) * s.batch
        if len(every) < need:
            raise RimError(
                f"--data {s.data}: {len(every)} examples; the bench needs "
                f"--batch x (--runs + --warmup) = {need}"
            )
        self.bm = _load_model(model, every, device, dtype)
        tok = self.bm.tokenizer
        self.cot = _method("cot", tok, s)
        self.today = _method("rim", tok, s)
        t_max = max(len(ex.steps) for ex in every)  # as the trainer: over the training set
        self.stages = {
            "rim-stage1": Stage("stage1", 0, 1, 1e-5, None, Grounding(t_max)),
            "rim-stage2": Stage("stage2", 1, 1, 1e-5, None, Refinement()),
        }
        self.new = {v: _method("rim", tok, s, s.new_path.get(v)) for v in self.stages}
        self.pool, self._first = self._draw(every)
        for m in (self.cot, self.today, *self.new.values()):
            m.pretokenize(self.pool)
        self.cot_ids = [self._cot_sequence(ex) for ex in self.pool]
        self.lengths = self._lengths()
        self.plans = {v: self._plan(v) for v in s.variants}
        self.train_step = _optimizer_step(self.bm)
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_tensors="pt")

    def _draw(self, every: list[Example]) -> tuple[list[Example], list[list[int]]]:
        """The pool: the first `runs` + `warmup` global batches the trainer's grouped order
        (`GroupedStream`, stage-1 lengths) takes from the whole file, so those batches are
        grouped as in a real run; the timed ones first. Returns (pool, those batches)."""
        s, m = self.spec, self.new["rim-stage1"]
        m.pretokenize(every)
        lengths = m.train_lengths(every, [self.stages["rim-stage1"]])[0].tolist()
        stream = GroupedStream(lengths, len(every), s.seed, s.batch)
        picked = [stream.take(s.batch) for _ in range(s.runs + s.warmup)]
        pool = [every[i] for b in picked for i in b]
        self.file_padding = _epoch_padding(lengths, s)
        return pool, [list(range(k * s.batch, (k + 1) * s.batch)) for k in range(len(picked))]

    # ---- what each variant trains on ----
    def _cot_sequence(self, ex: Example) -> list[int]:
        """The CoT text as one causal sequence: what `cot`'s layout holds, then EOS."""
        p = pack(self.cot.segments(ex, Stage("cot", 0, 1, 1e-5), 0.0), self.cot.eos_id)
        return p.input_ids + [self.cot.eos_id]

    def _lengths(self) -> dict[str, list[int]]:
        """Real tokens per pool example, per variant (padding never counted)."""
        s1 = self.stages["rim-stage1"]
        out = {ANCHOR: [len(ids) for ids in self.cot_ids]}
        for v, stage in self.stages.items():
            out[v] = self.new[v].train_lengths(self.pool, [stage])[0].tolist()
        out[TODAY] = self.today.train_lengths(self.pool, [s1])[0].tolist()
        naive = (chains(self.today.segments(ex, s1, 0.0)) for ex in self.pool)
        out["naive"] = [sum(len(ids) + len(r.ids) for ids, r in c) for c in naive]
        return out

    def _plan(self, variant: str) -> list[list[list[int]]]:
        """The variant's warm-up then timed global batches, as micro-batches of pool indices.

        The timed steps take exactly the pool's first `runs` x `batch` examples (the
        warm-up steps the rest), in each variant's order: rim-stage1 the grouped batches
        they were drawn as; rim-stage2 grouped anew by its own lengths (`GroupedStream`);
        the others random (`ExampleStream`), in chunks, as the trainer took them before."""
        s = self.spec
        timed, warm = self._first[: s.runs], self._first[s.runs :]
        lengths = self.lengths[variant] if variant in self.stages else None
        out = []
        for part in (warm, timed):
            idx = [i for b in part for i in b]
            if variant == "rim-stage1":
                order = idx
            elif variant == "rim-stage2":
                sub = [lengths[i] for i in idx]
                stream = GroupedStream(sub, len(idx), s.seed, s.batch)
                order = [idx[j] for j in stream.take(len(idx))]
            else:
                order = [idx[j] for j in ExampleStream(len(idx), s.seed).take(len(idx))]
            for k in range(0, len(order), s.batch):
                out.append(micro_batches(order[k : k + s.batch], s.micro_batch, lengths))
        return out

    # ---- one training step ----
    def step_fn(self, variant: str, batch: list[list[int]], count: Count) -> Callable[[], None]:
        """Forward + backward of every micro-batch of `batch` (the optimizer is the caller's);
        losses summed on the device, except today's path, which read each one (`.item()`)."""
        pass_ = {ANCHOR: self._causal, TODAY: self._today, "naive": self._naive}.get(variant)

        def run() -> None:
            total = torch.zeros((), device=self.bm.device)
            for chunk in batch:
                exs = [self.pool[i] for i in chunk]
                if pass_ is None:
                    loss, padded = self._new(variant, exs)
                else:
                    loss, padded = pass_(chunk, exs, len(batch))
                loss.backward()
                total += loss.detach().float().item() if variant == TODAY else loss.detach()
                count.add(sum(self.lengths[variant][i] for i in chunk), padded)

        return run

    def _causal(self, chunk: list[int], exs, n_chunks: int) -> tuple[torch.Tensor, int]:
        rows = self.flatten([{"input_ids": self.cot_ids[i]} for i in chunk])
        return flat_loss(self.bm.model, rows, self.bm.device) / n_chunks, rows["input_ids"].numel()

    def _new(self, variant: str, exs: list[Example]) -> tuple[torch.Tensor, int]:
        """`Method.loss` (its sdpa path), keeping the batch to count its padding."""
        m, dev = self.new[variant], self.bm.device
        b = m.batch(exs, self.stages[variant], 0.0, next(self.bm.model.parameters()).dtype)
        return batch_loss(self.bm.model, b.to(dev), self.spec.batch), b.input_ids.numel()

    def _today(self, chunk, exs: list[Example], n_chunks: int) -> tuple[torch.Tensor, int]:
        s1, dev = self.stages["rim-stage1"], self.bm.device
        return today_loss(self.today, self.bm.model, exs, s1, 0.0, self.spec.batch, dev)

    def _naive(self, chunk, exs: list[Example], n_chunks: int) -> tuple[torch.Tensor, int]:
        """`training.naive_step`: a forward + backward per readout index, each loss read
        (`.item()`) as there; the last pass's loss is left for the caller's backward."""
        padded, dev, model = 0, self.bm.device, self.bm.model
        passes = naive_batches(self.today, exs, self.stages["rim-stage1"], 0.0)
        for j, b in enumerate(passes):
            ids, mask = b.input_ids.to(dev), b.attention_mask.to(dev)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            b.labels, b.weights = b.labels.to(dev), b.weights.to(dev)
            loss = weighted_loss(logits, b, self.spec.batch)
            padded += ids.numel()
            if j == len(passes) - 1:
                return loss, padded
            loss.backward()
            loss.item()
        raise AssertionError("every example has a readout")

    def run_step(self, variant: str, k: int) -> Count:
        count = Count()
        self.train_step(self.step_fn(variant, self.plans[variant][k], count))
        return count


def flat_loss(model, rows: dict, device) -> torch.Tensor:
    """The model's own causal-LM loss (full-vocabulary logits, upcast to fp32) over rows from
    `DataCollatorWithFlattening`. `use_cache=False`: with a cache, transformers does not
    detect the packed sequences from the position ids, and attention crosses examples."""
    return model(**{k: v.to(device) for k, v in rows.items()}, use_cache=False).loss


def _epoch_padding(lengths: list[int], s: DataSpec) -> dict[str, float]:
    """Padding share of stage-1 micro-batches over one whole epoch of the file, random order
    against grouped: what a run would waste (the few timed batches hold fewer lengths)."""
    n, out = len(lengths), {}
    for name, stream in (
        ("random", ExampleStream(n, s.seed)),
        ("grouped", GroupedStream(lengths, n, s.seed, s.batch)),
    ):
        idx = stream.take(n - n % s.batch)
        sizes = [
            [lengths[i] for i in chunk]
            for k in range(0, len(idx), s.batch)
            for chunk in micro_batches(
                idx[k : k + s.batch], s.micro_batch, None if name == "random" else lengths
            )
        ]
        out[name] = round(padding_fraction(sizes), 4)
    return out


def _method(name: str, tok, spec: DataSpec, pack_tokens: int | None = None):
    from rim.methods import build

    cfg = bench_config(name, spec.blocks, spec.mem_tokens, 3, 0, 6)
    cfg.train.pack_tokens = pack_tokens
    return build(cfg, tok)


def _load_model(name: str, examples: list[Example], device, dtype) -> BenchModel:
    """A named size with a word-level tokenizer built from the data file (its vocabulary
    fits GPT-2's 50,257 rows, so ids need no mapping), or a model folder with its own."""
    from pathlib import Path

    from rim.config import Config
    from rim.model import build_tokenizer

    tok = None
    if not Path(name).is_dir():
        texts = [t for ex in examples for t in (ex.question, *ex.steps, ex.answer)]
        tok = build_tokenizer(texts + [Config().eval.answer_marker], _special_strings())
    return load_bench_model(name, device, dtype, tokenizer=tok)


# --------------------------------------------------------------------------- peak memory


def _peak_child(model: str, spec: DataSpec, device, dtype, threads: int, variant: str, k: int):
    """In a fresh process: a one-example step of `variant` (AdamW's state, warm kernels),
    then step `k`'s peak memory above what the process held before it
    (`training.peak_memory_mb`)."""
    torch.set_num_threads(threads)
    spec.variants = (variant,)
    w = Workload(model, spec, device, dtype)
    w.train_step(w.step_fn(variant, [w.plans[variant][k][0][:1]], Count()))
    return peak_memory_mb(lambda: w.run_step(variant, k), w.bm.device)


def measure_peak(model: str, spec: DataSpec, device, dtype, variant: str, k: int):
    """Peak memory of one step of `variant` (step `k`: its largest pass), in a fresh spawned
    process, so no variant inherits another's heap or high-water mark. CPU: the kernel's
    peak-RSS mark reset before the step, VmHWM - VmRSS after it; CUDA: max_memory_allocated."""
    ctx = multiprocessing.get_context("spawn")
    args = (model, spec, device, dtype, torch.get_num_threads(), variant, k)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(_peak_child, *args).result()


# --------------------------------------------------------------------------- the bench


def data_train_bench(model: str = "small", device="cpu", dtype="float32", log=None, **spec) -> dict:
    """The JSON of `rim bench train --data FILE`: a `rows` list, one per variant, with
    `real_tokens_per_s` (median over timed steps of real tokens / step time), `step_ms`
    (median), `peak_mb`, and the acceptance ratios of issue 29 from this one run."""
    s = DataSpec(**spec)
    load = load_average()  # before the run: the 1-minute average read after counts the run
    w = Workload(model, s, device, dtype)
    counts: dict[str, list[Count]] = {v: [] for v in s.variants}
    cursor = dict.fromkeys(s.variants, 0)

    def step(v: str) -> Callable[[], None]:
        def fn() -> None:
            c = Count()
            counts[v].append(c)
            k, cursor[v] = cursor[v], cursor[v] + 1
            w.step_fn(v, w.plans[v][k], c)()

        return fn

    steps = {v: step(v) for v in s.variants}
    times = _time_steps(steps, w.train_step, wall_clock(w.bm.device), s.warmup, s.runs, log)
    rows, how = [], "not measured"
    for v in s.variants:
        timed = counts[v][s.warmup :]
        peak = None
        if s.memory:
            k = s.warmup + max(range(len(timed)), key=lambda i: timed[i].largest)
            if log:
                log(f"[bench] peak memory of {v} (fresh process)")
            peak, how = measure_peak(model, s, device, dtype, v, k)
        rows.append(_row(v, times[v], timed, s, peak, w))
    machine = describe(w.bm.device, load_avg=load)
    return {
        "rows": rows,
        "ratios": _ratios(rows),
        "machine": machine.bench_dict(),
        "config": _config(w, s, how),
        "notes": machine.busy_note(),
    }


def _row(v: str, secs: list[float], timed: list[Count], s: DataSpec, peak, w) -> dict:
    rates = [c.real / t for c, t in zip(timed, secs)]
    real, padded = sum(c.real for c in timed), sum(c.padded for c in timed)
    return {
        "variant": v,
        "real_tokens_per_s": stats.median(rates),
        "step_ms": stats.median(secs) * 1e3,
        "peak_mb": peak,
        "examples_per_s": stats.median([s.batch / t for t in secs]),
        "real_tokens": real,  # over the timed steps: the same examples for every variant
        "padded_tokens": padded,  # what the tensors held, padding included
        "padding": 1 - real / padded if padded else 0.0,
        "setting": _setting(v, s),
    }


def _setting(v: str, s: DataSpec) -> str:
    if v in ("rim-stage1", "rim-stage2"):
        pk = s.new_path.get(v)
        rows = f"packed rows of <= {pk} tokens" if pk else "one example per row"
        return f"grouped by length, micro-batches sorted, {rows}, LM head at labels only"
    return {
        ANCHOR: "DataCollatorWithFlattening: one row per micro-batch, full logits, HF loss",
        TODAY: "random order, one example per row (padded), full logits in fp32",
        "naive": "random order, one padded causal pass per readout index, full logits",
    }[v]


def _ratios(rows: list[dict]) -> dict:
    by = {r["variant"]: r for r in rows}

    def ratio(a: str, b: str, key: str):
        return stats.ratio(by[a][key], by[b][key]) if a in by and b in by else None

    out = {}
    for name, (a, b, key, bound) in TARGETS.items():
        r = ratio(a, b, key)
        ok = None if r is None else (r >= bound if key == "real_tokens_per_s" else r <= bound)
        out[name] = {"ratio": r, "met": ok}
    out["rim-stage1/naive examples/s"] = {"ratio": ratio(NEW, "naive", "examples_per_s")}
    return out


def _config(w: Workload, s: DataSpec, how: str) -> dict:
    tok = w.bm.tokenizer
    mean = {v: sum(x) / len(x) for v, x in w.lengths.items()}
    return (
        w.bm.config(2)
        | {
            "data": s.data,
            "pool_examples": len(w.pool),
            "batch": s.batch,
            "micro_batch": s.micro_batch,
            "runs": s.runs,
            "warmup": s.warmup,
            "tokenizer": f"word-level, built from the data file ({len(tok)} tokens)",
            "mean_tokens_per_example": {v: round(x, 1) for v, x in mean.items()},
            "blocks": s.blocks,
            "mem_tokens": s.mem_tokens,
            "stage1_progress": 0.0,
            "stage1_padding_over_file": w.file_padding,
            "step": "zero_grad + forward + backward per micro-batch + AdamW (full fine-tune)",
            "memory": how + " (a fresh process per variant, at its step with the largest pass)",
        }
        | {"attention": getattr(w.bm.model.config, "_attn_implementation", None)}
    )
