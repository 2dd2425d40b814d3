"""`rim sweep`: grid files, their expansion and budgets, selection on validation, and one tiny
grid run end to end (results, resume, plots)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from rim.errors import ConfigError
from rim.machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "configs" / "sweeps"
DEMO = ROOT / "configs" / "demo"

# every run of the tiny grid: a tiny model, a few optimizer steps on a few hundred examples
TINY = {
    "model.size": "tiny",
    "data.train.size": 200,
    "data.valid.size": 32,
    "data.test.size": 48,
    "train.batch_size": 32,
    "train.steps": 8,
    "curriculum.stage1_steps": 5,
    "curriculum.stage2_steps": 3,
    "train.eval_every": 4,
    "train.log_every": 2,
    "eval.val_limit": 32,
}


def _grid_file(folder: Path, **spec) -> Path:
    data = {"recipes": str(DEMO), "methods": ["direct", "rim"], "seeds": 1} | spec
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width > 100 and height > 100


# --------------------------------------------------------------------------- grid files


def test_a_grid_is_the_product_of_its_axes_and_the_union_of_its_parts(tmp_path):
    from rim.grid import load_grid

    grid = load_grid(
        _grid_file(
            tmp_path,
            grid=[
                {"train.lr": [1e-3, 2e-3], "k": {"memory.blocks": [3, 5], "train.steps": [4, 6]}},
                {"methods": ["rim"], "curriculum.schedule": ["none", "uniform"]},
            ],
        )
    )
    cells = grid.cells()
    assert [a.name for a in grid.axes] == ["lr", "k", "schedule"]  # one-key axes: last part
    assert len(cells) == 2 * 2 * 2 + 2  # (direct, rim) x lr x k, then rim x schedule
    assert cells[0].method == "direct" and cells[0].values == {"lr": 1e-3, "k": 3}
    assert cells[1].overrides == {"train.lr": 1e-3, "memory.blocks": 5, "train.steps": 6}
    assert {c.method for c in cells[-2:]} == {"rim"}
    assert cells[-1].overrides == {"curriculum.schedule": "uniform"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"seed": 3}, "seed: unknown grid key"),
        ({"seeds": 0}, "seeds: expected an integer >= 1"),
        ({"methods": ["direct", "nope"]}, "methods: nope: no recipe"),
        ({"grid": {"k": {"memory.blocks": [3, 5], "train.steps": [4]}}}, "grid.k.train.steps: 1"),
        ({"grid": {"train.lr": []}}, "grid.train.lr: expected a non-empty list"),
        ({"grid": {"train.lr": [1, 1]}}, "a value is named twice"),
        ({"grid": {"train.lr": [1e-3]}, "select": "steps"}, "select: 'steps' is not an axis"),
        ({"grid": [{"lr": {"train.lr": [1]}}, {"lr": {"train.steps": [1]}}]}, "grid[1].lr"),
        ({"set": ["train.lr=1"]}, "set: expected a mapping"),
        ({"reuse": "results/width"}, "reuse: expected a list of sweep --out folders"),
        ({"reuse": ["nowhere"]}, "reuse: nowhere: no sweep output there"),
    ],
)
def test_grid_file_errors_name_the_file_and_the_key(tmp_path, spec, message):
    from rim.grid import load_grid

    path = _grid_file(tmp_path, **spec)
    with pytest.raises(ConfigError, match=r"^" + str(path).replace(".", r"\.")) as err:
        load_grid(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_bad_recipe_key_names_the_grid_file_and_the_cell(tmp_path):
    from rim.grid import load_grid
    from rim.sweep import plan

    path = _grid_file(tmp_path, grid={"train.stepz": [1, 2]})
    with pytest.raises(ConfigError, match=r"grid\.yaml: direct/stepz=1: .*train\.stepz"):
        plan(load_grid(path), tmp_path / "out")


def test_methods_at_one_grid_point_must_share_the_task(tmp_path):
    from rim.grid import load_grid
    from rim.sweep import plan

    base = DEMO / "base.yaml"
    (tmp_path / "rim.yaml").write_text(f"base: {base}\nmethod: rim\n")
    (tmp_path / "direct.yaml").write_text(
        f"base: {base}\nmethod: direct\ndata: {{train: {{size: 100}}}}\n"
    )
    path = _grid_file(tmp_path, recipes=str(tmp_path), grid={"train.lr": [1e-3]})
    with pytest.raises(ConfigError, match=r"rim/lr=0\.001: data differs from direct/lr=0\.001"):
        plan(load_grid(path), tmp_path / "out")
    plan(load_grid(path), tmp_path / "out", ["data.train.size=100"])  # --set: every run


# --------------------------------------------------------------------------- the grids


def _planned(name: str) -> dict:
    from rim.grid import load_grid
    from rim.sweep import plan

    return {c.name: c for c in plan(load_grid(SWEEPS / name), Path("out"))}


def test_width_grid_gives_every_method_the_same_examples_at_each_n():
    from rim.assembly import load_recipe

    cells = _planned("width.yaml")
    assert len(cells) == 4 * 4
    for n in (4, 8, 12, 16):
        at_n = [c for c in cells.values() if c.values["pairs"] == n]
        assert {c.method for c in at_n} == {"direct", "pause", "rim", "cot"}
        assert len({c.jobs[0].total_steps * c.cfg.train.batch_size for c in at_n}) == 1
        for c in at_n:
            d = c.cfg.data
            assert d.train.options["pairs"] == d.valid.options["pairs"] == d.test.options["pairs"]
            assert c.cfg.memory.blocks == n + 1  # K = N + 1
            assert c.cfg.eval.cot_max_new_tokens >= n + 3  # N flags, the marker, the answer
            assert len(c.jobs) == 3 and c.jobs[2].seed == 2
    demo = load_recipe(DEMO / "rim.yaml").to_dict()
    demo["data"]["train"]["options"] = {"pairs": 8}
    for split in ("valid", "test"):
        demo["data"][split]["options"] = {"pairs": 8}
    assert cells["rim/pairs=8"].cfg.to_dict() == demo  # N = 8 is the demo itself


def test_grounding_grid_is_widths_n16_and_selects_lr_on_validation():
    from rim.grid import load_grid

    grid = load_grid(SWEEPS / "grounding.yaml")
    assert grid.select == "lr"
    cells = _planned("grounding.yaml")
    assert set(cells) == {
        *(f"{m}/lr={lr},schedule=relative" for m in ("rim", "pause") for lr in (5e-4, 1e-3, 2e-3)),
        "rim/lr=0.001,schedule=none",
        "rim/lr=0.001,schedule=uniform",
    }  # rim at 1e-3, relative is in both parts: planned once
    width = _planned("width.yaml")
    for c in cells.values():
        ref = width[f"{c.method}/pairs=16"].cfg
        assert c.cfg.data == ref.data and c.cfg.memory == ref.memory
        assert c.jobs[0].total_steps == width[f"{c.method}/pairs=16"].jobs[0].total_steps


def test_grounding_takes_widths_n16_runs_at_its_learning_rate():
    """rim and pause at LR 1e-3 are width's N = 16 recipes: `reuse` takes their finished
    runs from results/width (committed), and no other run."""
    from rim.assembly import load_recipe
    from rim.grid import load_grid
    from rim.runner import finished
    from rim.sweep import plan

    planned = plan(load_grid(SWEEPS / "width.yaml"), ROOT / "results" / "width")
    n16 = [c for c in planned if c.values["pairs"] == 16]
    width = {(j.method, j.seed): j for c in n16 for j in c.jobs}
    shared = {"rim/lr=0.001,schedule=relative", "pause/lr=0.001,schedule=relative"}
    for name, c in _planned("grounding.yaml").items():
        for j in c.jobs:
            w = width[(j.method, j.seed)]
            recipe = load_recipe(j.recipe, j.train_sets).to_dict()
            same = recipe == load_recipe(w.recipe, w.train_sets).to_dict()
            assert same == (name in shared)
            assert j.reused == (same and finished(w))
            if j.reused:
                assert j.out.resolve() == w.out.resolve() and ".." not in j.out.parts


def test_selection_uses_the_valid_split_never_the_test_split():
    from rim.sweep import aggregate, select_best

    def cell(method, lr, valid, test):
        metrics = {"best_valid_accuracy": aggregate(valid), "accuracy": aggregate(test)}
        values = {"lr": lr, "schedule": "relative"}
        by_seed = {str(s): v for s, v in enumerate(valid)}
        return {"cell": f"{method}/{lr}", "method": method, "values": values, "metrics": metrics,
                "valid_by_seed": by_seed}  # fmt: skip

    cells = [
        cell("rim", 1e-3, [0.5, 0.6], [0.9, 0.9]),  # the best on test, not on valid
        cell("rim", 2e-3, [0.7, 0.8], [0.4, 0.6]),
        cell("pause", 1e-3, [0.2], [0.2]),  # one candidate: nothing chosen
    ]
    (best,) = select_best(cells, "lr")
    assert best["method"] == "rim" and best["chosen"] == 2e-3 and best["seeds"] == [0, 1]
    assert best["values"] == {"schedule": "relative"}
    assert best["valid_accuracy"] == pytest.approx(0.75)
    assert best["test_accuracy"]["mean"] == pytest.approx(0.5) and best["test_accuracy"]["n"] == 2
    assert best["candidates"] == {"0.001": pytest.approx(0.55), "0.002": pytest.approx(0.75)}


def test_a_tie_on_exact_accuracy_goes_to_valid_token_accuracy():
    """Three LRs all at 0 exact on valid (4x4 multiplication): the one whose best/ spells
    more answer digits right on valid is chosen, not the first listed."""
    from rim.runner import best_tokens
    from rim.sweep import best_table, select_best

    def cell(lr, tokens):
        return {"cell": f"rim/{lr}", "method": "rim", "values": {"lr": lr}, "metrics": {},
                "valid_by_seed": {"0": 0.0}, "valid_tokens_by_seed": {"0": tokens}}  # fmt: skip

    (best,) = select_best([cell(5e-4, 0.24), cell(1e-3, 0.31), cell(2e-3, 0.30)], "lr")
    assert best["chosen"] == 1e-3 and best["valid_accuracy"] == 0.0
    shown = best_table({"grid": {"select": "lr", "axes": {"lr": "train.lr"}}, "best": [best]})
    assert "0.001: 0.000 (tokens 0.310)" in shown  # the table says what broke the tie
    (best,) = select_best([cell(5e-4, 0.24), {**cell(1e-3, 0.5), "valid_tokens_by_seed": {}}], "lr")
    assert best["chosen"] == 5e-4  # a run with no token accuracy never wins the tie
    records = [
        {"stage": "stage1", "valid_accuracy": 0.0, "valid_token_accuracy": 0.9},
        {"stage": "stage2", "valid_accuracy": 0.1, "valid_token_accuracy": 0.3},
        {"stage": "stage2", "valid_accuracy": 0.1, "valid_token_accuracy": 0.4},  # best/ (tie)
        {"stage": "stage2", "valid_accuracy": 0.0, "valid_token_accuracy": 0.5},
        {"event": "done", "best_valid_accuracy": 0.1},
    ]
    assert best_tokens(records, 0.1) == 0.4 and best_tokens(records, 0.7) is None


@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=3),
    st.lists(st.floats(0, 1), min_size=1, max_size=3),
    st.floats(0, 1),
)
def test_selection_scores_candidates_on_the_seeds_all_of_them_finished(a, b, extra):
    """One more finished seed (a stopped sweep, a reused run) does not move the choice."""
    from rim.sweep import select_best

    n = min(len(a), len(b))

    def cell(lr, valid):
        by_seed = {str(s): v for s, v in enumerate(valid)}
        return {"cell": f"rim/{lr}", "method": "rim", "values": {"lr": lr}, "metrics": {},
                "valid_by_seed": by_seed}  # fmt: skip

    (best,) = select_best([cell(1, a[:n]), cell(2, b[:n])], "lr")
    (again,) = select_best([cell(1, a[:n] + [extra]), cell(2, b[:n])], "lr")
    assert best["seeds"] == again["seeds"] == list(range(n))
    assert (again["chosen"], again["candidates"]) == (best["chosen"], best["candidates"])


# --------------------------------------------------------------------------- a tiny grid, run


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    from rim.cli import parser
    from rim.sweep import run_sweep

    mp = pytest.MonkeyPatch()
    mp.setenv("RIM_NO_PROGRESS", "1")
    folder = tmp_path_factory.mktemp("sweep")

    def pairs(ns: list[int]) -> dict:  # N pairs in every split, K = N + 1 blocks
        axis = {f"data.{s}.options.pairs": ns for s in ("train", "valid", "test")}
        return {"pairs": axis | {"memory.blocks": [n + 1 for n in ns]}}

    # 3 runs, to stay fast: rim at N = 2 and 4, direct at N = 4 (a list of two products)
    grid = [{"methods": ["rim"]} | pairs([2, 4]), {"methods": ["direct"]} | pairs([4])]
    path = _grid_file(folder, set=TINY, grid=grid)
    out = folder / "out"
    argv = ["sweep", "--config", str(path), "--out", str(out), "--workers", "3"]
    args = parser().parse_args(argv)
    yield out, args, run_sweep(args)
    mp.undo()


def test_sweep_results_hold_every_run_and_each_cells_aggregate(swept):
    out, _, returned = swept
    res = json.loads((out / "results.json").read_text())
    assert res == json.loads(json.dumps(returned)) and res["failed"] == []
    runs = {(r["cell"], r["seed"]): r for r in res["runs"]}
    assert set(runs) == {("rim/pairs=2", 0), ("rim/pairs=4", 0), ("direct/pairs=4", 0)}
    for r in runs.values():
        assert r["state"] == "done" and not r["kept"] and 0 <= r["accuracy"] <= 1
        assert r["n"] == TINY["data.test.size"]  # tested on the test split
        assert (out / r["run"] / "test_eval.json").is_file()
    cells = {c["cell"]: c for c in res["cells"]}
    assert set(cells) == {c for c, _ in runs}
    for name, c in cells.items():
        acc = c["metrics"]["accuracy"]
        assert acc == {"mean": runs[(name, 0)]["accuracy"], "sd": None, "n": 1}
        assert c["train_examples"] == 8 * 32 and c["n"] == c["runs"] == 1
    assert len(cells["rim/pairs=4"]["per_block_accuracy"]["mean"]) == 5  # K = N + 1
    assert "per_block_accuracy" not in cells["direct/pairs=4"]
    pos = cells["rim/pairs=4"]["per_position_accuracy"]["mean"]  # fixed-width answers
    assert len(pos) == 5 and all(0 <= a <= 1 for row in pos for a in row)  # a row per block
    assert len(cells["direct/pairs=4"]["per_position_accuracy"]["mean"]) == 1
    assert res["grid"]["axes"] == {"pairs": "data.train.options.pairs"}
    assert {r["cpu"] for r in runs.values()} == {cpu_model()}  # results name their CPU


def test_sweep_writes_one_table_and_the_plots(swept):
    out, _, _ = swept
    md = (out / "results.md").read_text()
    assert "| method | pairs | test acc (mean ± s.d.) | any-block acc |" in md
    assert md.count("\n| rim | 4 |") == 1 and md.count("\n| direct | 4 |") == 1
    for name in ("accuracy_vs_pairs.png", "per_block.png", "per_position.png"):
        assert _is_png(out / name) and f"]({name})" in md
    assert f"Trained on: {cpu_model()} (3 runs)" in md


def test_timing_measures_every_finished_cell_together(swept, tmp_path, monkeypatch):
    """`--timing N`: each cell's best/ answers N test questions in rotating rounds, in one
    process; TTFT over direct's at the same grid point; a table and the pareto plot."""
    import rim.timing as timing
    from rim.cli import parser
    from rim.sweep import run_sweep

    out, args, _ = swept
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    order = []
    real = timing._one
    monkeypatch.setattr(timing, "_one", lambda r, q, clock: order.append(q) or real(r, q, clock))
    argv = ["sweep", "--config", args.config, "--out", str(copy), "--report-only", "--timing", "3"]
    res = run_sweep(parser().parse_args(argv))
    t = res["timing"]["cells"]
    assert set(t) == {"rim/pairs=2", "rim/pairs=4", "direct/pairs=4"}
    assert all(c["questions"] == 3 and c["ttft_ms"] > 0 for c in t.values())
    assert len(order) == 3 + 3 * 3  # a warm-up each, then 3 rounds of 3
    ratio = t["rim/pairs=4"]["ttft_ms"] / t["direct/pairs=4"]["ttft_ms"]
    assert t["rim/pairs=4"]["ttft_vs_direct"] == pytest.approx(ratio)
    assert "ttft_vs_direct" not in t["rim/pairs=2"]  # no direct cell at N = 2
    assert t["direct/pairs=4"]["accuracy"] == res["cells"][2]["metrics"]["accuracy"]["mean"]
    md = (copy / "results.md").read_text()
    assert "## Latency, measured together" in md and "| direct/pairs=4 |" in md
    assert _is_png(copy / "accuracy_vs_ttft.png") and "](accuracy_vs_ttft.png)" in md
    # a later rewrite without --timing keeps the measurement (not timed again) and its plot
    order.clear()
    again = run_sweep(parser().parse_args(argv[:-2]))
    assert order == [] and again["timing"]["cells"] == t
    assert again["timing"]["measured"] == res["timing"]["measured"]
    md = (copy / "results.md").read_text()
    assert "## Latency, measured together" in md and "](accuracy_vs_ttft.png)" in md
    assert _is_png(copy / "accuracy_vs_ttft.png")


