"""Resumable checkpoints: weights, optimizer, LR schedule, RNG, curriculum position, data cursor.

Written atomically (a temporary folder, then one rename), the last `train.keep_last` kept,
so a crash loses at most the work since the last checkpoint. `rim train --resume DIR`
continues bit-for-bit on the same machine.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from rim.errors import RimError

STATE_FILE = "trainer_state.json"


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def _save_weights(model, folder: Path) -> None:
    if _is_peft(model):
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(state, folder / "adapter.safetensors")
    else:
        save_model(model, str(folder / "model.safetensors"))  # handles tied weights


def _load_weights(model, folder: Path) -> None:
    if _is_peft(model):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(folder / "adapter.safetensors"))
    else:
        load_model(model, str(folder / "model.safetensors"))


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


def save_state(trainer) -> Path:
    """Write `checkpoints/step-N` for `trainer` (every process writes its own RNG file)."""
    acc = trainer.acc
    root = trainer.out / "checkpoints"
    final = root / f"step-{trainer.global_step:08d}"
    tmp = root / f".{final.name}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        _save_weights(acc.unwrap_model(trainer.model), tmp)
        opt = trainer.optimizer
        torch.save(
            {
                "optimizer": opt.state_dict() if opt is not None else None,
                "scheduler": trainer.scheduler.state_dict() if opt is not None else None,
            },
            tmp / "optimizer.pt",
        )
        state = {
            "stage_index": trainer.stage_index,
            "step_in_stage": trainer.step_in_stage,
            "global_step": trainer.global_step,
            "cursor": trainer.stream.cursor,
            "best": trainer.best,
            "num_processes": acc.num_processes,
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        keep = max(trainer.cfg.train.keep_last, 1)
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def latest(folder: Path) -> Path:
    """`folder` itself if it is a checkpoint, else its newest `checkpoints/step-*`."""
    if (folder / STATE_FILE).is_file():
        return folder
    found = sorted((folder / "checkpoints").glob("step-*")) or sorted(folder.glob("step-*"))
    if not found:
        raise RimError(f"--resume {folder}: no checkpoint found")
    return found[-1]


def load_state(trainer, folder: Path) -> None:
    """Restore `trainer` from a checkpoint folder (or a run folder: its latest checkpoint)."""
    ckpt = latest(folder)
    state = json.loads((ckpt / STATE_FILE).read_text())
    if state["num_processes"] != trainer.acc.num_processes:
        raise RimError(
            f"--resume {ckpt}: saved with {state['num_processes']} processes, "
            f"resumed with {trainer.acc.num_processes}"
        )
    _load_weights(trainer.acc.unwrap_model(trainer.model), ckpt)
    trainer.stage_index = state["stage_index"]
    trainer.step_in_stage = state["step_in_stage"]
    trainer.global_step = state["global_step"]
    trainer.stream.cursor = state["cursor"]
    trainer.best = state["best"]
    opt_state = torch.load(ckpt / "optimizer.pt", weights_only=False)
    if opt_state["optimizer"] is not None and trainer.stage_index < len(trainer.plan):
        trainer._new_optimizer(trainer.plan[trainer.stage_index])
        trainer.optimizer.load_state_dict(opt_state["optimizer"])
        trainer.scheduler.load_state_dict(opt_state["scheduler"])
    _set_rng_state(torch.load(ckpt / f"rng-{trainer.acc.process_index}.pt", weights_only=False))
