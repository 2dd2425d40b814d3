"""`rim bench latency`: time to first answer token (TTFT) and full-answer latency per method.

Every figure comes from `rim.decoding.decode` (through `run_decode`), the path `rim eval`
takes; a plain transformers loop (prefill + greedy with the KV cache) runs the same inputs in
the same rounds, so the overhead of our code path is measured, not assumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from rim.bench import stats
from rim.bench.models import BenchModel, load_bench_model, make_method, question_text, run_decode
from rim.compat import cache_of, with_cache
from rim.decoding import wall_clock
from rim.errors import RimError
from rim.machine import describe, load_average

LATENCY_METHODS = ("direct", "rim", "coconut", "cot")
RATIOS = {
    "rim/direct": ("rim", "direct"),
    "coconut/rim": ("coconut", "rim"),
    "cot/rim": ("cot", "rim"),
}


def expected_passes(
    name: str, answer_tokens: int, cot_tokens: int, thoughts: int, loops: int = 0
) -> int:
    """Sequential forward passes up to the last answer token (batch row 0)."""
    generated = answer_tokens + (cot_tokens if name == "cot" else 0)
    # Coconut: x++<bot>, thoughts 1..n-1, then thought n with <eot> (as the original's forward)
    prefill = thoughts + 1 if name == "coconut" else 1
    prefill += loops if name == "rim" else 0  # looped RiM: R more passes over the blocks
    return prefill + generated - 1


# --------------------------------------------------------------------------- plain reference


def _plain_thoughts(model, ids, thoughts: int, eot):
    """Coconut's prefill: the last hidden state fed back as the next input embedding, the n-th
    thought in one pass with `<eot>` (n + 1 passes). Returns the last output."""
    if thoughts == 0:
        return model(input_ids=torch.cat([ids, eot], dim=1), use_cache=True, logits_to_keep=1)
    kw = dict(use_cache=True, logits_to_keep=1, output_hidden_states=True)
    out = model(input_ids=ids, **kw)
    cache, h = cache_of(out), out.hidden_states[-1][:, -1:]  # h (B, 1, D): thought 1
    for _ in range(thoughts - 1):
        out = model(inputs_embeds=h, **with_cache(cache), **kw)
        cache, h = cache_of(out), out.hidden_states[-1][:, -1:]
    last = torch.cat([h, model.get_input_embeddings()(eot)], dim=1)  # (B, 2, D)
    return model(inputs_embeds=last, **with_cache(cache), use_cache=True, logits_to_keep=1)


def _plain_loops(model, ids, loops: tuple):
    """Looped RiM's prefill (`rim.methods.looped`) in plain calls: `x ++ blocks`, then R passes
    over the blocks' n tokens, each fed the projected last-layer states of the pass before."""
    R, own, proj, n = loops
    kw = dict(use_cache=True, output_hidden_states=True)
    out = model(input_ids=ids, **kw)
    cache, h = cache_of(out), out.hidden_states[-1]
    before, states = h[:, -n - 1 : -n], h[:, -n:]  # the question's last token, the blocks
    for _ in range(R):
        cache.crop(-n)  # back to the question: positions continue after it
        src = states if own else torch.cat([before, states[:, :-1]], dim=1)
        out = model(inputs_embeds=proj(src), **with_cache(cache), **kw)
        cache, states = cache_of(out), out.hidden_states[-1]
    return out


@torch.no_grad()
def plain_loop(
    model,
    prompt: list[int],
    batch: int,
    new_tokens: int,
    clock: Callable[[], float],
    thoughts: int = 0,
    eot_id: int | None = None,
    loops: tuple | None = None,
) -> tuple[list[float], list[int]]:
    """The reference: a plain transformers prefill + greedy loop with the KV cache.

    No attention mask or position ids (every row is the same prompt). With `eot_id`, Coconut's
    continuous thoughts first; with `loops` (R, own, projection, block tokens), looped RiM's
    passes. Returns the seconds from the start at which each token was known, and row 0's
    tokens.
    """
    start = clock()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt] * batch, dtype=torch.long, device=device)  # (B, P)
    if loops is not None:
        out = _plain_loops(model, ids, loops)
    elif eot_id is None:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    else:
        eot = torch.full((batch, 1), eot_id, dtype=torch.long, device=device)  # (B, 1)
        out = _plain_thoughts(model, ids, thoughts, eot)
    cache, nxt = cache_of(out), out.logits[:, -1].argmax(-1)  # nxt (B,)
    times, tokens = [], []
    for step in range(new_tokens):
        tokens.append(nxt.tolist()[0])  # synchronises, as greedy decoding does to check EOS
        times.append(clock() - start)
        if step == new_tokens - 1:
            break
        out = model(input_ids=nxt[:, None], **with_cache(cache), use_cache=True)
        cache, nxt = cache_of(out), out.logits[:, -1].argmax(-1)
    return times, tokens


