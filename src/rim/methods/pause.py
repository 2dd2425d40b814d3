"""Pause / filler tokens (Goyal et al. 2023): RiM's blocks trained with stage 2 only.

The natural ablation of RiM: the same blocks and readouts, no grounding on reasoning steps.
"""

from __future__ import annotations

from rim.curriculum import Stage
from rim.data import Example
from rim.layout import Segment
from rim.methods.base import Method
from rim.methods.registry import register
from rim.methods.rim import Refinement, RiM


@register
class Pause(RiM):
    name = "pause"

    def plan(self, n_train: int, t_max: int) -> list[Stage]:
        (stage,) = Method.plan(self, n_train, t_max)  # the single-stage budget
        return [Stage("stage2", 0, stage.steps, stage.lr, stage.dropout, Refinement())]

    def segments(self, ex: Example, stage: Stage, progress: float) -> list[Segment]:
        return self.refinement(ex, self.mem.num_blocks)
