"""Issue 30's multiplication benchmark: the from-scratch recipes (configs/mult/small_*), the
train set's exclusion of every valid/test question, the grids (configs/sweeps/mult*.yaml)
and a tiny version of the mult grid run end to end through `rim sweep`.

That the generator rewrites every line of the shipped valid/test files from its question,
byte for byte, is tests/test_data.py::test_mult_regenerated_byte_identical.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from rim.errors import ConfigError
from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
MULT = ROOT / "configs" / "mult"
SWEEPS = ROOT / "configs" / "sweeps"
METHODS = ("direct", "cot", "rim", "pause", "coconut", "icot", "codi")
DEPTH = {2: ("direct", "cot", "rim"), 3: ("direct", "cot", "rim")} | {k: METHODS for k in (4, 5)}
BUDGET = {2: 800, 3: 800, 4: 800, 5: 1600}  # optimizer steps of every method (rim: 5 : 3)


@pytest.fixture
def at_root(monkeypatch):
    """Recipes name their data relative to the repository root (../shared/data beside it)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    monkeypatch.chdir(ROOT)


def _recipe(k: int, method: str, sets: list[str] | None = None):
    from rim.assembly import load_recipe

    return load_recipe(MULT / f"small_{k}x{k}_{method}.yaml", sets)


# --------------------------------------------------------------------------- the recipes


def test_the_small_recipes_are_every_method_at_every_size():
    names = {p.name for p in MULT.glob("small_*_*.yaml")}
    assert names == {f"small_{k}x{k}_{m}.yaml" for k, ms in DEPTH.items() for m in ms}