# --------------------------------------------------------------------------- results


@dataclass
class LatencySpec:
    """What `latency_bench` was asked for (its keyword arguments, less model and logging)."""

    batch: int = 1
    question_tokens: int = 100
    cot_tokens: int = 26
    answer_tokens: int = 3
    thoughts: int = 6
    runs: int = 20
    warmup: int = 2
    blocks: int = 8
    mem_tokens: int = 2
    loops: int = 0  # RiM's memory.loops: 1 + R passes before the first answer token
    methods: tuple[str, ...] = LATENCY_METHODS
    plain: bool = True

    def check(self) -> None:
        if self.loops < 0:
            raise RimError("bench latency: --loops must be >= 0")
        if self.runs < 1 or self.batch < 1 or self.question_tokens < 2 or self.answer_tokens < 1:
            raise RimError("bench latency: runs, batch, answer tokens >= 1; question tokens >= 2")

    def max_positions(self) -> int:
        """Positions the longest prompt plus answer needs (at least the usual 1024)."""
        s = self
        need = s.question_tokens + s.blocks * (s.mem_tokens + 2) + s.thoughts + s.cot_tokens
        return max(1024, need + s.answer_tokens + 8)

    def config(self, bm: BenchModel) -> dict:
        keys = ("batch", "question_tokens", "cot_tokens", "answer_tokens", "thoughts")
        keys += ("blocks", "mem_tokens", "loops", "runs", "warmup")
        return (
            bm.config(1)
            | {k: getattr(self, k) for k in keys}
            | {
                "ms": "median time to first answer token",
                "latency_ms": "median full-answer latency",
            }
        )


@dataclass
class Samples:
    """One method's milliseconds per timed round: ours and the plain loop's."""

    ttft: list[float] = field(default_factory=list)
    full: list[float] = field(default_factory=list)
    plain_ttft: list[float] = field(default_factory=list)
    plain_full: list[float] = field(default_factory=list)

    def medians(self) -> dict[str, float | None]:
        return {f.name: stats.median(getattr(self, f.name)) for f in fields(self)}


@dataclass
class Counts:
    """Work done for batch row 0: tokens, sequential passes, prompt length."""

    generated_tokens: int
    forward_passes: int
    prompt_tokens: int
    expected_forward_passes: int | None = None
    same_tokens_as_plain: bool | None = None  # None: the plain loop did not run

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in d.items() if v is not None}


@dataclass
class LatencyResult:
    ms: dict  # method -> median TTFT ms, None where not run
    ratios: dict
    latency_ms: dict  # method -> median full-answer ms
    latency_ratios: dict
    machine: dict
    paired_ratios: dict
    plain_ms: dict | None  # None: no plain loop (then absent from the JSON)
    plain_latency_ms: dict | None
    overhead: dict | None
    counts: dict[str, Counts]
    config: dict
    notes: list[str]

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["counts"] = {n: c.to_dict() for n, c in self.counts.items()}
        plain = ("plain_ms", "plain_latency_ms", "overhead")
        return {k: v for k, v in d.items() if not (k in plain and v is None)}


# --------------------------------------------------------------------------- measuring


class _Session:
    """The methods, the question batch and every sample of one latency benchmark."""

    def __init__(self, bm: BenchModel, spec: LatencySpec, meths: dict):
        self.bm, self.spec, self.meths = bm, spec, meths
        self.q = question_text(bm.tokenizer, spec.question_tokens)
        self.clock = wall_clock(bm.device)
        # index of the first answer token: CoT's comes after its reasoning tokens
        self.first = {n: (spec.cot_tokens if n == "cot" else 0) for n in meths}
        self.samples = {n: Samples() for n in meths}
        self.counts: dict[str, Counts] = {}
        self.tokens: dict[str, list[int]] = {}
        self.plain_tokens: dict[str, list[int]] = {}

    def ours(self, name: str, keep: bool) -> None:
        m = self.meths[name]
        out = run_decode(m, self.bm.model, [self.q] * self.spec.batch, clock=self.clock)
        if keep:
            self.samples[name].ttft.append(out.token_times[self.first[name]] * 1e3)
            self.samples[name].full.append(out.token_times[-1] * 1e3)
        self.counts[name] = Counts(len(out.tokens[0]), out.passes[0], len(m.prompt(self.q)))
        self.tokens[name] = out.tokens[0]

    def reference(self, name: str, keep: bool) -> None:
        m, coco = self.meths[name], name == "coconut"
        times, tokens = plain_loop(
            self.bm.model,
            m.prompt(self.q),
            self.spec.batch,
            m.max_new_tokens(),
            self.clock,
            m.thoughts() if coco else 0,
            m.eot_id if coco else None,
            _loops(m),
        )
        self.plain_tokens[name] = tokens
        if keep:
            self.samples[name].plain_ttft.append(times[self.first[name]] * 1e3)
            self.samples[name].plain_full.append(times[-1] * 1e3)

    def run(self, log: Callable[[str], None] | None) -> None:
        """Round robin over methods; ours and the plain loop back to back, alternating first."""
        s, active = self.spec, list(self.meths)
        for r, keep, order in stats.rounds(active, s.warmup, s.runs):
            for name in order:
                pair = [self.ours, self.reference] if s.plain else [self.ours]
                for fn in pair if r % 2 == 0 else pair[::-1]:
                    fn(name, keep)
            if log and keep:
                ttft = ", ".join(f"{n} {self.samples[n].ttft[-1]:.1f}" for n in active)
                log(f"[bench] run {r - s.warmup + 1}/{s.runs}: {ttft} ms TTFT")

    def finish_counts(self) -> dict[str, Counts]:
        s = self.spec
        for n, c in self.counts.items():
            c.expected_forward_passes = expected_passes(
                n, s.answer_tokens, s.cot_tokens, s.thoughts, s.loops
            )
            if s.plain:  # same greedy tokens: the plain loop did the same work
                c.same_tokens_as_plain = self.tokens[n] == self.plain_tokens[n]
        return self.counts


