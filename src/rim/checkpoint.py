"""Resumable checkpoints: weights, optimizer, LR schedule, RNG, curriculum position, data cursor.

    runs/x/checkpoints/step-00000040/
        weights.safetensors   trainable parameters (all of a model from scratch; LoRA and the
                              new token rows of a pretrained one: the frozen rest is rebuilt
                              from `model.path`)
        optimizer.safetensors optimizer + LR schedule: moments as tensors, the rest as JSON in
                              the header (absent state = at a stage switch)
        rng-<rank>.safetensors python, numpy, torch (and CUDA) generators of every process
        trainer_state.json    stage, step in stage, global step, data cursor, best accuracy,
                              run id and branch
        config.yaml           the recipe, so `rim train --resume runs/x` needs nothing else
        manifest.json         size and sha256 of every file above; written last

No file is a pickle: a checkpoint is data, never code (an old-format `optimizer.pt` /
`rng-<rank>.pt` is read with `weights_only=True`, plain tensors and containers only, or
refused). Written atomically (a temporary folder, then one rename), the last `train.keep_last` of the
run's own lineage kept, so a crash loses at most the work since the last checkpoint. Before
use a checkpoint is verified against its manifest; `--resume RUN` takes the newest intact
checkpoint of RUN's run id and says so when it had to skip a damaged one. A resumed branch
supersedes the abandoned one: when it writes its first checkpoint, the checkpoints past its
resume point (and an abandoned `final/` or later `best/`) move to `RUN/abandoned/`.
A resumed branch logs aside until its first checkpoint; then the old lineage's records past
the resume step move to `abandoned/` too, so a resumed run's `metrics.jsonl` holds exactly
what an uninterrupted one does (and a branch killed before it saved loses nothing of the old), and continues bit-for-bit on the same machine and process
count. Under FSDP every process writes its own shard of weights and optimizer state.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open

from rim.config import Config, save_config
from rim.errors import RimError
from rim.fsdp import local
from rim.io import atomic_dir, atomic_file, os_error, remove, storage_error, write_bytes
from rim.manifest import MANIFEST, check_files, read_manifest, write_manifest
from rim.model import save_meta
from rim.runs import new_run_id, read_run_id

STATE_FILE = "trainer_state.json"
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
    branch_of_checkpoint: str | None = None  # the branch that wrote the resumed checkpoint

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
    tokenizer: object | None = None  # saved beside the weights: `rim eval` can read step N


# ---------------------------------------------------------------- weights and RNG


def _suffix(parts: Parts) -> str:
    """Sharded (FSDP) runs write one weights/optimizer file per process."""
    return f"-{parts.acc.process_index}" if parts.sharded else ""


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by name (shared tensors such as tied embeddings appear once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_weights(model, file: Path) -> None:
    state = {n: local(p).detach().cpu().contiguous() for n, p in _trainable(model).items()}
    write_bytes(file, safetensors.torch.save(state))


def _unreadable(file: Path, err: Exception) -> RimError:
    return RimError(f"{file}: cannot read ({str(err).splitlines()[0][:200]})")


def load_weights(model, file: Path, key: str = "--resume") -> None:
    """The checkpoint's trainable weights into `model` (the same names and shapes, or one
    line naming `key` and the checkpoint)."""
    try:
        saved = safetensors.torch.load_file(file)
    except Exception as err:  # SafetensorError, OSError: a damaged or missing file
        raise _unreadable(file, err) from None
    params = _trainable(model)
    if set(saved) != set(params):
        extra, missing = sorted(set(saved) - set(params)), sorted(set(params) - set(saved))
        raise RimError(
            f"{key} {file.parent}: its weights do not fit the model of this recipe "
            f"(missing {missing[:2]}, unexpected {extra[:2]})"
        )
    with torch.no_grad():
        for name, p in params.items():
            mine = local(p)
            if mine.shape != saved[name].shape:
                raise RimError(
                    f"{key} {file.parent}: {name} has shape {tuple(saved[name].shape)}, "
                    f"the model of this recipe {tuple(mine.shape)}"
                )
            mine.copy_(saved[name])


def _tensor_file(tensors: dict[str, torch.Tensor], record: dict) -> bytes:
    """Tensors and a JSON record in one safetensors file (the record in its header)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return safetensors.torch.save(tensors, metadata={"rim": json.dumps(record)})


