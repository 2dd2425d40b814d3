"""Multi-process training, accumulation, mixed precision, and exact resume after SIGKILL.

The two end-to-end tests launch real processes the way a user does (`accelerate launch`,
`rim train`, `rim train --resume`); see docs/reliability.md for the full failure list.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from .conftest import TINY_RECIPE, recipe_file, rim_main

ROOT = Path(__file__).resolve().parents[1]

BASE = TINY_RECIPE
TIMING = ("examples_per_s", "train_s")


recipe = partial(recipe_file, BASE)


def env() -> dict:
    e = dict(os.environ, RIM_NO_PROGRESS="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    e["HF_HUB_OFFLINE"] = "1"
    e.pop("RANK", None)
    return e


def rim_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rim", *args]


def records(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in lines]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(proc: subprocess.Popen, timeout: float = 90) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


# ------------------------------------------------------------------ multi-process


@pytest.mark.slow
def test_two_process_accelerate_matches_one_process(tmp_path: Path, monkeypatch, capsys) -> None:
    """`accelerate launch` with 2 CPU processes (gloo DDP, each accumulating 2 micro-batches)
    gives the loss of a plain 1-process `rim train` with the same global batch."""
    one = recipe(tmp_path, "one.yaml")
    two = recipe(tmp_path, "two.yaml", train={"micro_batch_size": 2})
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs/accelerate/ddp.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "-m",
        "rim",
        "train",
        "--config",
        str(two),
        "--out",
        str(tmp_path / "two"),
    ]
    p2 = subprocess.Popen(
        launch, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    monkeypatch.setenv("RIM_NO_PROGRESS", "1")
    rim_main("train", "--config", str(one), "--out", str(tmp_path / "one"))  # meanwhile
    out2 = finish(p2, timeout=110)
    assert out2.count('"best_valid_accuracy"') == 1  # one result line, not one per process
    ckpts = sorted((tmp_path / "two" / "checkpoints").glob("step-*"))
    assert json.loads((ckpts[-1] / "trainer_state.json").read_text())["num_processes"] == 2
    assert (ckpts[-1] / "rng-1.safetensors").is_file()  # both processes saved their RNG

    def losses(run: str) -> dict[int, float]:
        recs = [r for r in records(tmp_path / run) if "loss" in r]
        steps = [r["step"] for r in recs]
        assert steps == sorted(set(steps)), "each step logged once (only the main process logs)"
        return {r["step"]: r["loss"] for r in recs}

    l1, l2 = losses("one"), losses("two")
    assert sorted(l1) == sorted(l2) == list(range(1, 11))
    # step 1 starts from the same weights: only summation order differs (across processes,
    # the all-reduce adds in another order); later steps follow AdamW updates, which amplify
    # rounding into CPU-dependent differences, so they get a looser bound
    for step in l1:
        tol = 1e-6 if step == 1 else 1e-3
        assert abs(l2[step] - l1[step]) / abs(l1[step]) < tol, (step, l1[step], l2[step])


# ------------------------------------------------------------------ kill and resume


def _latest_state(run: Path) -> dict | None:
    found = sorted((run / "checkpoints").glob("step-*/trainer_state.json"))
    return json.loads(found[-1].read_text()) if found else None


@pytest.mark.slow
def test_sigkill_in_stage1_then_resume_equals_uninterrupted_run(
    tmp_path: Path, monkeypatch
) -> None:
    """SIGKILL mid stage 1, `rim train --resume RUN`: same final weights, best/ and metrics."""
    cfg = recipe(
        tmp_path,
        curriculum={"stage1_steps": 40, "stage2_steps": 6},
        train={"save_every": 5, "keep_last": 2, "dropout": 0.1, "eval_every": 10},
    )
    run = tmp_path / "run"
    victim = subprocess.Popen(
        rim_cmd("train", "--config", str(cfg), "--out", str(run)),
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 90
    while not (run / "checkpoints" / "step-00000005").is_dir():
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    state = _latest_state(run)
    assert state["stage_index"] == 0 and 0 < state["step_in_stage"] < 40  # mid stage 1
    assert not (run / "final").exists()
    (run / "checkpoints" / ".step-00000099.tmp").mkdir()  # a half-written checkpoint

    monkeypatch.setenv("RIM_NO_PROGRESS", "1")
    rim_main("train", "--resume", str(run))  # no --config: the checkpoint carries it
    ref = tmp_path / "ref"
    rim_main("train", "--config", str(cfg), "--out", str(ref))  # uninterrupted
    for folder in ("final", "best"):
        a = load_file(ref / folder / "model.safetensors")
        b = load_file(run / folder / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (folder, k)
    assert records(run) == records(ref)  # loss, lr and validation records, in order
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-00000045", "step-00000046"]  # keep_last=2, no temporary folders


def test_truncate_metrics_drops_later_steps_and_half_lines(tmp_path: Path) -> None:
    from rim.checkpoint import truncate_metrics

    f = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    f.write_text("\n".join(lines[:3] + [lines[3][:9]]))  # killed while writing step 4
    truncate_metrics(f, 2)
    assert f.read_text() == lines[0] + "\n" + lines[1] + "\n"


# ------------------------------------------------------------------ in-process invariants


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps process-wide state (mixed precision); reset it around a test."""
    _reset_accelerate()
    yield
    _reset_accelerate()


