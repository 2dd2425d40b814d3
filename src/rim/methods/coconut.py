"""Coconut, continuous thoughts (Hao et al. 2024; METHOD.md section 6).

Stage k replaces the first k reasoning steps by c*k *continuous thoughts*: the last-layer
hidden state of the previous position is fed back as the next input embedding. A sequence
is `x ++ <bot> ++ [thought] * n ++ <eot> ++ remaining steps ++ marker ++ answer`. A thought
depends on the previous pass's output, so training and inference need n + 2 sequential
forward passes (prefix, n thoughts, `<eot>` [+ target]) sharing one KV cache; gradients
flow through every thought. Stage 0 is plain CoT SFT with `<bot><eot>` in the prompt.

Padding a batch whose rows have different numbers of thoughts: prefixes are left-padded so
they end at the same index; a row out of thoughts feeds a dummy embedding whose key is
masked out and whose position does not advance, so each row computes exactly what it would
alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from rim.config import Config
from rim.curriculum import Stage, coconut_stages, steps_for
from rim.data import Example
from rim.decoding import Prefill, left_pad, positions
from rim.layout import IGNORE, Segment
from rim.memory import MemoryTokens
from rim.methods.base import Method, readout


@dataclass
class Thoughts:
    """State after the prefix pass and the thought passes."""

    cache: DynamicCache
    mask: torch.Tensor  # (B, P + n_max) key mask, 1 = visible
    next_pos: torch.Tensor  # (B,) position id of each row's next token (`<eot>`)
    passes: int  # forward passes so far


def think(model, prefixes: list[list[int]], counts: list[int], pad_id: int) -> Thoughts:
    """Run `x ++ <bot>` then `counts[b]` continuous thoughts per row, all with one cache."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prefixes, pad_id, device)  # (B, P), (B, P)
    pos = positions(mask)  # (B, P)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        cache=DynamicCache(),
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    cache, h = out.cache, out.hidden_states[-1][:, -1:]  # h: (B, 1, D)
    next_pos = pos[:, -1] + 1  # (B,)
    n = torch.tensor(counts, device=device)  # (B,)
    n_max = max(counts, default=0)
    for i in range(n_max):
        active = n > i  # (B,) rows still thinking
        emb = torch.where(active[:, None, None], h, torch.zeros_like(h))  # (B, 1, D)
        mask = torch.cat([mask, active.to(mask.dtype)[:, None]], dim=1)  # (B, P + i + 1)
        out = model(
            inputs_embeds=emb,
            attention_mask=mask,
            position_ids=next_pos[:, None],
            cache=cache,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        cache, h = out.cache, out.hidden_states[-1][:, -1:]  # (B, 1, D)
        next_pos = next_pos + active.to(next_pos.dtype)
    return Thoughts(cache, mask, next_pos, 1 + n_max)


class Coconut(Method):
    name = "coconut"
    writes_reasoning = True  # steps beyond the latent ones are still written before the marker

    def __init__(self, cfg: Config, tokenizer, mem: MemoryTokens | None = None):
        super().__init__(cfg, tokenizer, mem)
        vocab = tokenizer.get_vocab()
        missing = [s for s in self.new_tokens(cfg) if s not in vocab]
        if missing:
            raise ValueError(f"coconut: the tokenizer lacks {missing} (add new_tokens first)")
        c = cfg.coconut
        self.bot_id, self.thought_id, self.eot_id = (
            vocab[s] for s in (c.start_token, c.thought_token, c.end_token)
        )

    @classmethod
    def new_tokens(cls, cfg: Config) -> list[str]:
        c = cfg.coconut
        return [c.start_token, c.thought_token, c.end_token]

    # ---- training ----
    def plan(self, n_train: int, t_max: int) -> list[Stage]:
        """One stage per k; the trainer resets optimizer and LR at each stage switch."""
        c, t = self.cfg.coconut, self.cfg.train
        steps = steps_for(c.epochs_per_stage, c.steps_per_stage, n_train, t.batch_size)
        ks = coconut_stages(c.max_stage, c.stage0)
        return [Stage(f"stage{k}", i, steps, t.lr, t.dropout, {"k": k}) for i, k in enumerate(ks)]

    def parts(self, ex: Example, k: int) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
        """(`x ++ <bot>`, number of thoughts, target) for `ex` at stage k."""
        latent = min(k, len(ex.steps))
        n = self.cfg.coconut.thoughts_per_step * latent
        target = self.cot_ids(ex, latent) + self.answer_ids(ex.answer)
        return self.question_ids(ex.question) + (self.bot_id,), n, target

    def segments(self, ex: Example, stage: Stage, progress: float) -> list[Segment]:
        """The sequence with placeholder thought tokens (for length checks and inspection)."""
        prefix, n, target = self.parts(ex, int(stage.options.get("k", 0)))
        x = Segment(prefix + (self.thought_id,) * n + (self.eot_id,))
        return [x, readout(target, 0, 1.0)]

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
        k = int(stage.options.get("k", 0))
        prefixes, counts, targets = zip(*(self.parts(ex, k) for ex in examples))
        state = think(model, list(prefixes), list(counts), self.pad_id)
        B, Lt = len(examples), 1 + max(len(t) for t in targets)
        ids = torch.full((B, Lt), self.pad_id, dtype=torch.long)
        labels = torch.full((B, Lt), IGNORE, dtype=torch.long)
        weights = torch.zeros(B, Lt)
        tmask = torch.zeros(B, Lt, dtype=state.mask.dtype)
        for b, t in enumerate(targets):
            m = len(t)
            ids[b, : m + 1] = torch.tensor((self.eot_id,) + t)
            labels[b, : m + 1] = torch.tensor(t + (self.eos_id,))  # <eot> predicts t_1
            weights[b, : m + 1] = 1.0 / (m + 1)
            tmask[b, : m + 1] = 1
        ids, labels, weights = ids.to(device), labels.to(device), weights.to(device)
        mask = torch.cat([state.mask, tmask.to(device)], dim=1)  # (B, P + n_max + Lt)
        pos = state.next_pos[:, None] + torch.arange(Lt, device=device)  # (B, Lt)
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            cache=state.cache,
            use_cache=True,
        ).logits  # (B, Lt, V)
        nll = torch.nn.functional.cross_entropy(
            logits.float().reshape(B * Lt, -1),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="none",
        ).reshape(B, Lt)  # (B, Lt), 0 where IGNORE
        return (nll * weights).sum() / num_examples

    # ---- inference ----
    def thoughts(self) -> int:
        """Thoughts at inference: those of the final stage."""
        c = self.cfg.coconut
        return c.thoughts_per_step * c.max_stage

    def prompt(self, question: str, blocks: int | None = None) -> list[int]:
        return list(self.question_ids(question)) + [self.bot_id]

    @torch.no_grad()
    def prefill(self, model, prompts: list[list[int]]) -> Prefill:
        """Prefix, thoughts, then `<eot>`: greedy decoding continues from this cache."""
        n = self.thoughts()
        state = think(model, prompts, [n] * len(prompts), self.pad_id)
        N, device = len(prompts), state.mask.device
        ids = torch.full((N, 1), self.eot_id, dtype=torch.long, device=device)
        mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=1)  # (N, P+n+1)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=state.next_pos[:, None],
            cache=state.cache,
            use_cache=True,
        )
        logits = out.logits[:, -1].float()  # (N, V)
        return Prefill(out.cache, mask, logits, state.next_pos + 1, state.passes + 1)

    def meta(self) -> dict:
        c = self.cfg.coconut
        return super().meta() | {
            "thoughts": self.thoughts(),
            "thoughts_per_step": c.thoughts_per_step,
            "max_stage": c.max_stage,
        }