def test_timing_skips_runs_without_weights(tmp_path, capsys, monkeypatch):
    """A committed run folder has no best/ (results/.gitignore): that cell is not timed."""
    import rim.timing as timing

    (tmp_path / "runs" / "a" / "seed0" / "best").mkdir(parents=True)
    (tmp_path / "runs" / "b" / "seed0").mkdir(parents=True)
    runs = [{"cell": c, "seed": 0, "state": "done", "run": f"runs/{c}/seed0"} for c in "ab"]
    cells = [{"cell": c, "method": "rim", "values": {}, "metrics": {}} for c in "ab"]
    asked = {}
    fake = {"ttft_ms": 1.0, "latency_ms": 2.0, "questions": 1}
    monkeypatch.setattr(
        timing, "time_together", lambda picks, n, device: asked.update(picks) or {"a": fake}
    )
    res = {"runs": runs, "cells": cells, "grid": {"axes": {}}}
    timing.add_timing(res, tmp_path, 1)
    assert list(asked) == ["a"] and list(res["timing"]["cells"]) == ["a"]
    assert "no best/ weights here for b: not timed" in capsys.readouterr().out


def test_a_run_stopped_in_its_test_evaluation_is_scored_on_resume(swept, tmp_path):
    """Training and test evaluation are one process (`rim train --test`): a job killed
    after training, before its test_eval.json, is scored on resume, its training kept."""
    from rim.sweep import run_sweep

    out, args, first = swept
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    run = copy / "runs" / "rim" / "pairs=2" / "seed0"
    before = json.loads((run / "test_eval.json").read_text())
    (run / "test_eval.json").unlink()
    weights = (run / "best" / "model.safetensors").read_bytes()
    again = run_sweep(argparse.Namespace(**vars(args) | {"out": str(copy), "workers": 1}))
    runs = {r["cell"]: r for r in again["runs"]}
    assert not runs["rim/pairs=2"]["kept"] and runs["rim/pairs=4"]["kept"]
    after = json.loads((run / "test_eval.json").read_text())
    assert after["records"] == before["records"] and after["accuracy"] == before["accuracy"]
    assert (run / "best" / "model.safetensors").read_bytes() == weights  # not retrained
    assert runs["rim/pairs=2"]["accuracy"] == before["accuracy"]


