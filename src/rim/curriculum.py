"""Training curricula as pure functions: RiM's two stages and the baselines' schedules.

Stage 1 (grounding) anneals the supervision of each reasoning step away, earliest steps
first, so the memory blocks learn to hold the reasoning before they must stop spelling it
out; the answer readout always keeps weight 1. Stage 2 (refinement) supervises only the
answer, after every block, with weights that grow with the block index (METHOD.md §5).
Coconut and iCoT (§6) are expressed as the same kind of schedule so that the trainer is a
plain loop over a list of `Stage`s. No torch here: everything is cheap and unit-testable.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any

from rim.errors import ConfigError

__all__ = [
    "SCHEDULES",
    "Stage",
    "TRAIN_KEYS",
    "WarmupConstant",
    "alpha_weights",
    "check_schedule",
    "coconut_plan",
    "coconut_stages",
    "icot_offset",
    "icot_offset_probs",
    "icot_removed",
    "icot_runs",
    "icot_scheduled",
    "icot_steps_per_token",
    "stage1_weights",
    "stage_progress",
    "step_weight",
    "steps_for",
    "warmup_constant",
    "WarmupCosine",
]

SCHEDULES = ("relative", "absolute", "uniform", "none")


def check_schedule(schedule: str) -> str:
    """Return `schedule` if known, else raise the user-facing ConfigError (for early checks)."""
    if schedule not in SCHEDULES:
        raise ConfigError(
            f"curriculum.schedule: unknown value {schedule!r}; valid: {', '.join(SCHEDULES)}"
        )
    return schedule


def _check_horizon(T: int, schedule: str, T_max: int | None) -> None:
    if T < 0:
        raise ValueError(f"T (number of reasoning steps) must be >= 0, got {T}")
    if schedule == "absolute" and (T_max is None or T_max < T):
        raise ValueError(
            f"schedule 'absolute' needs T_max (the data set's largest T) >= T={T}, got {T_max}"
        )


def _clamp_progress(progress: float) -> float:
    if math.isnan(progress):
        raise ValueError("progress is NaN")
    return min(1.0, max(0.0, float(progress)))


def _weight(t: int, horizon: int, p: float, schedule: str) -> float:
    if schedule == "none":
        return 1.0
    if schedule == "uniform":
        return 1.0 - p
    # Step t's window is p in [(t-1)/H, t/H]; within it the weight falls linearly 1 -> 0.
    return min(1.0, max(0.0, t - p * horizon))


def step_weight(
    t: int, T: int, progress: float, schedule: str = "relative", T_max: int | None = None
) -> float:
    """Loss weight of the readout that predicts reasoning step `t` (1-based) of a T-step example.

    `relative` gives every example the whole of stage 1 to fade out its own steps (the
    paper's best); `absolute` uses the data set's T_max, so short examples lose their step
    supervision early; `uniform` fades all steps together; `none` is the no-annealing
    ablation. `progress` is clamped to [0, 1].
    """
    check_schedule(schedule)
    _check_horizon(T, schedule, T_max)
    if not 1 <= t <= T:
        raise ValueError(f"step t must be in 1..T={T}, got {t}")
    p = _clamp_progress(progress)
    horizon = T_max if schedule == "absolute" else T
    assert horizon is not None  # checked by _check_horizon
    return _weight(t, horizon, p, schedule)


def stage1_weights(
    T: int, progress: float, schedule: str = "relative", T_max: int | None = None
) -> list[float]:
    """The T+1 stage-1 readout weights: steps 1..T, then the answer readout (always 1.0).

    One list per example keeps the layout builder ignorant of schedules.

    >>> stage1_weights(4, 0.125)
    [0.5, 1.0, 1.0, 1.0, 1.0]
    >>> stage1_weights(2, 0.375, "absolute", T_max=4)
    [0.0, 0.5, 1.0]
    >>> stage1_weights(3, 0.25, "uniform")
    [0.75, 0.75, 0.75, 1.0]
    """
    check_schedule(schedule)
    _check_horizon(T, schedule, T_max)
    p = _clamp_progress(progress)
    horizon = T_max if schedule == "absolute" else T
    assert horizon is not None  # checked by _check_horizon
    return [_weight(t, horizon, p, schedule) for t in range(1, T + 1)] + [1.0]


def alpha_weights(K: int) -> list[float]:
    """Stage-2 answer-readout weights alpha_k = 2k / (K(K+1)), k = 1..K.

    They grow linearly so later blocks, which have had more room to reason, dominate the
    loss, and they sum to 1 so the loss scale does not depend on K.
    """
    if K < 1:
        raise ValueError(f"K (number of memory blocks) must be >= 1, got {K}")
    denom = K * (K + 1)
    return [2 * k / denom for k in range(1, K + 1)]


@dataclass(frozen=True)
class WarmupConstant:
    """LR multiplier for `torch.optim.lr_scheduler.LambdaLR`: linear warm-up, then constant.

    LambdaLR calls it with the number of scheduler steps taken so far (0 for the first
    optimizer step), so the n-th optimizer step (1-based) runs at n / warmup_steps and step
    `warmup_steps` is the first at full LR. A class rather than a closure so it pickles and
    its state survives `LambdaLR.state_dict()` for exact resume.
    """

    warmup_steps: int

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (max(step, 0) + 1) / self.warmup_steps)


@dataclass(frozen=True)
class WarmupCosine:
    """LR multiplier: linear warm-up from 0, then half a cosine to 0 at `total_steps`.

    transformers' `get_cosine_schedule_with_warmup` multiplier, written out with the same
    float operations (tests/test_curriculum.py checks equality): importing
    `transformers.optimization` loads its Trainer utilities and, through them, peft, about
    3 s at every `rim train` start. A class, as `WarmupConstant`, for exact resume.
    """

    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return float(step) / float(max(1, self.warmup_steps))
        span = float(max(1, self.total_steps - self.warmup_steps))
        progress = float(step - self.warmup_steps) / span
        return max(0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def warmup_constant(warmup_steps: int) -> Callable[[int], float]:
    """Constant LR after a linear warm-up (the paper's recipe); see `WarmupConstant`."""
    return WarmupConstant(warmup_steps)


@dataclass(frozen=True)
class Stage:
    """One entry of a training plan; the trainer resets optimizer and LR schedule per stage.

    `dropout=None` leaves the model's dropout as it is; `warmup=None` uses `train.warmup` (a
    baseline whose original resets the optimizer without warm-up sets 0.0); `payload` is the
    method's own frozen dataclass for the stage (e.g. RiM's `Grounding(t_max)`, Coconut's
    `Latent(k)`); `selects_best`: whether validation in this stage may write `best/` (None:
    only in the plan's last stage); `validate_at_end=False`: a stage that only restarts the
    optimizer (iCoT-SI's one more removed token) is validated at `train.eval_every` only.
    """

    name: str
    index: int
    steps: int
    lr: float
    dropout: float | None = None
    payload: Any = None
    warmup: float | None = None  # fraction of steps in LR warm-up; None = train.warmup
    selects_best: bool | None = None
    validate_at_end: bool = True

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}"
        if not self.name:
            raise ConfigError("stage name must be non-empty")
        if self.index < 0:
            raise ConfigError(f"{where}: index must be >= 0, got {self.index}")
        if self.steps < 1:
            raise ConfigError(f"{where}: steps must be >= 1, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"{where}: lr must be a positive number, got {self.lr}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}: dropout must be in [0, 1) or null, got {self.dropout}")
        if self.warmup is not None and not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"{where}: warmup must be in [0, 1) or null, got {self.warmup}")
        if isinstance(self.payload, dict | list | set):
            raise ConfigError(f"{where}: payload must be immutable (a frozen dataclass)")


