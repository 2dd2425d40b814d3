"""Coconut, continuous thoughts (Hao et al. 2024; METHOD.md section 6; docs/baselines.md).

Stage k replaces the first k reasoning steps by c*k *continuous thoughts*: the last-layer
hidden state of the previous position is fed back as the next input embedding. A training
sequence is `x ++ <bot> ++ [thought] * n ++ <eot> ++ remaining steps ++ marker ++ answer`, laid
out as the authors' `dataset.py` does: n = c * min(k, max_stage) for every example
(`pad_latent_to_max`), and the stages past max_stage drop every language step. n thoughts take
n + 1 sequential passes sharing one KV cache, as the original's `Coconut.forward`: the prefix
`x ++ <bot>`, one pass for each of thoughts 1..n-1, and a last pass that holds thought n
together with `<eot>` and the target (at inference, `<eot>` alone). Gradients flow through
every thought. Stage 0 (no thought) is CoT SFT with `<bot><eot>` in the prompt: one pass.

Rows with different numbers of thoughts (`pad_latent_to_max: false`): prefixes are left-padded
so they end at the same index; a row out of thoughts feeds a dummy embedding whose key is
masked out and whose position does not advance, and keeps its last thought for the last pass,
so each row computes exactly what it would alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from rim.compat import cache_of, with_cache
from rim.config import CoconutConfig
from rim.curriculum import Stage, coconut_plan, steps_for
from rim.data import Example
from rim.decoding import Prefill, left_pad, positions
from rim.errors import ConfigError
from rim.layout import IGNORE, Segment, weighted_nll
from rim.methods.base import Common, Method, Tokens, labelled_head, readout
from rim.methods.registry import register
from rim.tokenized import counts


@dataclass(frozen=True)
class Latent:
    """A stage's payload: stage k of the curriculum (k > max_stage: fully latent)."""

    k: int


@dataclass
class Passes:
    """State after the prefix, the thoughts and the tail (`<eot>` [+ target])."""

    cache: DynamicCache
    mask: torch.Tensor  # (B, S) key mask over everything cached, 1 = visible
    logits: torch.Tensor  # (B, keep, V) logits of the last `keep` positions (the tail)
    next_pos: torch.Tensor  # (B,) position id after each row's last tail token
    passes: int  # sequential forward passes: max(counts) + 1


def _right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and mask, rows aligned to the left."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _embedding(model) -> torch.nn.Module:
    while not hasattr(model, "get_input_embeddings") and hasattr(model, "module"):
        model = model.module  # DDP
    return model.get_input_embeddings()