def test_a_second_sweep_reruns_nothing(swept, capsys):
    from rim.sweep import run_sweep

    out, args, first = swept
    logs = {p: p.read_text() for p in (out / "runs").rglob("train.log")}
    assert len(logs) == 3
    for log in logs.values():  # a run folder can be committed: its commands name no path
        assert log.startswith("$ python -m rim train --config ") and sys.executable not in log
    for weights in ("best", "final", "checkpoints"):  # what results/.gitignore leaves out:
        for d in (out / "runs").rglob(weights):  # a committed run folder is still finished
            shutil.rmtree(d)
    again = run_sweep(args)
    assert {p: p.read_text() for p in logs} == logs  # no command ran in any run folder
    assert all(r["kept"] for r in again["runs"])
    assert [r["accuracy"] for r in again["runs"]] == [r["accuracy"] for r in first["runs"]]
    assert "3 of 3 runs finished before, kept" in capsys.readouterr().out


def test_only_trains_the_matching_cells_and_the_table_lists_all(swept, tmp_path, capsys):
    from rim.cli import parser
    from rim.sweep import run_sweep

    _, args, _ = swept
    argv = ["sweep", "--config", args.config, "--out", str(tmp_path / "o"), "--only", "direct/*"]
    run_sweep(parser().parse_args([*argv, "--dry-run"]))
    plan = capsys.readouterr().out
    assert "| direct/pairs=4 |" in plan and "rim/" not in plan and "1 cells, 1 runs" in plan
    res = run_sweep(parser().parse_args(argv))
    assert [p.parent.parent.name for p in (tmp_path / "o" / "runs").rglob("train.log")] == [
        "pairs=4"
    ]
    assert sorted(c["cell"] for c in res["cells"]) == [
        "direct/pairs=4",
        "rim/pairs=2",
        "rim/pairs=4",
    ]
    assert [r["cell"] for r in res["runs"] if r.get("accuracy") is not None] == ["direct/pairs=4"]
    with pytest.raises(ConfigError, match=r"--only rim/pairs=9: no cell of .*grid.yaml matches it"):
        run_sweep(parser().parse_args([*argv[:-1], "rim/pairs=9"]))


