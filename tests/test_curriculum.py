import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rim.curriculum import (
    SCHEDULES,
    Stage,
    alpha_weights,
    check_schedule,
    coconut_plan,
    coconut_stages,
    icot_removed,
    stage1_weights,
    stage_progress,
    step_weight,
    steps_for,
    warmup_constant,
)
from rim.errors import ConfigError

# ---------------------------------------------------------------- stage-1 schedules


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.0, [1, 1, 1, 1, 1]),
        (0.125, [0.5, 1, 1, 1, 1]),
        (0.25, [0, 1, 1, 1, 1]),
        (0.5, [0, 0, 1, 1, 1]),
        (0.625, [0, 0, 0.5, 1, 1]),
        (1.0, [0, 0, 0, 0, 1]),
    ],
)
def test_relative_T4(p, expected):
    assert stage1_weights(4, p) == pytest.approx(expected)


def test_relative_uses_each_examples_own_T():
    # At p=0.5 a 2-step example has faded step 1 fully; a 4-step example steps 1 and 2.
    assert stage1_weights(2, 0.5) == pytest.approx([0, 1, 1])
    assert stage1_weights(4, 0.5) == pytest.approx([0, 0, 1, 1, 1])


def test_absolute_uses_T_max():
    assert step_weight(2, 2, 0.375, "absolute", T_max=4) == pytest.approx(0.5)
    assert step_weight(1, 2, 0.375, "absolute", T_max=4) == 0.0
    # Past p = T/T_max the short example has no step supervision left.
    assert stage1_weights(2, 0.5, "absolute", T_max=4) == pytest.approx([0, 0, 1])
    # With T_max == T it matches relative.
    assert stage1_weights(3, 0.4, "absolute", T_max=3) == stage1_weights(3, 0.4, "relative")


def test_uniform_and_none():
    assert step_weight(3, 5, 0.25, "uniform") == pytest.approx(0.75)
    assert stage1_weights(3, 0.25, "uniform") == pytest.approx([0.75, 0.75, 0.75, 1])
    assert stage1_weights(3, 0.9, "none") == [1.0, 1.0, 1.0, 1.0]
    assert step_weight(1, 1, 1.0, "none") == 1.0


def test_progress_is_clamped():
    assert stage1_weights(4, -3.0) == stage1_weights(4, 0.0)
    assert stage1_weights(4, 7.0) == stage1_weights(4, 1.0)
    assert step_weight(1, 1, 2.0, "uniform") == 0.0
    with pytest.raises(ValueError, match="NaN"):
        stage1_weights(4, float("nan"))


def test_no_steps_gives_only_answer_weight():
    assert stage1_weights(0, 0.3) == [1.0]


def test_unknown_schedule_is_config_error():
    with pytest.raises(ConfigError, match="curriculum.schedule") as exc:
        step_weight(1, 2, 0.0, "linear")
    for name in SCHEDULES:
        assert name in str(exc.value)
    with pytest.raises(ConfigError, match="curriculum.schedule"):
        stage1_weights(2, 0.0, "Relative")
    assert check_schedule("uniform") == "uniform"


@pytest.mark.parametrize("T_max", [None, 2])
def test_absolute_needs_valid_T_max(T_max):
    with pytest.raises(ValueError, match="T_max"):
        step_weight(1, 3, 0.0, "absolute", T_max=T_max)
    with pytest.raises(ValueError, match="T_max"):
        stage1_weights(3, 0.0, "absolute", T_max=T_max)


@pytest.mark.parametrize("t, T", [(0, 3), (4, 3), (1, 0)])
def test_step_index_out_of_range(t, T):
    with pytest.raises(ValueError):
        step_weight(t, T, 0.0)


# ---------------------------------------------------------------- properties

schedules = st.sampled_from(SCHEDULES)
progress = st.floats(min_value=-0.5, max_value=1.5, allow_nan=False)


@st.composite
def examples(draw):
    T = draw(st.integers(0, 16))
    T_max = draw(st.integers(max(T, 1), 20))
    return T, T_max


@settings(max_examples=200, deadline=None)
@given(examples(), progress, schedules)
def test_weights_in_unit_interval_and_answer_is_one(ex, p, schedule):
    T, T_max = ex
    w = stage1_weights(T, p, schedule, T_max=T_max)
    assert len(w) == T + 1
    assert all(0.0 <= x <= 1.0 for x in w)
    assert w[-1] == 1.0


@settings(max_examples=200, deadline=None)
@given(examples(), progress, progress, schedules)
def test_weights_non_increasing_in_progress(ex, p1, p2, schedule):
    T, T_max = ex
    lo, hi = sorted((p1, p2))
    w_lo = stage1_weights(T, lo, schedule, T_max=T_max)
    w_hi = stage1_weights(T, hi, schedule, T_max=T_max)
    assert all(b <= a for a, b in zip(w_lo, w_hi))


@settings(max_examples=200, deadline=None)
@given(examples(), progress, st.sampled_from(["relative", "absolute"]))
def test_earlier_steps_fade_no_later(ex, p, schedule):
    T, T_max = ex
    steps = stage1_weights(T, p, schedule, T_max=T_max)[:-1]
    assert all(a <= b for a, b in zip(steps, steps[1:]))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 16), st.data())
def test_relative_window(T, data):
    t = data.draw(st.integers(1, T))
    eps = 1e-9
    assert step_weight(t, T, (t - 1) / T - eps) == pytest.approx(1.0)
    assert step_weight(t, T, t / T + eps) == pytest.approx(0.0, abs=1e-7)
    mid = step_weight(t, T, (t - 0.5) / T)
    assert mid == pytest.approx(0.5)


@settings(max_examples=100, deadline=None)
@given(examples(), progress, schedules)
def test_step_weight_matches_stage1_weights(ex, p, schedule):
    T, T_max = ex
    w = stage1_weights(T, p, schedule, T_max=T_max)
    assert [step_weight(t, T, p, schedule, T_max=T_max) for t in range(1, T + 1)] == w[:-1]


# ---------------------------------------------------------------- stage 2, LR


@pytest.mark.parametrize("K", [1, 2, 3, 8, 13])
def test_alpha_weights_sum_to_one_and_increase(K):
    a = alpha_weights(K)
    assert len(a) == K
    assert math.fsum(a) == pytest.approx(1.0)
    assert all(x < y for x, y in zip(a, a[1:]))
    assert a[0] == pytest.approx(2 / (K * (K + 1)))


def test_alpha_weights_values_and_errors():
    assert alpha_weights(3) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    with pytest.raises(ValueError):
        alpha_weights(0)


def test_warmup_constant():
    f = warmup_constant(4)
    assert [f(s) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert f(1000) == 1.0
    g = warmup_constant(0)
    assert g(0) == 1.0 and g(5) == 1.0
    assert warmup_constant(1)(0) == 1.0
    assert pickle.loads(pickle.dumps(f))(1) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        warmup_constant(-1)


@settings(max_examples=60, deadline=None)
@given(warm=st.integers(0, 50), total=st.integers(1, 400))
def test_warmup_cosine_is_transformers_schedule_exactly(warm, total):
    """The same multipliers, bit for bit, as transformers' `get_cosine_schedule_with_warmup`
    (runs and resumes from before it stay exact), and its state survives a LambdaLR reload."""
    import torch
    from transformers.optimization import get_cosine_schedule_with_warmup

    from rim.curriculum import WarmupCosine

    ours = WarmupCosine(warm, total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_cosine_schedule_with_warmup(opt, warm, total).lr_lambdas[0]
    assert [ours(s) for s in range(total + 3)] == [theirs(s) for s in range(total + 3)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(0, 1))
    sched.load_state_dict(torch.optim.lr_scheduler.LambdaLR(opt, ours).state_dict())
    assert sched.lr_lambdas[0] == ours


# ---------------------------------------------------------------- stage plan


def test_steps_for():
    assert steps_for(None, 50, 1000, 32) == 50
    assert steps_for(1, None, 1000, 32) == 32  # ceil(31.25)
    assert steps_for(6, None, 128, 128) == 6
    assert steps_for(0.1, None, 100, 10) == 1  # no float overshoot to 2
    assert steps_for(0.7, None, 100, 10) == 7
    assert steps_for(0.001, None, 10, 128) == 1  # at least 1


@pytest.mark.parametrize("epochs, steps", [(None, None), (1.0, 10)])
def test_steps_for_needs_exactly_one(epochs, steps):
    with pytest.raises(ConfigError, match="epochs") as exc:
        steps_for(epochs, steps, 100, 10)
    assert "steps" in str(exc.value)


@pytest.mark.parametrize(
    "epochs, steps, bs, match",
    [
        (0, None, 10, "epochs"),
        (-1.0, None, 10, "epochs"),
        (None, 0, 10, "steps"),
        (None, 2.5, 10, "steps"),
        (1, None, 0, "batch_size"),
    ],
)
def test_steps_for_bad_values(epochs, steps, bs, match):
    with pytest.raises(ConfigError, match=match):
        steps_for(epochs, steps, 100, bs)


def test_stage_progress():
    assert stage_progress(0, 10) == 0.0
    assert stage_progress(5, 10) == 0.5
    assert stage_progress(15, 10) == 1.0
    assert stage_progress(-1, 10) == 0.0
    with pytest.raises(ValueError):
        stage_progress(0, 0)


def test_stage_is_frozen_with_a_frozen_payload():
    from dataclasses import FrozenInstanceError

    from rim.methods.rim import Grounding

    s = Stage("stage1", 0, 100, 1e-4, None, Grounding(3))
    assert s.payload.t_max == 3
    with pytest.raises(FrozenInstanceError):
        s.payload.t_max = 4  # type: ignore[misc]
    with pytest.raises(AttributeError):
        s.steps = 3  # type: ignore[misc]
    assert Stage("direct", 0, 1, 1e-3).payload is None
    hash(s)
    assert s == Stage("stage1", 0, 100, 1e-4, None, Grounding(3))
    with pytest.raises(ConfigError, match="payload must be immutable"):
        Stage("stage1", 0, 100, 1e-4, None, {"kind": "grounding"})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"dropout": 1.0}, "dropout"),
        ({"index": -1}, "index"),
        ({"name": ""}, "name"),
    ],
)
def test_stage_validation(kwargs, match):
    args = {"name": "stage2", "index": 1, "steps": 10, "lr": 1e-5, "dropout": 0.1} | kwargs
    with pytest.raises(ConfigError, match=match):
        Stage(**args)


# ---------------------------------------------------------------- baselines


def test_coconut_stages():
    # k = max_stage + 1 stands for every stage past the maximum (all steps latent)
    assert coconut_stages(3, True) == [0, 1, 2, 3, 4]
    assert coconut_stages(3, False) == [1, 2, 3, 4]
    assert coconut_stages(3, True, final=False) == [0, 1, 2, 3]
    assert coconut_stages(0, True, final=False) == [0]
    with pytest.raises(ValueError):
        coconut_stages(0, False, final=False)
    with pytest.raises(ValueError):
        coconut_stages(-1, True)


def test_coconut_plan_spends_the_budget_like_the_original():
    # 3 stages of 4 steps, then the rest of 20 at k = 3; budgets too short stop early
    assert coconut_plan(2, True, 4, 20, None) == [(0, 4), (1, 4), (2, 4), (3, 8)]
    assert coconut_plan(2, True, 4, 6, None) == [(0, 4), (1, 2)]
    assert coconut_plan(2, True, 4, None, None) == [(0, 4), (1, 4), (2, 4)]  # no final stage
    # one optimizer per epoch of 3 steps, restarting at every stage switch
    assert coconut_plan(1, True, 4, 13, 3) == [(0, 3), (0, 1), (1, 3), (1, 1), (2, 3), (2, 2)]
    assert sum(s for _, s in coconut_plan(3, False, 7, 50, 5)) == 50


def test_icot_removed():
    assert icot_removed(0.0, 8, 100) == 0
    assert icot_removed(0.99, 8, 100) == 0
    assert icot_removed(1.0, 8, 100) == 8
    assert icot_removed(2.5, 8, 100) == 16
    assert icot_removed(50.0, 8, 100) == 100
    assert icot_removed(3.0, 0, 100) == 0
    assert isinstance(icot_removed(2.5, 8, 100), int)
    with pytest.raises(ValueError):
        icot_removed(-0.5, 8, 100)