@contextmanager
def _feeding(model, where: torch.Tensor, values: torch.Tensor) -> Iterator[None]:
    """Inside, the input embedding is `values` (B, 1, D) where `where` (B, L) is True.

    A hook rather than `inputs_embeds` so that the token embeddings are computed inside the
    model's forward (sharded weights are gathered there), as the original replaces the
    embeddings of its `<latent>` placeholders.
    """

    def hook(module, args, out):  # out: (B, L, D)
        return torch.where(where[..., None], values.to(out.dtype), out)

    handle = _embedding(model).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _think(model, ids, mask, pos, n: torch.Tensor, n_max: int):
    """The prefix pass and thought passes 1..n_max-1; returns each row's last thought."""
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        **with_cache(DynamicCache()),
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    cache, h = cache_of(out), out.hidden_states[-1][:, -1:]  # h: (B, 1, D), thought 1
    next_pos = pos[:, -1] + 1  # (B,)
    last = torch.zeros_like(h)  # (B, 1, D): thought n_b of row b, fed in the last pass
    for i in range(1, n_max):  # pass i feeds thought i; its output is thought i + 1
        last = torch.where((n == i)[:, None, None], h, last)
        active = n > i  # (B,) rows for which thought i is not the last
        emb = torch.where(active[:, None, None], h, torch.zeros_like(h))  # (B, 1, D)
        mask = torch.cat([mask, active.to(mask.dtype)[:, None]], dim=1)  # (B, P + i)
        out = model(
            inputs_embeds=emb,
            attention_mask=mask,
            position_ids=next_pos[:, None],
            **with_cache(cache),
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        cache, h = cache_of(out), out.hidden_states[-1][:, -1:]  # (B, 1, D)
        next_pos = next_pos + active.to(next_pos.dtype)
    last = torch.where((n == n_max)[:, None, None], h, last)
    return cache, mask, next_pos, last


def run(
    model,
    prefixes: list[list[int]],
    counts: list[int],
    tails: list[list[int]],
    pad_id: int,
    keep: int | None = None,
    where: torch.Tensor | None = None,
) -> Passes:
    """`x ++ <bot>`, `counts[b]` thoughts, then `tails[b]` per row: max(counts) + 1 passes.

    `keep`: logits of the last `keep` positions only (default: the whole tail). `where`
    (B, Lt): the tail's logits only where it is True, flat (N, V) (`labelled_head`).
    """
    head = nullcontext() if where is None else labelled_head(model, where)
    device = next(model.parameters()).device
    ids, mask = left_pad(prefixes, pad_id, device)  # (B, P)
    pos = positions(mask)  # (B, P)
    tail, tmask = _right_pad(tails, pad_id, device)  # (B, Lt)
    Lt = tail.shape[1]
    steps = torch.arange(Lt, device=device)  # (Lt,)
    n = torch.tensor(counts, device=device)  # (B,)
    n_max = max(counts, default=0)
    if n_max == 0:  # no thought: one pass over the whole sequence, as the original
        mask = torch.cat([mask, tmask], dim=1)  # (B, P + Lt)
        tpos = pos[:, -1:] + 1 + steps  # (B, Lt)
        with head:
            out = model(
                input_ids=torch.cat([ids, tail], dim=1),
                attention_mask=mask,
                position_ids=torch.cat([pos, tpos], dim=1),
                **with_cache(DynamicCache()),
                use_cache=True,
                logits_to_keep=keep or Lt,
            )
        return Passes(cache_of(out), mask, out.logits, tpos[:, 0] + tmask.sum(1), 1)
    cache, mask, next_pos, last = _think(model, ids, mask, pos, n, n_max)
    has = (n > 0).to(mask.dtype)  # (B,) rows with a last thought
    slot = torch.zeros(len(counts), 1 + Lt, dtype=torch.bool, device=device)
    slot[:, 0] = n > 0  # (B, 1 + Lt): where the last thought goes
    mask = torch.cat([mask, has[:, None], tmask], dim=1)  # (B, P + n_max - 1 + 1 + Lt)
    tpos = next_pos[:, None] + has[:, None] + steps  # (B, Lt)
    with _feeding(model, slot, last), head:
        out = model(
            input_ids=torch.cat([tail[:, :1], tail], dim=1),  # slot 0: any id, replaced
            attention_mask=mask,
            position_ids=torch.cat([next_pos[:, None], tpos], dim=1),
            **with_cache(cache),
            use_cache=True,
            logits_to_keep=keep or Lt,
        )
    return Passes(cache_of(out), mask, out.logits, tpos[:, 0] + tmask.sum(1), n_max + 1)


@register
class Coconut(Method):
    name = "coconut"
    section = "coconut"
    plain_prompt = False  # sequential latent passes at inference: not exportable
    shares_rows = False  # one example per row: the thought passes run row by row
    # the target after <eot> is `remaining steps ++ marker ++ answer`, as the original's
    # `steps ++ "### " answer`; fully latent at the final stage, the marker still comes first
    writes_reasoning = True
    settings: CoconutConfig

    def __init__(self, common: Common, settings: CoconutConfig, tokens: Tokens, tokenizer):
        super().__init__(common, settings, tokens, tokenizer)
        self.bot_id, self.thought_id, self.eot_id = tokens.new

    @classmethod
    def new_tokens(cls, settings: CoconutConfig) -> list[str]:
        return [settings.start_token, settings.thought_token, settings.end_token]

    # ---- training ----
    def plan(self, n_train: int, t_max: int) -> list[Stage]:
        """One Stage per optimizer: per epoch with `reset_optimizer`, else per k.

        The trainer resets optimizer and LR schedule at each Stage; every Stage of the last
        k may provide best/ (only it trains what inference runs).
        """
        c, t = self.settings, self.common
        bs = t.batch_size
        keys = ("coconut.epochs_per_stage", "coconut.steps_per_stage")
        per = steps_for(c.epochs_per_stage, c.steps_per_stage, n_train, bs, keys)
        total = (
            None
            if c.epochs is None and c.steps is None
            else steps_for(c.epochs, c.steps, n_train, bs, ("coconut.epochs", "coconut.steps"))
        )
        epoch = steps_for(1.0, None, n_train, bs) if c.reset_optimizer else None
        spans = coconut_plan(c.max_stage, c.stage0, per, total, epoch)
        if total is not None and spans[-1][0] <= c.max_stage:
            n_stages = c.max_stage + int(c.stage0)
            raise ConfigError(
                f"coconut.epochs/steps: the run ({total} steps) ends before the latent stage "
                f"(stages {0 if c.stage0 else 1}..{c.max_stage} take {per * n_stages}); raise "
                "it, or set both null to stop after max_stage"
            )
        last_k = spans[-1][0]
        seen: dict[int, int] = {}
        stages = []
        for i, (k, steps) in enumerate(spans):
            j = seen[k] = seen.get(k, -1) + 1
            name = f"stage{k}" if epoch is None else f"stage{k}.{j}"
            stage = Stage(name, i, steps, t.lr, t.dropout, Latent(k), c.warmup, k == last_k)
            stages.append(stage)
        return stages

    def parts(self, ex: Example, k: int) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
        """(`x ++ <bot>`, number of thoughts, target) for `ex` at stage k.

        As the original's `get_cot_latent_dataset`: stage k <= max_stage drops the first k
        steps, a later stage drops all of them; thoughts c * min(k, max_stage), or with
        `pad_latent_to_max: false` c * min(k, max_stage, T).
        """
        c = self.settings
        dropped = k if k <= c.max_stage else len(ex.steps)
        latent = min(k, c.max_stage)
        if not c.pad_latent_to_max:
            latent = min(latent, len(ex.steps))
        target = self.cot_ids(ex, dropped) + self.answer_ids(ex.answer)
        return self.question_ids(ex.question) + (self.bot_id,), c.thoughts_per_step * latent, target

    def layout(self, ex: Example, k: int) -> tuple[list[int], list[int]]:
        """The training sequence and labels as the original's `dataset.py` builds them.

        Thoughts as `<latent>` placeholders, EOS at the end, labels unshifted (IGNORE up to
        `<eot>`): token i's label is predicted at position i - 1.
        """
        prefix, n, target = self.parts(ex, k)
        head = list(prefix) + [self.thought_id] * n + [self.eot_id]
        tail = list(target) + [self.eos_id]
        return head + tail, [IGNORE] * len(head) + tail

    def segments(self, ex: Example, stage: Stage, progress: float) -> list[Segment]:
        """The sequence with placeholder thought tokens (for length checks and inspection)."""
        prefix, n, target = self.parts(ex, _k(stage))
        x = Segment(prefix + (self.thought_id,) * n + (self.eot_id,))
        return [x, readout(target, 0, 1.0)]

    def train_length(self, ex: Example, stage: Stage) -> int:
        """Tokens of the training sequence, counted without laying it out (many Stages)."""
        prefix, n, target = self.parts(ex, _k(stage))
        return len(prefix) + n + 1 + len(target)

    def train_lengths(self, examples: list[Example], stages: list[Stage]) -> np.ndarray:
        """`train_length` of every example at every stage, counted once per curriculum k."""
        c, by_k = self.settings, {}
        q = counts(self.question_ids(e.question) for e in examples)
        a = counts(self.answer_ids(e.answer) for e in examples)
        T = np.fromiter((len(e.steps) for e in examples), np.int64, len(examples))
        for k in dict.fromkeys(_k(s) for s in stages):
            cot = counts(self.cot_ids(e, k) for e in examples) if k <= c.max_stage else 0
            latent = min(k, c.max_stage)
            n = latent if c.pad_latent_to_max else np.minimum(latent, T)
            by_k[k] = q + 1 + c.thoughts_per_step * n + 1 + cot + a  # + <bot>, <eot>
        rows = [by_k[_k(s)] for s in stages]
        return np.stack(rows) if rows else np.zeros((0, len(examples)), np.int64)

    def texts(self, ex: Example) -> Iterator[str]:
        """The base's strings and the chains that stages 1..max_stage leave."""
        yield from super().texts(ex)
        for k in range(1, min(self.settings.max_stage, len(ex.steps) - 1) + 1):
            yield self._cot_text(ex.steps[k:], ex.step_sep)

    def loss(
        self,
        model,
        examples: list[Example],
        stage: Stage,
        progress: float,
        num_examples: int,
        device: torch.device,
    ) -> torch.Tensor:
        """Per-example mean target NLL, summed and divided by `num_examples` (as packed methods)."""
        k = _k(stage)
        prefixes, counts, targets = zip(*(self.parts(ex, k) for ex in examples))
        tails = [[self.eot_id, *t] for t in targets]  # <eot> predicts t_1, t_m predicts EOS
        B, Lt = len(tails), max(len(t) for t in tails)
        labels = torch.full((B, Lt), IGNORE, dtype=torch.long)
        weights = torch.zeros(B, Lt)
        for b, t in enumerate(targets):
            labels[b, : len(t) + 1] = torch.tensor(t + (self.eos_id,))
            weights[b, : len(t) + 1] = 1.0 / (len(t) + 1)
        labels, weights = labels.to(device), weights.to(device)
        where = labels != IGNORE  # (B, Lt): the LM head runs only there (not on padding)
        logits = run(model, list(prefixes), list(counts), tails, self.pad_id, where=where).logits
        return weighted_nll(logits, labels[where], weights[where], num_examples)  # (N, V)

    # ---- inference ----
    def thoughts(self) -> int:
        """Thoughts at inference: those of the final stage."""
        c = self.settings
        return c.thoughts_per_step * c.max_stage

    def latent_positions(self) -> int:
        return self.thoughts() + 1  # + <eot>

    def prompt(self, question: str, blocks: int | None = None) -> list[int]:
        return list(self.question_ids(question)) + [self.bot_id]

    @torch.no_grad()
    def prefill(self, model, prompts: list[list[int]], keep_states: int = 0) -> Prefill:
        """Prefix, thoughts and `<eot>` in n + 1 passes: greedy decoding continues from here.
        (No memory blocks: `keep_states` is ignored.)"""
        n = self.thoughts()
        out = run(
            model, prompts, [n] * len(prompts), [[self.eot_id]] * len(prompts), self.pad_id, 1
        )
        return Prefill(out.cache, out.mask, out.logits[:, -1].float(), out.next_pos, out.passes)

    def meta(self, plan: list[Stage] | None = None) -> dict:
        c = self.settings
        return super().meta(plan) | {
            "thoughts": self.thoughts(),
            "thoughts_per_step": c.thoughts_per_step,
            "max_stage": c.max_stage,
        }


def _k(stage: Stage) -> int:
    """Stage k of a Coconut plan (0 for a stage without a `Latent` payload)."""
    return stage.payload.k if isinstance(stage.payload, Latent) else 0
