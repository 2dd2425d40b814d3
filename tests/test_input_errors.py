"""Bad numbers, flags, devices and output paths, tried as a careless user would (issue 28).

Each ends in one stderr line `rim: error: <key, flag or path>: <what>` and exit 2 (bad input)
or 74 (the OS refused a write), with nothing written; a legal but unusual number
(`train.lr=1e6`) runs with one warning line per key. Every case calls the CLI entry point in
this process (`rim.cli.main`, the code `rim` runs) on one tiny trained checkpoint.
"""

from __future__ import annotations

import builtins
import copy
import errno
import os
import pathlib
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import TINY_RECIPE, recipe_file, rim_main
from .test_faults import fails

RECIPE = copy.deepcopy(TINY_RECIPE)
RECIPE["data"]["train"]["size"], RECIPE["data"]["valid"]["size"] = 16, 4
RECIPE["curriculum"]["stage1_steps"], RECIPE["curriculum"]["stage2_steps"] = 1, 1
RECIPE["eval"]["val_limit"], RECIPE["eval"]["batch_size"] = 4, 4
RECIPE["train"]["log_every"] = 1


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    import rim.config

    monkeypatch.setenv("RIM_NO_PROGRESS", "1")
    monkeypatch.setattr(rim.config, "_warned", set(), raising=False)  # each test: its own


