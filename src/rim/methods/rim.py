"""Reasoning in Memory (METHOD.md sections 2-5): K memory blocks, grounded then refined.

Stage 1 (grounding): an example with T steps gets T+1 blocks; the readout after block t
predicts step t with an annealed weight, the readout after block T+1 predicts the answer.
Stage 2 (refinement): exactly K blocks, the readout after every block predicts the answer
with weights alpha_k. All readouts of an example share one forward pass (`rim.layout`).
"""

from __future__ import annotations

from rim.curriculum import Stage, alpha_weights, stage1_weights, steps_for
from rim.data import Example
from rim.layout import Segment
from rim.methods.base import Method, block_chain, readout


class RiM(Method):
    name = "rim"
    uses_blocks = True

    def plan(self, n_train: int, t_max: int) -> list[Stage]:
        c, t = self.cfg.curriculum, self.cfg.train
        bs = t.batch_size
        s1 = steps_for(c.stage1_epochs, c.stage1_steps, n_train, bs)
        s2 = steps_for(c.stage2_epochs, c.stage2_steps, n_train, bs)
        lr2 = t.stage2_lr if t.stage2_lr is not None else t.lr
        drop2 = t.stage2_dropout if t.stage2_dropout is not None else t.dropout
        return [
            Stage("stage1", 0, s1, t.lr, t.dropout, {"kind": "grounding", "t_max": t_max}),
            Stage("stage2", 1, s2, lr2, drop2, {"kind": "refinement"}),
        ]

    def segments(self, ex: Example, stage: Stage, progress: float) -> list[Segment]:
        if stage.options.get("kind") == "grounding":
            return self.grounding(ex, progress, stage.options.get("t_max"))
        return self.refinement(ex, self.mem.num_blocks)

    def grounding(self, ex: Example, progress: float, t_max: int | None) -> list[Segment]:
        T = len(ex.steps)
        weights = stage1_weights(T, progress, self.cfg.curriculum.schedule, t_max)
        targets = [self.text_ids(s) for s in ex.steps] + [self.answer_ids(ex.answer)]
        segs = [Segment(self.question_ids(ex.question))] + block_chain(self.mem, T + 1)
        for k, (ids, w) in enumerate(zip(targets, weights), start=1):
            if w > 0:  # a faded readout costs compute and adds nothing: leave it out
                segs.append(readout(ids, k, w))
        return segs

    def refinement(self, ex: Example, K: int) -> list[Segment]:
        answer = self.answer_ids(ex.answer)
        segs = [Segment(self.question_ids(ex.question))] + block_chain(self.mem, K)
        segs += [readout(answer, k, a) for k, a in enumerate(alpha_weights(K), start=1)]
        return segs

    def prompt(self, question: str, blocks: int | None = None) -> list[int]:
        return list(self.question_ids(question)) + self.mem.blocks(blocks)

    def meta(self) -> dict:
        m = self.mem
        return super().meta() | {"blocks": m.num_blocks, "mem_tokens": m.mem_tokens}
