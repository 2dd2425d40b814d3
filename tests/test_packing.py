"""Batches without waste (rim.batching, `rim.layout.concat`) and the loss where labels are
(`rim.methods.base.labelled_head`): neither changes what an example contributes.

Every method built on the shared layout gets the same per-example losses and the same
gradient from rows that hold several examples, or from length-sorted micro-batches, as from
one example per row; the LM head applied at the labelled positions only gives the loss and
gradient of the full logits. The grouped order is a seeded permutation per epoch, resumable
from any cursor, and a run with grouping and packing resumes exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rim.batching import (
    MEGA,
    ExampleStream,
    GroupedStream,
    StageLengths,
    micro_batches,
    pack_rows,
    padding_fraction,
)
from rim.curriculum import Stage
from rim.data import Example
from rim.layout import IGNORE, Segment, allowed, concat, pack, token_nll, weighted_loss
from rim.methods.base import batch_loss, labelled_head
from rim.methods.icot import Removal

from .conftest import make_setup

EXAMPLES = [
    Example("3 + 4 + 2", ("7", "9"), "9"),
    Example("1 + 1", ("2",), "2"),
    Example("5 + 4 + 3 + 1", ("9", "12", "13"), "13"),
    Example("8 - 3", ("5",), "5"),
    Example("2 + 2 + 2 + 2 + 2", ("4", "6", "8", "10"), "10"),
]
N = len(EXAMPLES)
BUDGET = 48  # tokens per packed row: two to three of these examples
RTOL = 1e-5

# (method, stage index in its plan or a fixed stage, recipe overrides)
CASES = {
    "direct": ("direct", 0, {"train__steps": 1}),
    "cot": ("cot", 0, {"train__steps": 1}),
    "rim-stage1": ("rim", 0, {"memory__blocks": 3}),
    "rim-stage2": ("rim", 1, {"memory__blocks": 3}),
    "rim-explain": ("rim", 0, {"memory__blocks": 3, "curriculum__explain_weight": 0.5}),
    "pause": ("pause", 0, {"memory__blocks": 3, "train__steps": 1}),
    "icot": ("icot", Stage("remove2", 0, 10, 1e-3, None, Removal(2, False, 0)), {}),
}


def _setup(case: str, arch: str, attn: str):
    name, which, over = CASES[case]
    cfg, tok, model, method = make_setup(name, arch, attn, **over)
    stage = which if isinstance(which, Stage) else method.plan(N, 4)[which]
    return model, method, stage


def _packing(method, budget: int | None):
    method.common = dataclasses.replace(method.common, pack_tokens=budget)
    return method


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a|| over all gradients together."""
    assert a.keys() == b.keys() and a
    diff = sum(float((a[k] - b[k]).double().square().sum()) for k in a)
    return (diff / sum(float(a[k].double().square().sum()) for k in a)) ** 0.5


def per_example(model, method, examples, stage) -> torch.Tensor:
    """(n,) weighted NLL of each example, from the rows `method.batch` builds for them."""
    batch = method.batch(examples, stage, 0.3)
    lengths = [len(pack(method.segments(ex, stage, 0.3), method.eos_id)) for ex in examples]
    owner = torch.full(batch.labels.shape, -1)  # (B, L): which example each token is
    for r, row in enumerate(pack_rows(lengths, method.common.pack_tokens)):
        start = 0
        for i in row:
            owner[r, start : start + lengths[i]] = i
            start += lengths[i]
    where = batch.labels != IGNORE
    with labelled_head(model, where):
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits  # (N, V)
    nll = token_nll(logits, batch.labels[where]) * batch.weights[where]
    return torch.zeros(len(examples)).index_add(0, owner[where], nll)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_and_grouped_rows_equal_one_example_per_row(case, arch, attn):
    model, method, stage = _setup(case, arch, attn)
    # reference: one example per row, one batch; the trainer's loss and its gradient
    ref_each = per_example(model, _packing(method, None), EXAMPLES, stage).detach()
    ref = method.loss(model, EXAMPLES, stage, 0.3, N, torch.device("cpu"))
    ref.backward()
    ref_grads = _grads(model)
    # packed: several examples per row, positions restarting, no attention across them
    rows = pack_rows([len(method.batch([ex], stage, 0.3).input_ids[0]) for ex in EXAMPLES], BUDGET)
    assert len(rows) < N and max(len(r) for r in rows) > 1  # really shared rows
    packed_each = per_example(model, _packing(method, BUDGET), EXAMPLES, stage).detach()
    packed = method.loss(model, EXAMPLES, stage, 0.3, N, torch.device("cpu"))
    packed.backward()
    assert torch.allclose(packed_each, ref_each, rtol=RTOL, atol=0)
    assert packed.item() == pytest.approx(ref.item(), rel=RTOL)
    assert _gap(ref_grads, _grads(model)) < RTOL
    # grouped: length-sorted micro-batches of 2 (other padding), accumulated
    method = _packing(method, None)
    lengths = [len(pack(method.segments(ex, stage, 0.3), method.eos_id)) for ex in EXAMPLES]
    chunks = micro_batches(list(range(N)), 2, lengths)
    assert chunks[0] != [0, 1]  # really reordered
    for chunk in chunks:
        exs = [EXAMPLES[i] for i in chunk]
        each = per_example(model, method, exs, stage).detach()
        assert torch.allclose(each, ref_each[chunk], rtol=RTOL, atol=0)
        method.loss(model, exs, stage, 0.3, N, torch.device("cpu")).backward()
    grads = _grads(model)
    if not (case == "icot" and method.settings.loss == "token"):  # per micro-batch by design
        assert _gap(ref_grads, grads) < RTOL


