"""Inference (METHOD.md section 3): one prefill, then greedy decoding with the KV cache.

RiM's prompt is `x ++ m_1..m_K` under plain causal attention, so a stock model's forward
does it. Any-block answers come from ONE shared prefill and one shared cache: every step
appends the next token of all K branches, and a 4-D mask lets branch k see only the question,
blocks 1..k and its own tokens, with position ids continuing after block k.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from rim.errors import RimError

UNKNOWN_WARN = 0.05  # warn when more than this share of question tokens is unknown


@dataclass
class Prefill:
    cache: DynamicCache
    mask: torch.Tensor  # (N, P) key mask over everything cached so far (1 = visible)
    logits: torch.Tensor  # (N, V) logits of the first generated token
    next_pos: torch.Tensor  # (N,) position id of the next token
    passes: int  # forward passes spent so far (per row)


@dataclass
class Decoded:
    tokens: list[list[int]]  # generated ids per row, EOS excluded
    passes: list[int]  # forward passes per row up to its last token
    token_times: list[float] = field(default_factory=list)  # seconds from start, per step
    start: float = 0.0


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


@torch.no_grad()
def prefill(model, prompts: list[list[int]], pad_id: int) -> Prefill:
    ids, mask = left_pad(prompts, pad_id, _device(model))
    pos = positions(mask)
    cache = DynamicCache()
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,  # only the last position's logits: the LM head over P tokens is costly
    )
    return Prefill(out.cache, mask, out.logits[:, -1].float(), pos[:, -1] + 1, 1)


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
) -> Decoded:
    """The answer after every block from one prefill and ONE shared KV cache (row b*K + k-1).

    Training's packed layout, at inference: each decoding step appends K tokens per question
    (the next token of every branch) and a 4-D mask lets branch k see the question, blocks
    1..k and its own earlier tokens only, with positions continuing after block k. Branch k's
    first token comes from block k's last token in the prefill. No cache is copied.
    """
    device, dtype = _device(model), next(model.parameters()).dtype
    K = len(blocks) // block_len
    ids, mask = left_pad([q + blocks for q in questions], pad_id, device)
    pos = positions(mask)
    B, P = ids.shape
    ends = torch.tensor([P - 1 - (K - k) * block_len for k in range(1, K + 1)], device=device)
    keep = (K - 1) * block_len + 1  # logits from block 1's last token on, not over the question
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        cache=DynamicCache(),
        use_cache=True,
        logits_to_keep=keep,
    )
    logits, cache = out.logits[:, ends - (P - keep)].float(), out.cache  # (B, K, V)
    cols = torch.arange(P, device=device)
    seen = mask.bool()[:, None, :] & (cols[None, None, :] <= ends[None, :, None])  # (B, K, P)
    own = torch.eye(K, dtype=torch.bool, device=device).expand(B, K, K)  # branch k sees its own
    next_pos = pos[:, ends] + 1  # (B, K)
    track = _Tracker(B * K, 1, eos_id)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # (B, K)
        track.record(nxt.reshape(-1).tolist(), step, clock, start)
        if track.finished or step == max_new_tokens - 1:
            break
        seen = torch.cat([seen, own], dim=-1)  # (B, K, P + (step + 1) K)
        mask4 = torch.zeros(seen.shape, dtype=dtype, device=device)
        mask4.masked_fill_(~seen, torch.finfo(dtype).min)
        out = model(
            input_ids=nxt,
            attention_mask=mask4[:, None],  # (B, 1, K, kv)
            position_ids=next_pos,
            cache=cache,
            use_cache=True,
        )
        cache, logits, next_pos = out.cache, out.logits.float(), next_pos + 1
    return track.result(start)


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

    def result(self, start: float) -> Decoded:
        return Decoded(self.tokens, self.passes, self.times, start)


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
            cache=cache,
            use_cache=True,
        )
        cache, logits, pos = out.cache, out.logits[:, -1].float(), pos + 1
    return track.result(start)


def wall_clock(device: torch.device) -> Callable[[], float]:
    """A clock that first waits for the device, so times include queued GPU work."""

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


# ---------------------------------------------------------------- input checks


def position_limit(method, model) -> int | None:
    """Positions a prompt plus its answer may use: the model's, or the recipe's max_length."""
    from rim.model import max_positions

    limits = [max_positions(model), method.cfg.data.max_length]
    limits = [n for n in limits if isinstance(n, int)]
    return min(limits) if limits else None


def _reserved(method, question_ids: list[int], prompt: list[int]) -> int:
    """Positions after the question: blocks (or Coconut's thoughts) and the answer budget."""
    thoughts = method.thoughts() + 1 if hasattr(method, "thoughts") else 0  # + <eot>
    return len(prompt) - len(question_ids) + thoughts + method.max_new_tokens()


def check_questions(
    method, model, questions: list[str], blocks: int | None = None, truncate: bool = False,
    where: Callable[[int], str] = lambda i: f"question {i + 1}",
) -> None:  # fmt: skip
    """Refuse what the model cannot answer: empty questions and, unless `truncate`, questions
    longer than the positions left after the blocks and the answer budget. Warns (one line)
    when many question tokens are unknown to the tokenizer (the wrong checkpoint or data)."""
    limit = position_limit(method, model)
    unk, n_unk, n_all = method.tokenizer.unk_token_id, 0, 0
    for i, q in enumerate(questions):
        if not q.strip():
            raise RimError(f"{where(i)}: empty question")
        ids = list(method.question_ids(q))
        reserved = _reserved(method, ids, method.prompt(q, blocks))
        if (
            limit is not None
            and (len(ids) + reserved > limit)
            and (not truncate or limit - reserved < 2)
        ):
            raise RimError(
                f"{where(i)}: {len(ids)} question tokens + {reserved} for blocks and answer "
                f"> {limit} positions of the model (shorten it, or pass --truncate)"
            )
        n_all += len(ids)
        n_unk += ids.count(unk) if unk is not None else 0
    if n_all and n_unk / n_all > UNKNOWN_WARN:
        print(
            f"rim: warning: {n_unk / n_all:.0%} of the question tokens are unknown to the "
            f"checkpoint's tokenizer ({method.tokenizer.unk_token}); is the data for this model?",
            file=sys.stderr,
        )


def _fit(method, model, question_ids: list[int], prompt: list[int]) -> int:
    """How many question tokens to cut from the front so the prompt and answer fit."""
    limit = position_limit(method, model)
    if limit is None:
        return 0
    return max(len(question_ids) + _reserved(method, question_ids, prompt) - limit, 0)


def _truncated(method, model, question: str, blocks: int | None) -> tuple[list[int], list[int]]:
    """(question ids, prompt) with the question's oldest tokens dropped (its first, bos, kept)."""
    ids = list(method.question_ids(question))
    prompt = method.prompt(question, blocks)
    cut = _fit(method, model, ids, prompt)
    if cut:
        keep = ids[:1] + ids[1 + cut :]
        prompt, ids = keep + prompt[len(ids) :], keep
    return ids, prompt


@torch.no_grad()
def decode(
    method,
    model,
    questions: list[str],
    blocks: int | None = None,
    all_blocks: bool = False,
    clock: Callable[[], float] | None = None,
    truncate: bool = False,
) -> Decoded:
    """Answer `questions` with `method`'s prompt: the path `rim eval` and `rim generate` use.

    `blocks` overrides K (block methods); `all_blocks` returns K branches per question
    (row b*K + k-1 is question b answered after block k) from one shared prefill.
    `truncate` drops a too-long question's oldest tokens (see `check_questions`).
    """
    fitted = [_truncated(method, model, q, blocks) if truncate else None for q in questions]
    start = clock() if clock is not None else 0.0
    if all_blocks:
        if not method.uses_blocks:
            raise ValueError(f"method {method.name} has no memory blocks")
        mem = method.mem
        qs = [f[0] if f else list(method.question_ids(q)) for f, q in zip(fitted, questions)]
        return all_blocks_greedy(
            model, qs, mem.blocks(blocks), mem.block_len, method.pad_id, method.eos_id,
            method.max_new_tokens(), clock, start,
        )  # fmt: skip
    prompts = [f[1] if f else method.prompt(q, blocks) for f, q in zip(fitted, questions)]
    state = method.prefill(model, prompts)
    return greedy(model, state, method.eos_id, method.max_new_tokens(), clock, start)


class Reasoner:
    """A trained checkpoint ready to answer: `Reasoner.load(dir).generate(["3 + 4"])`."""

    def __init__(self, model, tokenizer, method):
        self.model, self.tokenizer, self.method = model, tokenizer, method

    @classmethod
    def load(cls, checkpoint: str, device: str = "cpu") -> Reasoner:
        from pathlib import Path

        from rim.config import load_config
        from rim.memory import memory_tokens
        from rim.methods import method_class
        from rim.model import load_checkpoint

        model, tok, meta = load_checkpoint(checkpoint, device)
        cfg = load_config(Path(checkpoint) / "config.yaml")
        mcls = method_class(meta.get("method", cfg.method))
        mem = memory_tokens(tok, cfg.memory) if mcls.uses_blocks else None
        method = mcls(cfg, tok, mem)
        return cls(method.attach(model, Path(checkpoint)), tok, method)

    def generate(
        self,
        questions: list[str],
        blocks: int | None = None,
        all_blocks: bool = False,
        truncate: bool = False,
    ) -> list[str] | list[list[str]]:
        """Greedy answers; with `all_blocks`, a list of K answers (after blocks 1..K) each.

        Questions are checked first (`check_questions`): too long is an error unless
        `truncate`, which drops their oldest tokens."""
        check_questions(self.method, self.model, questions, blocks, truncate)
        out = decode(self.method, self.model, questions, blocks, all_blocks, truncate=truncate)
        texts = self.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        if not all_blocks:
            return texts
        K = len(texts) // len(questions)
        return [texts[i * K : (i + 1) * K] for i in range(len(questions))]


def generate(checkpoint: str, questions: list[str], **kwargs) -> list[str] | list[list[str]]:
    """One-call API: load `checkpoint` and answer `questions` (see `Reasoner.generate`)."""
    return Reasoner.load(checkpoint).generate(questions, **kwargs)
