"""The shipped recipes: every YAML under configs/ loads, and every benchmark recipe trains.

The benchmark recipes (configs/{gsm8k,prosqa,prontoqa,mult}/<model>_..._<method>.yaml) need
local pretrained weights; the smoke runs swap in a tiny random-init model of the same family
(a word-level tokenizer built from the data) and shrink data and budgets, but keep everything
else of the recipe: its data files, method, memory layout, curricula and loss. Two more runs
keep the recipe's LoRA set-up on a tiny "pretrained" folder saved here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED = ROOT.parent / "shared" / "data"
TASKS = ("gsm8k", "prosqa", "prontoqa", "mult")
METHODS = ("rim", "direct", "cot", "pause", "coconut", "icot", "codi")


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))
ACCELERATE = [p for p in ALL_YAML if p.parent.name == "accelerate"]  # accelerate's own format
SWEEPS = [p for p in ALL_YAML if p.parent.name == "sweeps"]  # grid files of `rim sweep`
RIM_YAML = [p for p in ALL_YAML if p not in ACCELERATE + SWEEPS]
# a recipe names its method; bases and model layers (base.yaml, llama1b.yaml, 4x4.yaml) do not;
# configs/mult/small_* and columns_* train from scratch, no pretrained weights (tests/test_mult.py)
RECIPES = [
    p
    for t in TASKS
    for p in sorted((CONFIGS / t).glob("*.yaml"))
    if "method" in _raw(p) and not p.name.startswith(("small_", "columns_"))
]


def _family(path: Path) -> str:
    return "gpt2" if path.stem.startswith("gpt2") else "llama"


def _method(path: Path) -> str:
    return path.stem.rsplit("_", 1)[1]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """`train.threads` sets torch's process-wide thread count: give the next test its own."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _needs_data():
    if not SHARED.is_dir():
        pytest.skip("shared/data is not beside the checkout")


# ------------------------------------------------------------------------- every YAML loads


def test_the_benchmark_recipes_are_all_there():
    names = {_rel(p) for p in RECIPES}
    for model in ("gpt2", "llama1b", "llama3b"):
        assert {f"configs/gsm8k/{model}_{m}.yaml" for m in METHODS} <= names
    for task in ("prosqa", "prontoqa"):
        assert {f"configs/{task}/gpt2_{m}.yaml" for m in METHODS} <= names
    for k in (4, 5):
        assert {f"configs/mult/gpt2_{k}x{k}_{m}.yaml" for m in METHODS} <= names


@pytest.mark.parametrize("path", RIM_YAML, ids=_rel)
def test_every_rim_yaml_loads_and_validates(path):
    from rim.config import load_config

    cfg = load_config(path)
    if "method" in _raw(path):  # a recipe, not a base: its launch command names the file
        assert cfg.method in METHODS
        if path.parent.name in TASKS:
            assert f"rim train --config {_rel(path)}" in path.read_text()


@pytest.mark.parametrize("path", ACCELERATE, ids=_rel)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(path)).num_processes >= 1


@pytest.mark.parametrize("path", SWEEPS, ids=_rel)
def test_sweep_grids_load_and_every_cell_validates(path):
    from rim.grid import load_grid
    from rim.sweep import plan

    grid = load_grid(path, need_reuse=False)  # a sweep it reuses may not have run yet
    assert plan(grid, Path("out"))  # every cell's recipe loads
    assert f"rim sweep --config {_rel(path)}" in path.read_text()


