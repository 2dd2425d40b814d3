"""Decoding primitives (METHOD.md section 3): one prefill, then greedy steps with the KV cache.

Tensor-level and method-agnostic: prompts in, token ids out. Which prompt a method builds and
which decoder runs are `rim.decoders`; the user-facing `Reasoner` is `rim.reasoner`. RiM's prompt is `x ++ m_1..m_K` under plain causal attention, so a stock model's forward
does it. Any-block answers come from ONE shared prefill and one shared cache: every step
appends the next token of all K branches, and a 4-D mask lets branch k see only the question,
blocks 1..k and its own tokens, with position ids continuing after block k.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from rim.compat import cache_of, with_cache


@dataclass
class Prefill:
    cache: DynamicCache
    mask: torch.Tensor  # (N, P) key mask over everything cached so far (1 = visible)
    logits: torch.Tensor  # (N, V) logits of the first generated token
    next_pos: torch.Tensor  # (N,) position id of the next token
    passes: int  # forward passes spent so far (per row)
    states: tuple[torch.Tensor, ...] | None = None  # kept hidden states (see `prefill`)


@dataclass
class Decoded:
    tokens: list[list[int]]  # generated ids per row, EOS excluded
    passes: list[int]  # forward passes per row up to its last token
    token_times: list[float] = field(default_factory=list)  # seconds from start, per step
    start: float = 0.0
    rows_per_question: int = 1  # K for the all-blocks decoder (row b*K + k-1), else 1
    # when asked: the memory blocks' hidden states, one (Q, K*block_len, D) per layer
    # (embeddings first), on the CPU; None for methods without blocks
    memory_states: tuple[torch.Tensor, ...] | None = None
    blocks_used: list[int] | None = None  # per row, for decoders that choose (early-exit)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, P) ids and mask, prompts aligned to the right so every row ends at the same index."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p) :] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)  # (N, P)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def kept_states(out, keep: int) -> tuple[torch.Tensor, ...] | None:
    """The last `keep` positions' hidden states of every layer, (N, keep, D) each, on the CPU."""
    if not keep:
        return None
    return tuple(h[:, -keep:].detach().float().cpu() for h in out.hidden_states)


@torch.no_grad()
def prefill(model, prompts: list[list[int]], pad_id: int, keep_states: int = 0) -> Prefill:
    """One forward pass over the left-padded prompts; `keep_states` > 0 also returns the
    hidden states of the last `keep_states` positions (the memory blocks of a RiM prompt)."""
    ids, mask = left_pad(prompts, pad_id, _device(model))
    pos = positions(mask)
    cache = DynamicCache()
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        **with_cache(cache),
        use_cache=True,
        output_hidden_states=bool(keep_states),
        logits_to_keep=1,  # only the last position's logits: the LM head over P tokens is costly
    )
    logits = out.logits[:, -1].float()
    return Prefill(cache_of(out), mask, logits, pos[:, -1] + 1, 1, kept_states(out, keep_states))


# all_blocks_greedy's first pass: (ids, mask, positions, block ends, states to keep) ->
# (cache, (B, K, V) logits of every block's last token, kept states, forward passes spent)
FirstPass = Callable[..., tuple]


def one_pass(model) -> FirstPass:
    """The first pass of a one-prefill method: one forward over question and blocks."""

    def run(ids, mask, pos, ends, keep: int):
        first = int(ends[0])  # logits from block 1's last token on, not over the question
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, **with_cache(DynamicCache()),
            use_cache=True, output_hidden_states=bool(keep), logits_to_keep=ids.shape[1] - first,
        )  # fmt: skip
        return cache_of(out), out.logits[:, ends - first].float(), kept_states(out, keep), 1

    return run


