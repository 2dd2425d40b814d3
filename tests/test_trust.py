"""A checkpoint is data, never code (issue 28): planted pickles never run, paths named by
metadata stay inside their folder, damaged model folders are named in one line, and the
resume paths that used to lose or mix data keep every record. See docs/reliability.md.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch

from rim.manifest import write_manifest

from .conftest import TINY_RECIPE, recipe_file, rim_main
from .test_faults import fails, records

RECIPE = copy.deepcopy(TINY_RECIPE)
RECIPE["data"]["train"]["size"], RECIPE["data"]["valid"]["size"] = 32, 8
RECIPE["curriculum"]["stage1_steps"], RECIPE["curriculum"]["stage2_steps"] = 4, 4
RECIPE["eval"]["val_limit"], RECIPE["eval"]["batch_size"] = 8, 8
RECIPE["train"]["save_every"], RECIPE["train"]["keep_last"] = 2, 10
write_recipe = partial(recipe_file, RECIPE)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("RIM_NO_PROGRESS", "1")


class Payload:
    """Unpickling this runs `os.mkdir(marker)`: what a planted file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run with checkpoints at steps 2..8 (each test copies it)."""
    tmp = tmp_path_factory.mktemp("trained")
    os.environ["RIM_NO_PROGRESS"] = "1"
    rim_main("train", "--config", str(write_recipe(tmp)), "--out", str(tmp / "run"))
    return tmp / "run"


@pytest.fixture
def run(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _plant(folder: Path, marker: Path, names: tuple[str, ...]) -> None:
    for name in names:
        torch.save(Payload(marker), folder / name)  # the attacker may rewrite the manifest
    write_manifest(folder, json.loads((folder / "manifest.json").read_text()).get("run_id"))


PICKLE_NAMES = (
    "optimizer.pt", "rng-0.pt", "pytorch_model.bin", "training_args.bin", "adapter_model.bin",
    "scheduler.pt", "probe.pkl",
)  # fmt: skip


# ------------------------------------------------------------------ no pickle anywhere


def test_checkpoints_hold_no_pickle(run):
    for ckpt in (run / "checkpoints").iterdir():
        names = sorted(p.name for p in ckpt.iterdir())
        assert not [n for n in names if n.endswith((".pt", ".bin", ".pkl"))], names
        assert {"optimizer.safetensors", "rng-0.safetensors"} <= set(names)


def test_planted_payload_never_runs_on_resume(run, tmp_path, capsys):
    """Old-format names beside the new files are ignored; an old-format checkpoint whose
    optimizer/RNG files are pickles with code is refused in one line (exit 2)."""
    marker = tmp_path / "pwned"
    newest = run / "checkpoints" / "step-00000008"
    _plant(newest, marker, PICKLE_NAMES)
    rim_main("train", "--resume", str(newest), "--allow-change", "curriculum.stage2_steps",
             "--set", "curriculum.stage2_steps=5")  # fmt: skip
    assert not marker.exists()
    for ckpt in (run / "checkpoints").iterdir():  # now in the old format: only the pickles
        for name in ("optimizer", "rng-0"):
            (ckpt / f"{name}.safetensors").unlink(missing_ok=True)
        _plant(ckpt, marker, ("optimizer.pt", "rng-0.pt"))
    line = fails(capsys, "train", "--resume", str(run))
    assert "old-format (pickle)" in line and "never unpickles code" in line
    line = fails(capsys, "train", "--config", str(run / "config.yaml"), "--out", str(run),
                 "--resume-if-exists")  # fmt: skip
    assert "old-format (pickle)" in line
    assert not marker.exists()


def test_old_format_plain_optimizer_state_still_resumes(run, tmp_path):
    """A checkpoint of the previous format whose files are plain tensors and containers
    converts on load (weights_only=True, no allow-listed globals)."""
    from rim.checkpoint import _read_optimizer, _restore_rng

    ckpt = run / "checkpoints" / "step-00000006"
    state = _read_optimizer(ckpt / "optimizer.safetensors")
    torch.save(state, ckpt / "optimizer.pt")
    (ckpt / "optimizer.safetensors").unlink()
    again = _read_optimizer(ckpt / "optimizer.safetensors")
    assert again["scheduler"] == state["scheduler"]
    for i, entry in state["optimizer"]["state"].items():
        assert torch.equal(entry["exp_avg"], again["optimizer"]["state"][i]["exp_avg"])
    _restore_rng(ckpt / "rng-0.safetensors")  # the new-format RNG beside it


def test_rng_and_optimizer_round_trip_exactly(tmp_path):
    import random

    import numpy as np

    from rim.checkpoint import _optimizer_bytes, _read_optimizer, _restore_rng, _rng_bytes

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    (tmp_path / "rng.safetensors").write_bytes(_rng_bytes())
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    _restore_rng(tmp_path / "rng.safetensors")
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.8, 0.9))
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    blob = {"optimizer": opt.state_dict(), "scheduler": {"last_epoch": 1, "base_lrs": [1e-3]}}
    (tmp_path / "opt.safetensors").write_bytes(_optimizer_bytes(blob))
    back = _read_optimizer(tmp_path / "opt.safetensors")
    opt2 = torch.optim.AdamW(m.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9)
    assert torch.equal(opt2.state[m.weight]["exp_avg_sq"], opt.state[m.weight]["exp_avg_sq"])


@pytest.mark.parametrize("command", ["eval", "generate", "inspect", "export", "probe"])
def test_planted_payload_never_runs_in_readers(run, tmp_path, capsys, command):
    """Pickles planted in best/ (manifest rewritten to match) are never read: with the
    safetensors weights beside them the command works; without them it refuses, exit 2."""
    marker, best = tmp_path / "pwned", run / "best"
    _plant(best, marker, PICKLE_NAMES)
    args = {
        "eval": ["eval", "--checkpoint", str(best), "--split", "valid", "--limit", "2",
                 "--timing-examples", "0", "--out", str(tmp_path / "e.json")],
        "generate": ["generate", "--checkpoint", str(best), "1 2 3"],
        "inspect": ["inspect", "--checkpoint", str(best), "--limit", "4", "--timing-examples",
                    "0", "--out", str(tmp_path / "report")],
        "export": ["export", "--checkpoint", str(best), "--out", str(tmp_path / "exp")],
        "probe": ["probe", "--checkpoint", str(best), "--limit", "8"],
    }[command]  # fmt: skip
    try:
        rim_main(*args)
    except SystemExit as exc:  # a reader may refuse (e.g. too few examples), never run it
        assert exc.code == 2
    assert not marker.exists()
    (best / "model.safetensors").unlink()  # only the pickled weights are left
    _plant(best, marker, ())
    shutil.rmtree(tmp_path / "exp", ignore_errors=True)
    line = fails(capsys, *args)
    assert str(best) in line
    assert not marker.exists()


# ------------------------------------------------------------------ paths stay inside


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.onnx", "sub/../../x.onnx", 7])
def test_onnx_model_path_must_lie_inside_the_export(tmp_path, capsys, name):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "export"
    folder.mkdir()
    (tmp_path / "outside.onnx").write_bytes(b"not a model")
    meta = {"onnx": {"model": name, "dtype": "float32", "cache_inputs": []}}
    (folder / "rim.json").write_text(json.dumps(meta))
    line = fails(capsys, "generate", "--runtime", "onnx", "--checkpoint", str(folder), "1 2")
    assert "onnx.model" in line and "inside" in line


def test_onnx_model_symlink_out_is_refused(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "export"
    folder.mkdir()
    (tmp_path / "outside.onnx").write_bytes(b"x")
    (folder / "model.onnx").symlink_to(tmp_path / "outside.onnx")
    meta = {"onnx": {"model": "model.onnx", "dtype": "float32", "cache_inputs": []}}
    (folder / "rim.json").write_text(json.dumps(meta))
    line = fails(capsys, "generate", "--runtime", "onnx", "--checkpoint", str(folder), "1 2")
    assert "inside" in line


@pytest.mark.parametrize("name", ["../run.json", "/etc/hostname", "a/../../b"])
def test_manifest_names_outside_the_folder_are_refused(run, capsys, name):
    best = run / "best"
    manifest = json.loads((best / "manifest.json").read_text())
    manifest["files"][name] = {"size": 1, "sha256": "0" * 64}
    (best / "manifest.json").write_text(json.dumps(manifest))
    line = fails(capsys, "generate", "--checkpoint", str(best), "1 2 3")
    assert "lies outside" in line
    ckpt = run / "checkpoints" / "step-00000008"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = {"size": 1, "sha256": "0" * 64}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert "lies outside" in fails(capsys, "train", "--resume", str(ckpt))


def test_a_symlinked_weights_file_is_refused(run, tmp_path, capsys):
    best = run / "best"
    shutil.move(best / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (best / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    assert "lies outside" in fails(capsys, "generate", "--checkpoint", str(best), "1 2 3")


# ------------------------------------------------------------------ integrity of best/ final/


def test_best_and_final_have_manifests(run):
    from rim.manifest import check_files, read_manifest

    for name in ("best", "final"):
        files = read_manifest(run / name)["files"]
        assert {"model.safetensors", "rim.json", "config.yaml"} <= set(files)
        assert check_files(run / name, files) is None


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("command", ["eval", "generate", "export", "inspect"])
def test_damaged_weights_are_named_in_one_line(run, tmp_path, capsys, damage, command):
    file = run / "final" / "model.safetensors"
    data = bytearray(file.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    file.write_bytes(bytes(data))
    ckpt = str(run / "final")
    args = {
        "eval": ["eval", "--checkpoint", ckpt, "--split", "valid", "--timing-examples", "0"],
        "generate": ["generate", "--checkpoint", ckpt, "1 2 3"],
        "export": ["export", "--checkpoint", ckpt, "--out", str(tmp_path / "exp")],
        "inspect": ["inspect", "--checkpoint", ckpt, "--out", str(tmp_path / "rep")],
    }[command]
    line = fails(capsys, *args)
    assert f"{file}:" in line
    assert ("truncated" in line) if damage == "truncate" else ("differs" in line)
    assert not (tmp_path / "exp").exists() and not (tmp_path / "rep").exists()


# ------------------------------------------------------------------ no silent data loss


def _tree(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_resume_if_exists_never_wipes_a_finished_run(run, capsys):
    """No checkpoints left (keep_last, save_every 0, or deleted): nothing to resume, exit 0;
    another recipe is refused (exit 2); final/, best/ and metrics are untouched either way."""
    shutil.rmtree(run / "checkpoints")
    before = _tree(run)
    cfg = str(run / "config.yaml")
    args = ("train", "--config", cfg, "--out", str(run), "--resume-if-exists")
    rim_main(*args)
    assert "nothing to resume" in capsys.readouterr().out
    line = fails(capsys, *args, "--set", "train.lr=1e-3")
    assert "finished run of another recipe" in line and "train.lr" in line
    assert _tree(run) == before


def test_a_branch_killed_before_its_first_checkpoint_loses_no_records(run, monkeypatch):
    """Resume from an older step, killed before saving: metrics.jsonl keeps the old lineage;
    the branch's own records are set aside at the next start, not mixed in."""
    from rim.trainer import Trainer

    from .conftest import Crash

    before = (run / "metrics.jsonl").read_text()

    def crash(self):
        raise Crash

    monkeypatch.setattr(Trainer, "save_resumable", crash)
    with pytest.raises(Crash):
        rim_main("train", "--resume", str(run / "checkpoints" / "step-00000004"))
    assert (run / "metrics.jsonl").read_text() == before
    monkeypatch.undo()
    monkeypatch.setenv("RIM_NO_PROGRESS", "1")
    rim_main("train", "--resume", str(run))  # the newest: step 8, the end
    assert (run / "metrics.jsonl").read_text().startswith(before.rsplit('{"event": "done"', 1)[0])
    (unsaved,) = (run / "abandoned").glob("unsaved-*/metrics.jsonl")
    assert [json.loads(x)["step"] for x in unsaved.read_text().splitlines()][:2] == [5, 6]


