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

from rim.config import Config, CurriculumConfig, MemoryConfig
from rim.curriculum import Stage, alpha_weights, stage1_weights, steps_for
from rim.data import Example
from rim.layout import Segment
from rim.memory import MemoryTokens, token_strings
from rim.methods.base import Common, Method, Tokens, block_chain, readout
from rim.methods.registry import register


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
        super().__init__(common, settings, tokens, tokenizer)
        m = settings.memory
        self.mem = MemoryTokens(*tokens.new[:3], m.mem_tokens, m.blocks)
        self.explain_id: int | None = tokens.new[3] if len(tokens.new) > 3 else None

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
        s1 = steps_for(cur.stage1_epochs, cur.stage1_steps, n_train, c.batch_size)
        s2 = steps_for(cur.stage2_epochs, cur.stage2_steps, n_train, c.batch_size)
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

    def prompt(self, question: str, blocks: int | None = None) -> list[int]:
        return list(self.question_ids(question)) + self.mem.blocks(blocks)

    def meta(self, plan: list[Stage] | None = None) -> dict:
        m = self.mem
        out = {"blocks": m.num_blocks, "mem_tokens": m.mem_tokens}
        return super().meta(plan) | out | {"explain": self.explain_id is not None}
