"""Reasoning in Memory (METHOD.md sections 2-5): K memory blocks, grounded then refined.

Stage 1 (grounding): an example with T steps gets T+1 blocks; the readout after block t
predicts step t with an annealed weight, the readout after block T+1 predicts the answer.
Stage 2 (refinement): exactly K blocks, the readout after every block predicts the answer
with weights alpha_k. All readouts of an example share one forward pass (`rim.layout`).

Explain mode (`curriculum.explain_weight` w > 0, ours; issue 14): in both stages, block k
also gets a second readout behind the explain token (a cue the block does not predict) that
spells step k (nothing after the last step) at weight w, so `rim generate --explain` can
externalise each block on demand while the answer still needs only the one prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rim.config import Config, CurriculumConfig, MemoryConfig
from rim.curriculum import Stage, alpha_weights, stage1_weights, steps_for
from rim.data import Example
from rim.errors import ConfigError
from rim.layout import Segment
from rim.memory import MemoryTokens, token_strings
from rim.methods import depth, looped
from rim.methods.base import Common, Method, Tokens, block_chain, readout
from rim.methods.registry import register
from rim.tokenized import counts, ragged


@dataclass(frozen=True)
class RiMSettings:
    """`memory`, `curriculum` and the stage-2 overrides of `train`."""

    memory: MemoryConfig
    curriculum: CurriculumConfig
    stage2_lr: float | None = None  # None = train.lr
    stage2_dropout: float | None = None  # None = train.dropout


@dataclass(frozen=True)
class Grounding:
    """Stage 1's payload: `t_max`, the most steps of any training example."""

    t_max: int


@dataclass(frozen=True)
class Refinement:
    """Stage 2's payload."""