def test_only_takes_a_run_pattern_too(tmp_path):
    """`--only 'rim/*/s0'` trains seed 0 of the matching cells only; a cell pattern takes
    every seed, and the dry-run plan shows a cell that one of its runs matches."""
    from rim.runner import Job
    from rim.sweep import Planned, _chosen

    jobs = [Job("rim", s, tmp_path, tmp_path, [], 10, values={"pairs": 4}) for s in (0, 1)]
    pick = lambda only: [j.name for j in jobs if _chosen(j, only)]  # noqa: E731
    both = ["rim/pairs=4/s0", "rim/pairs=4/s1"]
    assert pick(None) == pick(["rim/*"]) == pick(["rim/pairs=4"]) == both
    assert pick(["rim/*/s0"]) == ["rim/pairs=4/s0"] and pick(["*/s1"]) == ["rim/pairs=4/s1"]
    assert pick(["rim/*/s2"]) == pick(["direct/*"]) == []
    cell = Planned("rim", {"pairs": 4}, [], None, tmp_path, 2, jobs)
    assert _chosen(cell, ["rim/*/s1"]) and not _chosen(cell, ["rim/*/s2"])


def test_a_new_axis_renames_cells_and_their_finished_runs_are_kept(swept, tmp_path, capsys):
    """A part with a new axis gives every cell a longer name (`rim/pairs=2` ->
    `rim/pairs=2,lr=...`); the runs finished under the old names are found and kept."""
    from rim.cli import parser
    from rim.sweep import run_sweep

    out, args, first = swept
    copy = shutil.copytree(out, tmp_path / "out")
    spec = yaml.safe_load(Path(args.config).read_text())
    spec["grid"].append({"methods": ["direct"], **spec["grid"][1], "train.lr": [0.5]})
    path = _grid_file(tmp_path, **spec)
    argv = ["sweep", "--config", str(path), "--out", str(copy), "--only", "rim/*"]
    res = run_sweep(parser().parse_args(argv))
    rim_runs = [r for r in res["runs"] if r["method"] == "rim"]
    assert {r["cell"] for r in rim_runs} == {"rim/pairs=2,lr=0.001", "rim/pairs=4,lr=0.001"}
    assert (
        all(r["kept"] for r in rim_runs)
        and not (copy / "runs" / "rim" / "pairs=2,lr=0.001").exists()
    )
    before = {r["cell"]: r["accuracy"] for r in first["runs"] if r["method"] == "rim"}
    assert sorted(r["accuracy"] for r in rim_runs) == sorted(before.values())


