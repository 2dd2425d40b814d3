"""Real faults, tried as users and schedulers cause them (issue 12): nothing lost or mixed.

One run per folder (a live second run and a rerun are refused), checkpoints that belong to
their run (a resumed branch supersedes the abandoned one), resume means the same recipe,
damaged checkpoints are skipped saying so, SIGTERM saves and exits 75, a full disk is one
line with nothing left behind, inference input is checked. See docs/reliability.md.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .conftest import TINY_RECIPE, recipe_file, resume_branch_and_crash, rim_main

RECIPE = copy.deepcopy(TINY_RECIPE)
RECIPE["data"]["train"]["size"], RECIPE["data"]["valid"]["size"] = 32, 8
RECIPE["curriculum"]["stage1_steps"], RECIPE["curriculum"]["stage2_steps"] = 6, 4
RECIPE["eval"]["val_limit"], RECIPE["eval"]["batch_size"] = 8, 8


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("RIM_NO_PROGRESS", "1")


write_recipe = partial(recipe_file, RECIPE)


def fails(capsys, *args: str, code: int = 2) -> str:
    """Run `rim *args`: exit `code` with exactly one stderr line; return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        rim_main(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == code, err
    assert len(err) == 1, err
    return err[0]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    drop = ("examples_per_s", "train_s")
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]


def steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders anywhere below `folder`."""
    return sorted(str(p) for p in folder.rglob(".*") if ".tmp" in p.name or ".old" in p.name)


# ------------------------------------------------------------------ one run per folder


@pytest.mark.slow
def test_live_run_refuses_second_then_sigterm_and_resume_if_exists(tmp_path, capsys):
    """A second `rim train` into a live run refuses; SIGTERM mid-stage with save_every 0
    writes a checkpoint and exits 75 with one line; `--resume-if-exists` (the same command a
    scheduler requeues) finishes it, equal to an uninterrupted run."""
    import rim.trainer  # noqa: F401  (imported before the race, not during it)

    cfg = write_recipe(tmp_path, curriculum={"stage1_steps": 100, "stage2_steps": 4})
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "rim", "train", "--config", str(cfg), "--out", str(run)]
    env = dict(os.environ, RIM_NO_PROGRESS="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    victim = subprocess.Popen(
        [*cmd, "--resume-if-exists"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file():
        assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    line = fails(capsys, "train", "--config", str(cfg), "--out", str(run), "--overwrite")
    assert f"--out {run}: another rim train (pid {victim.pid}) is writing this run folder" in line
    assert victim.poll() is None, "the refused run must not disturb the live one"
    victim.send_signal(signal.SIGTERM)
    out, err = victim.communicate(timeout=60)
    assert victim.returncode == 75, err
    (stopped,) = err.strip().splitlines()
    (ckpt,) = (run / "checkpoints").iterdir()
    step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    assert 0 < step < 100  # mid stage 1, and save_every is 0
    saved_s = json.loads((ckpt / "trainer_state.json").read_text())["train_s"]
    assert saved_s > 0  # the seconds trained so far go into the checkpoint
    assert (
        stopped == f"rim: stopped by SIGTERM at step {step}; resume with: rim train --resume {run}"
    )
    steps_logged = [r["step"] for r in records(run) if "loss" in r]
    assert steps_logged == list(range(1, step + 1))  # one run's records, none interleaved

    rim_main(*cmd[3:], "--resume-if-exists")
    (done,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
               if json.loads(x).get("event") == "done"]  # fmt: skip
    assert done["train_s"] > saved_s  # the resumed process adds to them: the whole run's cost
    ref = tmp_path / "ref"
    rim_main("train", "--config", str(cfg), "--out", str(ref), "--resume-if-exists")  # fresh
    assert same_weights(run / "final", ref / "final")
    assert records(run) == records(ref)
    assert not leftovers(run)


def test_rerun_refused_without_overwrite(tmp_path, capsys):
    cfg = write_recipe(tmp_path, curriculum={"stage1_steps": 2, "stage2_steps": 1})
    run = tmp_path / "run"
    rim_main("train", "--config", str(cfg), "--out", str(run))
    before = (run / "metrics.jsonl").read_text()
    old_id = json.loads((run / "run.json").read_text())["run_id"]
    line = fails(capsys, "train", "--config", str(cfg), "--out", str(run))
    assert line == (
        f"rim: error: --out {run}: already holds a run; continue it with --resume {run}, "
        "or start afresh with --overwrite"
    )
    assert (run / "metrics.jsonl").read_text() == before  # nothing appended or overwritten
    (run / "notes.txt").write_text("mine")
    rim_main("train", "--config", str(cfg), "--out", str(run), "--overwrite")
    assert json.loads((run / "run.json").read_text())["run_id"] != old_id
    assert sum(r.get("event") == "done" for r in records(run)) == 1
    assert (run / "notes.txt").read_text() == "mine"  # --overwrite removes only run outputs
    assert "cannot be combined" in fails(capsys, "train", "--resume", str(run), "--overwrite")


# ------------------------------------------------------------------ lineage and recipe


def test_resumed_branch_supersedes_the_abandoned_one(tmp_path, capsys, monkeypatch):
    """Resume from step-4 with another lr, crash after step-6, resume again: the new branch
    wins (not the abandoned run's later step-8 and final/); the change is in metrics.jsonl."""

    cfg = write_recipe(
        tmp_path,
        curriculum={"stage1_steps": 4, "stage2_steps": 4},
        train={"save_every": 2, "keep_last": 10},
    )
    run = tmp_path / "run"
    rim_main("train", "--config", str(cfg), "--out", str(run))
    assert steps(run) == ["step-00000002", "step-00000004", "step-00000006", "step-00000008"]
    resume_branch_and_crash(run, monkeypatch)
    assert steps(run) == ["step-00000002", "step-00000004", "step-00000006"]
    (aside,) = (run / "abandoned").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == [
        "best", "final", "metrics.jsonl", "step-00000006", "step-00000008",
    ]  # fmt: skip
    assert {
        json.loads(x)["step"]
        for x in (aside / "metrics.jsonl").read_text().splitlines()
        if "step" in json.loads(x)
    } == {5, 6, 7, 8}  # the old lineage's, kept aside
    assert not (run / "final").exists()
    rim_main("train", "--resume", str(run))  # the branch's own recipe: no --allow-change
    final_cfg = yaml.safe_load((run / "final" / "config.yaml").read_text())
    assert final_cfg["train"]["lr"] == 5e-4
    recs = records(run)
    assert [r["lr"] for r in recs if "lr" in r and r["step"] > 4] == [5e-4] * 4
    (event,) = [r for r in recs if r.get("event") == "resume"]
    assert event["step"] == 4 and event["changed"] == {"train.lr": [2e-3, 5e-4]}
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 9))