@torch.no_grad()
def all_blocks_greedy(
    model,
    questions: list[list[int]],
    blocks: list[int],
    block_len: int,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    clock: Callable[[], float] | None = None,
    start: float = 0.0,
    keep_states: bool = False,
    cue: int | None = None,
    first_pass: FirstPass | None = None,
) -> Decoded:
    """The answer after every block from one prefill and ONE shared KV cache (row b*K + k-1).

    Training's packed layout, at inference: each decoding step appends K tokens per question
    (the next token of every branch) and a 4-D mask lets branch k see the question, blocks
    1..k and its own earlier tokens only, with positions continuing after block k. Branch k's
    first token comes from block k's last token in the prefill, or, with `cue` (explain
    mode's token), from the cue fed to every branch first (one more pass, not returned).
    No cache is copied. `first_pass`: how the prefill runs (`one_pass`, or a looped model's
    1 + R passes, whose blocks are causal too: block k's last state sees blocks 1..k only).
    """
    device = _device(model)
    K = len(blocks) // block_len
    ids, mask = left_pad([q + blocks for q in questions], pad_id, device)
    pos = positions(mask)
    B, P = ids.shape
    ends = torch.tensor([P - 1 - (K - k) * block_len for k in range(1, K + 1)], device=device)
    run = first_pass or one_pass(model)
    cache, logits, states, base = run(ids, mask, pos, ends, len(blocks) if keep_states else 0)
    cols = torch.arange(P, device=device)
    seen = mask.bool()[:, None, :] & (cols[None, None, :] <= ends[None, :, None])  # (B, K, P)
    branches = _Branches(model, cache, seen, pos[:, ends] + 1)  # next positions (B, K)
    if cue is not None:
        logits, base = branches.step(torch.full((B, K), cue, device=device)), base + 1
    track = _Tracker(B * K, base, eos_id)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # (B, K)
        track.record(nxt.reshape(-1).tolist(), step, clock, start)
        if track.finished or step == max_new_tokens - 1:
            break
        logits = branches.step(nxt)
    return track.result(start, rows_per_question=K, states=states)


class _Branches:
    """K decoding branches per question over one shared cache (see `all_blocks_greedy`)."""

    def __init__(self, model, cache, seen: torch.Tensor, next_pos: torch.Tensor):
        self.model, self.cache, self.seen, self.next_pos = model, cache, seen, next_pos
        B, K, _ = seen.shape
        self.own = torch.eye(K, dtype=torch.bool, device=seen.device).expand(B, K, K)
        self.dtype = next(model.parameters()).dtype

    def step(self, nxt: torch.Tensor) -> torch.Tensor:
        """Append token `nxt[b, k]` to branch k of question b; (B, K, V) next-token logits."""
        self.seen = torch.cat([self.seen, self.own], dim=-1)  # (B, K, kv + K)
        mask4 = torch.zeros(self.seen.shape, dtype=self.dtype, device=self.seen.device)
        mask4.masked_fill_(~self.seen, torch.finfo(self.dtype).min)
        out = self.model(
            input_ids=nxt,
            attention_mask=mask4[:, None],  # (B, 1, K, kv)
            position_ids=self.next_pos,
            **with_cache(self.cache),
            use_cache=True,
        )
        self.cache, self.next_pos = cache_of(out), self.next_pos + 1
        return out.logits.float()


class _Tracker:
    """Per-row bookkeeping of greedy decoding: tokens until EOS, forward passes, step times."""

    def __init__(self, rows: int, base_passes: int, eos_id: int):
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.passes = [base_passes] * rows
        self.done = [False] * rows
        self.times: list[float] = []
        self.base, self.eos = base_passes, eos_id

    def record(self, nxt: list[int], step: int, clock, start: float) -> None:
        if clock is not None:
            self.times.append(clock() - start)
        for i, t in enumerate(nxt):
            if self.done[i]:
                continue
            self.passes[i] = self.base + step
            if t == self.eos:
                self.done[i] = True
            else:
                self.tokens[i].append(t)

    @property
    def finished(self) -> bool:
        return all(self.done)

    def result(self, start: float, rows_per_question: int = 1, states=None) -> Decoded:
        return Decoded(self.tokens, self.passes, self.times, start, rows_per_question, states)


@torch.no_grad()
def greedy(
    model,
    state: Prefill,
    eos_id: int,
    max_new_tokens: int,
    clock: Callable[[], float] | None = None,
    start: float = 0.0,
) -> Decoded:
    """Greedy decoding from a prefill until every row has produced EOS or the budget is spent."""
    N = state.logits.shape[0]
    device = state.logits.device
    track = _Tracker(N, state.passes, eos_id)
    logits, mask, pos, cache = state.logits, state.mask, state.next_pos, state.cache
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # (N,)
        track.record(nxt.tolist(), step, clock, start)  # .tolist() synchronises the device
        if track.finished or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(N, 1, dtype=mask.dtype, device=device)], dim=1)
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=pos[:, None],
            **with_cache(cache),
            use_cache=True,
        )
        cache, logits, pos = cache_of(out), out.logits[:, -1].float(), pos + 1
    return track.result(start, states=state.states)


def wall_clock(device: torch.device) -> Callable[[], float]:
    """A clock that first waits for the device, so times include queued GPU work."""

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock
