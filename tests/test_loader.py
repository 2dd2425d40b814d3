"""`rim.pipeline`: the steps a loader hands the trainer are the plan's, from any resume
point, and rows built in DataLoader workers equal rows built on the main thread.
(The end-to-end check, a run stopped with 2 workers and resumed equal to one without:
tests/test_gsm8k_runs.py.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rim.batching import ExampleStream, micro_batches
from rim.curriculum import Stage
from rim.pipeline import Jobs, Rows, idle, make_loader, workers_for
from tests.conftest import make_setup


def _split(idx, stage):
    return micro_batches(idx, 3)


def _jobs(n, plan, start, cursor, batch):
    return list(Jobs(ExampleStream(n, seed=1, cursor=cursor), plan, start, batch, _split))


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    batch=st.integers(1, 7),
    n=st.integers(1, 20),
    data=st.data(),
)
def test_jobs_from_any_step_are_the_tail_of_the_whole_plan(steps, batch, n, data):
    """A resumed run (stage, step, cursor from its checkpoint) gets exactly the steps an
    uninterrupted run would take next: same stage, progress, examples, cursor."""
    plan = [Stage(f"s{i}", i, s, 1e-3) for i, s in enumerate(steps)]
    whole = _jobs(n, plan, (0, 0), 0, batch)
    assert len(whole) == sum(steps) == len(Jobs(None, plan, (0, 0), batch, _split))
    k = data.draw(st.integers(0, len(whole)))
    if k == len(whole):
        return
    job = whole[k]
    cursor = whole[k - 1].cursor if k else 0
    assert _jobs(n, plan, (job.stage_index, job.step_in_stage), cursor, batch) == whole[k:]
    assert (
        job.cursor == (k + 1) * batch and job.progress == job.step_in_stage / steps[job.stage_index]
    )


def _same(a, b) -> None:
    if isinstance(a, list):
        assert a == b
        return
    for x, y in zip(vars(a).values(), vars(b).values(), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("method", ["rim", "coconut"])
def test_rows_from_workers_equal_rows_inline(method):
    """Packed methods get their `Batch` from a worker, equal to the main thread's; Coconut,
    whose loss builds its own rows, gets its examples back."""
    from rim.data import generate

    _, _, model, m = make_setup(method)
    examples = generate("chain", 24, seed=0)
    plan = m.plan(len(examples), 3)
    stage = plan[-1]
    at = (stage.index, 0)
    got = {}
    for workers in (0, 2):
        jobs = Jobs(ExampleStream(24, seed=0), plan, at, 8, _split)
        rows = Rows(m, examples, plan, torch.float32, None)
        got[workers] = list(make_loader(rows, jobs, workers, torch.device("cpu")))
    assert len(got[0]) == len(got[2]) == stage.steps + sum(s.steps for s in plan[at[0] + 1 :])
    for (ja, ra), (jb, rb) in zip(got[0], got[2], strict=True):
        assert ja == jb and len(ra) == len(rb) == 3
        for a, b in zip(ra, rb, strict=True):
            _same(a, b)
            assert isinstance(a, list) == (method == "coconut")
    exs = [examples[i] for i in got[0][0][0].chunks[0]]
    _same(got[0][0][1][0], m.rows(exs, stage, 0.0, torch.float32, None))


def test_worker_defaults_and_idle_micro_batches():
    assert workers_for(None, torch.device("cpu")) == 0
    assert workers_for(None, torch.device("cuda")) == 2
    assert workers_for(3, torch.device("cpu")) == 3
    assert idle([]) and not idle([object()])


def test_negative_loader_workers_is_refused():
    from rim.config import TrainConfig
    from rim.errors import ConfigError

    with pytest.raises(ConfigError, match="train.loader_workers"):
        TrainConfig(loader_workers=-1)
