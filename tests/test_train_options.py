"""Training options (rim.speed): gradient checkpointing, torch.compile and fp16 with a grad
scaler leave the loss of a few optimizer steps unchanged; what cannot run is refused."""

from __future__ import annotations

import os

import pytest
import torch
from accelerate import Accelerator

from rim import speed
from rim.assembly import assemble
from rim.config import (
    Config,
    ConfigError,
    CurriculumConfig,
    DataConfig,
    ModelConfig,
    SplitConfig,
    TrainConfig,
    load_config,
)
from rim.trainer import Trainer

from .conftest import make_setup


def _cfg(method: str = "rim", **train) -> Config:
    return Config(
        method=method,
        model=ModelConfig(arch="llama", size="tiny"),
        data=DataConfig(
            train=SplitConfig(generator="chain", size=32, seed=0),
            valid=SplitConfig(generator="chain", size=8, seed=1),
        ),
        curriculum=CurriculumConfig(
            stage1_epochs=None, stage1_steps=3, stage2_epochs=None, stage2_steps=1
        ),
        train=TrainConfig(
            **({"lr": 3e-3, "batch_size": 8, "micro_batch_size": 4, "warmup": 0.0} | train)
        ),
    )


def _run(tmp_path, name: str, steps: int = 3, accelerator=None, **train):
    """(losses of `steps` stage-1 optimizer steps, trainer) from the same seed."""
    setup = assemble(_cfg(**train), log=lambda *_: None)
    trainer = Trainer(setup, tmp_path / name, accelerator=accelerator)
    stage = trainer.plan[0]
    trainer.new_optimizer(stage)
    return [trainer.step(stage) for _ in range(steps)], trainer


def test_gradient_checkpointing_same_losses(tmp_path):
    want, _ = _run(tmp_path, "plain")
    got, trainer = _run(tmp_path, "gc", gradient_checkpointing=True)
    core = trainer.acc.unwrap_model(trainer.model)
    assert core.is_gradient_checkpointing and core.training
    assert got == pytest.approx(want, rel=1e-5)


def test_gradient_checkpointing_refused_for_latent_passes():
    cfg, _, _, m = make_setup("coconut", train__gradient_checkpointing=True, train__epochs=1.0)
    with pytest.raises(ConfigError, match=r"^train.gradient_checkpointing: coconut's latent"):
        speed.check(cfg, m, m.plan(32, 4), torch.device("cuda"))


def test_fp16_is_refused_on_cpu():
    """accelerate runs fp16 on a CPU as plain fp32 with no scaler: refused, not pretended."""
    cfg = load_config(None, ["train.mixed_precision=fp16"])
    _, _, _, m = make_setup("rim")
    with pytest.raises(ConfigError, match=r"^train.mixed_precision: fp16 needs a GPU"):
        speed.check(cfg, m, m.plan(32, 4), torch.device("cpu"))
    speed.check(cfg, m, m.plan(32, 4), torch.device("cuda"))
    with pytest.raises(ConfigError, match=r"train.mixed_precision: must be no, bf16 or fp16"):
        load_config(None, ["train.mixed_precision=fp8"])


def _scaled(init_scale: float) -> Accelerator:
    """An accelerator with the grad scaler fp16 gets on a GPU (here on the CPU's fp32 math):
    the trainer's scaler path, unscale before clipping and the scaler's step, without fp16."""
    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return acc


def test_grad_scaler_path_same_losses(tmp_path):
    """A power-of-two loss scale is exact in fp32: the scaled path must give the same losses
    (gradients unscaled before clipping, the update through the scaler)."""
    want, _ = _run(tmp_path, "plain")
    got, trainer = _run(tmp_path, "scaled", accelerator=_scaled(2.0**16))
    assert got == pytest.approx(want, rel=1e-5)
    assert trainer.acc.scaler.get_scale() == 2.0**16  # no step was skipped


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_grad_scaler_skips_an_overflowing_step(tmp_path):
    """Infinite scaled gradients: the scaler skips the update and lowers the scale; the run
    goes on (no non-finite-gradient stop), the weights untouched."""
    setup = assemble(_cfg(), log=lambda *_: None)
    trainer = Trainer(setup, tmp_path / "run", accelerator=_scaled(1e38))
    stage = trainer.plan[0]
    trainer.new_optimizer(stage)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loss = trainer.step(stage)
    assert loss == loss and loss < 100  # the loss itself is finite and unscaled
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    assert trainer.acc.scaler.get_scale() < 1e38


def test_compile_is_regional_and_in_place(tmp_path):
    """`train.compile`: every decoder layer compiled in place (the module, its parameter
    names and so checkpoints unchanged; the LM head stays eager); decoding runs eagerly."""
    setup = assemble(_cfg(compile=True), log=lambda *_: None)
    plain, keys = setup.model, list(setup.model.state_dict())
    trainer = Trainer(setup, tmp_path / "run")
    assert trainer.model is plain and list(trainer.model.state_dict()) == keys
    layers = plain.model.layers
    assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)
    assert plain.lm_head._compiled_call_impl is None
    from torch._dynamo.utils import counters

    frames = counters["frames"]["total"]
    with speed.decoding(plain), torch.no_grad():
        out = plain(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape[:2] == (1, 3)
    assert counters["frames"]["total"] == frames  # dynamo never saw a frame: eager
    trainer.out.mkdir(parents=True)
    trainer.validate(trainer.plan[0])  # the trainer's validation decodes the same way
    assert counters["frames"]["total"] == frames
    with pytest.raises(ConfigError, match=r"^train.compile: not with train.fsdp"):
        speed.check(_cfg(compile=True, fsdp=True), None, [], torch.device("cpu"))


COMPILE_OK = torch.cuda.is_available() or os.environ.get("RIM_TEST_COMPILE") == "1"


@pytest.mark.skipif(
    not COMPILE_OK,
    reason="inductor on a 2-core CPU takes ~120 s for these 3 steps (measured; the whole "
    "model: ~105 s, then ~90 s per new shape): runs on a GPU, or with RIM_TEST_COMPILE=1",
)
def test_compile_same_losses(tmp_path):
    want, _ = _run(tmp_path, "plain")
    got, _ = _run(tmp_path, "compiled", compile=True)
    assert got == pytest.approx(want, rel=1e-4)


def _gpu_train_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_train_check.py"
    spec = importlib.util.spec_from_file_location("gpu_train_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_train_check_plans_on_cpu(shared_data, tmp_path, capsys):
    """The GPU script's CPU-checkable part: every recipe it would train validates against
    this checkout's config, and missing data or a bad phase fail at once, in one line."""
    import json

    check = _gpu_train_check()
    data = shared_data / "gsm8k_aug"
    assert check.main(["--plan-only", "--device", "cpu", "--data-dir", str(data)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"gpt2", "bench", "options/reference", "options/flex"} <= set(plan["recipes"])
    for argv in (["--data-dir", str(tmp_path)], ["--phases", "gpt2,nope"]):
        with pytest.raises(SystemExit) as err:
            check.main(["--plan-only", "--device", "cpu", *argv])
        assert err.value.code == 2
        msg = capsys.readouterr().err
        assert msg.startswith("gpu_train_check: error: ") and msg.count("\n") == 1
