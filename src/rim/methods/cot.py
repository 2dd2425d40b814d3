"""SFT with CoT: question -> steps -> marker -> answer; the steps are generated at inference."""

from __future__ import annotations

import numpy as np

from rim.curriculum import Stage
from rim.data import Example
from rim.layout import Segment
from rim.methods.base import Method, readout
from rim.methods.registry import register
from rim.tokenized import counts


@register
class CoT(Method):
    name = "cot"
    writes_reasoning = True

    def segments(self, ex: Example, stage: Stage, progress: float) -> list[Segment]:
        x = Segment(self.question_ids(ex.question))
        target = self.cot_ids(ex) + self.answer_ids(ex.answer)
        return [x, readout(target, 0, 1.0)]

    def train_lengths(self, examples: list[Example], stages: list[Stage]) -> np.ndarray:
        n = counts(self.question_ids(e.question) for e in examples)
        n += counts(self.cot_ids(e) for e in examples)
        n += counts(self.answer_ids(e.answer) for e in examples)
        return np.tile(n, (len(stages), 1))