# ------------------------------------------------------------------ no wrong results


def test_a_copied_in_checkpoint_of_another_branch_is_refused(trained, tmp_path, capsys):
    """Run B is a copy of run A (same run id) trained on at another lr; B's checkpoint copied
    back into A must not be resumed there silently."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(trained, a)
    shutil.copytree(trained, b)
    rim_main("train", "--resume", str(b / "checkpoints" / "step-00000006"), "--set",
             "train.lr=1e-4", "--allow-change", "train.lr")  # fmt: skip
    shutil.rmtree(a / "checkpoints" / "step-00000008")
    shutil.copytree(b / "checkpoints" / "step-00000008", a / "checkpoints" / "step-00000008")
    line = fails(capsys, "train", "--resume", str(a))
    assert "never trained in" in line and "copied in" in line


def test_allow_change_lr_mid_stage_is_applied(run):
    """Resume from step 6 (stage 2, step 2 of 4) with a new lr: the next steps use it."""
    old = {r["step"]: r["lr"] for r in records(run) if "lr" in r}
    rim_main("train", "--resume", str(run / "checkpoints" / "step-00000006"), "--set",
             "train.lr=1e-4", "--allow-change", "train.lr")  # fmt: skip
    new = {r["step"]: r["lr"] for r in records(run) if "lr" in r}
    assert [new[s] for s in (1, 5, 6)] == [old[s] for s in (1, 5, 6)]
    assert new[7] == pytest.approx(old[7] * 1e-4 / RECIPE["train"]["lr"])
    assert new[8] == pytest.approx(old[8] * 1e-4 / RECIPE["train"]["lr"])


def test_allow_change_stage_steps_on_a_finished_run_trains_them(run):
    rim_main("train", "--resume", str(run), "--set", "curriculum.stage2_steps=7",
             "--allow-change", "curriculum.stage2_steps")  # fmt: skip
    recs = records(run)
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 12))
    done = json.loads((run / "final" / "rim.json").read_text())["run"]
    assert done["step"] == 11
    assert "stage2_steps: 7" in (run / "final" / "config.yaml").read_text()


def test_allow_change_refuses_what_cannot_change(run, capsys):
    line = fails(capsys, "train", "--resume", str(run), "--set", "memory.blocks=4",
                 "--allow-change", "memory")  # fmt: skip
    assert "memory.blocks cannot change on resume" in line and "Changeable: train.lr" in line
    line = fails(capsys, "train", "--resume", str(run / "checkpoints" / "step-00000006"),
                 "--set", "curriculum.stage1_steps=6", "--allow-change", "curriculum")  # fmt: skip
    assert "stage stage1 is over" in line


def test_temporaries_of_a_killed_run_are_removed_on_the_next_start(run, capsys):
    pid = 999999
    (run / f".best.tmp-{pid}").mkdir()
    (run / f".run.json.tmp-{pid}").write_text("{")
    (run / ".metrics.jsonl.tmp").write_text("x")
    (run / "checkpoints" / ".step-00000010.tmp").mkdir()
    shutil.move(run / "final", run / f".final.old-{pid}")  # killed between two renames
    rim_main("train", "--resume", str(run))
    assert "cleaned up after a killed run" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".lock"]
    assert not list((run / "checkpoints").glob(".*"))
    assert (run / "final" / "rim.json").is_file()


def test_bare_train_prints_usage(capsys):
    assert "needs --config RECIPE" in fails(capsys, "train")


def test_an_interrupted_swap_is_put_back(tmp_path):
    from rim.runs import clean_temporaries

    (tmp_path / ".best.old-12").mkdir()
    (tmp_path / ".best.old-12" / "rim.json").write_text("{}")
    (tmp_path / "final").mkdir()
    (tmp_path / ".final.old-12").mkdir()  # final/ exists: the old copy is stale
    assert sorted(clean_temporaries(tmp_path)) == [".best.old-12 -> best", ".final.old-12"]
    assert (tmp_path / "best" / "rim.json").is_file() and not list(tmp_path.glob(".*"))


def test_verify_hashes_a_folder_too_large_to_hash_by_default(run, capsys, monkeypatch):
    """Above `CHEAP_BYTES` only sizes are checked, unless `--verify`."""
    import rim.manifest

    monkeypatch.setattr(rim.manifest, "CHEAP_BYTES", 0)
    file = run / "best" / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF  # a flipped byte in the last tensor: same size
    file.write_bytes(bytes(data))
    rim_main("generate", "--checkpoint", str(run / "best"), "1 2 3")  # sizes only: loads
    line = fails(capsys, "generate", "--checkpoint", str(run / "best"), "--verify", "1 2 3")
    assert f"{file}: content differs" in line


def test_generate_on_an_export_says_what_the_folder_is(run, tmp_path, capsys):
    rim_main("export", "--checkpoint", str(run / "best"), "--out", str(tmp_path / "exp"))
    line = fails(capsys, "generate", "--checkpoint", str(tmp_path / "exp"), "1 2 3")
    assert "an exported model (rim export), not a training checkpoint" in line
    assert "config.yaml" not in line
    line = fails(capsys, "eval", "--checkpoint", str(run), "--split", "valid")
    assert "a run folder; did you mean" in line