def exits(capsys, code: int, *args: str) -> str:
    """Run `rim *args`; it must exit `code` with exactly one error line; return that line."""
    line = fails(capsys, *args, code=code)
    assert line.startswith("rim: error: ")
    return line


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny trained rim checkpoint (2 optimizer steps), shared by the module; read only."""
    root = tmp_path_factory.mktemp("input_errors")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RIM_NO_PROGRESS", "1")
        rim_main("train", "--config", str(recipe_file(RECIPE, root)), "--out", str(root / "run"))
    return root / "run" / "best"


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------ 1. counts in the recipe

COUNT_CASES = [
    ("curriculum.stage1_steps=-5", "curriculum.stage1_steps: must be >= 1, got -5"),
    ("curriculum.stage2_steps=0", "curriculum.stage2_steps: must be >= 1, got 0"),
    ("curriculum.stage1_epochs=-1", "curriculum.stage1_epochs: must be > 0, got -1.0"),
    ("train.steps=-3", "train.steps: must be >= 1, got -3"),
    ("train.log_every=0", "train.log_every: must be >= 1, got 0"),
    ("train.grad_clip=-1", "train.grad_clip: must be >= 0, got -1.0"),
    ("train.dropout=1.5", "train.dropout: must be in [0, 1) (or null), got 1.5"),
    ("eval.batch_size=0", "eval.batch_size: must be >= 1, got 0"),
    ("coconut.steps_per_stage=0", "coconut.steps_per_stage: must be >= 1, got 0"),
]


@pytest.mark.parametrize("override,expected", COUNT_CASES)
def test_bad_counts_in_the_recipe_name_the_key(tmp_path: Path, capsys, override, expected):
    cfg, out = recipe_file(RECIPE, tmp_path), tmp_path / "run"
    line = exits(capsys, 2, "train", "--config", str(cfg), "--out", str(out), "--set", override)
    assert line == f"rim: error: {cfg}: {expected}"
    assert not out.exists()


def test_epochs_and_steps_both_set_names_both_keys(tmp_path: Path, capsys) -> None:
    cfg, out = recipe_file(RECIPE, tmp_path), tmp_path / "run"
    line = exits(capsys, 2, "train", "--config", str(cfg), "--out", str(out),
                 "--set", "curriculum.stage2_epochs=2")  # fmt: skip
    assert "curriculum.stage2_epochs, curriculum.stage2_steps: set exactly one" in line
    assert line.endswith("got both")
    assert not out.exists()


# ------------------------------------------------------------------ 2. count flags

FLAG_CASES = [
    ("eval", ["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    ("eval", ["--batch-size", "-2"], "--batch-size: must be >= 1, got -2"),
    ("eval", ["--limit", "0"], "--limit: must be >= 1, got 0"),
    ("eval", ["--timing-examples", "-1"], "--timing-examples: must be >= 0, got -1"),
    ("probe", ["--limit", "-3"], "--limit: must be >= 1, got -3"),
    ("inspect", ["--batch-size", "0", "--out", "{tmp}/report"], "--batch-size: must be >= 1"),
    ("inspect", ["--timing-examples", "-2", "--out", "{tmp}/report"], "--timing-examples: must"),
]


@pytest.mark.parametrize("command,flags,expected", FLAG_CASES)
def test_count_flags_below_their_minimum(ckpt, tmp_path, capsys, command, flags, expected):
    before = _listing(ckpt.parent)
    flags = [f.format(tmp=tmp_path) for f in flags]
    line = exits(capsys, 2, command, "--checkpoint", str(ckpt), *flags)
    assert line.startswith(f"rim: error: {expected}")
    assert _listing(ckpt.parent) == before and not (tmp_path / "report").exists()


# ------------------------------------------------------------------ 3. --device

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
DEVICES = {
    "cuda": "--device cuda: CUDA is not available on this machine",
    "cuda:99": "--device cuda:99: ",  # no CUDA, or fewer than 100 devices
    "gpu0": "--device gpu0: not a device (cpu, cuda, cuda:N)",
    "meta": "--device meta: not supported",
}
DEVICE_CASES = [
    pytest.param(command, device, expected, marks=NO_CUDA if device == "cuda" else ())
    for command in ("eval", "generate", "probe", "inspect", "bench")
    for device, expected in DEVICES.items()
    if command != "bench" or not device.startswith("cuda")
]  # `rim bench` refused a missing CUDA in one line already (the check it now shares)


@pytest.mark.parametrize("command,device,expected", DEVICE_CASES)
def test_a_device_this_machine_lacks(ckpt, tmp_path, capsys, command, device, expected):
    args = {
        "eval": ["eval", "--checkpoint", str(ckpt)],
        "generate": ["generate", "--checkpoint", str(ckpt), "1 + 2"],
        "probe": ["probe", "--checkpoint", str(ckpt)],
        "inspect": ["inspect", "--checkpoint", str(ckpt), "--out", str(tmp_path / "report")],
        "bench": ["bench", "latency", "--model", "tiny", "--runs", "1"],
    }[command]
    before = _listing(ckpt.parent)
    line = exits(capsys, 2, *args, "--device", device)
    assert line.startswith(f"rim: error: {expected}")
    assert _listing(ckpt.parent) == before and not (tmp_path / "report").exists()


def test_the_device_check_on_a_machine_with_one_gpu(monkeypatch) -> None:
    """The branch a CPU machine cannot reach: CUDA present, an index past its devices."""
    from rim.errors import RimError
    from rim.reasoner import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda") == torch.device("cuda")
    assert check_device("cuda:0") == torch.device("cuda:0")
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(RimError, match=r"^--device cuda:1: this machine has 1 cuda device\(s\)$"):
        check_device("cuda:1")


# ------------------------------------------------------------------ 4. unusual numbers


def test_an_unusual_learning_rate_warns_once_and_runs(tmp_path: Path, capsys) -> None:
    """train.lr=1e6 is legal (a researcher may mean it) but most likely a typo for 1e-6."""
    cfg, out = recipe_file(RECIPE, tmp_path), tmp_path / "run"
    capsys.readouterr()
    try:
        rim_main("train", "--config", str(cfg), "--out", str(out), "--set", "train.lr=1e6")
    except SystemExit as exc:  # the run may diverge (one error line), it must not be refused
        assert "non-finite" in capsys.readouterr().err, exc
    else:
        assert (out / "final").is_dir()
    err = capsys.readouterr().err
    warned = [x for x in err.splitlines() if x.startswith("rim: warning: ")]
    assert warned == [
        "rim: warning: train.lr: 1e+06 is outside the usual range [1e-06, 0.1] (used as given)"
    ]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 1e6


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.lr=1e-9", "train.lr"),
        ("train.stage2_lr=5", "train.stage2_lr"),
        ("train.weight_decay=10", "train.weight_decay"),
        ("train.warmup=0.9", "train.warmup"),
        ("train.grad_clip=1e-4", "train.grad_clip"),
        ("train.dropout=0.8", "train.dropout"),
        ("train.stage2_dropout=0.7", "train.stage2_dropout"),
    ],
)
def test_unusual_numbers_warn_once_per_key(tmp_path: Path, capsys, override, key) -> None:
    from rim.config import load_config

    cfg = recipe_file(RECIPE, tmp_path)
    capsys.readouterr()
    usual = ["train.lr=3e-3", "train.weight_decay=0.1", "train.grad_clip=0", "train.dropout=0.1"]
    load_config(cfg, usual)  # usual values and 0 (off) do not warn
    assert capsys.readouterr().err == ""
    for _ in range(2):  # a resume loads the recipe twice: still one warning
        loaded = load_config(cfg, [override])
    value = getattr(loaded.train, key.split(".")[1])
    assert value == float(override.split("=")[1])  # used as given
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"rim: warning: {key}: "), err
    assert "is outside the usual range" in err[0]


# ------------------------------------------------------------------ 5. output paths


def test_eval_out_under_a_regular_file(ckpt, tmp_path: Path, capsys) -> None:
    file = tmp_path / "file"
    file.write_text("mine")
    before = _listing(ckpt.parent)
    line = exits(capsys, 2, "eval", "--checkpoint", str(ckpt), "--out", str(file / "x.json"))
    where = f"{file / 'x.json'}: a file stands where a folder is needed ({file} is a file)"
    assert line == f"rim: error: {where}"
    assert file.read_text() == "mine" and _listing(tmp_path) == ["file"]
    assert _listing(ckpt.parent) == before


def test_inspect_out_is_a_regular_file(ckpt, tmp_path: Path, capsys) -> None:
    file = tmp_path / "file"
    file.write_text("mine")
    line = exits(capsys, 2, "inspect", "--checkpoint", str(ckpt), "--out", str(file))
    assert line == f"rim: error: {file}: a file stands where a folder is needed"
    assert file.read_text() == "mine" and _listing(tmp_path) == ["file"]


def test_an_atomic_write_under_a_regular_file_is_one_line(tmp_path: Path) -> None:
    """Without the early check (every other writer): the write's own error, cleanup quiet."""
    from rim.errors import RimError, StorageError
    from rim.io import atomic_dir, atomic_file

    file = tmp_path / "file"
    file.write_text("mine")
    with pytest.raises(RimError, match="a file stands where a folder is needed") as exc:
        atomic_file(file / "x.json", "{}")
    assert not isinstance(exc.value, StorageError)  # exit 2: the path is wrong, not the disk
    with pytest.raises(RimError, match=f"{file} is a file"):
        atomic_dir(file / "sub" / "folder", lambda tmp: (tmp / "a").write_text("a"))
    assert _listing(tmp_path) == ["file"] and file.read_text() == "mine"


