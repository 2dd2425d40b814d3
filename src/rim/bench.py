"""Benchmarks: `rim bench latency | train | any-block` (docs/benchmarks.md has the numbers).

    rim bench latency --model gpt2 --device cpu --json
    rim bench train --model small --json
    rim bench any-block --model tiny

latency    Time to first answer token (TTFT) and full-answer latency of direct, RiM (K=8, M=2),
           Coconut and CoT on a random-init model of a named architecture (with the real
           vocabulary size of its family: the LM head matters) or on local weights. Every
           figure comes from `rim.decoding.decode`, the path `rim eval` uses; a plain
           transformers loop (prefill + greedy with the KV cache) runs the same inputs in the
           same rounds, so the overhead of our code path is measured, not assumed.
train      Examples/s and peak memory of one stage-1 RiM training step with every readout
           packed in one forward pass (`RiM.loss`), against the naive alternative (one plain
           causal forward + backward per readout, batched per readout index) and against
           Coconut's loss, on a GSM8K-shaped batch.
any-block  Wall time of `rim.evaluation.evaluate` with answers after all K blocks (shared
           prefill, K branches decoded as one batch) against final-block evaluation.

Random models never stop on EOS by design, so the methods' EOS is set to an id no token can
have and each method generates exactly its configured number of tokens. Measurements are
interleaved (round robin, rotating order) so background load hits all methods alike; figures
are medians.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import json
import os
import platform
import random
import statistics
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from rim.config import Config, MemoryConfig, ModelConfig
from rim.curriculum import Stage
from rim.data import Example
from rim.decoding import decode, wall_clock
from rim.errors import RimError
from rim.layout import IGNORE, Segment, pack, weighted_loss
from rim.machine import cpu_model
from rim.memory import add_special_tokens, memory_tokens
from rim.methods.base import readout

LATENCY_METHODS = ("direct", "rim", "coconut", "cot")
# named sizes with the real vocabulary of their family (GPT-2 50257, Llama-3.2 128256)
FAMILY: dict[str, tuple[str, int]] = {
    "gpt2": ("gpt2", 50257),
    "llama-1b": ("llama", 128256),
    "llama-3b": ("llama", 128256),
}
NEVER = -1  # an EOS id no generated token can equal: generation runs to max_new_tokens
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
WORDS = ["".join(p) for p in itertools.product(string.ascii_lowercase, repeat=2)]
DEFAULTS = {  # per bench kind: model, batch, question tokens, timed runs
    "latency": dict(model="gpt2", batch=1, question_tokens=100, runs=20),
    "train": dict(model="small", batch=16, question_tokens=60, runs=10),
    "any-block": dict(model="tiny", batch=64, question_tokens=30, runs=7),
}


# --------------------------------------------------------------------------- setup


@dataclass
class BenchModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    arch: str
    device: torch.device
    dtype: torch.dtype

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise RimError(f"--dtype {name}: not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _device(name: str | torch.device) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RimError(f"--device {name}: CUDA is not available on this machine")
    return device


def _special_strings() -> list[str]:
    """Memory-block and Coconut tokens (every method's new tokens), default spellings."""
    from rim.methods import METHODS

    cfg = Config()
    out: list[str] = []
    for cls in METHODS.values():
        out += [s for s in cls.new_tokens(cfg) if s not in out]
    return out


def load_bench_model(
    name: str,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    max_positions: int = 1024,
    seed: int = 0,
) -> BenchModel:
    """A random-init model of a named size (`rim.model.SIZES`) or local weights (a folder).

    Named sizes `gpt2`, `llama-1b`, `llama-3b` get their family's real vocabulary size; the
    small synthetic sizes (`tiny`, `small`, `base`) are Llama-style with a word-level vocabulary.
    The tokenizer holds every method's special tokens.
    """
    from rim.model import (
        SIZES,
        build_model,
        build_tokenizer,
        load_pretrained,
        load_tokenizer,
        resize_for,
    )

    dev, dt = _device(device), parse_dtype(dtype)
    extra = _special_strings()
    if Path(name).is_dir():
        tok = load_tokenizer(name)
        add_special_tokens(tok, extra)
        model = load_pretrained(ModelConfig(path=name))
        resize_for(model, tok)
        arch = model.config.model_type
    else:
        if name not in SIZES:
            raise RimError(f"--model {name}: not a model folder nor one of {', '.join(SIZES)}")
        arch, vocab = FAMILY.get(name, ("llama", 0))
        tok = build_tokenizer(WORDS + [Config().eval.answer_marker], extra)
        torch.manual_seed(seed)
        with dev:  # initialise on the device: a 3B model initialises in seconds on a GPU
            model = build_model(
                ModelConfig(arch=arch, size=name), max(vocab, len(tok)), max_positions
            )
    model.to(device=dev, dtype=dt).eval()
    return BenchModel(model, tok, name, arch, dev, dt)


def coconut_split(thoughts: int) -> tuple[int, int]:
    """(thoughts_per_step c, max_stage) with c * max_stage == thoughts (c = 2 when it can)."""
    if thoughts < 0:
        raise RimError(f"--thoughts {thoughts}: must be >= 0")
    return (2, thoughts // 2) if thoughts % 2 == 0 else (1, thoughts)


def make_method(
    name: str,
    tokenizer,
    *,
    blocks: int = 8,
    mem_tokens: int = 2,
    answer_tokens: int = 3,
    cot_tokens: int = 0,
    thoughts: int = 6,
    never_stop: bool = True,
):
    """The registered method `name` configured for a benchmark, or None if it is not registered.

    Each method gets its own Config: answer tokens for every method, plus `cot_tokens` of
    reasoning for CoT; Coconut thinks `thoughts` continuous thoughts. With `never_stop` the
    EOS id is one no token can have, so a random model generates exactly that many tokens.
    """
    from rim.methods import METHODS

    cls = METHODS.get(name)
    if cls is None:
        return None
    cfg = Config(method=name)
    cfg.memory = MemoryConfig(blocks=blocks, mem_tokens=mem_tokens)
    cfg.eval.max_new_tokens = answer_tokens
    cfg.eval.cot_max_new_tokens = answer_tokens + (cot_tokens if name == "cot" else 0)
    cfg.coconut.thoughts_per_step, cfg.coconut.max_stage = coconut_split(thoughts)
    add_special_tokens(tokenizer, cls.new_tokens(cfg))  # no-op: load_bench_model added them
    mem = memory_tokens(tokenizer, cfg.memory) if cls.uses_blocks else None
    method = cls(cfg, tokenizer, mem)
    if never_stop:
        method.eos_id = NEVER
    return method


def question_text(tokenizer, n_tokens: int, seed: int = 0) -> str:
    """A question of random words that tokenises (with special tokens) to `n_tokens` tokens."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(4 * n_tokens + 8)]

    def length(k: int) -> int:
        return len(tokenizer(" ".join(words[:k]), add_special_tokens=True)["input_ids"])

    k = max(n_tokens, 1)
    for _ in range(50):  # token count grows with the word count: walk to the target
        diff = n_tokens - length(k)
        if diff == 0:
            break
        k = min(max(k + (diff if abs(diff) > 1 else (1 if diff > 0 else -1)), 1), len(words))
    return " ".join(words[:k])


def machine(device: torch.device) -> dict:
    import transformers

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return info


def busy_note(device: torch.device) -> list[str]:
    """A warning when other processes share the CPU (timings are then noisy)."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return []
    if load <= 0.75 * cores:
        return []
    hint = "; threads > 1 suffer most (try --threads 1)" if device.type == "cpu" else ""
    return [f"machine busy: load average {load:.1f} on {cores} cores, timings are noisy{hint}"]


def _rotate(items: list, r: int) -> list:
    r %= max(len(items), 1)
    return items[r:] + items[:r]


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# --------------------------------------------------------------------------- latency


def expected_passes(name: str, answer_tokens: int, cot_tokens: int, thoughts: int) -> int:
    """Sequential forward passes up to the last answer token (batch row 0)."""
    generated = answer_tokens + (cot_tokens if name == "cot" else 0)
    # Coconut: x++<bot>, thoughts 1..n-1, then thought n with <eot> (as the original's forward)
    prefill = thoughts + 1 if name == "coconut" else 1
    return prefill + generated - 1


@torch.no_grad()
def plain_loop(
    model,
    prompt: list[int],
    batch: int,
    new_tokens: int,
    clock: Callable[[], float],
    thoughts: int = 0,
    eot_id: int | None = None,
) -> tuple[list[float], list[int]]:
    """The reference: a plain transformers prefill + greedy loop with the KV cache.

    No attention mask or position ids (every row is the same prompt). With `eot_id`, Coconut:
    the last hidden state fed back as the next input embedding, the n-th thought in one pass
    with `<eot>` (n + 1 passes). Returns the seconds from the start at which each token was
    known, and row 0's tokens.
    """
    start = clock()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt] * batch, dtype=torch.long, device=device)  # (B, P)
    coconut = eot_id is not None
    eot = torch.full((batch, 1), eot_id if coconut else 0, dtype=torch.long, device=device)
    if coconut and thoughts == 0:
        ids = torch.cat([ids, eot], dim=1)  # (B, P + 1)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, output_hidden_states=coconut)
    cache = out.past_key_values
    if coconut and thoughts > 0:
        h = out.hidden_states[-1][:, -1:]  # (B, 1, D): thought 1
        for _ in range(thoughts - 1):
            out = model(
                inputs_embeds=h,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                output_hidden_states=True,
            )
            cache, h = out.past_key_values, out.hidden_states[-1][:, -1:]
        last = torch.cat([h, model.get_input_embeddings()(eot)], dim=1)  # (B, 2, D)
        out = model(inputs_embeds=last, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1)  # (B,)
    times, tokens = [], []
    for step in range(new_tokens):
        tokens.append(nxt.tolist()[0])  # synchronises, as greedy decoding does to check EOS
        times.append(clock() - start)
        if step == new_tokens - 1:
            break
        out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    return times, tokens