@register
class RiM(Method):
    name = "rim"
    uses_blocks = True

    def __init__(self, common: Common, settings: RiMSettings, tokens: Tokens, tokenizer):
        m = settings.memory
        self.loops = m.loops  # memory.loops (ours): R passes over the blocks after the prefill
        if self.loops:
            if common.pack_tokens is not None:
                raise ConfigError(
                    "train.pack_tokens: memory.loops > 0 trains one example per row (its "
                    "passes run the blocks of each row again); set it null"
                )
            self.plain_prompt = self.shares_rows = False  # sequential passes, as Coconut
        super().__init__(common, settings, tokens, tokenizer)
        self.mem = MemoryTokens(*tokens.new[:3], m.mem_tokens, m.blocks)
        self.explain_id: int | None = tokens.new[3] if len(tokens.new) > 3 else None
        self.depth: torch.nn.ModuleDict | None = None  # set by `attach` (rim.methods.depth)

    @classmethod
    def settings_from(cls, cfg: Config) -> RiMSettings:
        t = cfg.train
        return RiMSettings(cfg.memory, cfg.curriculum, t.stage2_lr, t.stage2_dropout)

    @classmethod
    def new_tokens(cls, settings: RiMSettings) -> list[str]:
        explain = [settings.memory.explain_token] if settings.curriculum.explain_weight else []
        return token_strings(settings.memory) + explain

    def plan(self, n_train: int, t_max: int) -> list[Stage]:
        c, s = self.common, self.settings
        cur = s.curriculum
        s1, s2 = (
            steps_for(getattr(cur, f"{k}_epochs"), getattr(cur, f"{k}_steps"), n_train,
                      c.batch_size, (f"curriculum.{k}_epochs", f"curriculum.{k}_steps"))
            for k in ("stage1", "stage2")
        )  # fmt: skip
        lr2 = s.stage2_lr if s.stage2_lr is not None else c.lr
        drop2 = s.stage2_dropout if s.stage2_dropout is not None else c.dropout
        return [
            Stage("stage1", 0, s1, c.lr, c.dropout, Grounding(t_max)),
            Stage("stage2", 1, s2, lr2, drop2, Refinement()),
        ]

    def segments(self, ex: Example, stage: Stage, progress: float) -> list[Segment]:
        if isinstance(stage.payload, Grounding):
            return self.grounding(ex, progress, stage.payload.t_max)
        return self.refinement(ex, self.mem.num_blocks)

    def grounding(self, ex: Example, progress: float, t_max: int | None) -> list[Segment]:
        T = len(ex.steps)
        weights = stage1_weights(T, progress, self.settings.curriculum.schedule, t_max)
        targets = [self.text_ids(s) for s in ex.steps] + [self.answer_ids(ex.answer)]
        segs = [Segment(self.question_ids(ex.question))] + block_chain(self.mem, T + 1)
        for k, (ids, w) in enumerate(zip(targets, weights), start=1):
            if w > 0:  # a faded readout costs compute and adds nothing: leave it out
                segs.append(readout(ids, k, w))
        return segs + self.explanations(ex, T + 1)

    def refinement(self, ex: Example, K: int) -> list[Segment]:
        answer = self.answer_ids(ex.answer)
        segs = [Segment(self.question_ids(ex.question))] + block_chain(self.mem, K)
        segs += [readout(answer, k, a) for k, a in enumerate(alpha_weights(K), start=1)]
        return segs + self.explanations(ex, K)

    def explanations(self, ex: Example, k: int) -> list[Segment]:
        """Explain mode's readouts under blocks 1..k: the cue, then step j (none after T)."""
        w = self.settings.curriculum.explain_weight
        if not w or self.explain_id is None:
            return []
        steps = [self.text_ids(s) for s in ex.steps[:k]] + [()] * max(k - len(ex.steps), 0)
        cue = (self.explain_id,)
        return [Segment(cue + ids, j, w, "readout", cue=1) for j, ids in enumerate(steps, 1)]

    def train_lengths(self, examples: list[Example], stages: list[Stage]) -> np.ndarray:
        """`grounding` / `refinement` lengths at progress 0, summed from token counts."""
        q = counts(self.question_ids(e.question) for e in examples)
        a = counts(self.answer_ids(e.answer) for e in examples)
        T = np.fromiter((len(e.steps) for e in examples), np.int64, len(examples))
        steps = ragged(counts(self.text_ids(s) for e in examples for s in e.steps), T)
        block, K = len(self.mem.block()), self.mem.num_blocks
        rows = []
        for stage in stages:
            if isinstance(stage.payload, Grounding):
                read = self._grounded(T, steps, a, stage.payload.t_max)
                rows.append(q + (T + 1) * block + read + self._explained(steps, T + 1))
            else:
                rows.append(q + K * block + K * a + self._explained(steps, np.full_like(T, K)))
        return np.stack(rows) if rows else np.zeros((0, len(examples)), np.int64)

    def _grounded(self, T: np.ndarray, steps: np.ndarray, a: np.ndarray, t_max: int | None):
        """Tokens of the stage-1 readouts kept at progress 0 (weight > 0), per example."""
        width = steps.shape[1]
        kinds, which = np.unique(T, return_inverse=True)
        on = np.zeros((len(kinds), width + 1), dtype=bool)  # readout k kept (k = T: answer)
        for u, t in enumerate(kinds.tolist()):
            w = stage1_weights(t, 0.0, self.settings.curriculum.schedule, t_max)
            on[u, : t + 1] = np.array(w) > 0
        on = on[which.reshape(-1)]  # (N, width + 1)
        return (steps * on[:, :width]).sum(1) + on[np.arange(len(T)), T] * a

    def _explained(self, steps: np.ndarray, k: np.ndarray) -> np.ndarray | int:
        """Tokens of explain mode's readouts under blocks 1..k: a cue each, steps 1..k."""
        if not self.settings.curriculum.explain_weight or self.explain_id is None:
            return 0
        first_k = np.arange(steps.shape[1])[None, :] < k[:, None]  # (N, width)
        return k + (steps * first_k).sum(1)

    # ---- looped memory and the state loss (ours: rim.methods.depth, rim.methods.looped) ----
    def loss(self, model, examples, stage, progress, num_examples, device) -> torch.Tensor:
        """RiM's packed loss; with `memory.loops` the looped passes, with the state loss on
        in this stage its term too. Both off: `Method.loss`, untouched."""
        state_on = self._state_on(stage)
        args = (self, model, examples, stage, progress, num_examples, device, state_on)
        if self.loops:
            return looped.loss(*args)
        if state_on:
            depth.refuse_fsdp(model)
            return depth.packed_loss(*args[:-1])
        return super().loss(model, examples, stage, progress, num_examples, device)

    def _state_on(self, stage: Stage) -> bool:
        s = self.settings.memory.state_loss
        return s.weight > 0 and (1 if isinstance(stage.payload, Grounding) else 2) in s.stages

    def builds_rows(self, stage: Stage) -> bool:
        """Plain RiM's loss is `Method.loss`: its rows can be built ahead (rim.pipeline)."""
        return not self.loops and not self._state_on(stage)

    def grounds_steps(self, stage: Stage) -> bool:
        """Stage 1 does (looped memory: read after the last pass, as trained)."""
        return isinstance(stage.payload, Grounding)

    def memory_report(self, model, examples: list[Example], batch_size: int) -> dict:
        """With a state head: how well it reads step t from block t (`depth.state_accuracy`)."""
        if self.depth is None or "state_head" not in self.depth:
            return {}
        return depth.state_accuracy(self, model, examples, batch_size)

    def prefill(self, model, prompts: list[list[int]], keep_states: int = 0):
        if self.loops:
            return looped.prefill(self, model, prompts, keep_states)
        return super().prefill(model, prompts, keep_states)

    def first_pass(self, model):
        return looped.first_pass(self, model) if self.loops else None

    def attach(self, model, checkpoint: Path | None = None):
        m = self.settings.memory
        model, self.depth = depth.attach(model, m.state_loss, m.loops, checkpoint)
        return model

    def save_modules(self, model, folder: Path, state_dict: dict | None = None) -> None:
        depth.save(self.depth, folder, state_dict)

    def prompt(self, question: str, blocks: int | None = None) -> list[int]:
        return list(self.question_ids(question)) + self.mem.blocks(blocks)

    def meta(self, plan: list[Stage] | None = None) -> dict:
        m = self.mem
        out = {"blocks": m.num_blocks, "mem_tokens": m.mem_tokens}
        if self.loops:
            out |= {"loops": self.loops, "loop_input": self.settings.memory.loop_input}
        return super().meta(plan) | out | {"explain": self.explain_id is not None}
