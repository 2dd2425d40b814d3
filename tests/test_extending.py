"""Adding a packed method is one module and one recipe (docs/contributing.md).

`Think` lives only in this file: three fixed `<|think|>` tokens after the question, then the
answer. It registers itself, and `rim train`, `rim eval`, `rim generate`, `Reasoner` and
the plan-based step count find it through the one registry, with no other edit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rim.curriculum import Stage
from rim.data import Example
from rim.layout import Segment
from rim.methods import METHODS, Method, register
from rim.methods.base import readout

from .conftest import TINY_RECIPE, recipe_file, rim_main

THINK = "<|think|>"


class Think(Method):
    name = "test_think"

    @classmethod
    def new_tokens(cls, settings) -> list[str]:
        return [THINK]

    def prompt(self, question: str, blocks: int | None = None) -> list[int]:
        return list(self.question_ids(question)) + [self.tokens.new[0]] * 3

    def segments(self, ex: Example, stage: Stage, progress: float) -> list[Segment]:
        x = Segment(tuple(self.prompt(ex.question)))
        return [x, readout(self.answer_ids(ex.answer), 0, 1.0)]


@pytest.fixture
def registered():
    register(Think)
    yield Think
    METHODS.pop(Think.name, None)


def test_a_method_defined_in_a_test_trains_and_decodes(registered, tmp_path: Path, capsys):
    from rim.methods import plan
    from rim.reasoner import Reasoner

    recipe = recipe_file(
        TINY_RECIPE, tmp_path, method=Think.name, train={"steps": 3, "batch_size": 8}
    )
    run = tmp_path / "run"
    rim_main("train", "--config", str(recipe), "--out", str(run))
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in metrics if "loss" in r]
    assert steps[-1] == 3 and {r.get("stage") for r in metrics if "loss" in r} == {Think.name}
    assert json.loads((run / "best" / "rim.json").read_text())["method"] == Think.name
    from rim.assembly import load_recipe

    assert sum(s.steps for s in plan(load_recipe(recipe), 64)) == 3  # the demo's count

    r = Reasoner.load(str(run / "best"))
    assert isinstance(r.method, Think) and r.tokenizer.convert_tokens_to_ids(THINK) in (
        r.method.prompt("3 + 4")
    )
    capsys.readouterr()
    rim_main("generate", "--checkpoint", str(run / "best"), "3 + 4", "2 + 1")
    assert capsys.readouterr().out.splitlines() == r.generate(["3 + 4", "2 + 1"])
    rim_main("eval", "--checkpoint", str(run / "best"), "--timing-examples", "1")
    res = json.loads((run / "best" / "eval.json").read_text())
    assert res["decoder"] == "final" and res["n"] == len(res["records"]) == 16
    assert res["forward_passes"] >= 1 and 0.0 <= res["accuracy"] <= 1.0
    with pytest.raises(SystemExit):  # no memory blocks: the all-blocks decoder refuses
        rim_main("generate", "--checkpoint", str(run / "best"), "--decoder", "all-blocks", "1")
    assert "has no memory blocks" in capsys.readouterr().err


def test_an_unregistered_method_is_a_config_error(tmp_path: Path, capsys):
    recipe = recipe_file(TINY_RECIPE, tmp_path, method=Think.name)
    with pytest.raises(SystemExit) as exc:
        rim_main("train", "--config", str(recipe), "--out", str(tmp_path / "run"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"method: '{Think.name}' is not one of" in err and str(recipe) in err