def _read_tensor_file(file: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, record) of `_tensor_file`: data only, nothing in it can run."""
    try:
        with safe_open(file, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            record = json.loads((f.metadata() or {})["rim"])
    except Exception as err:  # SafetensorError, OSError, KeyError, ValueError
        raise _unreadable(file, err) from None
    return tensors, record


def _old_format(file: Path):
    """A checkpoint file of rim's earlier pickle format, read without running code from it:
    `weights_only=True` admits tensors and plain containers only (no allow-listed globals)."""
    try:
        return torch.load(file, weights_only=True)
    except Exception:
        raise RimError(
            f"{file}: an old-format (pickle) file that cannot be read as plain data; rim "
            "never unpickles code from a run folder. Resume from a checkpoint written by this "
            "version, or start afresh with --overwrite"
        ) from None


def _plain(value):
    """A JSON-able copy of an optimizer/scheduler value (tuples become lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        raise TypeError("tensors go to the tensor part")
    return value


def _optimizer_bytes(opt_state: dict) -> bytes:
    """optimizer + scheduler state dicts as safetensors (moment tensors) + JSON (the rest)."""
    opt = opt_state["optimizer"]
    tensors, record = {}, {"optimizer": None, "scheduler": _plain(opt_state["scheduler"])}
    if opt is not None:
        state = {}
        for idx, entries in opt["state"].items():
            state[str(idx)] = {}
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"state.{idx}.{name}"] = local(value)
                else:
                    state[str(idx)][name] = _plain(value)
        record["optimizer"] = {"state": state, "param_groups": _plain(opt["param_groups"])}
    return _tensor_file(tensors, record)


def _read_optimizer(file: Path) -> dict:
    """The state dicts `_optimizer_bytes` wrote (or an old-format optimizer.pt beside)."""
    old = file.with_suffix(".pt")
    if not file.is_file() and old.is_file():
        return _old_format(old)
    tensors, record = _read_tensor_file(file)
    opt = record.get("optimizer")
    if opt is not None:
        state = {int(i): dict(v) for i, v in opt["state"].items()}
        for key, t in tensors.items():
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = t
        for group in opt["param_groups"]:
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        opt = {"state": state, "param_groups": opt["param_groups"]}
    return {"optimizer": opt, "scheduler": record.get("scheduler")}


def _rng_bytes() -> bytes:
    """Python, NumPy, torch (and CUDA) generator states: tensors + JSON, no pickle."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    record = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
    }
    return _tensor_file(tensors, record)


def _restore_rng(file: Path) -> None:
    old = file.with_suffix(".pt")
    if not file.is_file() and old.is_file():
        state = _old_format(old)
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        return
    tensors, record = _read_tensor_file(file)
    try:
        version, mt, gauss = record["python"]
        random.setstate((version, tuple(mt), gauss))
        kind, pos, has_gauss, cached = record["numpy"]
        keys = tensors["numpy"].numpy().astype(np.uint32)
        np.random.set_state((kind, keys, pos, has_gauss, cached))
        torch.set_rng_state(tensors["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise _unreadable(file, err) from None
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------- manifest


def verify(folder: Path) -> str | None:
    """None if `folder` matches its manifest, else what is wrong (one line, naming the file)."""
    try:
        files = read_manifest(folder)["files"]
    except RimError as err:
        return str(err)
    if STATE_FILE not in files:
        return f"{folder / MANIFEST}: lists no {STATE_FILE}"
    return check_files(folder, files)


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


def pending_metrics(out: Path, branch: str) -> Path:
    """Where a resumed branch logs until its first checkpoint supersedes the old lineage."""
    return out / f".metrics-branch-{branch}.jsonl"


def supersede(out: Path, resumed_from: int, branch: str) -> list[Path]:
    """Move the abandoned branch's outputs past step `resumed_from` to `out/abandoned/`:
    checkpoints, `final/`, a later `best/`, and its metrics records; the branch's own records
    (logged aside until now, `pending_metrics`) then continue `metrics.jsonl`."""
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
    kept, later = split_metrics(out / METRICS, resumed_from)
    if later:
        aside.mkdir(parents=True, exist_ok=True)
        atomic_file(aside / METRICS, "".join(later))
        moved.append(out / METRICS)
    pending = pending_metrics(out, branch)
    mine = pending.read_text() if pending.is_file() else ""
    atomic_file(out / METRICS, "".join(kept) + mine)
    pending.unlink(missing_ok=True)
    return moved


def set_aside_unsaved_branches(out: Path) -> list[Path]:
    """A branch killed before its first checkpoint superseded nothing: its records (logged
    aside) move to `out/abandoned/unsaved-BRANCH/metrics.jsonl`; `metrics.jsonl` is intact."""
    moved = []
    for pending in sorted(out.glob(".metrics-branch-*.jsonl")):
        branch = pending.name.removeprefix(".metrics-branch-").removesuffix(".jsonl")
        aside = out / "abandoned" / f"unsaved-{branch}"
        aside.mkdir(parents=True, exist_ok=True)
        pending.rename(aside / METRICS)
        moved.append(aside / METRICS)
    return moved


def _write_files(parts: Parts, tmp: Path) -> None:
    """This process's share of the checkpoint."""
    acc, opt = parts.acc, parts.optimizer
    write_bytes(tmp / f"rng-{acc.process_index}.safetensors", _rng_bytes())
    opt_state = {
        "optimizer": opt.state_dict() if opt is not None else None,
        "scheduler": parts.scheduler.state_dict() if opt is not None else None,
    }
    if parts.sharded or acc.is_main_process:
        sfx = _suffix(parts)
        _save_weights(acc.unwrap_model(parts.model), tmp / f"weights{sfx}.safetensors")
        write_bytes(tmp / f"optimizer{sfx}.safetensors", _optimizer_bytes(opt_state))


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
            if parts.tokenizer is not None:
                parts.tokenizer.save_pretrained(tmp)
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
    """A loadable checkpoint (`best/`, `final/`): weights (or adapter), tokenizer, config.yaml,
    rim.json (`meta`) and manifest.json (what `rim eval` and the others verify), atomically.

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
        write_manifest(tmp, meta.get("run", {}).get("id"))  # last: the folder is complete

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


def split_metrics(file: Path, step: int) -> tuple[list[str], list[str]]:
    """(records of steps <= `step`, the later ones) of a metrics.jsonl; a half-written last
    line is dropped."""
    if not file.is_file():
        return [], []
    good = []
    for line in file.read_text().splitlines():
        try:
            good.append((line + "\n", json.loads(line)))
        except json.JSONDecodeError:  # a line half-written by a kill
            continue
    cut = next((i for i, (_, r) in enumerate(good) if r.get("step", 1 << 62) > step), len(good))
    return [line for line, _ in good[:cut]], [line for line, _ in good[cut:]]


def truncate_metrics(file: Path, step: int) -> None:
    """Keep the records of steps <= `step` (and drop a half-written last line)."""
    if file.is_file():
        atomic_file(file, "".join(split_metrics(file, step)[0]))


def read_state(ckpt: Path) -> dict:
    """A checkpoint's trainer_state.json, checked (one line naming the file if not)."""
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
    one). `out/metrics.jsonl` is left as it is: the branch logs aside until its first
    checkpoint supersedes the old lineage (`supersede`). A collective call."""
    acc = parts.acc
    ckpt = latest(Path(folder))
    saved = read_state(ckpt)
    if saved["num_processes"] != acc.num_processes:
        raise RimError(
            f"--resume {ckpt}: saved with {saved['num_processes']} processes, "
            f"resumed with {acc.num_processes}"
        )
    if saved.get("sharded", False) != parts.sharded:
        was, now = ("with" if x else "without" for x in (saved.get("sharded"), parts.sharded))
        raise RimError(f"--resume {ckpt}: saved {was} FSDP, resumed {now} (launch it as before)")
    sfx = _suffix(parts)
    load_weights(acc.unwrap_model(parts.model), ckpt / f"weights{sfx}.safetensors")
    opt_state = _read_optimizer(ckpt / f"optimizer{sfx}.safetensors")
    _restore_rng(ckpt / f"rng-{acc.process_index}.safetensors")
    names = set(TrainState.SAVED) - {"branch"}  # a resume starts a new branch
    state = TrainState(**{k: saved[k] for k in names if saved.get(k) is not None})
    state.resumed_from = state.global_step
    state.branch_of_checkpoint = saved.get("branch")
    return Restored(ckpt, state, opt_state["optimizer"], opt_state["scheduler"])
