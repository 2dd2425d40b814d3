"""Explain mode (rim.explain): the cued step readouts in training and their decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rim.curriculum import Stage
from rim.data import Example
from rim.errors import RimError
from rim.explain import explain, step_accuracy
from rim.layout import IGNORE, pack

from .conftest import TINY_RECIPE, make_setup, recipe_file, rim_run

ROOT = Path(__file__).resolve().parents[1]
EX = Example("3 + 4 - 2", ("7", "5"), "5")


def _stage(method, name: str) -> Stage:
    return next(s for s in method.plan(64, 2) if s.name == name)


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_stage2_keeps_one_cued_step_readout_per_block(weight):
    cfg, tok, model, method = make_setup(memory__blocks=4, curriculum__explain_weight=weight)
    segs = method.segments(EX, _stage(method, "stage2"), 0.5)
    cued = [s for s in segs if s.cue]
    if not weight:  # the paper's schedule: unchanged, no explain token in the vocabulary
        assert not cued and method.explain_id is None and "<|explain|>" not in tok.get_vocab()
        return
    assert [s.parent for s in cued] == [1, 2, 3, 4] and {s.weight for s in cued} == {weight}
    assert cued[0].ids == (method.explain_id,) + method.text_ids("7")
    assert cued[2].ids == (method.explain_id,)  # after the last step: quiet (cue -> EOS)
    p = pack(segs, method.eos_id)
    cue_at = [i for i, t in enumerate(p.input_ids) if t == method.explain_id]
    assert len(cue_at) == 4
    assert p.labels[cue_at[0]] == method.text_ids("7")[0]  # the cue predicts the step
    assert p.labels[cue_at[2]] == method.eos_id
    blocks_end = [i for i, t in enumerate(p.input_ids) if t == method.mem.end_id]
    answer = method.answer_ids("5")[0]
    assert all(p.labels[i] == answer for i in blocks_end)  # the block still predicts the answer
    assert all(p.labels[i] != IGNORE for i in cue_at)


def test_stage1_adds_cued_readouts_beside_the_annealed_ones():
    _, _, _, method = make_setup(memory__blocks=4, curriculum__explain_weight=0.25)
    segs = method.segments(EX, _stage(method, "stage1"), 0.0)
    assert [s.parent for s in segs if s.cue] == [1, 2, 3]  # T + 1 blocks in stage 1
    assert len([s for s in segs if s.kind == "readout" and not s.cue]) == 3  # paper's readouts


def _naive(model, ids: list[int], n: int, eos: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
    return out


def test_explain_equals_plain_runs_of_the_cued_prompt_after_k_blocks():
    """The shared-cache branches with a cue are the plain causal runs of x ++ m_1..m_k ++ cue."""
    cfg, tok, model, method = make_setup(
        memory__blocks=3, curriculum__explain_weight=0.5, eval__cot_max_new_tokens=4
    )
    questions = ["3 + 4 + 2", "9 - 4 + 3 + 1"]
    got = explain(method, model, questions)
    for q, said in zip(questions, got):
        assert len(said) == 3
        for k in range(1, 4):
            ids = method.prompt(q, k) + [method.explain_id]
            want = _naive(model, ids, 4, method.eos_id)
            assert said[k - 1] == tok.decode(want, skip_special_tokens=True).strip()
    rep = step_accuracy(method, model, [EX, Example("1 + 1", ("2",), "2")])
    assert len(rep["step_accuracy_per_block"]) == 2 and 0.0 <= rep["step_accuracy"] <= 1.0


def test_explain_refuses_a_checkpoint_trained_without_it():
    _, _, model, method = make_setup(memory__blocks=2)
    with pytest.raises(RimError, match="without explain mode"):
        explain(method, model, ["1 + 1"])


def test_generate_and_eval_explain_from_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RIM_NO_PROGRESS", "1")
    cur = TINY_RECIPE["curriculum"] | {"explain_weight": 0.5}
    recipe = recipe_file(TINY_RECIPE, tmp_path, curriculum=cur)
    run = tmp_path / "run"
    r = rim_run(capsys, "train", "--config", str(recipe), "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    best = str(run / "best")
    r = rim_run(capsys, "generate", "--checkpoint", best, "--explain", "3 + 4 - 2")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "3 + 4 - 2" and lines[1].startswith("  answer: ")
    assert [line.split(":")[0].strip() for line in lines[2:]] == ["block 1", "block 2", "block 3"]
    out = tmp_path / "e.json"
    r = rim_run(capsys, "eval", "--checkpoint", best, "--explain", "--timing-examples", "0",
             "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert len(res["step_accuracy_per_block"]) == 2 and "step accuracy" in r.stdout