def test_a_grid_takes_the_runs_another_sweep_finished(swept, tmp_path, capsys):
    """Two grids sharing a point train it once: `reuse` names the other sweep's --out, and
    its finished run of the same recipe and seed is taken from there, nothing trained."""
    from rim.cli import parser
    from rim.grid import load_grid
    from rim.sweep import plan, run_sweep

    out, _, first = swept
    axis = {f"data.{s}.options.pairs": [4] for s in ("train", "valid", "test")}
    grid = {"n": axis | {"memory.blocks": [5]}}  # rim and direct at N = 4, another axis name
    path = _grid_file(tmp_path, set=TINY, grid=grid, reuse=[os.path.relpath(out, tmp_path)])
    argv = ["sweep", "--config", str(path), "--out", str(tmp_path / "out")]
    res = run_sweep(parser().parse_args(argv))
    assert not (tmp_path / "out" / "runs").exists()  # nothing trained here
    before = {r["cell"].replace("pairs", "n"): r for r in first["runs"]}
    for r in res["runs"]:
        assert r["reused"] and r["kept"] and r["accuracy"] == before[r["cell"]]["accuracy"]
        assert (tmp_path / "out" / r["run"]).resolve() == (out / before[r["cell"]]["run"]).resolve()
    assert "(kept from " in capsys.readouterr().out
    assert "Taken from other sweeps: 2 runs from" in (tmp_path / "out" / "results.md").read_text()
    cells = plan(load_grid(path), tmp_path / "out", ["train.lr=0.5"])  # another recipe
    assert not any(j.reused for c in cells for j in c.jobs)


