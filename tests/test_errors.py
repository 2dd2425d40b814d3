"""Bad input, tried as a new user would: one line `rim: error: <where>: <what>`, exit code 2,
and no run folder (nothing half-written). A NaN loss stops training, names the step and keeps
the last good checkpoint. The readers never fail with anything but that one-line error.

Most cases call the CLI entry point in this process (`rim.cli.main`, the code `rim` runs);
`test_real_command_line` runs the installed command in a fresh interpreter.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# the shared tiny recipe, smaller still: these runs only need to start (or fail) quickly
from .conftest import TINY_RECIPE, recipe_file, rim_main

RECIPE = copy.deepcopy(TINY_RECIPE)
RECIPE["data"]["train"]["size"], RECIPE["data"]["valid"]["size"] = 32, 8
RECIPE["curriculum"]["stage1_steps"], RECIPE["curriculum"]["stage2_steps"] = 3, 2
RECIPE["eval"]["val_limit"], RECIPE["eval"]["batch_size"] = 8, 8


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("RIM_NO_PROGRESS", "1")


write_recipe = partial(recipe_file, RECIPE)


def fails(capsys, *args: str, warned: str | None = None) -> str:
    """Run `rim *args`; it must exit 2 with exactly one stderr line (after the one warning
    that starts with `warned`, if given); return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        rim_main(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    if warned is not None:
        assert err and err.pop(0).startswith(f"rim: warning: {warned}"), err
    assert len(err) == 1, err
    assert err[0].startswith("rim: error: ")
    return err[0]


# ------------------------------------------------------------------ data files

DATA_CASES = {
    # name: (file name, content, expected message after "rim: error: <path>")
    "bad_json": (
        "train.jsonl",
        '{"question": "1 + 2", "steps": ["3"], "answer": "3"}\n'
        '{"question": "2 + 2", "steps": [], "answer": "4"\n',
        ":2: invalid JSON",
    ),
    "missing_answer": (
        "train.jsonl",
        '{"question": "1 + 2", "steps": ["3"], "answer": "3"}\n'
        '{"question": "2 + 2", "steps": []}\n',
        ":2: missing key 'answer'",
    ),
    "empty_question": ("train.txt", "1 + 2||3 #### 3\n   ||4 #### 4\n", ":2: empty question"),
    "missing_bars": ("train.txt", "1 + 2||3 #### 3\n1 + 1 2 #### 2\n", ":2: missing '||'"),
    "missing_hashes": ("train.txt", "1 + 2||3 #### 3\n1 + 1|| 2 2\n", ":2: missing '####'"),
    "empty_answer": ("train.txt", "1 + 2||3 ####   \n", ":1: empty answer"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_malformed_data_names_file_and_line(tmp_path: Path, capsys, case: str) -> None:
    name, content, expected = DATA_CASES[case]
    data = tmp_path / name
    data.write_text(content)
    cfg = write_recipe(tmp_path, data={"train": {"path": str(data)}})
    out = tmp_path / "run"
    line = fails(capsys, "train", "--config", str(cfg), "--out", str(out))
    assert line == f"rim: error: {data}{expected}" or line.startswith(
        f"rim: error: {data}{expected}"
    )
    assert not out.exists()


# ------------------------------------------------------------------ config


CONFIG_CASES = [
    # (recipe sections, --set overrides, expected substring)
    ({"train": {"learning_rate": 1e-3}}, [], "train.learning_rate: unknown config key"),
    ({"train": {"batch_size": "eight"}}, [], "train.batch_size: expected an integer"),
    ({"memory": {"blocks": 2.5}}, [], "memory.blocks: expected an integer"),
    ({}, ["train.lrr=1"], "train.lrr: unknown config key"),
    ({}, ["memory.blocks=0"], "memory.blocks: K must be >= 1"),
    ({}, ["memory.mem_tokens=0"], "memory.mem_tokens: M must be >= 1"),
    ({}, ["train.lr=.inf"], "train.lr: expected a finite number"),
    ({}, ["method=coconutt"], "method: 'coconutt' is not one of"),
    ({}, ["data.too_long=truncate"], "data.too_long: must be skip or error"),
    ({}, ["model.size=huge"], "model.size: 'huge' is not one of"),
]


@pytest.mark.parametrize("sections,overrides,expected", CONFIG_CASES)
def test_config_errors_name_the_key(tmp_path: Path, capsys, sections, overrides, expected):
    cfg = write_recipe(tmp_path, **sections)
    sets = [a for o in overrides for a in ("--set", o)]
    out = tmp_path / "run"
    line = fails(capsys, "train", "--config", str(cfg), "--out", str(out), *sets)
    assert expected in line
    assert not out.exists()


def test_scientific_notation_is_a_number(tmp_path: Path) -> None:
    """YAML 1.1 reads `1e-3` as a string; a new user writes it anyway."""
    from rim.config import load_config

    cfg = write_recipe(tmp_path, train={"lr": "1e-3"})
    assert load_config(cfg, ["train.weight_decay=1e-2"]).train.lr == 1e-3


def test_invalid_yaml_names_the_line(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("method: rim\ntrain:\n  lr: 1e-3\n   batch_size: 8\n")
    assert f"{cfg}:4: invalid YAML" in fails(capsys, "train", "--config", str(cfg))
    assert "no such config file" in fails(capsys, "train", "--config", str(tmp_path / "x.yaml"))


def test_generate_rejects_zero_blocks(capsys) -> None:
    assert "--blocks: K must be >= 1" in fails(
        capsys, "generate", "--checkpoint", "nowhere", "--blocks", "0", "1 + 2"
    )


# ------------------------------------------------------------------ lengths


def _lengths_data(tmp_path: Path) -> Path:
    long_q = " + ".join(["1"] * 30)
    lines = ["1 + 2||3 #### 3", "2 + 2||4 #### 4", f"{long_q}||30 #### 30", "3 + 3||6 #### 6"]
    data = tmp_path / "train.txt"
    data.write_text("\n".join(lines) + "\n")
    return data


def test_too_long_error(tmp_path: Path, capsys) -> None:
    data = _lengths_data(tmp_path)
    cfg = write_recipe(
        tmp_path, data={"train": {"path": str(data)}, "max_length": 40, "too_long": "error"}
    )
    line = fails(capsys, "train", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert "data.train: example 3 needs" in line and "> max_length 40" in line
    assert not (tmp_path / "run").exists()


def test_too_long_skip_counts(tmp_path: Path, capsys) -> None:
    data = _lengths_data(tmp_path)
    cfg = write_recipe(
        tmp_path,
        data={"train": {"path": str(data)}, "max_length": 40},
        curriculum={"stage1_steps": 1, "stage2_steps": 1},
    )
    rim_main("train", "--config", str(cfg), "--out", str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "skipped 1 examples longer than 40 tokens" in out
    assert "3 train /" in out


def test_nothing_fits(tmp_path: Path, capsys) -> None:
    cfg = write_recipe(tmp_path, data={"max_length": 5})
    assert "data.train: no example fits in 5 tokens" in fails(
        capsys, "train", "--config", str(cfg), "--out", str(tmp_path / "run")
    )


# ------------------------------------------------------------------ paths and tokenizers


def _tokenizer(folder: Path, pad: bool, eos: bool) -> Path:
    from transformers import PreTrainedTokenizerFast

    from rim.model import build_tokenizer

    words = build_tokenizer(["0 1 2 3 4 5 6 7 8 9 + -"])
    kw = {"bos_token": "<bos>", "unk_token": "<unk>"}
    if pad:
        kw["pad_token"] = "<pad>"
    if eos:
        kw["eos_token"] = "<eos>"
    PreTrainedTokenizerFast(tokenizer_object=words.backend_tokenizer, **kw).save_pretrained(folder)
    return folder


def test_missing_model_and_tokenizer_paths(tmp_path: Path, capsys) -> None:
    cfg = write_recipe(tmp_path)
    out = tmp_path / "run"
    for key, what in (("model.path", "model"), ("model.tokenizer", "tokenizer")):
        missing = tmp_path / f"no-{what}"
        line = fails(
            capsys, "train", "--config", str(cfg), "--out", str(out), "--set", f"{key}={missing}"
        )
        assert line.endswith(f"{key}: {missing}: no such {what} folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    line = fails(
        capsys, "train", "--config", str(cfg), "--out", str(out), "--set", f"model.path={empty}"
    )
    assert f"model.path: {empty}: cannot load" in line
    assert not out.exists()


def test_tokenizer_without_pad_uses_eos_and_without_eos_fails(tmp_path: Path, capsys) -> None:
    from rim.model import load_tokenizer

    tok = load_tokenizer(_tokenizer(tmp_path / "no-pad", pad=False, eos=True))
    assert tok.pad_token == tok.eos_token == "<eos>"  # GPT-2 / Llama style: eos pads
    bad = _tokenizer(tmp_path / "no-pad-no-eos", pad=False, eos=False)
    cfg = write_recipe(tmp_path, model={"tokenizer": str(bad)})
    line = fails(capsys, "train", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert f"model.tokenizer: {bad}: the tokenizer has no eos token" in line
    assert not (tmp_path / "run").exists()
    # training with the eos-padded tokenizer works (also covered with a pretrained model in
    # tests/test_export.py::test_export_lora_merges_and_answers_like_rim_generate)
    cfg = write_recipe(
        tmp_path,
        "ok.yaml",
        model={"tokenizer": str(tmp_path / "no-pad")},
        curriculum={"stage1_steps": 1, "stage2_steps": 1},
    )
    rim_main("train", "--config", str(cfg), "--out", str(tmp_path / "ok"))
    assert (tmp_path / "ok" / "final" / "rim.json").is_file()


def test_resume_and_export_paths(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty-run").mkdir()
    assert "no checkpoint found" in fails(capsys, "train", "--resume", str(tmp_path / "empty-run"))
    out = tmp_path / "exported"
    line = fails(capsys, "export", "--checkpoint", str(tmp_path / "nope"), "--out", str(out))
    assert "--checkpoint" in line and "no such folder" in line
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "rim.json").write_text("{}")
    line = fails(capsys, "export", "--checkpoint", str(run), "--out", str(out))
    assert f"did you mean {run / 'best'}?" in line
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    (run / "best" / "config.yaml").write_text("{}")
    line = fails(capsys, "export", "--checkpoint", str(run / "best"), "--out", str(out))
    assert "already exists and is not empty" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------ NaN


def test_nan_loss_stops_names_step_and_keeps_last_good_checkpoint(tmp_path: Path, capsys):
    """lr = 1e30 blows the weights up after step 1; step 2's gradients overflow."""
    from rim.assembly import assemble
    from rim.config import load_config
    from rim.trainer import Trainer

    cfg = write_recipe(tmp_path, train={"lr": 1.0e30, "save_every": 1, "keep_last": 5})
    run = tmp_path / "run"
    line = fails(capsys, "train", "--config", str(cfg), "--out", str(run), warned="train.lr: 1e+30")
    assert "train: non-finite loss or gradient" in line
    assert ") at step 2 (stage1 step 2); stopped" in line
    good = run / "checkpoints" / "step-00000001"
    assert line.endswith(f"last good checkpoint: {good}")
    assert not (run / "final").exists()  # no model from a diverged run
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 1 and all(math.isfinite(x) for x in losses)
    trainer = Trainer(assemble(load_config(cfg), log=lambda *a: None), tmp_path / "reload")
    assert trainer.resume(good) == good  # loadable
    assert trainer.state.global_step == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ------------------------------------------------------------------ readers never crash

_PIECES = list('ab1 +-|#{}":[],\\\n\t') + [
    "||",
    "####",
    '"question"',
    '"answer"',
    '"steps"',
    '"input"',
    '"target"',
    "\u00e9",
]
_LINE = st.lists(st.sampled_from(_PIECES), max_size=16).map("".join)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    lines=st.lists(_LINE, min_size=1, max_size=4),
    suffix=st.sampled_from([".txt", ".jsonl", ".json"]),
)
def test_readers_fail_only_with_a_located_data_error(tmp_path: Path, lines, suffix) -> None:
    """Any file content: examples with non-empty question and answer, or a DataError whose
    message starts with the path (and a line or record number when one is at fault)."""
    from rim.data import read_examples
    from rim.errors import DataError

    path = tmp_path / f"fuzz{suffix}"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        examples = read_examples(path)
    except DataError as err:
        msg = str(err)
        assert msg.startswith(f"{path}:") or msg.startswith(f"{path}: ")
        assert "\n" not in msg
        return
    assert examples
    for ex in examples:
        assert ex.question.strip() and ex.answer.strip()


# ------------------------------------------------------------------ the real command


def test_real_command_line(tmp_path: Path) -> None:
    """`python -m rim` in a fresh process: exit 2, one stderr line, nothing written."""
    data = tmp_path / "train.txt"
    data.write_text("1 + 2||3 #### 3\n2 + 2 4 #### 4\n")
    bad_data = write_recipe(tmp_path, "data.yaml", data={"train": {"path": str(data)}})
    bad_key = write_recipe(tmp_path, "key.yaml", memory={"blockz": 4})
    env = dict(os.environ, RIM_NO_PROGRESS="1", HF_HUB_OFFLINE="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rim",
                "train",
                "--config",
                str(cfg),
                "--out",
                str(tmp_path / cfg.stem),
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cfg in (bad_data, bad_key)
    ]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    expected = [
        f"rim: error: {data}:2: missing '||'",
        f"rim: error: {bad_key}: memory.blockz: unknown config key",
    ]
    for (out, err, code), want in zip(results, expected):
        assert code == 2
        assert err.strip().splitlines() == [want]
        assert out == ""
    assert not (tmp_path / "data").exists() and not (tmp_path / "key").exists()


def test_resume_refuses_a_different_model_or_process_count(tmp_path: Path, capsys) -> None:
    cfg = write_recipe(tmp_path, curriculum={"stage1_steps": 1, "stage2_steps": 1})
    run = tmp_path / "run"
    rim_main("train", "--config", str(cfg), "--out", str(run))
    other = write_recipe(
        tmp_path,
        "other.yaml",
        model={"size": "small"},
        curriculum={"stage1_steps": 1, "stage2_steps": 1},
    )
    line = fails(capsys, "train", "--resume", str(run), "--config", str(other))
    assert "differs from the checkpoint's in model.size ('tiny' -> 'small')" in line
    args = ("train", "--resume", str(run), "--config", str(other), "--allow-change", "model")
    assert "--allow-change: model.size cannot change on resume" in fails(capsys, *args)
    from rim.checkpoint import write_manifest

    ckpt = run / "checkpoints" / "step-00000002"
    state = ckpt / "trainer_state.json"
    state.write_text(state.read_text().replace('"num_processes": 1', '"num_processes": 2'))
    write_manifest(ckpt, json.loads(state.read_text())["run_id"])  # a consistent checkpoint
    line = fails(capsys, "train", "--resume", str(run))
    assert "saved with 2 processes, resumed with 1" in line