def latency_bench(
    model: str | BenchModel = "gpt2",
    device: str = "cpu",
    dtype: str = "float32",
    batch: int = 1,
    question_tokens: int = 100,
    cot_tokens: int = 26,
    answer_tokens: int = 3,
    thoughts: int = 6,
    runs: int = 20,
    warmup: int = 2,
    blocks: int = 8,
    mem_tokens: int = 2,
    methods: tuple[str, ...] = LATENCY_METHODS,
    plain: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Median TTFT and full-answer latency per method (ms), ratios, and the plain-loop figures."""
    if runs < 1 or batch < 1 or question_tokens < 2 or answer_tokens < 1:
        raise RimError("bench latency: runs, batch, answer tokens >= 1; question tokens >= 2")
    need = question_tokens + blocks * (mem_tokens + 2) + thoughts + cot_tokens + answer_tokens + 8
    bm = (
        model
        if isinstance(model, BenchModel)
        else load_bench_model(model, device, dtype, max_positions=max(1024, need))
    )
    notes: list[str] = []
    active, meths = [], {}
    for name in methods:
        m = make_method(
            name,
            bm.tokenizer,
            blocks=blocks,
            mem_tokens=mem_tokens,
            answer_tokens=answer_tokens,
            cot_tokens=cot_tokens,
            thoughts=thoughts,
        )
        if m is None:
            notes.append(f"{name}: method not registered in rim.methods.METHODS; skipped")
            continue
        active.append(name)
        meths[name] = m
    q = question_text(bm.tokenizer, question_tokens)
    questions = [q] * batch
    clock = wall_clock(bm.device)
    first = {n: (cot_tokens if n == "cot" else 0) for n in active}
    S = {n: {k: [] for k in ("ttft", "full", "plain_ttft", "plain_full")} for n in active}
    counts: dict[str, dict] = {}
    generated: dict[str, list[int]] = {}
    plain_tokens: dict[str, list[int]] = {}

    def ours(name: str, keep: bool) -> None:
        out = decode(meths[name], bm.model, questions, clock=clock)
        if keep:
            S[name]["ttft"].append(out.token_times[first[name]] * 1e3)
            S[name]["full"].append(out.token_times[-1] * 1e3)
        counts.setdefault(name, {}).update(
            generated_tokens=len(out.tokens[0]),
            forward_passes=out.passes[0],
            prompt_tokens=len(meths[name].prompt(q)),
        )
        generated[name] = out.tokens[0]

    def reference(name: str, keep: bool) -> None:
        m = meths[name]
        coco = name == "coconut"
        times, tokens = plain_loop(
            bm.model,
            m.prompt(q),
            batch,
            m.max_new_tokens(),
            clock,
            m.thoughts() if coco else 0,
            m.eot_id if coco else None,
        )
        plain_tokens[name] = tokens
        if keep:
            S[name]["plain_ttft"].append(times[first[name]] * 1e3)
            S[name]["plain_full"].append(times[-1] * 1e3)

    for r in range(warmup + runs):
        keep = r >= warmup
        for name in _rotate(active, r):
            pair = [ours, reference] if plain else [ours]
            for fn in pair if r % 2 == 0 else pair[::-1]:
                fn(name, keep)
        if log and keep:
            log(
                f"[bench] run {r - warmup + 1}/{runs}: "
                + ", ".join(f"{n} {S[n]['ttft'][-1]:.1f}" for n in active)
                + " ms TTFT"
            )

    med = {n: {k: _median(v) for k, v in S[n].items()} for n in active}
    keys = list(dict.fromkeys(LATENCY_METHODS + tuple(methods)))  # None where not run
    ms = {n: med[n]["ttft"] if n in med else None for n in keys}
    lat = {n: med[n]["full"] if n in med else None for n in keys}
    res = {
        "ms": ms,
        "ratios": _latency_ratios(ms),
        "latency_ms": lat,
        "latency_ratios": _latency_ratios(lat),
        "machine": machine(bm.device),
    }
    # medians of per-round ratios: the two figures of a pair were timed back to back, so
    # background load that drifts between rounds cancels out
    res["paired_ratios"] = {
        k: _paired(S.get(a, {}).get("ttft"), S.get(b, {}).get("ttft"))
        for k, (a, b) in RATIOS.items()
    }
    if plain:
        res["plain_ms"] = {n: med[n]["plain_ttft"] if n in med else None for n in keys}
        res["plain_latency_ms"] = {n: med[n]["plain_full"] if n in med else None for n in keys}
        res["overhead"] = {  # ours / plain loop, paired per round: 1.0 = no overhead
            n: {
                "ttft": _paired(S[n]["ttft"], S[n]["plain_ttft"]),
                "latency": _paired(S[n]["full"], S[n]["plain_full"]),
            }
            for n in active
        }
    for n in active:
        counts[n]["expected_forward_passes"] = expected_passes(
            n, answer_tokens, cot_tokens, thoughts
        )
        if plain:  # same greedy tokens: the plain loop did the same work
            counts[n]["same_tokens_as_plain"] = generated[n] == plain_tokens[n]
    res["counts"] = counts
    res["config"] = {
        "model": bm.name,
        "arch": bm.arch,
        "params_m": round(bm.params / 1e6, 1),
        "vocab": bm.model.get_input_embeddings().weight.shape[0],
        "device": str(bm.device),
        "dtype": str(bm.dtype).removeprefix("torch."),
        "batch": batch,
        "question_tokens": question_tokens,
        "cot_tokens": cot_tokens,
        "answer_tokens": answer_tokens,
        "thoughts": thoughts,
        "blocks": blocks,
        "mem_tokens": mem_tokens,
        "runs": runs,
        "warmup": warmup,
        "ms": "median time to first answer token",
        "latency_ms": "median full-answer latency",
    }
    res["notes"] = notes + busy_note(bm.device)
    return res


RATIOS = {
    "rim/direct": ("rim", "direct"),
    "coconut/rim": ("coconut", "rim"),
    "cot/rim": ("cot", "rim"),
}


def _latency_ratios(ms: dict) -> dict:
    return {k: _ratio(ms.get(a), ms.get(b)) for k, (a, b) in RATIOS.items()}


def _paired(a: list[float] | None, b: list[float] | None) -> float | None:
    """Median of a[i] / b[i] over rounds i."""
    if not a or not b:
        return None
    return statistics.median(x / y for x, y in zip(a, b))


# --------------------------------------------------------------------------- training


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
        L = max(len(p) for p in items)
        ids = torch.full((len(items), L), method.pad_id, dtype=torch.long)
        mask = torch.zeros(len(items), L, dtype=torch.long)
        labels = torch.full((len(items), L), IGNORE, dtype=torch.long)
        weights = torch.zeros(len(items), L)
        for b, p in enumerate(items):
            n = len(p)
            ids[b, :n], mask[b, :n] = torch.tensor(p.input_ids), 1
            labels[b, :n], weights[b, :n] = torch.tensor(p.labels), torch.tensor(p.weights)
        batches.append(
            SimpleNamespace(input_ids=ids, attention_mask=mask, labels=labels, weights=weights)
        )
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


def train_bench(
    model: str | BenchModel = "small",
    device: str = "cpu",
    dtype: str = "float32",
    batch: int = 16,
    question_tokens: int = 60,
    steps_per_example: int = 4,
    step_tokens: int = 10,
    thoughts: int = 6,
    runs: int = 10,
    warmup: int = 2,
    memory: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Examples/s and peak memory of one training step (forward + backward + AdamW):
    stage-1 RiM packed, stage-1 RiM naive (one pass per readout), Coconut at its last stage."""
    from rim.methods import METHODS

    bm = model if isinstance(model, BenchModel) else load_bench_model(model, device, dtype)
    dev = bm.device
    K = steps_per_example + 1  # stage 1: T + 1 blocks
    rim = make_method("rim", bm.tokenizer, blocks=K, never_stop=False)
    coco = make_method("coconut", bm.tokenizer, thoughts=thoughts, never_stop=False)
    examples = gsm8k_like(batch, question_tokens, steps_per_example, step_tokens)
    t_max = steps_per_example
    s1 = Stage("stage1", 0, 1, 1e-5, None, {"kind": "grounding", "t_max": t_max})
    variants: dict[str, Callable[[], None]] = {}
    notes: list[str] = []

    def packed() -> None:
        rim.loss(bm.model, examples, s1, 0.0, batch, dev).backward()

    def naive() -> None:
        naive_step(rim, bm.model, examples, s1, 0.0, batch, dev)

    variants["rim_packed"], variants["rim_naive"] = packed, naive
    if coco is not None:
        # its final stage: every step latent, c * max_stage thoughts
        last = Stage("latent", 0, 1, 1e-5, None, {"k": coco.cfg.coconut.max_stage + 1})

        def coconut() -> None:
            coco.loss(bm.model, examples, last, 0.0, batch, dev).backward()

        variants["coconut"] = coconut
    else:
        notes.append("coconut: method not registered in rim.methods.METHODS; skipped")
    amp = bm.dtype != torch.float32
    if amp:
        bm.model.float()  # fp32 master weights, bf16/fp16 autocast (as `train.mixed_precision`)
    model_ = bm.model.train()
    opt = torch.optim.AdamW([p for p in model_.parameters() if p.requires_grad], lr=1e-5)
    clock = wall_clock(dev)

    def train_step(fn: Callable[[], None]) -> None:
        with torch.autocast(dev.type, dtype=bm.dtype, enabled=amp):
            opt.zero_grad(set_to_none=True)
            fn()
        opt.step()

    times: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for r in range(warmup + runs):
        for name in _rotate(names, r):
            t0 = clock()
            train_step(variants[name])
            dt = clock() - t0
            if r >= warmup:
                times[name].append(dt)
        if log and r >= warmup:
            log(
                f"[bench] step {r - warmup + 1}/{runs}: "
                + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names)
            )
    peak: dict[str, float | None] = {}
    how = "not measured"
    for name in names:
        if memory:
            peak[name], how = peak_memory_mb(lambda n=name: train_step(variants[n]), dev)
        else:
            peak[name] = None
    ms = {n: _median(v) * 1e3 for n, v in times.items()}
    eps = {n: batch / (ms[n] / 1e3) for n in names}
    lengths = {
        "rim_packed": sum(rim.train_length(ex, s1) for ex in examples),
        "rim_naive": sum(
            len(ids) + len(r.ids) for ex in examples for ids, r in chains(rim.segments(ex, s1, 0.0))
        ),
    }
    if coco is not None:
        lengths["coconut"] = sum(coco.train_length(ex, last) for ex in examples)
    for n in ("rim_packed", "rim_naive", "coconut"):
        eps.setdefault(n, None)
        ms.setdefault(n, None)
        peak.setdefault(n, None)
    return {
        "ms": ms,
        "examples_per_s": eps,
        "peak_mb": peak,
        "ratios": {
            "packed/naive": _ratio(eps["rim_packed"], eps["rim_naive"]),
            "packed/coconut": _ratio(eps["rim_packed"], eps["coconut"]),
            "naive/packed peak memory": _ratio(peak["rim_naive"], peak["rim_packed"]),
        },
        "machine": machine(dev),
        "tokens_per_batch": lengths,
        "config": {
            "model": bm.name,
            "arch": bm.arch,
            "params_m": round(bm.params / 1e6, 2),
            "vocab": bm.model.get_input_embeddings().weight.shape[0],
            "device": str(dev),
            "dtype": str(bm.dtype).removeprefix("torch."),
            "batch": batch,
            "question_tokens": question_tokens,
            "steps_per_example": steps_per_example,
            "step_tokens": step_tokens,
            "readouts": K,
            "coconut_thoughts": thoughts,
            "coconut_stage": dict(last.options) if coco is not None else None,
            "runs": runs,
            "warmup": warmup,
            "step": "zero_grad + forward + backward + AdamW",
            "memory": how,
            "registered_methods": list(METHODS),
        },
        "notes": notes + busy_note(dev),
    }