def test_file_splits_are_named_not_sized() -> None:
    """A split read from a file has no meaningful `size`: the tables name its file."""
    from rim.config import SplitConfig
    from rim.sweep import _split_size

    assert _split_size(SplitConfig(generator="pairsum", size=256)) == 256
    assert _split_size(SplitConfig(path="../shared/data/prosqa/prosqa_test.json")) == (
        "prosqa_test.json"
    )
    assert _split_size(SplitConfig(path="d/v.json", limit=50)) == "v.json (first 50)"
    assert _split_size(None) == "none"


def test_report_only_summarises_the_finished_runs_and_runs_nothing(swept, tmp_path, capsys):
    """A sweep still running (or stopped): its tables from the runs that finished."""
    from rim.cli import parser
    from rim.sweep import run_sweep

    out, args, first = swept
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "runs" / "rim" / "pairs=2" / "seed0" / "test_eval.json").unlink()  # not finished
    logs = {p: p.read_text() for p in (copy / "runs").rglob("train.log")}
    argv = ["sweep", "--config", args.config, "--out", str(copy), "--report-only"]
    res = run_sweep(parser().parse_args(argv))
    assert {p: p.read_text() for p in logs} == logs  # nothing ran
    runs = {r["cell"]: r for r in res["runs"]}
    assert runs["rim/pairs=2"]["state"] == "queued" and "accuracy" not in runs["rim/pairs=2"]
    for cell in ("rim/pairs=4", "direct/pairs=4"):
        before = next(r for r in first["runs"] if r["cell"] == cell)
        assert runs[cell]["kept"] and runs[cell]["accuracy"] == before["accuracy"]
    cells = {c["cell"]: c for c in res["cells"]}
    assert cells["rim/pairs=2"]["n"] == 0 and cells["rim/pairs=4"]["n"] == 1
    md = (copy / "results.md").read_text()
    assert "\n| rim | 2 | - |" in md and "nothing trained in this invocation" in md
    command = md.split("Command: `")[1].split("\n")[0]  # the training one, then this rewrite's
    assert "--report-only" not in command.split("`")[0] and "(these tables: the same" in command
    assert "1 run(s) not finished, not run" in capsys.readouterr().out