@pytest.mark.parametrize("path", RECIPES, ids=_rel)
def test_recipe_keeps_the_papers_settings(path):
    from rim.config import load_config

    cfg = load_config(path)
    text = path.read_text()
    assert cfg.method == _method(path)
    assert cfg.model.arch == _family(path)
    assert cfg.model.path.startswith("/path/to/"), "a placeholder the user overrides"
    assert "--set model.path=" in text and "accelerate launch" in text
    m, t = cfg.model, cfg.train
    assert (cfg.memory.blocks, cfg.memory.mem_tokens) == (8, 2)
    i = cfg.icot  # every recipe's bases carry the original iCoT-SI schedule
    assert (i.schedule, i.remove_per_epoch, i.removal_smoothing_lambda) == ("step", 8, 4)
    assert (i.warmup, i.loss) == (0.0, "token")
    if cfg.method == "icot" and _family(path) == "gpt2":  # the original's own recipe
        assert m.full_finetune and (t.lr, t.batch_size, t.micro_batch_size) == (5e-5, 32, None)
        assert (t.mixed_precision, t.warmup, t.lr_schedule) == ("no", 0.0, "constant")
        assert (t.weight_decay, t.grad_clip) == (0.01, 1.0)
        assert i.remove_all_when_remove_beyond is not None  # so the plan has one final stage
    elif cfg.method == "coconut" and _family(path) == "gpt2":  # the original's args/*.yaml
        assert (m.full_finetune, t.mixed_precision, t.weight_decay) == (True, "no", 0.01)
        assert (t.lr, cfg.coconut.warmup, cfg.coconut.reset_optimizer) == (1e-4, 0.0, True)
        assert t.batch_size == 128 and t.micro_batch_size and 128 % t.micro_batch_size == 0
    elif cfg.method == "codi":  # zhenyi4/codi's scripts: 3% warm-up, cosine, lr 3e-3 / 8e-4
        assert (t.batch_size, t.mixed_precision) == (128, "bf16")
        assert t.micro_batch_size and 128 % t.micro_batch_size == 0
        assert (t.warmup, t.lr_schedule, m.lora_alpha, cfg.codi.latents) == (0.03, "cosine", 32, 6)
        assert t.lr == (3e-3 if cfg.model.arch == "gpt2" else 8e-4)
    else:
        assert (m.lora_rank, m.lora_targets, m.full_finetune) == (128, "all-linear", False)
        assert (t.batch_size, t.warmup, t.mixed_precision) == (128, 0.04, "bf16")
        assert t.micro_batch_size and 128 % t.micro_batch_size == 0
        assert 1e-5 <= t.lr <= 1e-3
    if cfg.method == "rim":
        c = cfg.curriculum
        assert (c.schedule, c.stage1_epochs, c.stage2_epochs) == ("relative", 6, 2)
        assert t.stage2_lr is not None and t.stage2_lr < t.lr  # paper: lower in stage 2
    d = cfg.data
    assert d.valid.path and d.test and d.test.path and d.valid.path != d.test.path
    assert "test" not in Path(d.valid.path).name  # selection never on test
    if path.parent.name == "gsm8k":
        assert d.train.path.endswith("gsm8k_aug/train_no_aug.txt")
        assert d.valid.path.endswith("gsm8k_aug/valid.txt")
        assert d.test.path.endswith("gsm8k_aug/test.txt")
        assert "gsm_hard/gsmhardv2.jsonl" in text
        if cfg.method == "coconut":
            c = cfg.coconut
            assert (c.thoughts_per_step, c.max_stage, c.stage0) == (2, 3, True)
        assert i.remove_all_when_remove_beyond == 39  # the original's GSM8K command
    if SHARED.is_dir():  # every shipped file a recipe names exists
        for split in (d.train, d.valid, d.test):
            if split.path and split.path.startswith("../shared/"):
                assert (ROOT / split.path).is_file(), split.path


# ------------------------------------------------------------------------- smoke runs