def _full_logits_loss(model, batch, n):
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).logits  # (B, L, V)
    return weighted_loss(logits, batch, n)


@pytest.mark.parametrize(
    "arch,wrap",
    [("gpt2", None), ("llama", None), ("qwen2", "untied"), ("llama", "lora"), ("gpt2", "lora")],
)
def test_labelled_head_equals_full_logits(arch, wrap):
    over = {"model__overrides": {"tie_word_embeddings": False}} if wrap == "untied" else {}
    cfg, tok, model, method = make_setup("rim", arch, "sdpa", memory__blocks=3, **over)
    if wrap == "lora":
        from rim.model import wrap_lora

        cfg.model.lora_rank, cfg.model.lora_targets = 4, "all-linear"
        model = wrap_lora(model, cfg.model, list(method.tokens.new)).eval()  # no dropout
        assert type(model.get_output_embeddings()).__name__ != "Linear"  # peft's head
    stage = method.plan(N, 4)[0]
    batch = method.batch(EXAMPLES, stage, 0.3)
    want = _full_logits_loss(model, batch, N)
    want.backward()
    want_grads = _grads(model)
    got = batch_loss(model, batch, N)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=RTOL)
    assert _gap(want_grads, _grads(model)) < RTOL
    with labelled_head(model, batch.labels != IGNORE):  # the head ran at labelled rows only
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert out.logits.shape == ((batch.labels != IGNORE).sum().item(), len(tok))


def test_concatenated_examples_see_only_themselves():
    a = pack([Segment((5, 6)), Segment((1,), 0, kind="block"), Segment((7,), 1, 1.0)], 0)
    b = pack([Segment((8,)), Segment((9, 9), 0, 1.0)], 0)
    row = concat([a, b, a])
    ok = allowed(row)
    doc = torch.tensor([0] * len(a) + [1] * len(b) + [2] * len(a))
    assert not (ok & (doc[:, None] != doc[None, :])).any()  # never across examples
    assert torch.equal(ok[:4, :4], allowed(a)) and torch.equal(ok[4:7, 4:7], allowed(b))
    assert row.position_ids == a.position_ids + b.position_ids + a.position_ids
    assert row.labels == a.labels + b.labels + a.labels


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([3, 5, 2, 4, 8, 1], 8)
    assert rows == [[4], [1, 0], [3, 2, 5]]
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert pack_rows([3, 9], 8) == [[1], [0]]  # too long: a row of its own
    assert pack_rows([3, 5], None) == [[0], [1]]
    assert padding_fraction([[3, 5], [2]]) == pytest.approx(1 - 10 / 12)


def test_methods_with_latent_passes_refuse_packing():
    from rim.errors import ConfigError

    for name in ("coconut", "codi"):
        with pytest.raises(ConfigError, match="train.pack_tokens"):
            make_setup(name, train__pack_tokens=64)


# ---------------------------------------------------------------- the grouped order


lengths_st = st.lists(st.integers(1, 40), min_size=1, max_size=90)


@settings(max_examples=60, deadline=None)
@given(lengths_st, st.integers(1, 12), st.integers(0, 5), st.integers(0, 200), st.integers(1, 40))
def test_grouped_order_is_a_resumable_permutation(lengths, batch, seed, cursor, k):
    n = len(lengths)

    def of_epoch(epoch):  # another stage, other lengths, every other epoch
        return lengths if epoch % 2 == 0 else [-x for x in lengths]

    full = GroupedStream(of_epoch, n, seed, batch)
    for epoch in range(3):
        assert sorted(full.order(epoch)) == list(range(n))  # each epoch: a permutation
    whole = full.take(cursor + k)
    resumed = GroupedStream(of_epoch, n, seed, batch, cursor=cursor)  # resumed anywhere
    assert resumed.take(k) == whole[cursor:]
    assert resumed.cursor == cursor + k