def test_resume_with_a_different_recipe_is_refused(tmp_path, capsys):
    cfg = write_recipe(tmp_path, curriculum={"stage1_steps": 2, "stage2_steps": 1})
    run = tmp_path / "run"
    rim_main("train", "--config", str(cfg), "--out", str(run))
    line = fails(capsys, "train", "--resume", str(run), "--set", "memory.blocks=4")
    assert "the recipe differs from the checkpoint's in memory.blocks (3 -> 4)" in line
    assert "--allow-change KEY" in line
    other = write_recipe(tmp_path, "other.yaml", train={"lr": 1e-3})
    line = fails(capsys, "train", "--resume", str(run), "--config", str(other))
    assert "train.lr (0.002 -> 0.001)" in line and "curriculum.stage1_steps (2 -> 6)" in line
    edited = (run / "config.yaml").read_text().replace("blocks: 3", "blocks: 5")
    (run / "config.yaml").write_text(edited)  # a user's edit of the run's recipe is not lost
    assert "memory.blocks (3 -> 5)" in fails(capsys, "train", "--resume", str(run))
    assert "--allow-change: only with --resume" in fails(
        capsys, "train", "--config", str(cfg), "--allow-change", "train.lr"
    )


# ------------------------------------------------------------------ damaged checkpoints


