"""CODI, continuous thoughts by self-distillation (Shen et al. 2025; `zhenyi4/codi`).

One model plays two roles in every step, and the three losses are summed:

    teacher  x ++ CoT ++ marker ++ answer ++ EOS                     CE on all after x
    student  x ++ <bot> ++ [latent] * n ++ <eot> ++ marker ++ answer ++ EOS   CE after <eot>
    distill  at the token just before the answer value (the original's colon of "The answer
             is:"): the student's hidden state of EVERY layer (embeddings included) regresses
             onto the teacher's, detached, normalised by the teacher states' std.

A latent is the previous pass's last-layer hidden state (after the final norm) through a
projection (Dropout, Linear, GELU, Linear, LayerNorm) fed back as the next input embedding;
gradients flow through every latent. The first latent comes from `<bot>`'s state, so n latents
need n sequential passes after the prefix; the last one runs together with `<eot>` (and the
answer in training): n + 1 forward passes before the first answer token. The original runs
the last latent alone (n + 2); the outputs are the same.

The projection belongs to the model (`attach` registers it, so the optimizer, DDP and
resumable checkpoints see it) and is saved beside the weights as `codi_projection.safetensors`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from rim.compat import cache_of, with_cache
from rim.config import CODIConfig
from rim.curriculum import Stage
from rim.data import Example
from rim.decoding import Prefill, left_pad, positions
from rim.errors import RimError
from rim.layout import IGNORE, Segment, token_nll
from rim.methods.base import Common, Method, Tokens, attach_module, labelled_head, readout
from rim.methods.registry import register
from rim.tokenized import counts

PROJECTION = "codi_projection"  # the submodule's name on the model
PROJECTION_FILE = "codi_projection.safetensors"


@dataclass(frozen=True)
class Layout:
    """One example's sequences, as the original's `preprocess` builds them (`remove_eos`)."""

    encoder: tuple[int, ...]  # x ++ <bot>: the student's first pass
    decoder: tuple[int, ...]  # <eot> ++ marker ++ answer ++ EOS; its labels: itself, shifted
    teacher: tuple[int, ...]  # x ++ CoT ++ marker ++ answer ++ EOS
    question_len: int  # teacher labels are IGNORE over the question
    teacher_distill: int  # index in `teacher` of the distilled token
    student_distill: int  # index in `decoder` of the distilled token


def projection(dim: int, hidden: int, dropout: float, norm: bool) -> nn.Sequential:
    """The original's `prj`: Dropout, Linear, GELU, Linear (+ LayerNorm as `ln`)."""
    prj = nn.Sequential(
        nn.Dropout(dropout), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
    )
    if norm:
        prj.add_module("ln", nn.LayerNorm(dim))
    return prj


