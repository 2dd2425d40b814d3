"""Looped memory (`memory.loops: R` > 0; ours, issue 31, after PCCoT's Jacobi passes).

Pass 0 is RiM's prefill of `x ++ m_1..m_K`. Passes 1..R run the block tokens only, the
question's KV cache reused: the cache is cropped back to the question after each pass, and
a block token's input embedding in pass r is the loop projection (`rim.methods.depth`,
identity at init) of a last-layer state of pass r - 1: its own (`loop_input: own`) or its
predecessor's (`previous`, as PCCoT and Coconut feed a position the state before it; the
first block token's predecessor is the question's last token, from pass 0). So the blocks
get (R + 1) L layers of sequential depth for R more passes over K (M + 2) tokens.

Training runs the same passes, one example per row, with gradients through all of them.
Every row is laid out in columns `[question, left-padded | blocks | readouts]`, so one
crop serves all rows; the readouts (RiM's curriculum, unchanged: `RiM.segments`) hang
under the LAST pass's blocks and run in that pass, under the tree mask of `rim.layout`
(placed at those columns), so readout k sees the question, blocks 1..k of pass R and
itself. At inference the prefill plus R passes leave the cache of `x ++ m_1..m_K` (pass R)
and the first answer token's logits: 1 + R passes before greedy decoding; the all-blocks
decoder reads every block's answer (and stage 1's step readouts) from that one cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import DynamicCache

from rim.compat import cache_of, with_cache
from rim.data import Example
from rim.decoding import FirstPass, Prefill, kept_states, left_pad, positions
from rim.layout import IGNORE, allowed, pack, weighted_nll
from rim.methods import depth
from rim.methods.base import labelled_head


@dataclass
class Rows:
    """Columns `[question | blocks | readouts]` of every row (B rows, C = Q + N + Rd)."""

    ids: torch.Tensor  # (B, C)
    pos: torch.Tensor  # (B, C)
    labels: torch.Tensor  # (B, C)
    weights: torch.Tensor  # (B, C)
    mask: torch.Tensor  # (B, 1, C, C) additive float: 0 allowed, dtype-min blocked
    Q: int  # question columns (left-padded: every question ends at column Q - 1)
    N: int  # block columns (right-padded)

    def to(self, device) -> Rows:
        moved = (t.to(device) for t in (self.ids, self.pos, self.labels, self.weights, self.mask))
        return Rows(*moved, self.Q, self.N)


def layout(method, examples: list[Example], stage, progress: float, dtype) -> tuple[Rows, list]:
    """Each example's packed sequence (`rim.layout.pack` of `method.segments`) placed at its
    row's columns, and the state loss's items (row, first block column, blocks, step ids) in
    the last pass's columns (`[blocks | readouts]`)."""
    parts = []
    for ex in examples:
        segs = method.segments(ex, stage, progress)
        nb = sum(1 for s in segs if s.kind == "block")
        if any(s.kind != "block" for s in segs[1 : nb + 1]):
            raise ValueError("looped: the blocks must follow the question")
        q, n = len(segs[0].ids), sum(len(s.ids) for s in segs[1 : nb + 1])
        parts.append((pack(segs, method.eos_id), q, n, nb, ex))
    Q = max(p[1] for p in parts)
    N = max(p[2] for p in parts)
    C = Q + N + max(len(p[0]) - p[1] - p[2] for p in parts)
    B = len(parts)
    ids = torch.full((B, C), method.pad_id, dtype=torch.long)
    pos = torch.zeros(B, C, dtype=torch.long)
    labels = torch.full((B, C), IGNORE, dtype=torch.long)
    weights = torch.zeros(B, C)
    ok = torch.eye(C, dtype=torch.bool).repeat(B, 1, 1)  # a padded query sees itself
    items = []
    for b, (p, q, n, nb, ex) in enumerate(parts):
        L = len(p)
        j = torch.arange(L)
        col = torch.where(j < q, Q - q + j, torch.where(j < q + n, Q + j - q, Q + N + j - q - n))
        ids[b, col] = torch.tensor(p.input_ids)
        pos[b, col] = torch.tensor(p.position_ids)
        labels[b, col] = torch.tensor(p.labels)
        weights[b, col] = torch.tensor(p.weights)
        ok[b, col[:, None], col[None, :]] = allowed(p)
        items.append((b, 0, nb, [method.text_ids(s) for s in ex.steps]))
    mask = torch.zeros(B, 1, C, C, dtype=dtype)
    mask.masked_fill_(~ok[:, None], torch.finfo(dtype).min)
    return Rows(ids, pos, labels, weights, mask, Q, N), items


