"""The training loop: exact accumulation, stage switches, validation-only checkpoint choice."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rim.assembly import assemble
from rim.batching import ExampleStream
from rim.config import (
    Config,
    ConfigError,
    CurriculumConfig,
    DataConfig,
    ModelConfig,
    SplitConfig,
    TrainConfig,
)
from rim.trainer import Trainer


def _cfg(**train) -> Config:
    return Config(
        method="rim",
        model=ModelConfig(arch="llama", size="tiny"),
        data=DataConfig(
            train=SplitConfig(generator="chain", size=64, seed=0),
            valid=SplitConfig(generator="chain", size=8, seed=1),
        ),
        curriculum=CurriculumConfig(
            stage1_epochs=None, stage1_steps=3, stage2_epochs=None, stage2_steps=2
        ),
        train=TrainConfig(**({"lr": 1e-3, "batch_size": 8, "warmup": 0.5, "log_every": 1} | train)),
    )


def _losses(out) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


def test_accumulation_is_exact(tmp_path):
    """batch 8 x accumulation 1 == micro-batch 1 x accumulation 8 (same loss trajectory).

    The first loss is computed from identical weights, so only summation order differs;
    later ones follow AdamW updates, which turn rounding-level gradient differences into
    CPU-dependent weight differences, so they are compared loosely (the exact invariant,
    on the accumulated gradient, is tests/test_reliability.py's).
    """
    runs = []
    for micro in (8, 1):
        setup = assemble(_cfg(micro_batch_size=micro), log=lambda *_: None)
        Trainer(setup, tmp_path / f"m{micro}").fit()
        runs.append(_losses(tmp_path / f"m{micro}"))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    assert runs[0] == pytest.approx(runs[1], rel=1e-3)


def test_stage_switch_resets_optimizer_and_warmup(tmp_path):
    setup = assemble(_cfg(stage2_lr=5e-4, stage2_dropout=0.2), log=lambda *_: None)
    trainer = Trainer(setup, tmp_path / "run")
    trainer.fit()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [(r["stage"], r["lr"]) for r in recs if "lr" in r]
    # LambdaLR reports the LR for the next step: stage 1 (3 steps, warm-up 1) then stage 2
    assert lrs[0] == ("stage1", pytest.approx(1e-3))
    assert [s for s, _ in lrs] == ["stage1"] * 3 + ["stage2"] * 2
    assert lrs[-1][1] == pytest.approx(5e-4)  # stage-2 learning rate
    drop = [m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert all(p == 0.2 for p in drop) or not drop
    valid = [r for r in recs if "valid_accuracy" in r]
    assert [r["stage"] for r in valid] == ["stage1", "stage2"]  # validated at each stage end
    assert (tmp_path / "run" / "best" / "rim.json").is_file()
    meta = json.loads((tmp_path / "run" / "best" / "rim.json").read_text())
    assert meta["blocks"] == 8 and meta["mem_tokens"] == 2


def test_cosine_schedule_decays_within_each_stage(tmp_path):
    cfg = _cfg(lr_schedule="cosine", warmup=0.0)
    cfg.curriculum.stage1_steps, cfg.curriculum.stage2_steps = 4, 4
    Trainer(assemble(cfg, log=lambda *_: None), tmp_path / "run").fit()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for stage in ("stage1", "stage2"):
        lrs = [r["lr"] for r in recs if r.get("stage") == stage and "lr" in r]
        # the LR reported after step i is the next step's: cos(pi * i / 4) scaled, reaching 0
        assert lrs == pytest.approx(
            [1e-3 * (1 + math.cos(math.pi * i / 4)) / 2 for i in (1, 2, 3, 4)]
        )
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_example_stream_is_seeded_and_resumable():
    a = ExampleStream(10, seed=3)
    first = a.take(25)
    assert sorted(first[:10]) == list(range(10))  # each epoch is a permutation
    b = ExampleStream(10, seed=3, cursor=7)
    assert b.take(18) == first[7:]


def test_grounding_validations_log_how_well_each_block_spells_its_step(tmp_path, monkeypatch):
    """At every validation of stage 1 (only there) the step readout after each block is decoded
    on the validation examples and scored against step k: "is step t in block t?", over time."""
    import rim.trainer as trainer_module

    seen = []
    real = trainer_module.step_accuracy

    def spy(method, model, valid, batch_size, cue="explain"):
        seen.append((len(valid), cue))
        return real(method, model, valid, batch_size, cue=cue)

    monkeypatch.setattr(trainer_module, "step_accuracy", spy)
    setup = assemble(_cfg(eval_every=1), log=lambda *_: None)
    Trainer(setup, tmp_path / "run").fit()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    report = [r for r in records if "valid_step_accuracy_per_block" in r]
    # stage 1's three validations (eval_every=1), none in stage 2; without the explain cue
    assert seen == [(8, None)] * 3 and [r["step"] for r in report] == [1, 2, 3]
    assert {r["stage"] for r in report} == {"stage1"}
    r = report[-1]
    most = max(len(e.steps) for e in setup.valid)
    assert len(r["valid_step_accuracy_per_block"]) == min(most, setup.method.mem.num_blocks)
    assert all(0.0 <= a <= 1.0 for a in r["valid_step_accuracy_per_block"])
    assert 0.0 <= r["valid_step_accuracy"] <= 1.0


def test_a_signal_while_the_run_is_built_stops_before_training(tmp_path, monkeypatch):
    """SIGTERM during the (slow) build is caught, not fatal: one line, nothing trained or saved."""
    import os
    import signal

    import rim.trainer as trainer_module
    from rim.errors import Preempted

    real = trainer_module.assemble

    def preempted_while_loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets the flag
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "assemble", preempted_while_loading)
    with pytest.raises(Preempted, match="stopped by SIGTERM before training began"):
        trainer_module.train(_cfg(), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def test_stages_that_only_restart_the_optimizer_are_not_validated_at_their_end(
    tmp_path, monkeypatch
):
    """iCoT-SI's stage per removed token: validations at train.eval_every and the end only
    (a CoT decode of the valid split every few steps made its runs ~4x slower)."""
    cfg = _cfg(steps=12, eval_every=5)
    cfg.method = "icot"
    cfg.icot.remove_per_epoch = 8  # 64 examples / 8 = 8 steps an epoch: a token a step
    steps = []
    real = Trainer.validate

    def counted(self, stage):
        steps.append(self.state.global_step)
        return real(self, stage)

    monkeypatch.setattr(Trainer, "validate", counted)
    setup = assemble(cfg, log=lambda *_: None)
    assert len(setup.method.plan(64, 3)) > 3
    Trainer(setup, tmp_path / "run").fit()
    assert steps == [5, 10, 12]