@pytest.fixture
def read_only(tmp_path: Path, monkeypatch) -> Path:
    """A folder in which every write fails with EROFS, unlink of a missing file included, as
    on a read-only mount (root may write into a chmod 0o500 folder: simulate the OS instead)."""
    ro = tmp_path / "ro"
    ro.mkdir()

    def refuse(path) -> None:
        if isinstance(path, str | os.PathLike) and Path(path).absolute().is_relative_to(ro):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def guard(fn):
        def wrapped(path, *args, **kwargs):
            if not (fn is real_mkdir and Path(path).is_dir()):  # the OS answers EEXIST first
                refuse(path)
            return fn(path, *args, **kwargs)

        return wrapped

    def open_(file, mode="r", *args, **kwargs):
        if set("wax+") & set(mode):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    real_open, real_mkdir = builtins.open, pathlib.Path.mkdir
    monkeypatch.setattr(builtins, "open", open_)
    for name in ("mkdir", "unlink", "rename", "touch"):
        monkeypatch.setattr(pathlib.Path, name, guard(getattr(pathlib.Path, name)))
    monkeypatch.setattr(os, "replace", guard(os.replace))
    return ro


def test_atomic_writes_into_a_read_only_folder(read_only: Path) -> None:
    from rim.errors import StorageError
    from rim.io import atomic_dir, atomic_file

    with pytest.raises(StorageError, match=r"read-only file system \(errno 30\)"):
        atomic_file(read_only / "x.json", "{}")
    with pytest.raises(StorageError, match=r"read-only file system \(errno 30\)"):
        atomic_dir(read_only / "export", lambda tmp: None)


@pytest.mark.parametrize("command", ["eval", "inspect", "export"])
def test_commands_writing_into_a_read_only_folder(ckpt, read_only, capsys, command) -> None:
    out = {"eval": read_only / "x.json", "inspect": read_only / "report",
           "export": read_only / "export"}[command]  # fmt: skip
    line = exits(capsys, 74, command, "--checkpoint", str(ckpt), "--out", str(out))
    assert line.startswith(f"rim: error: {read_only}") and line.endswith(
        "read-only file system (errno 30)"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_inspect_into_a_chmod_500_folder(ckpt, tmp_path, capsys) -> None:
    """A real EACCES (eval and export reported it in one line already; EROFS: above)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        out = ro / "report"
        line = exits(capsys, 74, "inspect", "--checkpoint", str(ckpt), "--out", str(out))
        assert line.startswith(f"rim: error: {ro}") and "permission denied (errno 13)" in line
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_train_test_without_a_test_split_is_refused_before_training(tmp_path, capsys):
    """`rim train --test` scores best/ on data.test after training: a recipe without one
    is refused at once, not after the training it would waste."""
    run = tmp_path / "run"
    args = ("train", "--config", str(recipe_file(RECIPE, tmp_path)), "--out", str(run))
    line = exits(capsys, 2, *args, "--set", "data.test=null", "--test")
    assert (
        line == "rim: error: --test: the recipe has no data.test to score best/ on (set data.test)"
    )
    assert not run.exists()