# --------------------------------------------------------------------------- any-block


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
    """Wall time of `rim.evaluation.evaluate` answering after every block (K branches from one
    shared prefill, decoded as one batch) against final-block evaluation; questions of mixed
    lengths, batched with left padding."""
    from rim.evaluation import evaluate

    bm = model if isinstance(model, BenchModel) else load_bench_model(model, device, dtype)
    m = make_method(
        "rim", bm.tokenizer, blocks=blocks, mem_tokens=mem_tokens, answer_tokens=answer_tokens
    )
    rng = random.Random(1)
    lo = max(2, question_tokens * 3 // 4)
    exs = [
        Example(question_text(bm.tokenizer, rng.randint(lo, question_tokens), seed=i), (), "1")
        for i in range(examples)
    ]
    clock = wall_clock(bm.device)
    times: dict[str, list[float]] = {"final": [], "any": []}
    for r in range(warmup + runs):
        for mode in _rotate(["final", "any"], r):
            t0 = clock()
            evaluate(
                m, bm.model, exs, batch, all_blocks=mode == "any", timing_examples=0, progress=False
            )
            if r >= warmup:
                times[mode].append((clock() - t0) * 1e3)
        if log and r >= warmup:
            log(
                f"[bench] run {r - warmup + 1}/{runs}: final {times['final'][-1]:.0f} ms, "
                f"any {times['any'][-1]:.0f} ms"
            )
    ms = {k: _median(v) for k, v in times.items()}
    return {
        "ms": ms,
        "ratios": {"any/final": _ratio(ms["any"], ms["final"])},
        "machine": machine(bm.device),
        "config": {
            "model": bm.name,
            "device": str(bm.device),
            "dtype": str(bm.dtype).removeprefix("torch."),
            "examples": examples,
            "batch": batch,
            "question_tokens": [lo, question_tokens],
            "answer_tokens": answer_tokens,
            "blocks": blocks,
            "mem_tokens": mem_tokens,
            "runs": runs,
            "warmup": warmup,
            "path": "rim.evaluation.evaluate",
        },
        "notes": busy_note(bm.device),
    }


# --------------------------------------------------------------------------- CLI


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def format_latency(res: dict) -> str:
    c = res["config"]
    lines = [
        f"latency: {c['model']} ({c['arch']}, {c['params_m']}M params, vocab {c['vocab']}), "
        f"{c['device']} {c['dtype']}, batch {c['batch']}, question {c['question_tokens']} tokens, "
        f"K={c['blocks']} M={c['mem_tokens']}, CoT {c['cot_tokens']} tokens, "
        f"{c['thoughts']} thoughts, {c['answer_tokens']} answer tokens; "
        f"median of {c['runs']} runs",
        "",
        "| method | TTFT ms | plain TTFT ms | latency ms | plain latency ms | passes | prompt |",
        "|---|---|---|---|---|---|---|",
    ]
    plain = res.get("plain_ms", {})
    plain_lat = res.get("plain_latency_ms", {})
    for n, v in res["ms"].items():
        k = res["counts"].get(n, {})
        lines.append(
            f"| {n} | {_fmt(v)} | {_fmt(plain.get(n))} | {_fmt(res['latency_ms'][n])} | "
            f"{_fmt(plain_lat.get(n))} | {k.get('forward_passes', '-')} | "
            f"{k.get('prompt_tokens', '-')} |"
        )
    lines.append("")
    lines.append(
        "TTFT ratios: " + ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in res["ratios"].items())
    )
    lines.append(
        "TTFT ratios, paired per round: "
        + ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in res["paired_ratios"].items())
    )
    lines.append(
        "latency ratios: "
        + ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in res["latency_ratios"].items())
    )
    if "overhead" in res:
        lines.append(
            "ours / plain loop (TTFT, latency): "
            + ", ".join(
                f"{n} {_fmt(o['ttft'], '.2f')} {_fmt(o['latency'], '.2f')}"
                for n, o in res["overhead"].items()
            )
        )
    lines += [f"note: {n}" for n in res["notes"]]
    return "\n".join(lines)


