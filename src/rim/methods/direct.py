"""SFT without CoT ("direct"): question -> answer. The latency floor RiM must match."""

from __future__ import annotations

import numpy as np

from rim.curriculum import Stage
from rim.data import Example
from rim.layout import Segment
from rim.methods.base import Method, readout
from rim.methods.registry import register
from rim.tokenized import counts


@register
class Direct(Method):
    name = "direct"

    def segments(self, ex: Example, stage: Stage, progress: float) -> list[Segment]:
        x = Segment(self.question_ids(ex.question))
        return [x, readout(self.answer_ids(ex.answer), 0, 1.0)]

    def train_lengths(self, examples: list[Example], stages: list[Stage]) -> np.ndarray:
        n = counts(self.question_ids(e.question) for e in examples)
        n += counts(self.answer_ids(e.answer) for e in examples)
        return np.tile(n, (len(stages), 1))
