"""iCoT-SI, stepwise internalisation (Deng et al. 2024; METHOD.md section 6).

CoT SFT whose reasoning tokens are removed from the left, so the model gradually learns to
do in its hidden states what it used to write out. As in the authors' code
(`da03/Internalize_CoT_Step_by_Step`, `src/train.py`): one more token every
round(steps_per_epoch / remove_per_epoch) optimizer steps, a fresh AdamW without warm-up at
each increment (each increment is a `Stage`: the trainer resets at every stage switch),
removal smoothing (each example removes k more tokens, P(k) ~ exp(-lambda k)), the whole CoT
dropped once the count reaches `remove_all_when_remove_beyond`, and the loss averaged over a
batch's target tokens. The steps after full removal are one final stage, the only one that
may provide `best/`. At inference the model writes whatever reasoning it still has before
the answer marker. Differences and the keys that restore the old behaviour:
docs/baselines.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from rim.config import ICoTConfig
from rim.curriculum import (
    TRAIN_KEYS,
    Stage,
    icot_offset,
    icot_removed,
    icot_runs,
    icot_steps_per_token,
    steps_for,
)
from rim.data import Example
from rim.layout import Segment
from rim.methods.base import Method, readout
from rim.methods.registry import register
from rim.tokenized import counts


@dataclass(frozen=True)
class Removal:
    """A stage's payload: CoT tokens removed from the left (`all`: the whole CoT), and the
    global step the stage starts at (removal smoothing draws per step)."""

    removed: int = 0
    all: bool = False
    start: int = 0


@register
class ICoT(Method):
    name = "icot"
    section = "icot"
    writes_reasoning = True
    settings: ICoTConfig

    # ---- the schedule ----
    def plan(self, n_train: int, t_max: int) -> list[Stage]:
        """One stage per removal count, each with its `Removal`."""
        t, i = self.common, self.settings
        total = steps_for(t.epochs, t.steps, n_train, t.batch_size, TRAIN_KEYS)
        per_epoch = max(1, math.ceil(n_train / t.batch_size))
        if i.schedule == "step":
            spt = icot_steps_per_token(per_epoch, i.remove_per_epoch)
            beyond = i.remove_all_when_remove_beyond
            runs = icot_runs(total, spt, i.remove_start_from, beyond, i.max_remove)
        else:
            runs = self._epoch_runs(total, per_epoch)
        stages: list[Stage] = []
        start = 0
        for n, (steps, removed, every) in enumerate(runs):
            name = "remove_all" if every else f"remove{removed}"
            payload = Removal(removed, every, start)
            # `step`: a stage per removed token (dozens, a few steps each): their ends only
            # restart the optimizer, so validation follows train.eval_every (and the end)
            ends = i.schedule != "step" or n == len(runs) - 1
            stage = Stage(name, len(stages), steps, t.lr, t.dropout, payload, i.warmup)
            stages.append(replace(stage, validate_at_end=ends))
            start += steps
        return stages

    def _epoch_runs(self, total: int, per_epoch: int) -> list[tuple[int, int, bool]]:
        """`schedule: epoch`: remove_per_epoch more tokens at each epoch boundary."""
        i = self.settings
        runs: list[tuple[int, int, bool]] = []
        for e, done in enumerate(range(0, total, per_epoch)):
            steps = min(per_epoch, total - done)
            cap = i.max_remove if i.max_remove is not None else math.inf
            removed = i.remove_start_from + icot_removed(e, i.remove_per_epoch, 1 << 62)
            removed = int(min(cap, removed))
            if runs and runs[-1][1] == removed:  # no new removal: no reset
                steps += runs.pop()[0]
            runs.append((steps, removed, False))
        return runs

    def removal(self, ex: Example, stage: Stage, progress: float) -> int | None:
        """Tokens removed from `ex` at this step (None = the whole CoT), smoothing included."""
        o, i = _removal(stage), self.settings
        if o.all:
            return None
        removed = o.removed
        if i.removal_smoothing_lambda is not None:
            step = o.start + round(progress * stage.steps)
            key = f"{ex.question}\x1f{ex.cot}\x1f{ex.answer}"
            removed += icot_offset(i.removal_smoothing_lambda, self.common.seed, step, key)
        return removed if i.max_remove is None else min(removed, i.max_remove)

    # ---- the training sequence ----
    def target(self, ex: Example, removed: int | None) -> tuple[int, ...]:
        """CoT tokens without the first `removed` (None or past the end: all), then answer."""
        cot = self.cot_ids(ex)
        cut = len(cot) if removed is None else min(removed, len(cot))
        return cot[cut:] + self.answer_ids(ex.answer)

    def segments(self, ex: Example, stage: Stage, progress: float) -> list[Segment]:
        """Question, then one readout; `loss: token` weighs every target token 1."""
        x = Segment(self.question_ids(ex.question))
        target = self.target(ex, self.removal(ex, stage, progress))
        weight = len(target) + 1.0 if self.settings.loss == "token" else 1.0
        return [x, readout(target, 0, weight)]

    def loss(
        self,
        model,
        examples: list[Example],
        stage: Stage,
        progress: float,
        num_examples: int,
        device: torch.device,
    ) -> torch.Tensor:
        """`loss: token`: the original's mean NLL over the (micro-)batch's target tokens,
        times this micro-batch's share of the global batch (its `loss.div(accumulate)`);
        `loss: example`: each example's mean token NLL, summed / `num_examples` (rim)."""
        loss = super().loss(model, examples, stage, progress, num_examples, device)
        if self.settings.loss == "example":
            return loss
        # the packed weights are 1 per token: loss = sum NLL / num_examples
        n_tok = sum(len(self.target(ex, self.removal(ex, stage, progress))) + 1 for ex in examples)
        return loss * len(examples) / n_tok

    def train_length(self, ex: Example, stage: Stage) -> int:
        """Tokens at the stage's scheduled removal, no smoothing (which only shortens).

        Cheap: the length check calls it for every example and each of dozens of stages.
        """
        q, cot, answer = self._lengths(ex)
        o = _removal(stage)
        kept = 0 if o.all else max(0, cot - o.removed)
        return q + kept + answer

    def train_lengths(self, examples: list[Example], stages: list[Stage]) -> np.ndarray:
        """`train_length` of every example at every stage, the counts taken once."""
        q = counts(self.question_ids(e.question) for e in examples)
        cot = counts(self.cot_ids(e) for e in examples)
        answer = counts(self.answer_ids(e.answer) for e in examples)
        rows = []
        for stage in stages:
            o = _removal(stage)
            kept = 0 if o.all else np.maximum(0, cot - o.removed)
            rows.append(q + kept + answer)
        return np.stack(rows) if rows else np.zeros((0, len(examples)), np.int64)

    @lru_cache(maxsize=4096)  # noqa: B019 (one method per run; examples come in order)
    def _lengths(self, ex: Example) -> tuple[int, int, int]:
        q = len(self.question_ids(ex.question))
        return q, len(self.cot_ids(ex)), len(self.answer_ids(ex.answer))

    def meta(self, plan: list[Stage] | None = None) -> dict:
        last = _removal(plan[-1]) if plan else Removal()
        return super().meta(plan) | {"removed_tokens": last.removed, "removed_all": last.all}


def _removal(stage: Stage) -> Removal:
    return stage.payload if isinstance(stage.payload, Removal) else Removal()