def test_sigterm_stops_the_sweep_and_its_training_processes_save(tmp_path):
    """`kill SWEEP` (a background sweep ignores SIGINT): every running `rim train` gets
    SIGTERM, saves a checkpoint and exits with the sweep; none is left running alone."""
    slow = TINY | {"train.steps": 4000, "curriculum.stage1_steps": 4000, "train.eval_every": 0}
    path = _grid_file(tmp_path, methods=["direct"], set=slow)
    out = tmp_path / "out"
    env = dict(os.environ, RIM_NO_PROGRESS="1")
    cmd = [sys.executable, "-m", "rim", "sweep", "--config", str(path), "--out", str(out)]
    sweep = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    log = out / "runs" / "direct" / "seed0" / "train.log"
    metrics = log.with_name("metrics.jsonl")  # its first record: the loop is running
    deadline = time.monotonic() + 300  # a busy machine
    while not metrics.is_file():
        assert sweep.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    sweep.send_signal(signal.SIGTERM)
    _, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 130 and "interrupted: running jobs stopped" in err
    assert "rim: stopped by SIGTERM at step" in log.read_text()
    assert any((out / "runs" / "direct" / "seed0" / "checkpoints").iterdir())
    alive = [p for p in Path("/proc").glob("[0-9]*/cmdline") if _reads(p, str(out))]
    assert alive == []


