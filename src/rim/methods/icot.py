"""iCoT-SI, stepwise internalisation (Deng et al. 2024; METHOD.md section 6).

CoT SFT whose reasoning tokens are removed from the left a few per epoch, so the model
gradually learns to do in its hidden states what it used to write out. Each removal is a new
stage: the paper resets the optimizer whenever tokens are removed, which the trainer does at
every stage switch. At inference the model writes whatever reasoning it still has before the
answer marker, so nothing beyond the question is needed in the prompt.
"""

from __future__ import annotations

import math

from rim.config import Config
from rim.curriculum import Stage, icot_removed, steps_for
from rim.data import Example
from rim.layout import Segment
from rim.memory import MemoryTokens
from rim.methods.base import Method, readout


class ICoT(Method):
    name = "icot"
    writes_reasoning = True

    def __init__(self, cfg: Config, tokenizer, mem: MemoryTokens | None = None):
        super().__init__(cfg, tokenizer, mem)
        self.final_removed: int | None = None  # set by `plan`, reported by `meta`

    def removed_at(self, epoch: int) -> int:
        """CoT tokens removed from the left in `epoch` (before each example's own cap)."""
        i = self.cfg.icot
        cap = i.max_remove if i.max_remove is not None else epoch * i.remove_per_epoch
        return icot_removed(epoch, i.remove_per_epoch, cap)

    def plan(self, n_train: int, t_max: int) -> list[Stage]:
        """One stage per removal count (an epoch each; epochs past the cap merge into one)."""
        t = self.cfg.train
        total = steps_for(t.epochs, t.steps, n_train, t.batch_size)
        per_epoch = max(1, math.ceil(n_train / t.batch_size))
        stages: list[Stage] = []
        for e, done in enumerate(range(0, total, per_epoch)):
            steps = min(per_epoch, total - done)
            removed = self.removed_at(e)
            if stages and stages[-1].options["removed"] == removed:  # no new removal: no reset
                last = stages.pop()
                steps += last.steps
                e = last.index
            opts = {"removed": removed}
            stages.append(Stage(f"epoch{e}", len(stages), steps, t.lr, t.dropout, opts))
        self.final_removed = stages[-1].options["removed"]
        return stages

    def target(self, ex: Example, removed: int) -> tuple[int, ...]:
        """Reasoning tokens without the first `removed` (capped at the CoT length), then answer."""
        cot = self.reasoning_ids(ex.steps)
        return cot[min(removed, len(cot)) :] + self.answer_ids(ex.answer)

    def segments(self, ex: Example, stage: Stage, progress: float) -> list[Segment]:
        x = Segment(self.question_ids(ex.question))
        return [x, readout(self.target(ex, int(stage.options.get("removed", 0))), 0, 1.0)]

    def meta(self) -> dict:
        return super().meta() | {"removed_tokens": self.final_removed}