def _core(model):
    """The model under a DDP wrapper (whose attributes do not forward)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def right_pad(rows: list[tuple[int, ...]], fill: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out  # (B, L)


@register
class CODI(Method):
    name = "codi"
    section = "codi"
    plain_prompt = False  # sequential latent passes at inference: not exportable
    shares_rows = False  # teacher and student passes, one example per row
    writes_reasoning = True  # the student writes the marker, then the answer
    settings: CODIConfig

    def __init__(self, common: Common, settings: CODIConfig, tokens: Tokens, tokenizer):
        super().__init__(common, settings, tokens, tokenizer)
        self.bot_id, self.eot_id = tokens.new
        self.projection: nn.Module | None = None  # set by `attach`
        self.layout = lru_cache(maxsize=200_000)(self._layout)

    @classmethod
    def new_tokens(cls, settings: CODIConfig) -> list[str]:
        return [settings.start_token, settings.end_token]

    # ---- the projection, owned by the model ----
    def attach(self, model, checkpoint: Path | None = None):
        c = self.settings
        if checkpoint is None and not c.train_new_tokens and hasattr(model, "peft_config"):
            for name, p in model.named_parameters():  # the original: frozen under LoRA
                if "trainable_tokens_delta" in name:
                    p.requires_grad_(False)
        if not c.projection:
            return model
        dim = model.config.hidden_size
        prj = projection(dim, c.projection_dim or dim, c.projection_dropout, c.projection_norm)
        missing = "a codi checkpoint"
        self.projection = attach_module(
            model, PROJECTION, prj, checkpoint, PROJECTION_FILE, missing
        )
        return model

    def save_modules(self, model, folder: Path, state_dict: dict | None = None) -> None:
        if self.projection is None:
            return
        from safetensors.torch import save_file

        pre = f"{PROJECTION}."
        full = {k[len(pre) :]: v for k, v in (state_dict or {}).items() if k.startswith(pre)}
        state = full or self.projection.state_dict()
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()}, folder / PROJECTION_FILE
        )

    def project(self, h: torch.Tensor) -> torch.Tensor:
        if not self.settings.projection:
            return h
        if self.projection is None:
            raise RimError("codi: no projection on the model; call method.attach(model) first")
        return self.projection(h)

    # ---- layout ----
    def _layout(self, ex: Example) -> Layout:
        q = self.question_ids(ex.question)
        steps = self._steps(ex)
        answer = self.answer_ids(ex.answer)
        k = self.distill_index(answer)
        cot = self.reasoning_ids(steps)
        teacher = q + cot + answer + (self.eos_id,)
        decoder = (self.eot_id,) + answer + (self.eos_id,)
        return Layout(q + (self.bot_id,), decoder, teacher, len(q), len(q) + len(cot) + k, 1 + k)

    def distill_index(self, answer: tuple[int, ...]) -> int:
        """Index in `answer` (marker ++ value) of the last token before the value.

        The original distils the colon of "The answer is:" on GPT-2 and the lone space token
        after it on Llama (its +1): the marker's last token, then any whitespace-only tokens.
        """
        marker = self.text_ids(self.marker)
        n = 0
        while n < min(len(marker), len(answer)) and marker[n] == answer[n]:
            n += 1
        if n == 0:
            raise ValueError(f"codi: the answer {answer} does not start with the marker {marker}")
        i = n - 1
        while i + 2 < len(answer) and not self.tokenizer.decode([answer[i + 1]]).strip():
            i += 1
        return i

    def segments(self, ex: Example, stage: Stage, progress: float) -> list[Segment]:
        """The teacher's sequence (for inspection; `loss` runs both roles)."""
        lay = self.layout(ex)
        return [
            Segment(lay.teacher[: lay.question_len]),
            readout(lay.teacher[lay.question_len : -1], 0, 1.0),
        ]

    def train_length(self, ex: Example, stage: Stage) -> int:
        lay = self.layout(ex)
        student = len(lay.encoder) + self.settings.latents + len(lay.decoder) - 1
        return max(len(lay.teacher) - 1, student)

    def train_lengths(self, examples: list[Example], stages: list[Stage]) -> np.ndarray:
        """`train_length` from token counts: the teacher's `q ++ cot ++ answer`, the
        student's `q ++ <bot> ++ latents ++ <eot> ++ answer` (the last input unused)."""
        q = counts(self.question_ids(e.question) for e in examples)
        a = counts(self.answer_ids(e.answer) for e in examples)
        cot = counts(self.reasoning_ids(self._steps(e)) for e in examples)
        n = np.maximum(q + cot + a, q + a + self.settings.latents + 2)
        return np.tile(n, (len(stages), 1))

    def _steps(self, ex: Example) -> tuple[str, ...]:
        return ex.steps[:-1] if self.settings.drop_last_step else ex.steps

    def texts(self, ex: Example) -> Iterator[str]:
        """The answer target and the teacher's chain (steps joined by spaces)."""
        yield f"{self.marker} {ex.answer}"
        if self._steps(ex):
            yield " ".join(self._steps(ex))

    # ---- training ----
    def loss(
        self,
        model,
        examples: list[Example],
        stage: Stage,
        progress: float,
        num_examples: int,
        device: torch.device,
    ) -> torch.Tensor:
        """alpha teacher CE + beta student CE + gamma distillation, per micro-batch (original)
        or per example (`codi.reduction`), scaled so that the global batch sums to its mean."""
        if "FSDP" in type(model).__name__ or "FullyShardedDataParallel" in type(model).__name__:
            raise RimError("codi: FSDP is not supported (the projection runs outside the model)")
        c = self.settings
        lays = [self.layout(ex) for ex in examples]
        per_example = c.reduction == "example"
        t_nll, t_mask, targets = self.teacher_pass(model, lays, device)
        s_nll, s_mask, states = self.student_pass(model, lays, device)
        total = (
            c.teacher_weight * _mean(t_nll, t_mask, per_example)
            + c.student_weight * _mean(s_nll, s_mask, per_example)
            + c.distill_weight * self.distill(states, targets, per_example)
        )  # () or (B,)
        scale = 1 if per_example else len(examples)
        return (total * scale).sum() / num_examples

    def teacher_pass(self, model, lays: list[Layout], device):
        """(NLL (B, L), label mask (B, L), detached distilled states: L+1 x (B, D))."""
        rows = [lay.teacher[:-1] for lay in lays]  # the final EOS predicts nothing
        ids = right_pad(rows, self.pad_id).to(device)  # (B, L)
        mask = right_pad([(1,) * len(r) for r in rows], 0).to(device)  # (B, L)
        labels = right_pad(
            [(IGNORE,) * (lay.question_len - 1) + lay.teacher[lay.question_len :] for lay in lays],
            IGNORE,
        ).to(device)  # (B, L): position t predicts teacher[t + 1]
        kw = dict(attention_mask=mask, position_ids=positions(mask), use_cache=False)
        where = labels != IGNORE  # (B, L): the LM head runs only there
        with labelled_head(model, where):
            out = model(input_ids=ids, output_hidden_states=True, **kw)
        nll = _spread(token_nll(out.logits, labels[where]), where)  # (B, L)
        idx = torch.tensor([lay.teacher_distill for lay in lays], device=device)  # (B,)
        hidden = out.hidden_states
        if self.settings.separate_target_pass:  # the original: a 2nd pass, own dropout draw
            with torch.no_grad(), labelled_head(model, torch.zeros_like(where)):  # no logits
                hidden = model(input_ids=ids, output_hidden_states=True, **kw).hidden_states
        rows_ = torch.arange(len(lays), device=device)
        targets = [h[rows_, idx].detach() for h in hidden]  # L+1 x (B, D)
        return nll, labels != IGNORE, targets

    def think(self, model, prompts: list[list[int]]):
        """`x ++ <bot>` then latents 1..n-1 (one pass each), one KV cache for all rows.

        Returns (cache, key mask (B, P + n - 1), latent n (B, 1, D), its position (B,)).
        """
        device = next(model.parameters()).device
        ids, mask = left_pad(prompts, self.pad_id, device)  # (B, P)
        pos = positions(mask)  # (B, P)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            **with_cache(DynamicCache()),
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        cache, latent = cache_of(out), self.project(out.hidden_states[-1][:, -1:])  # (B, 1, D)
        next_pos = pos[:, -1] + 1  # (B,)
        for _ in range(self.settings.latents - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(
                inputs_embeds=latent,
                attention_mask=mask,
                position_ids=next_pos[:, None],
                **with_cache(cache),
                use_cache=True,
                output_hidden_states=True,
                logits_to_keep=1,
            )
            cache, latent = cache_of(out), self.project(out.hidden_states[-1][:, -1:])
            next_pos = next_pos + 1
        return cache, mask, latent, next_pos

    def student_pass(self, model, lays: list[Layout], device):
        """(NLL (B, Ld), label mask (B, Ld), distilled states: L+1 x (B, D)), with gradients."""
        cache, mask, latent, next_pos = self.think(model, [list(lay.encoder) for lay in lays])
        rows = [lay.decoder[:-1] for lay in lays]  # <eot> ++ answer; EOS predicts nothing
        ids = right_pad(rows, self.pad_id).to(device)  # (B, Ld)
        dmask = right_pad([(1,) * len(r) for r in rows], 0).to(device)  # (B, Ld)
        labels = right_pad([lay.decoder[1:] for lay in lays], IGNORE).to(device)  # (B, Ld)
        emb = _core(model).get_input_embeddings()(ids)  # (B, Ld, D)
        Ld = ids.shape[1]
        where = labels != IGNORE  # (B, Ld): <eot> predicts the marker's first token
        with labelled_head(model, torch.cat([torch.zeros_like(where[:, :1]), where], dim=1)):
            out = model(
                inputs_embeds=torch.cat([latent.to(emb.dtype), emb], dim=1),  # (B, 1 + Ld, D)
                attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1]), dmask], dim=1),
                position_ids=next_pos[:, None] + torch.arange(1 + Ld, device=device),
                **with_cache(cache),
                use_cache=True,
                output_hidden_states=True,
            )
        nll = _spread(token_nll(out.logits, labels[where]), where)  # (B, Ld)
        idx = 1 + torch.tensor([lay.student_distill for lay in lays], device=device)  # (B,)
        rows_ = torch.arange(len(lays), device=device)
        return nll, labels != IGNORE, [h[rows_, idx] for h in out.hidden_states]

    def distill(self, states, targets, per_example: bool) -> torch.Tensor:
        """Mean over layers of the std-normalised loss between student and teacher states."""
        kind, norm = self.settings.distill_loss, self.settings.distill_std_norm
        total = 0.0
        for s, t in zip(states, targets):  # (B, D) each
            s, t = s.float(), t.float()
            if kind == "smooth_l1":
                err = F.smooth_l1_loss(s, t, reduction="none")
            elif kind == "l2":
                err = (s - t) ** 2
            else:
                err = (s - t).abs()
            loss = err.mean(-1) if per_example else err.mean()  # (B,) or ()
            if norm:
                std = t.std(-1) if per_example else t.std()
                loss = loss / (std**2 if kind == "l2" else std)  # the original: std twice for l2
            total = total + loss
        return total / len(states)

    # ---- inference ----
    def prompt(self, question: str, blocks: int | None = None) -> list[int]:
        return list(self.question_ids(question)) + [self.bot_id]

    def max_new_tokens(self) -> int:
        return self.common.max_new_tokens + len(self.text_ids(self.marker))

    @torch.no_grad()
    def prefill(self, model, prompts: list[list[int]], keep_states: int = 0) -> Prefill:
        """Prefix, latents, then the last latent with `<eot>`: n + 1 passes (no memory
        blocks: `keep_states` is ignored)."""
        cache, mask, latent, next_pos = self.think(model, prompts)
        N, device = latent.shape[0], latent.device
        eot = torch.full((N, 1), self.eot_id, dtype=torch.long, device=device)
        emb = _core(model).get_input_embeddings()(eot)  # (N, 1, D)
        mask = torch.cat([mask, torch.ones_like(mask[:, :2])], dim=1)  # (N, P + n + 1)
        out = model(
            inputs_embeds=torch.cat([latent.to(emb.dtype), emb], dim=1),  # (N, 2, D)
            attention_mask=mask,
            position_ids=next_pos[:, None] + torch.arange(2, device=device),
            **with_cache(cache),
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].float()  # (N, V)
        return Prefill(cache_of(out), mask, logits, next_pos + 2, self.settings.latents + 1)

    def latent_positions(self) -> int:
        return self.settings.latents + 1  # + <eot>

    def meta(self, plan: list[Stage] | None = None) -> dict:
        c = self.settings
        return super().meta(plan) | {"latents": c.latents, "projection": c.projection}


def _spread(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(N,) `values` of the labelled positions back to `where`'s shape (B, L), 0 elsewhere."""
    out = torch.zeros(where.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(where, values)


def _mean(nll: torch.Tensor, mask: torch.Tensor, per_example: bool) -> torch.Tensor:
    """Token mean over the micro-batch (the original's CrossEntropyLoss) or per row (B,)."""
    if per_example:
        return nll.sum(-1) / mask.sum(-1)
    return nll.sum() / mask.sum()