def _damage(ckpt: Path, how: str) -> str:
    """Damage `ckpt` as `how`; return the file name the report must name."""
    files = {
        "truncated_weights": "weights.safetensors",
        "empty_weights": "weights.safetensors",
        "garbage_state": "trainer_state.json",
        "truncated_optimizer": "optimizer.safetensors",
        "missing_rng": "rng-0.safetensors",
        "garbage_manifest": "manifest.json",
    }
    file = ckpt / files[how]
    if how.startswith("truncated"):
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif how == "empty_weights":
        file.write_bytes(b"")
    elif how.startswith("garbage"):
        file.write_text("{not json")
    else:
        file.unlink()
    return file.name


@pytest.mark.parametrize(
    "how",
    [
        "truncated_weights",
        "empty_weights",
        "garbage_state",
        "truncated_optimizer",
        "missing_rng",
        "garbage_manifest",
    ],
)
def test_damaged_latest_checkpoint_falls_back_saying_so(tmp_path, capsys, how):
    """A damaged newest checkpoint is reported in one line naming the file; the previous
    intact one is used; resuming from it gives final weights equal to an uninterrupted run."""
    import shutil

    from rim.checkpoint import resolve

    cfg = write_recipe(tmp_path, train={"save_every": 2, "keep_last": 10})
    ref = tmp_path / "ref"
    rim_main("train", "--config", str(cfg), "--out", str(ref))
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for name in ("final", "best", "checkpoints/step-00000008", "checkpoints/step-00000010"):
        shutil.rmtree(run / name)  # as if killed after step 6
    name = _damage(run / "checkpoints" / "step-00000006", how)
    reports = []
    assert resolve(run, reports.append) == run / "checkpoints" / "step-00000004"
    (report,) = reports
    assert report.startswith(f"{run / 'checkpoints' / 'step-00000006' / name}")
    assert report.endswith(f"resuming from {run / 'checkpoints' / 'step-00000004'} instead")
    line = fails(capsys, "train", "--resume", str(run / "checkpoints" / "step-00000006"))
    assert name in line  # an explicit checkpoint must be intact: no silent substitute
    if how != "truncated_weights":
        return  # one full resume is enough (the loader is the same for all)
    capsys.readouterr()
    rim_main("train", "--resume", str(run))
    err = capsys.readouterr().err.strip().splitlines()
    assert [x for x in err if x.startswith("rim:")] == [f"rim: warning: {report}"]
    assert same_weights(run / "final", ref / "final")
    assert records(run) == records(ref)
    assert steps(run) == steps(ref)  # the damaged one moved aside, replaced by a good one


# ------------------------------------------------------------------ full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_during_a_checkpoint(tmp_path, capsys, monkeypatch):
    import rim.checkpoint

    cfg = write_recipe(tmp_path, train={"save_every": 2})
    run = tmp_path / "run"
    real = rim.checkpoint.write_bytes

    def fill_at_step_4(path, data):
        (_enospc if "step-00000004" in str(path) else real)(path, data)

    monkeypatch.setattr(rim.checkpoint, "write_bytes", fill_at_step_4)
    line = fails(capsys, "train", "--config", str(cfg), "--out", str(run), code=74)
    tmp = run / "checkpoints" / ".step-00000004.tmp"
    assert line == f"rim: error: {tmp}: no space left on device (errno 28)"
    assert not leftovers(run)
    assert steps(run) == ["step-00000002"]
    assert rim.checkpoint.verify(run / "checkpoints" / "step-00000002") is None


def test_full_disk_while_writing_best_keeps_the_old_best(tmp_path, capsys, monkeypatch):
    import rim.checkpoint

    cfg = write_recipe(tmp_path, train={"eval_every": 1})
    run = tmp_path / "run"
    calls, seen = [], {}
    real = rim.checkpoint.save_meta

    def fill_on_second(path, meta):
        calls.append(path)
        if len(calls) == 2:
            seen["best"] = (run / "best" / "model.safetensors").read_bytes()
            _enospc()
        real(path, meta)

    monkeypatch.setattr(rim.checkpoint, "save_meta", fill_on_second)
    line = fails(capsys, "train", "--config", str(cfg), "--out", str(run), code=74)
    assert line.endswith(": no space left on device (errno 28)") and "best" in line
    assert not leftovers(run)
    assert (run / "best" / "model.safetensors").read_bytes() == seen["best"]
    assert rim.checkpoint.verify(run / "checkpoints" / "step-00000006") is None