def format_train(res: dict) -> str:
    c = res["config"]
    lines = [
        f"train: {c['model']} ({c['params_m']}M params, vocab {c['vocab']}), {c['device']} "
        f"{c['dtype']}, batch {c['batch']}, question {c['question_tokens']} tokens, "
        f"{c['steps_per_example']} steps of ~{c['step_tokens']} tokens; median of {c['runs']} steps",
        "",
        "| variant | step ms | examples/s | peak MB | tokens/batch |",
        "|---|---|---|---|---|",
    ]
    for n in res["ms"]:
        lines.append(
            f"| {n} | {_fmt(res['ms'][n])} | {_fmt(res['examples_per_s'][n])} | "
            f"{_fmt(res['peak_mb'][n])} | {res['tokens_per_batch'].get(n, '-')} |"
        )
    lines.append("")
    lines.append("ratios: " + ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in res["ratios"].items()))
    lines.append(f"memory: {c['memory']}")
    lines += [f"note: {n}" for n in res["notes"]]
    return "\n".join(lines)


def format_any_block(res: dict) -> str:
    c = res["config"]
    return (
        f"any-block: {c['model']} {c['device']}, {c['examples']} questions at batch "
        f"{c['batch']}, K={c['blocks']}: final {_fmt(res['ms']['final'])} ms, any "
        f"{_fmt(res['ms']['any'])} ms, any/final {_fmt(res['ratios']['any/final'], '.2f')}"
        + "".join(f"\nnote: {n}" for n in res["notes"])
    )


def run_bench(args) -> dict:
    """`rim bench KIND ...` (see `rim.cli`): run, print a table or JSON, return the result."""
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


def _run(args, kind: str, arg: Callable) -> dict:
    import sys

    as_json = getattr(args, "json", False)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    common = dict(
        model=arg("model"),
        device=arg("device", "cpu"),
        dtype=arg("dtype", "float32"),
        batch=arg("batch"),
        question_tokens=arg("question_tokens"),
        runs=arg("runs"),
        warmup=arg("warmup", 2),
        log=log,
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
    print(json.dumps(res, indent=2) if as_json else text)
    return res
