"""The key invariant (METHOD.md section 4): packed readouts == plain causal runs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rim.curriculum import Stage
from rim.data import Example
from rim.layout import IGNORE, Segment, allowed, collate, pack
from rim.methods.rim import Grounding, Refinement

from .conftest import make_setup

EXAMPLES = [
    Example("3 + 4 + 2", ("7", "9"), "9"),
    Example("1 + 1", ("2",), "2"),
    Example("5 + 4 + 3 + 1", ("9", "1 2", "1 3"), "1 3"),
]


def _plain_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]  # (L, V)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["grounding", "refinement"])
def test_packed_readouts_equal_plain_causal_runs(arch, attn, kind):
    cfg, tok, model, method = make_setup("rim", arch, attn, memory__blocks=3)
    stage = Stage("s", 0, 1, 1e-3, None, Grounding(3) if kind == "grounding" else Refinement())
    seg_lists = [method.segments(ex, stage, 0.0) for ex in EXAMPLES]
    packed = [pack(s, method.eos_id) for s in seg_lists]
    assert len({len(p) for p in packed}) > 1  # really padded
    batch = collate(packed, method.pad_id)
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits  # (B, L, V)
    checked = 0
    for b, (segs, p) in enumerate(zip(seg_lists, packed)):
        for s, seg in enumerate(segs):
            if seg.kind != "readout":
                continue
            chain, a = [], s  # the plain sequence: ancestors in order, then the readout
            while a >= 0:
                chain.append(a)
                a = segs[a].parent
            plain_ids = [t for c in reversed(chain) for t in segs[c].ids]
            plain = _plain_logits(model, plain_ids)
            idx = [i for i, g in enumerate(p.segment) if g == s]
            parent_last = max(i for i, g in enumerate(p.segment) if g == seg.parent)
            got = logits[b, [parent_last] + idx]
            want = plain[-len(idx) - 1 :]
            assert (got - want).abs().max().item() < 1e-4, (arch, attn, b, s)
            checked += 1
    assert checked >= 6


def test_labels_point_at_readout_targets():
    _, _, _, method = make_setup("rim", "llama", "sdpa", memory__blocks=2)
    stage = Stage("s", 1, 1, 1e-3, None, Refinement())
    p = pack(method.segments(EXAMPLES[1], stage, 0.0), method.eos_id)
    answer = list(method.answer_ids("2"))
    n_sup = sum(1 for label in p.labels if label != IGNORE)
    assert n_sup == 2 * (len(answer) + 1)  # two readouts, answer tokens + EOS each
    assert abs(sum(p.weights) - 1.0) < 1e-6  # alpha weights sum to 1


@st.composite
def rim_trees(draw):
    """Random RiM-shaped trees: question, K chained blocks, readouts under random blocks."""
    q = draw(st.integers(1, 6))
    K = draw(st.integers(1, 5))
    M = draw(st.integers(1, 3))
    segs = [Segment(tuple(range(10, 10 + q)))]
    segs += [Segment((1,) + (2,) * M + (3,), parent=k, kind="block") for k in range(K)]
    ks = draw(st.lists(st.integers(1, K), unique=True, min_size=1, max_size=K))
    for k in sorted(ks):
        n = draw(st.integers(1, 4))
        segs.append(Segment(tuple(range(50, 50 + n)), parent=k, weight=1.0, kind="readout"))
    return segs


@settings(max_examples=60, deadline=None)
@given(rim_trees())
def test_mask_follows_method_rules(segs):
    p = pack(segs, eos_id=0)
    ok = allowed(p)
    seg = p.segment
    for i in range(len(p)):
        si = segs[seg[i]]
        for j in range(len(p)):
            sj = segs[seg[j]]
            if sj.kind == "readout" and seg[j] != seg[i]:
                assert not ok[i, j]  # nothing attends to another readout
            if j > i:
                assert not ok[i, j]  # causal
            if si.kind == "readout" and sj.kind == "block":
                assert bool(ok[i, j]) == (seg[j] <= si.parent)  # R_k sees m_1..m_k only
            if si.kind == "block" and sj.kind in ("x", "block") and j <= i:
                assert ok[i, j]  # a block sees x and earlier blocks
    for s, sg in enumerate(segs):  # readout positions continue right after its block
        if sg.kind == "readout":
            first = p.segment.index(s)
            parent_last = max(i for i, g in enumerate(p.segment) if g == sg.parent)
            assert p.position_ids[first] == p.position_ids[parent_last] + 1