@pytest.mark.parametrize("k", sorted(DEPTH))
def test_small_recipes_share_model_data_budget_and_evaluation(k):
    """Every method at a size: one model, one data set and evaluation, the same examples;
    K = T + 1 blocks of M = 2; each file opens with its launch command."""
    from rim.runner import total_steps

    cfgs = {m: _recipe(k, m) for m in DEPTH[k]}
    ref = cfgs["direct"]
    assert (ref.model.arch, ref.model.size, ref.model.overrides) == (
        "llama", "base", {"num_hidden_layers": 4},
    )  # fmt: skip
    assert ref.data.train.generator == "mult" and ref.data.train.size == 200_000
    assert ref.data.train.options["digits"] == k
    for m, cfg in cfgs.items():
        assert cfg.method == m
        assert cfg.model == ref.model and cfg.data == ref.data and cfg.eval == ref.eval
        assert (cfg.train.batch_size, cfg.train.threads, cfg.train.eval_every) == (64, 1, 100)
        assert cfg.eval.val_limit == 256
        assert total_steps(cfg) == BUDGET[k]  # the same number of examples
        assert cfg.memory.blocks == k + 1 and cfg.memory.mem_tokens == 2  # K = T + 1
        assert cfg.train.lr == 1e-3
        head = (MULT / f"small_{k}x{k}_{m}.yaml").read_text().splitlines()[:6]
        assert any(f"rim train --config configs/mult/small_{k}x{k}_{m}.yaml" in h for h in head)
    if "rim" in cfgs:
        c = cfgs["rim"].curriculum
        assert (c.stage1_steps, c.stage2_steps) == (BUDGET[k] * 5 // 8, BUDGET[k] * 3 // 8)


@pytest.mark.parametrize("k", [4, 5])
def test_the_baselines_schedules_are_scaled_to_the_budget(k):
    """Coconut: one stage per partial product, 1/8 of the budget each, then the latent
    stage; iCoT-SI: the whole chain removed within the first half, a token per step group."""
    from rim.methods import plan
    from rim.model import build_tokenizer
    from rim.sources import load_split

    coconut = _recipe(k, "coconut")
    stages = plan(coconut, coconut.data.train.size)
    assert coconut.coconut.max_stage == k  # T: the last stage makes every step latent
    per = BUDGET[k] // 8  # 4x4: 100 x 5 stages, then 300 latent; 5x5: 200 x 6, then 400
    assert [s.steps for s in stages] == [per] * (k + 1) + [BUDGET[k] - per * (k + 1)]
    icot = _recipe(k, "icot")
    stages = plan(icot, icot.data.train.size)
    assert stages[-1].name == "remove_all" and stages[-1].steps > BUDGET[k] / 2
    assert icot.train.lr_schedule == "constant"
    valid = load_split(icot.data.valid) if SHARED_DATA.is_dir() else None
    if valid:  # the removal ends where every chain ends (word-level tokens)
        tok = build_tokenizer([f"{e.question} {e.cot} #### {e.answer}" for e in valid[:20]])
        lengths = {len(tok(e.cot, add_special_tokens=False)["input_ids"]) for e in valid}
        assert lengths == {icot.icot.remove_all_when_remove_beyond}


@pytest.mark.parametrize("k", [4, 5])
def test_the_recipes_score_both_icot_test_files_and_select_on_valid(k):
    d = _recipe(k, "rim").data
    folder = f"../shared/data/{k}_by_{k}_mult"
    assert d.valid.path == f"{folder}/valid.txt"
    assert d.test.path == f"{folder}/test_bigbench.txt"
    assert d.extra_tests == [f"{folder}/test_bigbench.implicit_chain_of_thought.txt"]
    assert d.train.options["exclude"] == [d.valid.path, d.test.path, *d.extra_tests]


# --------------------------------------------------------------------------- exclusion


@pytest.mark.parametrize("k", [2, 4])
def test_the_train_set_shares_no_question_with_valid_or_test(at_root, k):
    """The recipes' own 200,000 lines (4x4: ~7 would repeat a valid/test product by chance;
    2x2: all 8,100 products would be drawn)."""
    from rim.sources import load_split

    d = _recipe(k, "direct").data
    held = [load_split(s) for s in (d.valid, d.test)]
    held += [load_split(type(d.test)(path=p)) for p in d.extra_tests]
    train = {e.question for e in load_split(d.train)}
    assert len(train) > 6000
    for split in held:
        assert len(split) == 1000 and not train & {e.question for e in split}
    if k == 2:  # generated valid and test: disjoint too
        assert not {e.question for e in held[0]} & {e.question for e in held[1]}


def test_exclusion_errors_are_one_line():
    from rim.data import generate

    with pytest.raises(ConfigError, match="option 'exclude' leaves no product to draw"):
        every = {"generator": "mult", "size": 999, "seed": 1, "options": {"digits": 1}}
        generate("mult", 5, 0, digits=1, exclude=[every])
    with pytest.raises(ConfigError, match="option 'exclude' must be a list"):
        generate("mult", 5, 0, digits=2, exclude="valid.txt")
    with pytest.raises(ConfigError, match="option 'exclude': .*unexpected keyword .*pth"):
        generate("mult", 5, 0, digits=2, exclude=[{"pth": "valid.txt"}])


# --------------------------------------------------------------------------- the grids


def _plan(name: str):
    from rim.grid import load_grid
    from rim.sweep import plan

    return {c.name: c for c in plan(load_grid(SWEEPS / name, need_reuse=False), Path("out"))}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def test_the_mult_grid_is_seven_methods_at_twice_the_recipes_budget():
    cells = _plan("mult.yaml")
    assert len(cells) == 2 * (5 + 2 * 3) and sum(len(c.jobs) for c in cells.values()) == 42
    for k in (4, 5):
        at_k = {n: c for n, c in cells.items() if c.values["digits"] == k}
        assert {c.method for c in at_k.values()} == set(METHODS)
        for c in at_k.values():
            search = c.method in ("rim", "pause")
            assert [j.seed for j in c.jobs] == ([0] if search else [0, 1, 2])
            assert c.values["budget"] == 2 * BUDGET[k]
            one = _flat(_recipe(k, c.method, [f"train.lr={c.values['lr']}"]).to_dict())
            two = _flat(c.cfg.to_dict())
            moved = {key for key in one if one[key] != two[key]}
            assert "train.steps" in moved and moved <= {
                "train.steps", "curriculum.stage1_steps", "curriculum.stage2_steps",
                "coconut.steps_per_stage", "coconut.steps", "icot.remove_per_epoch",
            }  # fmt: skip
            for key in moved:  # each schedule stretched: a rate halves, a length doubles
                assert two[key] == (one[key] / 2 if key.startswith("icot.") else 2 * one[key])
            if c.method in ("rim", "pause", "coconut"):  # the keys their training reads
                assert moved > {"train.steps"}
        lrs = {c.values["lr"] for c in at_k.values() if c.method == "rim"}
        assert lrs == {5e-4, 1e-3, 2e-3}


def test_the_depth_grid_is_the_recipes_own_budget_at_every_size():
    """The depth sweep trains every size at its recipe's (1x) budget: its 4x4 and 5x5 runs are
    mult_budget's 1x points, not the table's (mult.yaml, at 2x)."""
    depth = _plan("mult_depth.yaml")
    assert {c.values["digits"] for c in depth.values()} == {2, 3, 4, 5}
    assert {c.method for c in depth.values()} == {"direct", "cot", "rim"}
    for c in depth.values():
        k, lr = c.values["digits"], [f"train.lr={c.values['lr']}"]
        assert c.cfg.to_dict() == _recipe(k, c.method, lr).to_dict()
        assert [j.seed for j in c.jobs] == ([0] if c.method == "rim" else [0, 1, 2])


def test_the_grids_dry_run_lists_every_run(capsys):
    from rim.cli import parser
    from rim.sweep import run_sweep

    for name, runs, row in (
        ("mult.yaml", "22 cells, 42 runs", "| rim/digits=4,budget=1600,lr=0.002 | 0 (search) | 1600 |"),
        ("mult_depth.yaml", "20 cells, 36 runs", "| rim/digits=4,lr=0.002 | 0 (search) | 800 |"),
    ):  # fmt: skip
        argv = ["sweep", "--config", str(SWEEPS / name), "--out", "/nonexistent", "--dry-run"]
        assert run_sweep(parser().parse_args(argv)) == {}
        out = capsys.readouterr().out
        assert runs in out and "then 8 runs more" in out and row in out


# --------------------------------------------------------------------------- tiny, run


def _tiny_grid(folder: Path) -> Path:
    """The mult grid's search on the real 4x4 recipes, tiny: rim's LR searched on seed 0,
    then the chosen LR's seed 1 (3 runs). Both test files, cut short."""
    kd = folder / "test_bigbench.implicit_chain_of_thought.txt"
    lines = (SHARED_DATA / "4_by_4_mult" / kd.name).read_text().splitlines(keepends=True)
    kd.write_text("".join(lines[:24]))
    tiny = {
        "model.size": "tiny",
        "model.overrides": {},
        "data.train.size": 200,
        "data.valid.limit": 24,
        "data.test.limit": 32,
        "data.extra_tests": [str(kd)],
        "train.batch_size": 32,
        "train.steps": 6,
        "curriculum.stage1_steps": 4,
        "curriculum.stage2_steps": 2,
        "train.eval_every": 3,
        "train.log_every": 2,
        "eval.val_limit": 24,
    }
    grid = {
        "recipes": str(MULT / "small_4x4_{method}.yaml"),
        "seeds": 2,
        "set": tiny,
        "grid": [
            {
                "methods": ["rim"],
                "seeds": 1,
                "data.train.options.digits": [4],
                "train.lr": [1e-3, 3e-3],
            },
        ],
        "select": "lr",
    }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


@pytest.mark.slow
def test_a_tiny_mult_grid_runs_end_to_end(at_root, tmp_path, monkeypatch):
    """Search, then the chosen LR's other seed; both test files scored; one table."""
    from rim.cli import parser
    from rim.sweep import run_sweep

    monkeypatch.setenv("RIM_NO_PROGRESS", "1")
    out = tmp_path / "out"
    argv = ["sweep", "--config", str(_tiny_grid(tmp_path)), "--out", str(out)]
    res = run_sweep(parser().parse_args(argv + ["--workers", "2"]))
    assert res["failed"] == []
    (best,) = res["best"]
    assert best["method"] == "rim" and best["seeds"] == [0]
    rim0 = [r for r in res["runs"] if r["method"] == "rim" and r["seed"] == 0]
    valid = {r["values"]["lr"]: r["best_valid_accuracy"] for r in rim0}
    runs = sorted((r["cell"], r["seed"]) for r in res["runs"])
    chosen = f"rim/digits=4,lr={best['chosen']:g}"
    other = f"rim/digits=4,lr={({1e-3, 3e-3} - {best['chosen']}).pop():g}"
    assert runs == sorted([(chosen, 0), (chosen, 1), (other, 0)])
    assert valid[best["chosen"]] == max(valid.values())  # chosen on validation
    name = "test_bigbench.implicit_chain_of_thought"
    for r in res["runs"]:
        assert r["state"] == "done" and r["n"] == 32  # data.test, cut to 32
        kd = json.loads((out / r["run"] / f"test_eval.{name}.json").read_text())
        assert kd["n"] == 24 and r["extra_tests"] == {name: kd["accuracy"]}
    cells = {c["cell"]: c for c in res["cells"]}
    assert cells[chosen]["runs"] == 2 and cells[other]["runs"] == 1
    assert cells[chosen]["extra_tests"][name]["n"] == 2
    md = (out / "results.md").read_text()
    assert f"| {name} acc |" in md and "## lr chosen on validation" in md
    again = run_sweep(parser().parse_args(argv + ["--report-only"]))  # resumes: all kept
    assert [r["kept"] for r in again["runs"]] == [True] * 3


def test_extra_tests_need_distinct_file_names():
    """Each is scored into test_eval.<file stem>.json: two of one name would collide."""
    from rim.config import load_config

    two = 'data.extra_tests=["a/test.txt", "b/test.txt"]'
    with pytest.raises(ConfigError, match="data.extra_tests: expected a list of files with dist"):
        load_config(overrides=[two])
    assert load_config(overrides=['data.extra_tests=["a/t1.txt"]']).data.extra_tests == ["a/t1.txt"]


@pytest.mark.parametrize(
    "part, message",
    [
        ({"seeds": 3, "train.lr": [1e-3, 2e-3]}, "grid[0].seeds: more than the grid's seeds"),
        ({"seeds": 1, "train.steps": [4, 8]}, "grid[0].seeds: fewer than the grid's seeds"),
        ({"recipes": "nowhere/{method}.yaml", "train.lr": [1e-3]}, "methods: direct: no recipe"),
    ],
)
def test_a_search_part_names_its_select_axis(tmp_path, part, message):
    from rim.grid import load_grid

    grid = {"methods": ["direct"], "seeds": 2, "grid": [part], "select": "lr"}
    if "train.lr" not in part:
        grid["grid"].append({"train.lr": [1e-3]})
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"recipes": str(MULT / "small_4x4_{method}.yaml")} | grid))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_grid(path)