@settings(max_examples=60, deadline=None)
@given(lengths_st, st.integers(2, 8), st.integers(0, 5))
def test_grouped_batches_hold_neighbouring_lengths(lengths, batch, seed):
    """Within one mega-batch, the aligned global batches are runs of the length order:
    their length ranges never interleave (what removes the padding)."""
    n = len(lengths)
    assert n <= MEGA * batch  # one mega-batch per epoch here
    s = GroupedStream(lengths, n, seed, batch)
    batches = [s.take(batch) for _ in range(n // batch)]  # epoch 0: aligned, no head
    for j, x in enumerate(batches):
        for y in batches[j + 1 :]:
            lx, ly = [lengths[i] for i in x], [lengths[i] for i in y]
            assert max(lx) <= min(ly) or max(ly) <= min(lx)


def test_grouped_order_pads_less_than_random():
    g = torch.Generator().manual_seed(0)
    lengths = (torch.randint(10, 200, (2000,), generator=g)).tolist()
    pads = {}
    for name, s in (
        ("random", ExampleStream(2000, 0)),
        ("grouped", GroupedStream(lengths, 2000, 0, 64)),
    ):
        pads[name] = padding_fraction([[lengths[i] for i in s.take(64)] for _ in range(60)])
    assert pads["grouped"] < 0.1 < pads["random"]


def test_epochs_are_grouped_by_the_stage_that_trains_their_middle():
    """RiM's stage 2 starts just after an epoch boundary (ceil(6 n / B) steps of stage 1):
    that epoch is grouped by stage 2's lengths; each step sorts by its own stage's."""

    class Fake:  # lengths 10 * (stage index + 1) + example index
        def train_lengths(self, examples, stages):
            return np.array([[10 * (s.index + 1) + i for i in examples] for s in stages])

    n, B = 10, 4
    plan = [Stage("stage1", 0, 15, 1e-3, None), Stage("stage2", 1, 5, 1e-3, None)]  # 6 + 2
    lengths = StageLengths(Fake(), list(range(n)), plan, B)
    assert [lengths.of_epoch(e)[0] for e in range(8)] == [10] * 6 + [20] * 2
    assert lengths.of_epoch(99)[0] == 20  # past the plan: its last stage
    assert lengths.at(plan[1]) == [20 + i for i in range(n)]


def test_ungrouped_stream_is_unchanged():
    """Off by default, the order is the old `ExampleStream`'s: existing recipes reproduce."""
    expected = [
        torch.randperm(10, generator=torch.Generator().manual_seed(3 + e)).tolist()
        for e in range(2)
    ]
    assert ExampleStream(10, 3).take(20) == expected[0] + expected[1]
    assert micro_batches([4, 1, 3], 2) == [[4, 1], [3]]  # no sorting without lengths


# ---------------------------------------------------------------- the trainer


def _cfg(**train):
    from rim.config import (
        Config,
        CurriculumConfig,
        DataConfig,
        ModelConfig,
        SplitConfig,
        TrainConfig,
    )

    base = {
        "lr": 1e-3,
        "batch_size": 8,
        "micro_batch_size": 4,
        "log_every": 1,
        "save_every": 1,
        "keep_last": 9,
    }
    return Config(
        method="rim",
        model=ModelConfig(arch="llama", size="tiny"),
        data=DataConfig(
            train=SplitConfig(generator="chain", size=20, seed=0),
            valid=SplitConfig(generator="chain", size=4, seed=1),
        ),
        curriculum=CurriculumConfig(
            stage1_epochs=None, stage1_steps=4, stage2_epochs=None, stage2_steps=2
        ),
        train=TrainConfig(**(base | train)),
    )


def test_grouped_packed_training_resumes_exactly(tmp_path):
    """group_by_length + pack_tokens: runs resumed from the step-2 checkpoint (mid stage 1,
    mid epoch: 20 examples, batch 8) and from step 5 (stage 2, at an epoch's start, whose
    order a resumed run builds afresh) end with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    from rim.assembly import assemble
    from rim.trainer import Trainer

    quiet = {"log": lambda *_: None}
    cfg = _cfg(group_by_length=True, pack_tokens=64)
    ref = Trainer(assemble(cfg, **quiet), tmp_path / "ref")
    assert isinstance(ref.lengths, StageLengths) and isinstance(ref.stream, GroupedStream)
    ref.fit()
    want = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    for step in (2, 5):
        run = Trainer(assemble(cfg, **quiet), tmp_path / f"run{step}")
        run.resume(tmp_path / "ref" / "checkpoints" / f"step-{step:08d}")
        assert run.state.global_step == step and run.stream.cursor == 8 * step
        run.fit()
        got = load_file(tmp_path / f"run{step}" / "final" / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