@contextmanager
def _feeding(model, where: torch.Tensor, values: torch.Tensor) -> Iterator[None]:
    """Inside, the input embedding is `values` (B, L, D) where `where` (B, L) is True: a hook,
    as Coconut's, so the other tokens embed inside the model's forward (PEFT's new rows)."""
    core = extract_model_from_parallel(model)

    def hook(module, args, out):  # out: (B, L, D)
        return torch.where(where[..., None], values.to(out.dtype), out)

    handle = core.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _crop(cache: DynamicCache, length: int) -> None:
    """Drop the cached positions after the first `length` (the question's)."""
    drop = cache.get_seq_length() - length
    if drop > 0:
        cache.crop(-drop)


def passes(model, proj, loops: int, own: bool, rows: Rows, where, hidden: bool):
    """Pass 0 over `[question | blocks]`, passes 1..R over the blocks (the last one with the
    readout columns, if any). `where` (B, C - Q): the last pass's LM-head positions.
    Returns the last pass's output (its hidden states when `hidden`)."""
    Q, N = rows.Q, rows.N
    P, C = Q + N, rows.ids.shape[1]
    B = rows.ids.shape[0]
    no_logits = torch.zeros(B, P, dtype=torch.bool, device=rows.ids.device)
    with labelled_head(model, no_logits):
        out = model(
            input_ids=rows.ids[:, :P], attention_mask=rows.mask[..., :P, :P],
            position_ids=rows.pos[:, :P], **with_cache(DynamicCache()), use_cache=True,
            output_hidden_states=True,
        )  # fmt: skip
    cache, h = cache_of(out), out.hidden_states[-1]  # (B, P, D)
    before, states = h[:, Q - 1 : Q], h[:, Q:]  # the question's last token, the blocks
    for r in range(1, loops + 1):
        _crop(cache, Q)
        last = r == loops
        end = C if last else P
        src = states if own else torch.cat([before, states[:, :-1]], dim=1)  # (B, N, D)
        feed = torch.zeros(B, end - Q, dtype=torch.bool, device=src.device)
        feed[:, :N] = True
        values = torch.nn.functional.pad(proj(src), (0, 0, 0, end - P))  # (B, end - Q, D)
        head = where if last else torch.zeros_like(feed)
        with _feeding(model, feed, values), labelled_head(model, head):
            out = model(
                input_ids=rows.ids[:, Q:end], attention_mask=rows.mask[..., Q:end, :end],
                position_ids=rows.pos[:, Q:end], **with_cache(cache), use_cache=True,
                output_hidden_states=hidden or not last,
            )  # fmt: skip
        cache = cache_of(out)
        if not last:
            states = out.hidden_states[-1]  # (B, N, D)
    return out


def loss(method, model, examples: list[Example], stage, progress: float, num_examples: int,
         device, state_on: bool) -> torch.Tensor:  # fmt: skip
    """RiM's weighted readout NLL after R loops (+ the state loss on pass R's states)."""
    depth.refuse_fsdp(model)
    mem = method.settings.memory
    dtype = next(model.parameters()).dtype
    rows, items = layout(method, examples, stage, progress, dtype)
    rows = rows.to(device)
    labels, weights = rows.labels[:, rows.Q :], rows.weights[:, rows.Q :]
    where = labels != IGNORE
    proj = depth.module(method, "loop_projection")
    own = mem.loop_input == "own"
    out = passes(model, proj, mem.loops, own, rows, where, state_on)
    total = weighted_nll(out.logits, labels[where], weights[where], num_examples)
    if not state_on:
        return total
    cfg = mem.state_loss
    tg = depth.targets(cfg, items, method.mem.block_len)
    layer = depth.state_layer(cfg, len(out.hidden_states) - 1)
    head = depth.module(method, "state_head")
    return total + depth.state_loss(model, head, cfg, out.hidden_states[layer], tg, num_examples)