def _loops(m) -> tuple | None:
    """`plain_loop`'s `loops` for a looped RiM, else None."""
    if not getattr(m, "loops", 0):
        return None
    mem = m.settings.memory
    n = len(m.mem.blocks())
    return mem.loops, mem.loop_input == "own", m.depth["loop_projection"], n


def _ratios(ms: dict) -> dict:
    return {k: stats.ratio(ms.get(a), ms.get(b)) for k, (a, b) in RATIOS.items()}


def _result(session: _Session, notes: list[str], load: tuple | None) -> LatencyResult:
    spec, S = session.spec, session.samples
    med = {n: s.medians() for n, s in S.items()}
    keys = list(dict.fromkeys(LATENCY_METHODS + tuple(spec.methods)))  # None where not run

    def per_method(k: str) -> dict:
        return {n: med[n][k] if n in med else None for n in keys}

    ms, lat = per_method("ttft"), per_method("full")
    overhead = {  # ours / plain loop, paired per round: 1.0 = no overhead
        n: {
            "ttft": stats.paired(s.ttft, s.plain_ttft),
            "latency": stats.paired(s.full, s.plain_full),
        }
        for n, s in S.items()
    }
    machine = describe(session.bm.device, load_avg=load)
    return LatencyResult(
        ms=ms,
        ratios=_ratios(ms),
        latency_ms=lat,
        latency_ratios=_ratios(lat),
        machine=machine.bench_dict(),
        # medians of per-round ratios: the two figures of a pair were timed back to back
        paired_ratios={
            k: stats.paired(S[a].ttft if a in S else None, S[b].ttft if b in S else None)
            for k, (a, b) in RATIOS.items()
        },
        plain_ms=per_method("plain_ttft") if spec.plain else None,
        plain_latency_ms=per_method("plain_full") if spec.plain else None,
        overhead=overhead if spec.plain else None,
        counts=session.finish_counts(),
        config=spec.config(session.bm),
        notes=notes + machine.busy_note(),
    )


def measure_latency(
    model: str | BenchModel, spec: LatencySpec, device="cpu", dtype="float32", log=None
) -> LatencyResult:
    """Median TTFT and full-answer latency per method, ratios, and the plain-loop figures."""
    spec.check()
    load = load_average()  # before the run: the 1-minute average read after it counts the run
    bm = model
    if not isinstance(model, BenchModel):
        bm = load_bench_model(model, device, dtype, max_positions=spec.max_positions())
    notes: list[str] = []
    meths = {}
    for name in spec.methods:
        m = make_method(
            name,
            bm.tokenizer,
            blocks=spec.blocks,
            mem_tokens=spec.mem_tokens,
            answer_tokens=spec.answer_tokens,
            cot_tokens=spec.cot_tokens,
            thoughts=spec.thoughts,
            loops=spec.loops,
        )
        if m is None:
            notes.append(f"{name}: method not registered in rim.methods.METHODS; skipped")
        else:
            m.attach(bm.model)  # looped RiM's projection (random init, identity); else nothing
            meths[name] = m
    session = _Session(bm, spec, meths)
    session.run(log)
    return _result(session, notes, load)


def latency_bench(
    model: str | BenchModel = "gpt2",
    device: str = "cpu",
    dtype: str = "float32",
    log: Callable[[str], None] | None = None,
    **spec,
) -> dict:
    """`measure_latency` as the JSON of `rim bench latency --json`; keyword arguments are the
    fields of `LatencySpec` (batch, question_tokens, cot_tokens, ..., methods, plain)."""
    return measure_latency(model, LatencySpec(**spec), device, dtype, log).to_dict()
