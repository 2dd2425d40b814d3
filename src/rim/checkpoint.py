"""Resumable checkpoints: weights, optimizer, LR schedule, RNG, curriculum position, data cursor.

    runs/x/checkpoints/step-00000040/
        weights.safetensors   trainable parameters (all of a model from scratch; LoRA and the
                              new token rows of a pretrained one: the frozen rest is rebuilt
                              from `model.path`)
        optimizer.pt          optimizer + LR schedule (absent state = at a stage switch)
        rng-<rank>.pt         python, numpy, torch (and CUDA) generators of every process
        trainer_state.json    stage, step in stage, global step, data cursor, best accuracy,
                              run id and branch
        config.yaml           the recipe, so `rim train --resume runs/x` needs nothing else
        manifest.json         size and sha256 of every file above; written last

Written atomically (a temporary folder, then one rename), the last `train.keep_last` of the
run's own lineage kept, so a crash loses at most the work since the last checkpoint. Before
use a checkpoint is verified against its manifest; `--resume RUN` takes the newest intact
checkpoint of RUN's run id and says so when it had to skip a damaged one. A resumed branch
supersedes the abandoned one: when it writes its first checkpoint, the checkpoints past its
resume point (and an abandoned `final/` or later `best/`) move to `RUN/abandoned/`.
Resuming truncates `metrics.jsonl` to the checkpoint's step, so a resumed run logs exactly
what an uninterrupted one does, and continues bit-for-bit on the same machine and process
count. Under FSDP every process writes its own shard of weights and optimizer state.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from rim.config import Config, save_config
from rim.errors import RimError
from rim.fsdp import local
from rim.io import atomic_dir, os_error, remove, storage_error, write_bytes
from rim.model import save_meta
from rim.runs import new_run_id, read_run_id

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"


@dataclass
class TrainState:
    """Where a run is: the record `save_state` writes and `load_state` restores.

    `run_id` names the run, `branch` this line of it (saved; a resume starts a new one);
    `resumed_from` and `superseded` are not saved: they describe this branch only.
    """

    stage_index: int = 0
    step_in_stage: int = 0
    global_step: int = 0
    cursor: int = 0  # examples taken from the seeded stream
    best: float = -1.0  # best validation accuracy of a stage that may write best/
    train_s: float = 0.0  # training seconds up to this checkpoint, summed over resumes
    run_id: str = field(default_factory=new_run_id)
    branch: str = field(default_factory=new_run_id)
    resumed_from: int | None = None  # step of the checkpoint this branch resumed
    superseded: bool = False  # the abandoned branch's later outputs moved aside

    SAVED = (
        "stage_index", "step_in_stage", "global_step", "cursor", "best", "train_s", "run_id",
        "branch",
    )  # fmt: skip

    def saved(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in self.SAVED}


@dataclass
class Parts:
    """What a resumable checkpoint holds besides the state; `optimizer` None between stages."""

    acc: object  # accelerate.Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object | None = None
    sharded: bool = False  # FSDP: every process writes its own shard


# ---------------------------------------------------------------- weights and RNG


def _suffix(parts: Parts) -> str:
    """Sharded (FSDP) runs write one weights/optimizer file per process."""
    return f"-{parts.acc.process_index}" if parts.sharded else ""


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by name (shared tensors such as tied embeddings appear once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _torch_bytes(obj) -> bytes:
    """torch.save to memory: a full disk then fails in a plain write (an OSError we can name)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _save_weights(model, file: Path) -> None:
    state = {n: local(p).detach().cpu().contiguous() for n, p in _trainable(model).items()}
    write_bytes(file, safetensors.torch.save(state))


def _unreadable(file: Path, err: Exception) -> RimError:
    return RimError(f"{file}: cannot read ({str(err).splitlines()[0][:200]})")


def _load_weights(model, file: Path) -> None:
    try:
        saved = safetensors.torch.load_file(file)
    except Exception as err:  # SafetensorError, OSError: a damaged or missing file
        raise _unreadable(file, err) from None
    params = _trainable(model)
    if set(saved) != set(params):
        extra, missing = sorted(set(saved) - set(params)), sorted(set(params) - set(saved))
        raise RimError(
            f"--resume {file.parent}: its weights do not fit the model of this recipe "
            f"(missing {missing[:2]}, unexpected {extra[:2]})"
        )
    with torch.no_grad():
        for name, p in params.items():
            mine = local(p)
            if mine.shape != saved[name].shape:
                raise RimError(
                    f"--resume {file.parent}: {name} has shape {tuple(saved[name].shape)}, "
                    f"the model of this recipe {tuple(mine.shape)}"
                )
            mine.copy_(saved[name])


def _torch_load(file: Path):
    try:
        return torch.load(file, weights_only=False)
    except Exception as err:
        raise _unreadable(file, err) from None


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


# ---------------------------------------------------------------- manifest


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, run_id: str | None = None) -> None:
    """Sizes and hashes of every file in `folder`: written last, it marks the folder complete."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    entry = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    record = {"format": 1, "run_id": run_id, "files": entry}
    write_bytes(folder / MANIFEST, json.dumps(record, indent=2).encode())


def _read_manifest(folder: Path) -> dict:
    file = folder / MANIFEST
    if not file.is_file():
        raise RimError(f"{file}: missing (an incomplete checkpoint)")
    try:
        data = json.loads(file.read_bytes())
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise RimError(f"{file}: not a valid manifest") from None
    return data


def verify(folder: Path) -> str | None:
    """None if `folder` matches its manifest, else what is wrong (one line, naming the file)."""
    try:
        files = _read_manifest(folder)["files"]
    except RimError as err:
        return str(err)
    if STATE_FILE not in files:
        return f"{folder / MANIFEST}: lists no {STATE_FILE}"
    for name, want in files.items():
        file = folder / name
        if not file.is_file():
            return f"{file}: missing"
        size = file.stat().st_size
        if size != want.get("size"):
            return f"{file}: {size} bytes, the manifest says {want.get('size')} (truncated?)"
        if _sha256(file) != want.get("sha256"):
            return f"{file}: content differs from the manifest (damaged or edited)"
    return None


# ---------------------------------------------------------------- save


def _step_of(ckpt: Path) -> int:
    try:
        return int(ckpt.name.removeprefix("step-"))
    except ValueError:
        return -1


def _run_id_of(ckpt: Path) -> str | None:
    try:
        return json.loads((ckpt / MANIFEST).read_bytes()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _written_by(folder: Path) -> dict:
    try:
        return json.loads((folder / "rim.json").read_text()).get("run", {})
    except (OSError, ValueError, AttributeError):
        return {}


def supersede(out: Path, resumed_from: int, branch: str) -> list[Path]:
    """Move the abandoned branch's outputs past step `resumed_from` to `out/abandoned/`."""
    moved = []
    aside = out / "abandoned" / f"after-step-{resumed_from:08d}-{branch}"
    for ckpt in sorted((out / "checkpoints").glob("step-*")):
        if _step_of(ckpt) > resumed_from:
            moved.append(ckpt)
    for name in ("final", "best"):
        by = _written_by(out / name)
        later = by.get("step", 1 << 62) > resumed_from or name == "final"
        if (out / name).is_dir() and by.get("branch") != branch and later:
            moved.append(out / name)
    for path in moved:
        aside.mkdir(parents=True, exist_ok=True)
        path.rename(aside / path.name)
    return moved


def _write_files(parts: Parts, tmp: Path) -> None:
    """This process's share of the checkpoint."""
    acc, opt = parts.acc, parts.optimizer
    write_bytes(tmp / f"rng-{acc.process_index}.pt", _torch_bytes(_rng_state()))
    opt_state = {
        "optimizer": opt.state_dict() if opt is not None else None,
        "scheduler": parts.scheduler.state_dict() if opt is not None else None,
    }
    if parts.sharded or acc.is_main_process:
        sfx = _suffix(parts)
        _save_weights(acc.unwrap_model(parts.model), tmp / f"weights{sfx}.safetensors")
        write_bytes(tmp / f"optimizer{sfx}.pt", _torch_bytes(opt_state))


def _failed(tmp: Path, exc: BaseException) -> BaseException:
    """Remove the half-written checkpoint; an OS error becomes one line naming the path."""
    remove(tmp)
    err = os_error(exc)
    return storage_error(tmp, err) if err is not None else exc


def save_state(out: Path, state: TrainState, parts: Parts, cfg: Config) -> Path:
    """Write `out/checkpoints/step-N`; a collective call (every process joins)."""
    acc = parts.acc
    root = out / "checkpoints"
    final = root / f"step-{state.global_step:08d}"
    tmp = root / f".{final.name}.tmp"
    main = acc.is_main_process
    if main:
        if state.resumed_from is not None and not state.superseded:
            supersede(out, state.resumed_from, state.branch)
            state.superseded = True
        for stale in root.glob(".step-*.tmp"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as err:
            raise storage_error(tmp, err) from None
    acc.wait_for_everyone()
    try:
        _write_files(parts, tmp)
    except BaseException as exc:
        raise _failed(tmp, exc) from None
    acc.wait_for_everyone()
    if main:
        record = state.saved() | {"num_processes": acc.num_processes, "sharded": parts.sharded}
        try:
            save_config(cfg, tmp / "config.yaml")
            write_bytes(tmp / STATE_FILE, json.dumps(record, indent=2).encode())
            write_manifest(tmp, state.run_id)  # written last: complete
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except BaseException as exc:
            raise _failed(tmp, exc) from None
        for old in lineage(out, state.run_id)[max(cfg.train.keep_last, 1) :]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def save_model(
    path: Path, model, tokenizer, cfg: Config, meta: dict, method, state_dict: dict | None = None
) -> None:
    """A loadable checkpoint (`best/`, `final/`): weights (or adapter), tokenizer, config.yaml
    and rim.json (`meta`), written atomically.

    `state_dict`: the gathered full weights when the model is sharded (FSDP); `method`
    writes its own modules (CODI's projection) beside them.
    """

    def write(tmp: Path) -> None:
        extra = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
        # the adapter's trainable-token rows hold the new embeddings; the rest is the base's
        method.save_modules(model, tmp, state_dict)  # before: HF prunes state_dict
        model.save_pretrained(tmp, state_dict=state_dict, **extra)
        tokenizer.save_pretrained(tmp)
        save_config(cfg, tmp / "config.yaml")
        save_meta(tmp, meta)

    atomic_dir(path, write)


# ---------------------------------------------------------------- find and load


def is_checkpoint(folder: Path) -> bool:
    return (folder / MANIFEST).exists() or (folder / STATE_FILE).exists()


def lineage(run: Path, run_id: str | None = None) -> list[Path]:
    """`run`'s checkpoints of run id `run_id` (default: run.json's), newest first.

    A checkpoint whose manifest is unreadable stays in the list (verification reports it).
    """
    run = Path(run)
    run_id = run_id or read_run_id(run)
    found = sorted((run / "checkpoints").glob("step-*"), key=_step_of, reverse=True)
    if not found:
        found = sorted(run.glob("step-*"), key=_step_of, reverse=True)
    if run_id is None:
        return found
    return [c for c in found if _run_id_of(c) in (run_id, None)]


def find_latest(folder: Path) -> Path | None:
    """`folder` itself if it is an intact checkpoint, else its newest intact one (or None)."""
    folder = Path(folder)
    if is_checkpoint(folder):
        return folder if verify(folder) is None else None
    return next((c for c in lineage(folder) if verify(c) is None), None)


def warn(line: str) -> None:
    print(f"rim: warning: {line}", file=sys.stderr)


def resolve(folder: str | Path, report=warn) -> Path:
    """The checkpoint `--resume folder` continues from, verified.

    A checkpoint folder must be intact. For a run folder, damaged checkpoints are skipped
    (newest first) and reported in one line naming the file and the checkpoint used instead.
    """
    folder = Path(folder)
    if is_checkpoint(folder):
        problem = verify(folder)
        if problem:
            raise RimError(f"--resume {folder}: {problem}")
        return folder
    bad = []
    for ckpt in lineage(folder):
        problem = verify(ckpt)
        if problem is None:
            if bad:
                more = f" (and {len(bad) - 1} more damaged)" if len(bad) > 1 else ""
                report(f"{bad[0]}{more}; resuming from {ckpt} instead")
            return ckpt
        bad.append(problem)
    if bad:
        raise RimError(f"--resume {folder}: no intact checkpoint ({bad[0]})")
    raise RimError(f"--resume {folder}: no checkpoint found (no checkpoints/step-*)")


def latest(folder: Path) -> Path:
    """Like `find_latest`, but a missing or damaged checkpoint is the user's error."""
    return resolve(folder, report=lambda line: None)


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


def _read_state(ckpt: Path) -> dict:
    file = ckpt / STATE_FILE
    try:
        state = json.loads(file.read_bytes())
    except (OSError, ValueError) as err:
        raise _unreadable(file, err) from None
    need = ("stage_index", "step_in_stage", "global_step", "cursor", "best", "num_processes")
    missing = [k for k in need if not isinstance(state, dict) or k not in state]
    if missing:
        raise RimError(f"{file}: missing key {missing[0]!r}")
    return state


@dataclass
class Restored:
    """A loaded checkpoint: its folder, the state, and the optimizer and LR-schedule state
    dicts (None at a stage switch: the trainer builds a fresh optimizer)."""

    checkpoint: Path
    state: TrainState
    optimizer: dict | None
    scheduler: dict | None


def load_state(folder: Path, out: Path, parts: Parts) -> Restored:
    """Weights and RNG restored from a checkpoint folder (or a run folder: its newest intact
    one); `out/metrics.jsonl` truncated to its step. A collective call."""
    acc = parts.acc
    ckpt = latest(Path(folder))
    saved = _read_state(ckpt)
    if saved["num_processes"] != acc.num_processes:
        raise RimError(
            f"--resume {ckpt}: saved with {saved['num_processes']} processes, "
            f"resumed with {acc.num_processes}"
        )
    if saved.get("sharded", False) != parts.sharded:
        was, now = ("with" if x else "without" for x in (saved.get("sharded"), parts.sharded))
        raise RimError(f"--resume {ckpt}: saved {was} FSDP, resumed {now} (launch it as before)")
    sfx = _suffix(parts)
    _load_weights(acc.unwrap_model(parts.model), ckpt / f"weights{sfx}.safetensors")
    opt_state = _torch_load(ckpt / f"optimizer{sfx}.pt")
    _set_rng_state(_torch_load(ckpt / f"rng-{acc.process_index}.pt"))
    names = set(TrainState.SAVED) - {"branch"}  # a resume starts a new branch
    state = TrainState(**{k: saved[k] for k in names if saved.get(k) is not None})
    state.resumed_from = state.global_step
    if acc.is_main_process:
        truncate_metrics(out / METRICS, state.global_step)
    acc.wait_for_everyone()
    return Restored(ckpt, state, opt_state["optimizer"], opt_state["scheduler"])