def steps_for(
    epochs: float | None, steps: int | None, n_examples: int, batch_size: int,
    keys: tuple[str, str] = ("epochs", "steps"),
) -> int:  # fmt: skip
    """Optimizer steps of a stage given either its epochs or its steps (exactly one); errors
    name `keys`, the recipe keys the two came from (`curriculum.stage1_epochs`, ...).

    Epochs are converted with ceil(epochs * n_examples / batch_size), computed on the decimal
    value of `epochs` so that e.g. 0.1 epochs of 100 examples at batch 10 is 1 step, not 2.
    """
    ek, sk = keys
    if (epochs is None) == (steps is None):
        got = "both" if epochs is not None else "neither"
        raise ConfigError(f"{ek}, {sk}: set exactly one of them (the other null), got {got}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if steps is not None:
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ConfigError(f"{sk}: must be a positive integer, got {steps!r}")
        return int(steps)
    assert epochs is not None
    if isinstance(epochs, bool) or not (math.isfinite(epochs) and epochs > 0):
        raise ConfigError(f"{ek}: must be a positive number, got {epochs!r}")
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1 to count steps from epochs, got {n_examples}")
    exact = Fraction(repr(float(epochs))) * n_examples / batch_size
    return max(1, math.ceil(exact))


TRAIN_KEYS = ("train.epochs", "train.steps")  # `steps_for`'s keys of a single-stage budget


def stage_progress(step_in_stage: int, stage_steps: int) -> float:
    """Stage progress p = step_in_stage / stage_steps, clamped to [0, 1].

    With a 0-based step counter the first step sees p = 0, i.e. full step supervision.
    """
    if stage_steps < 1:
        raise ValueError(f"stage_steps must be >= 1, got {stage_steps}")
    return min(1.0, max(0.0, step_in_stage / stage_steps))


def coconut_stages(max_stage: int, include_stage0: bool, final: bool = True) -> list[int]:
    """Coconut's stages as the number k of leading steps replaced by continuous thoughts.

    Stage 0 is plain CoT SFT; the paper reports Coconut with and without it. With `final`,
    the stage k = max_stage + 1 follows: in the original (`run.py`) the stage keeps rising
    with the epoch, and every stage above `max_latent_stage` drops all remaining language
    steps (so the final model is fully latent); those stages are identical, so one k stands
    for all of them.
    """
    if max_stage < 0:
        raise ValueError(f"max_stage must be >= 0, got {max_stage}")
    ks = list(range(0 if include_stage0 else 1, max_stage + 1))
    if final:
        ks.append(max_stage + 1)
    if not ks:
        raise ValueError("coconut plan is empty: max_stage=0 without stage 0")
    return ks


def coconut_plan(
    max_stage: int,
    include_stage0: bool,
    stage_steps: int,
    total_steps: int | None,
    epoch_steps: int | None,
) -> list[tuple[int, int]]:
    """(k, optimizer steps) of each span trained with one optimizer, in order.

    Stages 0..max_stage get `stage_steps` each; the rest of `total_steps` (the original's
    `num_epochs`) trains the final, fully latent stage. A budget shorter than the stages
    stops early, as the original does. `total_steps=None` stops after max_stage (a
    latent/CoT hybrid). `epoch_steps` splits every stage into epochs, each with a fresh
    optimizer (the original's `reset_optimizer`); None = one optimizer per stage.

    >>> coconut_plan(2, True, 4, 14, None)
    [(0, 4), (1, 4), (2, 4), (3, 2)]
    >>> coconut_plan(1, False, 4, 10, 3)
    [(1, 3), (1, 1), (2, 3), (2, 3)]
    """
    if stage_steps < 1:
        raise ValueError(f"stage_steps must be >= 1, got {stage_steps}")
    ks = coconut_stages(max_stage, include_stage0, final=total_steps is not None)
    left = total_steps if total_steps is not None else stage_steps * len(ks)
    spans: list[tuple[int, int]] = []
    for k in ks:
        steps = min(left, stage_steps if k <= max_stage else left)
        if steps == 0:
            break
        left -= steps
        chunk = epoch_steps or steps
        spans += [(k, min(chunk, steps - i)) for i in range(0, steps, chunk)]
    return spans


def icot_removed(epoch: float, remove_per_epoch: float, max_tokens: int) -> int:
    """iCoT `schedule: epoch` (rim before issue 11): CoT tokens removed at a (fractional) epoch.

    Removal happens in whole-epoch increments, floor(epoch) * remove_per_epoch, capped at
    max_tokens (the longest CoT), after which training is effectively direct answering.
    """
    if math.isnan(epoch) or epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if remove_per_epoch < 0 or max_tokens < 0:
        raise ValueError(
            f"remove_per_epoch and max_tokens must be >= 0, got {remove_per_epoch}, {max_tokens}"
        )
    if remove_per_epoch == 0:
        return 0
    return int(min(max_tokens, math.floor(math.floor(epoch) * remove_per_epoch)))


def icot_steps_per_token(steps_per_epoch: int, remove_per_epoch: float) -> int:
    """Optimizer steps per removed CoT token in the original: round(steps / remove_per_epoch).

    Python's round (halves to even), as `src/train.py`; 0 means one more token every step.

    >>> icot_steps_per_token(10, 4), icot_steps_per_token(30, 4), icot_steps_per_token(10, 30)
    (2, 8, 0)
    """
    if steps_per_epoch < 1 or not remove_per_epoch > 0:
        raise ValueError(
            f"need steps_per_epoch >= 1 and remove_per_epoch > 0, got "
            f"{steps_per_epoch}, {remove_per_epoch}"
        )
    return int(round(steps_per_epoch / remove_per_epoch))


def icot_scheduled(step: int, steps_per_token: int, start: int = 0) -> int:
    """Tokens the original schedules for removal at optimizer step `step` (0-based).

    Its counter starts at 0 and is checked before each batch: the first increment comes at
    step `steps_per_token` (or at step 0 already when steps_per_token is 0).
    """
    if steps_per_token == 0:
        return start + step + 1
    return start + step // steps_per_token


def icot_runs(
    total: int,
    steps_per_token: int,
    start: int = 0,
    remove_all_beyond: int | None = None,
    max_remove: int | None = None,
) -> list[tuple[int, int, bool]]:
    """(steps, removed, all) for each run of constant removal over `total` optimizer steps.

    Once the scheduled count reaches `remove_all_beyond` the whole CoT goes (all=True) for
    the rest of training; `max_remove` (ours) freezes the count instead. Either ends the
    increments, so the remaining steps are one run.

    >>> icot_runs(7, 2, remove_all_beyond=3)
    [(2, 0, False), (2, 1, False), (2, 2, False), (1, 3, True)]
    """
    runs: list[tuple[int, int, bool]] = []
    s = 0
    while s < total:
        r = icot_scheduled(s, steps_per_token, start)
        if remove_all_beyond is not None and r >= remove_all_beyond:
            runs.append((total - s, r, True))
            break
        if max_remove is not None and r >= max_remove:
            runs.append((total - s, max_remove, False))
            break
        nxt = s + 1 if steps_per_token == 0 else (s // steps_per_token + 1) * steps_per_token
        runs.append((min(nxt, total) - s, r, False))
        s = min(nxt, total)
    return runs


def icot_offset_probs(lam: float, truncate: int = 100) -> list[float]:
    """Removal smoothing: P(k) = (1 - e^-lam) e^(-lam k) for k < truncate, the tail on the last.

    The original's `compute_lambda_distribution` (truncated at 100).
    """
    if not lam > 0 or truncate < 1:
        raise ValueError(f"need lam > 0 and truncate >= 1, got {lam}, {truncate}")
    p = [(1.0 - math.exp(-lam)) * math.exp(-lam * k) for k in range(truncate)]
    p[-1] += max(0.0, 1.0 - sum(p))
    return p


def icot_offset(lam: float, seed: int, step: int, key: str) -> int:
    """A smoothing offset drawn from `icot_offset_probs(lam)`, a pure function of its inputs.

    Seeded by (train seed, optimizer step, example), not by global RNG state, so exact resume,
    micro-batching and the number of processes leave it unchanged.
    """
    digest = hashlib.blake2b(f"{seed}:{step}:{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64  # uniform in [0, 1)
    acc = 0.0
    probs = _offset_probs(lam)
    for k, p in enumerate(probs):
        acc += p
        if u < acc:
            return k
    return len(probs) - 1


@lru_cache(maxsize=8)
def _offset_probs(lam: float) -> tuple[float, ...]:
    return tuple(icot_offset_probs(lam))
