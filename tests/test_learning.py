"""It learns: RiM (stage 1 then stage 2) from scratch on an easy task, through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import rim_run

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "toy" / "pick_llama_rim.yaml"


def _rim(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"RIM_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "rim", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pick") / "run"
    r = _rim(
        "train",
        "--config",
        str(RECIPE),
        "--out",
        str(out),
        "--set",
        "curriculum.stage1_steps=70",
        "--set",
        "curriculum.stage2_steps=40",
        "--set",
        "data.train.size=2000",
        "--set",
        f"train.threads={torch.get_num_threads()}",  # 2 alone, 1 under `pytest -n`
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setenv("RIM_NO_PROGRESS", "1")


@pytest.mark.slow
def test_rim_reaches_90_percent_on_held_out_examples(trained, capsys):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in records if "loss" in r]
    assert stages[0] == "stage1" and stages[-1] == "stage2"  # both stages ran, in order
    out = trained / "test_eval.json"
    r = rim_run(
        capsys,
        "eval",
        "--checkpoint",
        str(trained / "best"),
        "--split",
        "test",
        "--timing-examples",
        "4",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["n"] == 512  # the recipe's test split: seed 2, never seen in training
    assert res["accuracy"] >= 0.9, res
    assert len(res["per_block_accuracy"]) == 2
    assert res["any_block_accuracy"] >= res["accuracy"]
    assert res["forward_passes"] == pytest.approx(res["generated_tokens"] + 1, abs=1e-6)
    assert res["ttft_ms"] > 0 and res["latency_ms"] >= res["ttft_ms"]
    assert "final acc" in r.stdout


@pytest.mark.slow
def test_generate_all_blocks_from_the_cli(trained, capsys):
    """`rim generate` prints what `Reasoner.generate` answers, in its documented layout.

    Which digits a barely trained model gets right depends on the machine (float sums in
    another order train slightly other weights), so the test holds the CLI to the library,
    not to one machine's answers; learning itself is the test above.
    """
    from rim.reasoner import Reasoner

    questions = ["7 3 9 1 4", "5 0 2 8 6", "1 9 9 4 4"]
    reasoner = Reasoner.load(str(trained / "best"))
    per_block = reasoner.generate(questions[:1], decoder="all-blocks")[0]
    finals = reasoner.generate(questions[1:])
    r = rim_run(
        capsys,
        "generate",
        "--checkpoint",
        str(trained / "best"),
        "--decoder",
        "all-blocks",
        questions[0],
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0] == questions[0]
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["block 1", "block 2"]
    assert [line.split(":", 1)[1].strip() for line in lines[1:]] == per_block
    r = rim_run(capsys, "generate", "--checkpoint", str(trained / "best"), *questions[1:])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == finals


def test_unknown_config_key_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: rim\ntrain:\n  learning_rate: 1\n")
    r = rim_run(capsys, "train", "--config", str(bad), "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"rim: error: {bad}: train.learning_rate: unknown config key"
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_probe_and_selection_from_the_cli(trained, tmp_path, capsys):
    """`rim probe`, then `rim eval --select` on test: every selection is at most the oracle,
    the probe's AUROC is reported, and the probe stays in the checkpoint.

    The probe is fitted on the train split: this toy model answers valid's 256 examples
    almost perfectly (2 with a wrong block on an Intel Xeon, so a CPU may well give 0 or 1,
    too few to choose a layer on), the 2,000 of train hold about a dozen.
    """
    best = trained / "best"
    r = rim_run(capsys, "probe", "--checkpoint", str(best), "--split", "train")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "probe: layer" in r.stdout and (best / "probe.json").is_file()
    refused = rim_run(capsys, "probe", "--checkpoint", str(best), "--split", "test")
    assert refused.returncode == 2 and "--split test" in refused.stderr
    out = tmp_path / "sel.json"
    args = ["--split", "test", "--timing-examples", "0", "--out", str(out)]
    r = rim_run(
        capsys, "eval", "--checkpoint", str(best), *args, "--select", "final,probe,vote,oracle"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    sel = res["selection"]
    assert sel["final"] == pytest.approx(res["accuracy"])
    assert all(sel[h] <= sel["oracle"] for h in sel)
    assert sel["oracle"] == pytest.approx(res["any_block_accuracy"])
    assert 0.0 <= res["probe_auroc"] <= 1.0 and "probe AUROC" in r.stdout
    ee = tmp_path / "ee.json"
    args = ["--split", "test", "--timing-examples", "2", "--out", str(ee), "--limit", "64"]
    r = rim_run(capsys, "eval", "--checkpoint", str(best), *args, "--decoder", "early-exit")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(ee.read_text())
    assert res["decoder"] == "early-exit" and 1 <= res["mean_blocks"] <= 2
    assert all(1 <= x["blocks"] <= 2 for x in res["records"]) and res["ttft_ms"] > 0