def _reads(cmdline: Path, text: str) -> bool:
    try:
        return text in cmdline.read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_seed_in_a_set_value_is_each_runs_own(tmp_path):
    """`{seed}` in a grid's value names the same seed's file (mult_from_cot.yaml: the CoT run
    of the same seed), in the command and in the recipe a finished run is compared with."""
    from rim.runner import Job

    sets = ["model.path=results/cot/seed{seed}/best", "train.lr=0.001"]
    job = Job("coconut", 2, tmp_path / "r.yaml", tmp_path / "out", sets, 10)
    assert job.train_sets == [
        "model.path=results/cot/seed2/best", "train.lr=0.001", "train.seed=2", "train.threads=1"
    ]  # fmt: skip


def test_jobs_that_a_finished_job_makes_possible_join_the_queue_in_order(tmp_path):
    """`run_jobs(more=...)`, asked after each job ends, queues what it returns (a search's
    chosen value's other seeds) where `key` sorts it: before a costlier job queued earlier,
    not after the whole queue."""
    from rim.progress import Status
    from rim.runner import Job, run_jobs

    started: list[str] = []

    class Recording:
        def run(self, job):
            started.append(job.name)
            job.state, job.result = "done", {"accuracy": 0.0, "train_s": 0.0}
            return job

        def stop(self) -> None:
            pass

    def job(method: str, steps: int, seed: int) -> Job:
        return Job(method, seed, tmp_path / "r.yaml", tmp_path / f"{method}{seed}", [], steps)

    later = [job("rim", 10, 1)]  # made possible by rim/s0's end

    def more() -> list[Job]:
        return [later.pop()] if later and "rim/s0" in started else []

    jobs = [job("rim", 10, 0), job("direct", 20, 0)]
    run_jobs(
        jobs, 1, Recording(), Status(every=0.0), "sweep", more, lambda j: (j.total_steps, j.seed)
    )
    assert started == ["rim/s0", "rim/s1", "direct/s0"]


def test_per_position_panels_each_name_their_methods(tmp_path, monkeypatch):
    """A method found in one panel only (iCoT at budget 800, not yet at 1600) is named in
    that panel's legend: a legend on the last panel alone left it unnamed."""
    import rim.plots

    figures = []
    monkeypatch.setattr(rim.plots, "_save", lambda fig, path: figures.append(fig) or path)

    def cell(method: str, budget: int) -> dict:
        pos = {"mean": [[1.0, 0.2, 0.8]], "n": 1}
        metrics = {"best_valid_accuracy": {"mean": 0.0}}
        return {"method": method, "values": {"budget": budget}, "n": 1, "metrics": metrics,
                "per_position_accuracy": pos}  # fmt: skip

    res = {
        "grid": {"axes": {"budget": "train.steps"}, "seeds": 1, "file": "g.yaml"},
        "task": {"generator": "mult"}, "model": "llama base", "machine": {"device": "cpu"},
        "cells": [cell("rim", 800), cell("icot", 800), cell("rim", 1600)],
    }  # fmt: skip
    rim.plots.plot_sweep_per_position(res, tmp_path)
    (fig,) = figures
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
    assert legends == [["rim (1 seed)", "icot (1 seed)"], ["rim (1 seed)"]]