def test_full_disk_during_export_and_eval_out(tmp_path, capsys, monkeypatch):
    import rim.io

    cfg = write_recipe(tmp_path, curriculum={"stage1_steps": 1, "stage2_steps": 1})
    run = tmp_path / "run"
    rim_main("train", "--config", str(cfg), "--out", str(run))
    real = Path.write_text

    def full_on_rim_json(self, *args, **kwargs):
        if self.name == "rim.json":
            _enospc()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_on_rim_json)
    out = tmp_path / "exported"
    line = fails(capsys, "export", "--checkpoint", str(run / "best"), "--out", str(out), code=74)
    assert line == f"rim: error: {out}: no space left on device (errno 28)"
    assert not out.exists() and not leftovers(tmp_path)
    monkeypatch.setattr(Path, "write_text", real)
    monkeypatch.setattr(rim.io, "write_bytes", _enospc)
    result = tmp_path / "eval.json"
    args = ("eval", "--checkpoint", str(run / "best"), "--out", str(result), "--split", "valid")
    line = fails(capsys, *args, "--timing-examples", "0", code=74)
    assert line == f"rim: error: {result}: no space left on device (errno 28)"
    assert not result.exists() and not leftovers(tmp_path)


# ------------------------------------------------------------------ inference input


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = write_recipe(folder, curriculum={"stage1_steps": 1, "stage2_steps": 1})
    os.environ["RIM_NO_PROGRESS"] = "1"
    rim_main("train", "--config", str(cfg), "--out", str(folder / "run"))
    return folder / "run" / "best"


def test_over_long_and_empty_questions(checkpoint, tmp_path, capsys):
    """The tiny model has 1,024 positions; K = 3 blocks of 4 tokens; 4 answer tokens."""
    long_q = " + ".join(["1"] * 600)  # 1,200 tokens with bos
    line = fails(capsys, "generate", "--checkpoint", str(checkpoint), long_q)
    assert line == (
        "rim: error: question 1: 1200 question tokens + 16 for blocks and answer > 1024 "
        "positions of the model (shorten it, or pass --truncate)"
    )
    capsys.readouterr()
    rim_main("generate", "--checkpoint", str(checkpoint), "--truncate", long_q)
    assert capsys.readouterr().out.strip()  # an answer from the question's last tokens
    assert "question 2: empty question" in fails(
        capsys, "generate", "--checkpoint", str(checkpoint), "1 + 2", "  "
    )
    data = tmp_path / "long.txt"
    data.write_text(f"1 + 2||3 #### 3\n{long_q}||1 #### 600\n")
    line = fails(capsys, "eval", "--checkpoint", str(checkpoint), "--data", str(data))
    assert line.startswith(f"rim: error: {data}: example 2: 1200 question tokens")
    assert not (checkpoint / "eval.json").exists()


def test_unknown_tokens_warn(checkpoint, capsys):
    capsys.readouterr()
    rim_main("generate", "--checkpoint", str(checkpoint), "what is seven plus two")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rim: warning: ")
    assert "of the question tokens are unknown to the checkpoint's tokenizer" in err[0]


def test_cr_only_line_endings_are_line_breaks(checkpoint, tmp_path, capsys):
    from rim.data import read_examples

    data = tmp_path / "mac.txt"
    data.write_bytes(b"1 + 2||3 #### 3\r2 + 2||4 #### 4\r3 + 3||6 #### 6\r")
    assert [e.answer for e in read_examples(data)] == ["3", "4", "6"]
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(b"1 + 2||3 #### 3\r\n2 + 2||4 #### 4\r3 + 3 6 #### 6\n")
    line = fails(capsys, "eval", "--checkpoint", str(checkpoint), "--data", str(mixed))
    assert line == f"rim: error: {mixed}:3: missing '||'"
    capsys.readouterr()
    out = tmp_path / "eval.json"
    rim_main("eval", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out))
    assert json.loads(out.read_text())["n"] == 3