def _steps(tmp_path: Path, n: int, accelerator=None, **sections):
    from rim.assembly import assemble
    from rim.config import load_config
    from rim.trainer import Trainer

    cfg = load_config(recipe(tmp_path, f"r{len(list(tmp_path.iterdir()))}.yaml", **sections))
    setup = assemble(cfg, log=lambda *a: None)
    tr = Trainer(setup, tmp_path / "run", accelerator)
    stage = tr.plan[0]
    tr.new_optimizer(stage)
    losses = []
    for _ in range(n):
        losses.append(tr.step(stage))
    return losses, tr.acc.unwrap_model(tr.model)


def _first_gradients(tmp_path: Path, per_micro_batch: bool = False, **sections):
    """(loss, {name: gradient}) of the first optimizer step, as accumulated (before clipping).

    `per_micro_batch`: the accumulation bug this guards against, each micro-batch's loss
    normalised by its own size instead of the global batch.
    """
    from rim.assembly import assemble
    from rim.config import load_config
    from rim.trainer import Trainer

    cfg = load_config(recipe(tmp_path, f"r{len(list(tmp_path.iterdir()))}.yaml", **sections))
    setup = assemble(cfg, log=lambda *a: None)
    if per_micro_batch:
        loss = setup.method.rows_loss  # a micro-batch's rows: one example per row here
        setup.method.rows_loss = lambda m, b, st, p, n, d: loss(m, b, st, p, len(b.input_ids), d)
    tr = Trainer(setup, tmp_path / "run", None)
    stage = tr.plan[0]
    tr.new_optimizer(stage)
    grads: dict[str, torch.Tensor] = {}
    clip = tr.acc.clip_grad_norm_  # the first thing `step` does after the backward passes

    def record_then_clip(*args, **kwargs):
        for name, p in tr.acc.unwrap_model(tr.model).named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.detach().clone()
        return clip(*args, **kwargs)

    tr.acc.clip_grad_norm_ = record_then_clip
    return tr.step(stage), grads


