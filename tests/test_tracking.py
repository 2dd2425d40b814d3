"""Experiment tracking through accelerate's trackers (rim.tracking, issue 16).

TensorBoard for real: a tiny run's event files, read back with TensorBoard's own reader,
hold exactly metrics.jsonl's numbers (same steps, float32 values), also across a crash and
two resumes, one of them with another learning rate (the abandoned steps are purged).
"""

from __future__ import annotations

import copy
import importlib.util
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import yaml

from rim import tracking
from rim.config import ConfigError, load_config
from rim.errors import RimError

from .conftest import TINY_RECIPE, recipe_file, resume_branch_and_crash, rim_main

RECIPE = copy.deepcopy(TINY_RECIPE)
RECIPE["data"]["train"]["size"], RECIPE["data"]["valid"]["size"] = 32, 8
RECIPE["eval"]["val_limit"], RECIPE["eval"]["batch_size"] = 8, 8
RECIPE["train"]["report_to"] = ["tensorboard"]
write_recipe = partial(recipe_file, RECIPE)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("RIM_NO_PROGRESS", "1")


def expected(run: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as tracker scalars: tag -> {step: value}, float32 like TensorBoard."""
    out: dict[str, dict[int, float]] = {}
    step = 0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        step = rec.get("step", step)  # the done record logs at the last step
        for tag, value in tracking.scalars(rec).items():
            out.setdefault(tag, {})[step] = float(np.float32(value))
    return out


def logged(run: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: every scalar event in RUN/tracking/rim, as (step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tracking" / "rim"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def assert_same(run: Path) -> None:
    want, got = expected(run), logged(run)
    assert sorted(got) == sorted(want)
    for tag, points in got.items():
        assert points == sorted(want[tag].items()), tag  # one point per step, no leftovers


def test_tensorboard_event_files_hold_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    rim_main("train", "--config", str(write_recipe(tmp_path)), "--out", str(run))
    assert_same(run)
    tags = set(logged(run))
    for stage in ("stage1", "stage2"):
        assert {f"{stage}/{k}" for k in ("loss", "lr", "examples_per_s")} <= tags
        assert {f"{stage}/valid_accuracy", f"{stage}/valid_token_accuracy"} <= tags
    assert {"run/train_s", "run/best_valid_accuracy"} <= tags
    (hparams,) = (run / "tracking" / "rim").glob("*/hparams.yml")  # the recipe, flat
    flat = yaml.safe_load(hparams.read_text())
    assert flat["train.lr"] == 2e-3 and flat["memory.blocks"] == 3
    assert flat["train.report_to"] == '["tensorboard"]'


def test_resumes_keep_tensorboard_equal_to_metrics_jsonl(tmp_path, monkeypatch):
    """Finish, resume from step 4 with another lr and crash after step 6, resume again:
    TensorBoard shows the branch that won, exactly as metrics.jsonl has it."""
    pytest.importorskip("tensorboard")

    cfg = write_recipe(
        tmp_path,
        curriculum={"stage1_steps": 4, "stage2_steps": 4},
        train={"save_every": 2, "keep_last": 10},
    )
    run = tmp_path / "run"
    rim_main("train", "--config", str(cfg), "--out", str(run))
    before = logged(run)["stage2/loss"]
    resume_branch_and_crash(run, monkeypatch)
    rim_main("train", "--resume", str(run))
    assert_same(run)
    after = logged(run)
    assert after["stage2/loss"] != before  # the new lr's losses, not the abandoned ones
    assert [v for _, v in after["stage2/lr"]] == [float(np.float32(5e-4))] * 4
    assert len(list((run / "tracking" / "rim").glob("events.out.tfevents.*"))) == 3


def test_report_to_names_are_accelerate_trackers():
    assert load_config(overrides=["train.report_to=[tensorboard, wandb]"]).train.report_to == [
        "tensorboard",
        "wandb",
    ]
    assert load_config(overrides=["train.report_to=tensorboard"]).train.report_to == ["tensorboard"]
    assert load_config(overrides=["train.report_to=none"]).train.report_to == []
    assert load_config().train.report_to == []
    with pytest.raises(ConfigError, match=r"^train.report_to: unknown tracker 'tensorbord' \("):
        load_config(overrides=["train.report_to=[tensorbord]"])
    with pytest.raises(ConfigError, match=r"^train.report_to: \[3\] is not a valid"):
        load_config(overrides=["train.report_to=[3]"])


def test_a_missing_tracker_library_names_the_extra(tmp_path, capsys):
    missing = [n for n in ("mlflow", "trackio", "wandb") if importlib.util.find_spec(n) is None]
    if not missing:
        pytest.skip("mlflow, trackio and wandb are all installed")
    name = missing[0]
    with pytest.raises(RimError, match=rf"^train.report_to: {name} is not installed"):
        tracking.check_installed([name])
    recipe = write_recipe(tmp_path, train={"report_to": [name]})
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        rim_main("train", "--config", str(recipe), "--out", str(tmp_path / "run"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].endswith(f"(pip install 'rim[{name}]')")
    assert not (tmp_path / "run").exists()  # refused before the build