def _rows(model, ids: torch.Tensor, mask: torch.Tensor, N: int) -> Rows:
    """Inference's rows: left-padded prompts ending in N block tokens, plain causal attention."""
    (B, P), device = ids.shape, ids.device
    dtype = next(model.parameters()).dtype
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    seen = (mask.bool()[:, None, :] & causal) | torch.eye(P, dtype=torch.bool, device=device)
    mask4 = torch.zeros(B, 1, P, P, dtype=dtype, device=device)
    mask4.masked_fill_(~seen[:, None], torch.finfo(dtype).min)
    return Rows(ids, positions(mask), None, None, mask4, P - N, N)


def _run(method, model, rows: Rows, where: torch.Tensor, keep_states: int):
    mem = method.settings.memory
    proj = depth.module(method, "loop_projection")
    own = mem.loop_input == "own"
    return passes(model, proj, mem.loops, own, rows, where, bool(keep_states))


@torch.no_grad()
def prefill(method, model, prompts: list[list[int]], keep_states: int = 0) -> Prefill:
    """`x ++ m_1..m_k` then R passes over the blocks: 1 + R passes, the cache of pass R.

    Every prompt ends with the same k blocks (`RiM.prompt`), so left padding makes every
    question end at column Q - 1 and one crop serves all rows."""
    N = _block_tokens(method, prompts)
    ids, mask = left_pad(prompts, method.pad_id, next(model.parameters()).device)  # (B, P)
    rows = _rows(model, ids, mask, N)
    where = torch.zeros(ids.shape[0], N, dtype=torch.bool, device=ids.device)
    where[:, -1] = True  # the last block token predicts the first answer token
    out = _run(method, model, rows, where, keep_states)
    states = kept_states(out, keep_states)
    passes_ = 1 + method.settings.memory.loops
    return Prefill(cache_of(out), mask, out.logits.float(), rows.pos[:, -1] + 1, passes_, states)


def first_pass(method, model) -> FirstPass:
    """`rim.decoding.all_blocks_greedy`'s first pass for a looped model: the prefill and R
    passes, every block's last token read from pass R. A block's state in every pass sees
    only the question and the blocks up to it (causal, and its input is its own or its
    predecessor's state), so branch k answers as a model given k blocks would (tested)."""

    def run(ids, mask, pos, ends, keep: int):
        B, P = ids.shape
        N = P - int(ends[0]) - 1 + method.mem.block_len  # all K blocks' tokens
        rows = _rows(model, ids, mask, N)
        where = torch.zeros(B, N, dtype=torch.bool, device=ids.device)
        where[:, ends - rows.Q] = True
        out = _run(method, model, rows, where, keep)
        logits = out.logits.float().view(B, len(ends), -1)  # (B, K, V), row-major
        return cache_of(out), logits, kept_states(out, keep), 1 + method.settings.memory.loops

    return run


def _block_tokens(method, prompts: list[list[int]]) -> int:
    """Tokens of the k blocks every prompt ends with (`RiM.prompt`: question ++ k blocks)."""
    block, Lb = method.mem.block(), method.mem.block_len
    shortest = min(prompts, key=len)
    k = 0
    while len(shortest) > (k + 1) * Lb and shortest[-(k + 1) * Lb :][:Lb] == block:
        k += 1
    if k == 0 or any(p[-k * Lb :] != block * k for p in prompts):
        raise ValueError("looped: every prompt must end with the same memory blocks")
    return k * Lb
