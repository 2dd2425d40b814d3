"""Resumable checkpoints: weights, optimizer, LR schedule, RNG, curriculum position, data cursor.

    runs/x/checkpoints/step-00000040/
        weights.safetensors   trainable parameters (all of a model from scratch; LoRA and the
                              new token rows of a pretrained one: the frozen rest is rebuilt
                              from `model.path`)
        optimizer.pt          optimizer + LR schedule (absent state = at a stage switch)
        rng-<rank>.pt         python, numpy, torch (and CUDA) generators of every process
        trainer_state.json    stage, step in stage, global step, data cursor, best accuracy
        config.yaml           the recipe, so `rim train --resume runs/x` needs nothing else

Written atomically (a temporary folder, then one rename), the last `train.keep_last` kept,
so a crash loses at most the work since the last checkpoint. Resuming truncates
`metrics.jsonl` to the checkpoint's step, so a resumed run logs exactly what an
uninterrupted one does, and continues bit-for-bit on the same machine and process count.
Under FSDP every process writes its own shard of weights and optimizer state.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rim.config import save_config
from rim.errors import RimError

STATE_FILE = "trainer_state.json"
METRICS = "metrics.jsonl"


# ---------------------------------------------------------------- weights and RNG


def _sharded(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def _suffix(acc) -> str:
    return f"-{acc.process_index}" if _sharded(acc) else ""


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by name (shared tensors such as tied embeddings appear once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2 DTensor -> this rank's shard


def _save_weights(model, file: Path) -> None:
    state = {n: _local(p).detach().cpu().contiguous() for n, p in _trainable(model).items()}
    save_file(state, file)


def _load_weights(model, file: Path) -> None:
    saved = load_file(file)
    params = _trainable(model)
    if set(saved) != set(params):
        extra, missing = sorted(set(saved) - set(params)), sorted(set(params) - set(saved))
        raise RimError(
            f"--resume {file.parent}: its weights do not fit the model of this recipe "
            f"(missing {missing[:2]}, unexpected {extra[:2]})"
        )
    with torch.no_grad():
        for name, p in params.items():
            local = _local(p)
            if local.shape != saved[name].shape:
                raise RimError(
                    f"--resume {file.parent}: {name} has shape {tuple(saved[name].shape)}, "
                    f"the model of this recipe {tuple(local.shape)}"
                )
            local.copy_(saved[name])


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- save


def save_state(trainer) -> Path:
    """Write `checkpoints/step-N` for `trainer`; a collective call (every process joins)."""
    acc = trainer.acc
    root = trainer.out / "checkpoints"
    final = root / f"step-{trainer.global_step:08d}"
    tmp = root / f".{final.name}.tmp"
    if acc.is_main_process:
        for stale in root.glob(".step-*.tmp"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{acc.process_index}.pt")
    opt = trainer.optimizer
    opt_state = {
        "optimizer": opt.state_dict() if opt is not None else None,
        "scheduler": trainer.scheduler.state_dict() if opt is not None else None,
    }
    if _sharded(acc) or acc.is_main_process:
        sfx = _suffix(acc)
        _save_weights(acc.unwrap_model(trainer.model), tmp / f"weights{sfx}.safetensors")
        torch.save(opt_state, tmp / f"optimizer{sfx}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {
            "stage_index": trainer.stage_index,
            "step_in_stage": trainer.step_in_stage,
            "global_step": trainer.global_step,
            "cursor": trainer.stream.cursor,
            "best": trainer.best,
            "num_processes": acc.num_processes,
        }
        save_config(trainer.cfg, tmp / "config.yaml")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # written last: complete
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        keep = max(trainer.cfg.train.keep_last, 1)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


# ---------------------------------------------------------------- find and load


def find_latest(folder: Path) -> Path | None:
    """`folder` itself if it is a checkpoint, else its newest complete `checkpoints/step-*`."""
    folder = Path(folder)
    if (folder / STATE_FILE).is_file():
        return folder
    found = sorted((folder / "checkpoints").glob("step-*")) or sorted(folder.glob("step-*"))
    found = [f for f in found if (f / STATE_FILE).is_file()]
    return found[-1] if found else None


def latest(folder: Path) -> Path:
    """Like `find_latest`, but a missing checkpoint is the user's error."""
    ckpt = find_latest(folder)
    if ckpt is None:
        raise RimError(f"--resume {folder}: no checkpoint found (no checkpoints/step-*)")
    return ckpt


def resume_config_path(folder: str | Path) -> Path:
    """The recipe to resume `folder` with: the checkpoint's own, else the run folder's."""
    ckpt = latest(Path(folder))
    for candidate in (ckpt / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    raise RimError(f"--resume {folder}: no config.yaml beside the checkpoint; pass --config")


def truncate_metrics(file: Path, step: int) -> None:
    """Keep the records of steps <= `step` (and drop a half-written last line)."""
    if not file.is_file():
        return
    kept = []
    for line in file.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if "step" not in rec or rec["step"] > step:
            break
        kept.append(line + "\n")
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(file)


def load_state(trainer, folder: Path) -> Path:
    """Restore `trainer` from a checkpoint folder (or a run folder: its latest checkpoint)."""
    acc = trainer.acc
    ckpt = latest(Path(folder))
    state = json.loads((ckpt / STATE_FILE).read_text())
    if state["num_processes"] != acc.num_processes:
        raise RimError(
            f"--resume {ckpt}: saved with {state['num_processes']} processes, "
            f"resumed with {acc.num_processes}"
        )
    sfx = _suffix(acc)
    _load_weights(acc.unwrap_model(trainer.model), ckpt / f"weights{sfx}.safetensors")
    trainer.stage_index = state["stage_index"]
    trainer.step_in_stage = state["step_in_stage"]
    trainer.global_step = state["global_step"]
    trainer.stream.cursor = state["cursor"]
    trainer.best = state["best"]
    opt_state = torch.load(ckpt / f"optimizer{sfx}.pt", weights_only=False)
    if opt_state["optimizer"] is not None and trainer.stage_index < len(trainer.plan):
        trainer._new_optimizer(trainer.plan[trainer.stage_index])
        trainer.optimizer.load_state_dict(opt_state["optimizer"])
        trainer.scheduler.load_state_dict(opt_state["scheduler"])
    _set_rng_state(torch.load(ckpt / f"rng-{acc.process_index}.pt", weights_only=False))
    if acc.is_main_process:
        truncate_metrics(trainer.out / METRICS, trainer.global_step)
    acc.wait_for_everyone()
    return ckpt
