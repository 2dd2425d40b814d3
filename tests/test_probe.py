"""The correctness probe (rim.probe): layer choice, save/load round trip, answer selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rim.errors import RimError
from rim.evaluation import Record
from rim.probe import PROBE_FILE, PROBE_JSON, Probe, block_states, choose, fit, selection_report

from .conftest import make_setup


def synthetic(n: int = 120, K: int = 3, L: int = 4, D: int = 8, layer: int = 2, seed: int = 0):
    """States where only `layer` carries correctness (along one direction), others noise."""
    rng = np.random.default_rng(seed)
    correct = rng.random((n, K)) < 0.5
    states = rng.normal(size=(n, K, L, D))
    states[:, :, layer, 0] += np.where(correct, 2.0, -2.0)
    return states, correct


def test_fit_picks_the_informative_layer_and_round_trips(tmp_path: Path):
    states, correct = synthetic()
    probe = fit(states, correct)
    assert probe.layer == 2
    auroc = probe.info["selection_auroc"]
    assert auroc[2] > 0.9 and max(auroc[:2] + auroc[3:]) < 0.75  # noise layers near chance
    probe.save(tmp_path)
    assert json.loads((tmp_path / PROBE_JSON).read_text())["layer"] == 2
    assert b"pickle" not in (tmp_path / PROBE_FILE).read_bytes()[:200]
    again = Probe.load(tmp_path)
    np.testing.assert_allclose(again.score(states), probe.score(states), rtol=1e-12)
    assert (
        selection_report(records_for(correct), ["final"], probe.score(states))["probe_auroc"] > 0.9
    )


def test_fit_refuses_a_single_class():
    states, correct = synthetic()
    with pytest.raises(RimError, match="every block answer is wrong"):
        fit(states, np.zeros_like(correct))


def records_for(correct: np.ndarray, answers=None) -> list[Record]:
    out = []
    for i, row in enumerate(correct):
        ans = answers[i] if answers else tuple(str(k) for k in range(len(row)))
        out.append(Record(i, "g", ans, tuple(bool(c) for c in row), 1, 2))
    return out


def test_selection_rules():
    correct = np.array([[True, False, False], [False, True, False], [False, False, False]])
    answers = [("7", "3", "3"), ("1", "4", "2"), ("5", "5", "6")]
    recs = records_for(correct, answers)
    assert choose(recs, "final") == [False, False, False]
    assert choose(recs, "oracle") == [True, True, False]
    assert choose(recs, "vote") == [False, False, False]  # "3" twice; ties go to the later block
    scores = np.array([[0.9, 0.1, 0.2], [0.1, 0.8, 0.3], [0.5, 0.4, 0.3]])
    assert choose(recs, "probe", scores) == [True, True, False]
    rep = selection_report(recs, ["final", "probe", "vote", "oracle"], scores)
    assert rep["selection"] == {"final": 0.0, "probe": 2 / 3, "vote": 0.0, "oracle": 2 / 3}
    with pytest.raises(RimError, match="no probe"):
        choose(recs, "probe")


def test_block_states_are_each_blocks_last_token_from_a_plain_forward():
    from rim.data import generate

    cfg, tok, model, method = make_setup("rim", "llama", "sdpa", memory__blocks=3)
    examples = generate("chain", 5, seed=3)
    states, records = block_states(method, model, examples, batch_size=2)
    K, Lb = 3, method.mem.block_len
    assert states.shape == (5, K, model.config.num_hidden_layers + 1, model.config.hidden_size)
    assert len(records) == 5 and all(len(r.answers) == K for r in records)
    prompt = method.prompt(examples[0].question)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states
    P = len(prompt)
    for k in range(K):
        pos = P - (K - k - 1) * Lb - 1  # block k's last token
        for layer in range(len(ref)):
            np.testing.assert_allclose(states[0, k, layer], ref[layer][0, pos].numpy(), atol=1e-4)


def test_fit_holds_out_rare_wrong_examples_on_both_sides():
    """A strong model: 4 of 200 examples have a wrong block. The layer-selection share must
    still see both classes (an unstratified 30% share often holds none of the four)."""
    from rim.probe import _selection_split

    states, correct = synthetic(n=200)
    correct[:] = True
    correct[[3, 50, 120, 180], 0] = False
    for seed in range(20):
        sel, rest = _selection_split(correct, seed, 0.3)
        assert set(sel) | set(rest) == set(range(200)) and not set(sel) & set(rest)
        assert not correct[sel].all() and not correct[rest].all()
    assert fit(states, correct).layer >= 0


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(4, 60),
    k=st.integers(1, 4),
    data=st.data(),
    seed=st.integers(0, 1000),
)
def test_selection_split_sees_both_classes_when_two_examples_have_a_wrong_block(n, k, data, seed):
    """Any mix of all-wrong and mixed examples (one of each: the 2-block toy model on an
    Intel CPU), with two or more wrong and two or more all-right ones: both parts of the
    split hold a right and a wrong block answer, and no example is in both."""
    from rim.probe import _selection_split

    wrong = data.draw(st.sets(st.integers(0, n - 1), min_size=2, max_size=n - 2))
    correct = np.ones((n, k), dtype=bool)
    for i in wrong:  # at least one wrong block, perhaps all
        row = data.draw(st.lists(st.booleans(), min_size=k, max_size=k))
        row[data.draw(st.integers(0, k - 1))] = False
        correct[i] = row
    sel, rest = _selection_split(correct, seed, 0.3)
    assert sorted([*sel, *rest]) == list(range(n))
    for part in (sel, rest):
        assert correct[part].any() and not correct[part].all()


def test_one_wrong_example_is_a_clear_error():
    states, correct = synthetic(n=50)
    correct[:] = True
    correct[7] = False
    with pytest.raises(RimError, match="1 of 50 examples have a wrong block answer"):
        fit(states, correct)