def smoke_overrides(path: Path) -> list[str]:
    """The recipe with a tiny random-init model, a few examples and 2-3 steps per stage."""
    from rim.config import load_config

    cfg = load_config(path)
    over = [
        "model.path=null",
        f"model.arch={_family(path)}",
        "model.size=tiny",
        "model.tokenizer=null",
        "data.valid.limit=8",
        "curriculum.stage1_epochs=null",
        "curriculum.stage1_steps=2",
        "curriculum.stage2_epochs=null",
        "curriculum.stage2_steps=2",
        "coconut.epochs_per_stage=null",
        "coconut.steps_per_stage=2",
        "coconut.epochs=null",  # 2 steps per stage, then 2 at the fully latent stage
        f"coconut.steps={2 * (cfg.coconut.max_stage + int(cfg.coconut.stage0)) + 2}",
        "train.epochs=null",
        # 12 examples at batch 4 = 3 steps an epoch: icot's 4 steps remove 1 more token each
        f"train.steps={4 if cfg.method == 'icot' else 3}",
        "train.batch_size=4",
        "train.micro_batch_size=2",  # 2 micro-batches: gradient accumulation runs too
        "train.mixed_precision='no'",  # quoted: YAML reads a bare no as false
        "train.eval_every=0",
        "train.save_every=0",
        "train.log_every=1",
        "train.threads=1",  # tiny models: one thread is faster, and steady on a busy CPU
        "eval.batch_size=4",
        "eval.val_limit=4",
        "eval.max_new_tokens=6",
        "eval.cot_max_new_tokens=8",
    ]
    if cfg.data.train.generator is not None:
        over.append("data.train.size=12")
    else:
        over.append("data.train.limit=12")
        if not (ROOT / cfg.data.train.path).is_file():
            # ProsQA's train split is not shipped: its valid file stands in, FOR A SMOKE RUN ONLY
            over.append(f"data.train.path={cfg.data.valid.path}")
    return over


def run(cfg, out: Path):
    from rim.assembly import assemble
    from rim.trainer import Trainer

    setup = assemble(cfg, log=lambda *a: None)
    trainer = Trainer(setup, out)
    trainer.fit()
    return setup, trainer


def check_run(trainer, out: Path) -> None:
    assert (out / "best").is_dir() and (out / "final").is_dir()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = {r["stage"] for r in records if "loss" in r}
    assert trained == {s.name for s in trainer.plan}, "a loss record for every stage"
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r), "no NaN loss"
    assert any(r.get("event") == "done" for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=_rel)
def test_recipe_smoke_run(path, tmp_path, monkeypatch):
    from rim.config import load_config

    _needs_data()
    monkeypatch.chdir(ROOT)  # recipes name data relative to the repo root
    monkeypatch.setenv("RIM_NO_PROGRESS", "1")
    cfg = load_config(path, smoke_overrides(path))
    _, trainer = run(cfg, tmp_path / "run")
    check_run(trainer, tmp_path / "run")


def _fake_pretrained(folder: Path, arch: str, cfg) -> Path:
    """A tiny random-init model saved like downloaded weights (model + tokenizer)."""
    import torch

    from rim.config import ModelConfig
    from rim.model import build_model, build_tokenizer
    from rim.sources import load_split

    train = load_split(cfg.data.train)
    texts = [e.question for e in train] + [s for e in train for s in e.steps]
    tok = build_tokenizer(texts + [e.answer for e in train] + [cfg.eval.answer_marker])
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, size="tiny"), len(tok), max_positions=1024)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["gsm8k/gpt2_rim.yaml", "gsm8k/llama1b_coconut.yaml", "gsm8k/gpt2_codi.yaml"]
)
def test_recipe_lora_run_on_local_weights(name, tmp_path, monkeypatch):
    """model.path + the recipe's LoRA (rank 128, all linear layers, new-token rows)."""
    from rim.config import load_config
    from rim.model import load_checkpoint

    _needs_data()
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RIM_NO_PROGRESS", "1")
    path = CONFIGS / name
    over = [o for o in smoke_overrides(path) if not o.startswith("model.")]
    small = load_config(path, over)
    weights = _fake_pretrained(tmp_path / "weights", _family(path), small)
    cfg = load_config(path, over + [f"model.path={weights}"])
    setup, trainer = run(cfg, tmp_path / "run")
    check_run(trainer, tmp_path / "run")
    assert hasattr(setup.model, "peft_config") and cfg.model.lora_rank == 128
    model, _, meta = load_checkpoint(tmp_path / "run" / "best")
    assert meta["adapter"] and meta["base_model"] == str(weights)