def _relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a|| over all gradients together (a rounding-scale number when equal)."""
    assert a.keys() == b.keys()
    diff = sum(float((a[k] - b[k]).double().square().sum()) for k in a)
    norm = sum(float(a[k].double().square().sum()) for k in a)
    return (diff / norm) ** 0.5


# float32 sums in another order differ by ~1e-7 relative on any x86-64 CPU; a wrong
# normalisation is off by a factor (here 4 micro-batches: relative gap 3.0)
GRAD_RTOL = 1e-4


def test_gradient_accumulation_is_exact(tmp_path: Path) -> None:
    """Global batch 8 in one pass == 4 micro-batches of 2: the same loss and, before the
    optimizer step, the same accumulated gradient (the loss is divided by the global batch).

    Compared before the update on purpose: AdamW divides by the root of the second moment,
    so after a few steps a rounding difference in a tiny gradient becomes a weight
    difference that depends on the CPU's summation order, not on accumulation.
    """
    full_loss, full = _first_gradients(tmp_path)
    acc_loss, acc = _first_gradients(tmp_path, train={"micro_batch_size": 2})
    assert abs(full_loss - acc_loss) / full_loss < 1e-6
    assert len(full) > 10 and _relative_gap(full, acc) < GRAD_RTOL


def test_gradient_accumulation_check_fails_on_a_per_micro_batch_loss(tmp_path: Path) -> None:
    """The check above can fail: normalising each micro-batch by its own size is caught."""
    _, full = _first_gradients(tmp_path)
    _, wrong = _first_gradients(tmp_path, per_micro_batch=True, train={"micro_batch_size": 2})
    assert _relative_gap(full, wrong) > 100 * GRAD_RTOL


def test_bf16_is_autocast_with_fp32_master_weights(tmp_path: Path, fresh_accelerate) -> None:
    from accelerate import Accelerator

    seen = []
    fp32, _ = _steps(tmp_path, 2)
    _reset_accelerate()
    acc = Accelerator(mixed_precision="bf16", cpu=True)
    from rim.assembly import assemble
    from rim.config import load_config
    from rim.trainer import Trainer

    setup = assemble(load_config(recipe(tmp_path, "bf16.yaml")), log=lambda *a: None)
    linear = next(m for m in setup.model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    tr = Trainer(setup, tmp_path / "bf16", acc)
    stage = tr.plan[0]
    tr.new_optimizer(stage)
    bf16 = []
    for _ in range(2):
        bf16.append(tr.step(stage))
    assert seen and set(seen) == {torch.bfloat16}  # matmuls ran in bf16 ...
    assert {p.dtype for p in tr.model.parameters()} == {torch.float32}  # ... weights stay fp32
    for a, b in zip(fp32, bf16):
        assert abs(a - b) / a < 0.05


def test_accelerate_configs_parse() -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    ddp = load_config_from_file(str(ROOT / "configs/accelerate/ddp.yaml"))
    fsdp = load_config_from_file(str(ROOT / "configs/accelerate/fsdp.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.mixed_precision == "no"
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_version"] == 2  # rim.fsdp: per-parameter sharding (LoRA)
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def test_cpu_launch_uses_gloo(monkeypatch) -> None:
    """A multi-process launch on a machine without GPUs must not fall back to 1 process."""
    import rim.trainer as trainer_mod

    seen = {}
    monkeypatch.setattr(trainer_mod, "Accelerator", lambda **kw: seen.update(kw) or kw)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    trainer_mod.make_accelerator("no")
    assert seen["cpu"] is True  # accelerate then picks MULTI_CPU with the gloo backend
    monkeypatch.setenv("WORLD_SIZE", "1")
    trainer_mod.make_accelerator("no")
    assert seen["cpu"] is False


# ------------------------------------------------------------------ layout from examples

_TEXT = st.text(alphabet="0123456789+- ", min_size=1, max_size=12).filter(str.strip)


@pytest.fixture(scope="module")
def rim_method():
    from rim.config import Config, MemoryConfig
    from rim.methods import build
    from rim.model import build_tokenizer

    cfg = Config(memory=MemoryConfig(blocks=4, mem_tokens=2))
    tok = build_tokenizer(["0 1 2 3 4 5 6 7 8 9 + -"])
    return build(cfg, tok)


@settings(max_examples=40, deadline=None)
@given(
    question=_TEXT,
    steps=st.lists(_TEXT, max_size=5),
    answer=_TEXT,
    progress=st.floats(0, 1),
    refine=st.booleans(),
)
def test_any_example_gives_a_method_md_mask(
    rim_method, question, steps, answer, progress, refine
) -> None:
    """Through RiM's own segment builder (tests/test_layout.py checks raw segment trees):
    R_k sees x, m_1..m_k and itself causally; its positions are those of the plain causal
    run `x ++ m_1..m_k ++ R_k`; nothing sees a readout; blocks see x and earlier blocks."""
    from rim.data import Example
    from rim.layout import allowed, pack

    ex = Example(question, tuple(steps), answer)
    stage = rim_method.plan(10, 5)[1 if refine else 0]
    segs = rim_method.segments(ex, stage, progress)
    p = pack(segs, rim_method.eos_id)
    ok = allowed(p)
    seg, kinds = p.segment, [s.kind for s in segs]
    n_x, block_len = len(segs[0].ids), rim_method.mem.block_len
    n_blocks = kinds.count("block")
    assert n_blocks == (4 if refine else len(steps) + 1)
    for i in range(len(p)):
        si = seg[i]
        for j in range(len(p)):
            sj = seg[j]
            if kinds[si] == "readout":
                k = segs[si].parent  # R_k hangs under block k (segment index k)
                want = (sj <= k or sj == si) and j <= i
            else:  # x and blocks: plain causal over x and the blocks
                want = kinds[sj] != "readout" and j <= i
            assert bool(ok[i, j]) == want, (i, j)
    for s, sg in enumerate(segs):
        if sg.kind == "readout":
            first = seg.index(s)
            expect = n_x + sg.parent * block_len
            assert p.position_ids[first : first + len(sg.ids)] == list(
                range(expect, expect + len(sg.ids))
            )
