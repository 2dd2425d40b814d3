"""Shared fixtures: tiny random-init models built from configs, a locally built tokenizer."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

# Two threads when alone; one per `pytest -n` worker (`make test`), the cores are shared.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(int(os.environ.get("RIM_TEST_THREADS", "2" if _WORKERS == 1 else "1")))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# A tiny RiM recipe (as a YAML mapping) for subprocess and CLI tests.
TINY_RECIPE = {
    "method": "rim",
    "model": {"arch": "llama", "size": "tiny"},
    "data": {
        "train": {"generator": "chain", "size": 64, "seed": 0},
        "valid": {"generator": "chain", "size": 16, "seed": 1},
    },
    "memory": {"blocks": 3, "mem_tokens": 2},
    "curriculum": {
        "stage1_epochs": None,
        "stage1_steps": 6,
        "stage2_epochs": None,
        "stage2_steps": 4,
    },
    "train": {"lr": 2.0e-3, "batch_size": 8, "log_every": 1, "threads": 1},
    "eval": {"max_new_tokens": 4, "val_limit": 16, "batch_size": 16},
}


def recipe_file(base: dict, folder: Path, name: str = "recipe.yaml", **sections) -> Path:
    """`base` with `sections` merged in (one level deep), written to `folder/name` as YAML."""
    import copy

    import yaml

    data = copy.deepcopy(base)
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def make_setup(method: str = "rim", arch: str = "llama", attn: str = "sdpa", **cfg_over):
    """(cfg, tokenizer, model, method) for a tiny model on the `chain` task."""
    from rim.config import Config, ModelConfig
    from rim.data import generate
    from rim.memory import memory_tokens
    from rim.methods import build
    from rim.model import build_model, build_tokenizer, resize_for

    cfg = Config(method=method, model=ModelConfig(arch=arch, size="tiny", attn_implementation=attn))
    for key, value in cfg_over.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    examples = generate("chain", 50, seed=0)
    texts = [e.question for e in examples] + [s for e in examples for s in e.steps]
    texts += [e.answer for e in examples] + [cfg.eval.answer_marker]
    tok = build_tokenizer(texts)
    memory_tokens(tok, cfg.memory)  # every method's vocabulary holds the block tokens
    method_ = build(cfg, tok)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=len(tok), max_positions=512)
    resize_for(model, tok)
    model.eval()
    return cfg, tok, model, method_


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("shared/data is not beside the checkout")
    return SHARED_DATA


def rim_main(*args: str) -> None:
    """`rim ...` in this process (the CLI entry point, without a second interpreter start)."""
    from rim.cli import main

    main(list(args))


def rim_run(capsys, *args: str) -> subprocess.CompletedProcess:
    """`rim ARGS` in this process, read back as a subprocess would be: exit code, stdout,
    stderr (`capsys`, or `capfd` where C++ code prints too). An interpreter start costs ~6 s
    of CPU (torch, transformers); tests that need no process of their own (for signals,
    launchers, a fresh allocator) use this."""
    capsys.readouterr()
    code = 0
    try:
        rim_main(*args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["rim", *args], code, out.out, out.err)


class Crash(Exception):
    """Stands in for SIGKILL right after a checkpoint (in this process, so it is fast)."""


def resume_branch_and_crash(run: Path, monkeypatch, crash_at: int = 6) -> None:
    """Resume `run` from its step-4 checkpoint with another lr and crash right after the
    checkpoint of step `crash_at`: an abandoned branch, as a preempted experiment leaves it."""
    from rim.trainer import Trainer

    original = Trainer.save_resumable

    def crash_after(self):
        original(self)
        if self.state.global_step == crash_at:
            raise Crash

    monkeypatch.setattr(Trainer, "save_resumable", crash_after)
    branch = str(run / "checkpoints" / "step-00000004")
    with pytest.raises(Crash):
        rim_main(
            "train", "--resume", branch, "--set", "train.lr=5e-4", "--allow-change", "train.lr"
        )
    monkeypatch.setattr(Trainer, "save_resumable", original)


# The files that train, export or launch processes, longest first (measured serially on the
# project's CPU machine): `make test` hands a file to each xdist worker in collection order, so
# these go first and no worker is left alone with a long file at the end. Order only.
LONG_FILES = [
    "test_learning.py", "test_serving.py", "test_mult.py", "test_sweep.py", "test_recipes.py",
    "test_fsdp.py", "test_demo.py", "test_gsm8k_runs.py", "test_reliability.py",
]  # fmt: skip


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as found


@pytest.fixture(scope="session", autouse=True)
def _tmpdir_of_launched_processes(tmp_path_factory):
    """Processes the tests start write their temporary files under pytest's own folder,
    which pytest prunes: torchrun leaves an empty `torchelastic_*` tree per launch in the
    system's /tmp otherwise (hundreds after a few `make test`)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))
        yield
