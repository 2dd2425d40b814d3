"""One run per folder: a lock, a run id, and the rules for starting or continuing a run.

    rim train --config C --out RUN                    # RUN must be new (or hold no run)
    rim train --config C --out RUN --overwrite        # start afresh: old outputs removed first
    rim train --resume RUN                            # continue RUN's own lineage
    rim train --config C --out RUN --resume-if-exists # a requeued job: continue or start

`RUN/.lock` is locked (`flock`) by the training process for its whole life, so a second
`rim train` into a live run refuses; the OS drops the lock of a dead process, so a stale lock
never blocks. `RUN/run.json` names the run id that every checkpoint of the run records.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from rim.errors import RimError
from rim.io import atomic_file, remove

LOCK = ".lock"
RUN_FILE = "run.json"
# what a run writes; --overwrite removes exactly these (never other files in the folder)
OUTPUTS = (
    "checkpoints", "abandoned", "best", "final", "metrics.jsonl", "config.yaml", RUN_FILE,
    "tracking",  # rim.tracking: the trackers' files
)  # fmt: skip

_held: dict[str, int] = {}  # run folder -> open lock descriptor (kept for the process life)


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def has_run(folder: Path) -> bool:
    """Does `folder` hold another run's outputs (checkpoints, metrics, best/ or final/)?"""
    return any((Path(folder) / name).exists() for name in OUTPUTS)


def lock(folder: Path) -> None:
    """Hold `folder/.lock` until this process exits; refuse if a live process holds it."""
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise _busy(folder, holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd


def check_unlocked(folder: Path) -> None:
    """Refuse at once (before a slow build) if a live process holds `folder/.lock`."""
    if str(Path(folder).resolve()) in _held:
        return
    try:
        fd = os.open(Path(folder) / LOCK, os.O_RDWR)
    except OSError:
        return  # no lock file: nobody is writing here
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        raise _busy(folder, holder) from None
    finally:
        os.close(fd)


def _busy(folder: Path, holder: str) -> RimError:
    return RimError(f"--out {folder}: another rim train (pid {holder}) is writing this run folder")


def unlock(folder: Path) -> None:
    fd = _held.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def refuse_existing(folder: Path) -> None:
    if has_run(folder):
        raise RimError(
            f"--out {folder}: already holds a run; continue it with --resume {folder}, "
            "or start afresh with --overwrite"
        )


def clear(folder: Path) -> None:
    """--overwrite: remove the old run's outputs (before anything new is written)."""
    for name in OUTPUTS:
        path = Path(folder) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _run_record(folder: Path) -> dict:
    try:
        data = json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_run_id(folder: Path) -> str | None:
    """The id in `folder/run.json` (None for a folder without one, or a run from before ids)."""
    run_id = _run_record(folder).get("run_id")
    return run_id if isinstance(run_id, str) else None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_run(folder: Path, run_id: str, config_text: str, branch: str | None = None) -> None:
    """`config.yaml` and `run.json`: its hash (to tell a user's later edit from our copy) and
    every branch that trained in this folder with its recipe's hash (`check_lineage`)."""
    atomic_file(Path(folder) / "config.yaml", config_text)
    old = _run_record(folder)
    branches = old.get("branches", {}) if old.get("run_id") == run_id else {}
    branches = dict(branches) if isinstance(branches, dict) else {}
    if branch is not None:
        branches[branch] = _sha(config_text)
    record = {"run_id": run_id, "config_sha256": _sha(config_text), "branches": branches}
    atomic_file(Path(folder) / RUN_FILE, json.dumps(record) + "\n")


def check_lineage(folder: Path, ckpt: Path, run_id: str, branch: str | None) -> None:
    """Refuse a checkpoint of this run's id that this folder's lineage never wrote (a folder
    copied from this one, trained on with another recipe, then copied back), or whose recipe
    is not the one its branch trained with. Runs from before branches were recorded pass."""
    record = _run_record(folder)
    branches = record.get("branches")
    if record.get("run_id") != run_id or not isinstance(branches, dict) or not branches:
        return
    if branch not in branches:
        raise RimError(
            f"--resume {ckpt}: written by branch {branch} of run {run_id}, which never trained "
            f"in {folder} (copied in from another folder?); resume it in its own folder"
        )
    try:
        text = (Path(ckpt) / "config.yaml").read_text()
    except OSError:
        text = ""
    if _sha(text) != branches[branch]:
        raise RimError(
            f"--resume {ckpt}: its config.yaml is not the recipe branch {branch} trained with "
            "(edited or copied in); resume from an untouched checkpoint"
        )


def finished(folder: Path) -> bool:
    """Did the run in `folder` end (its `done` record in metrics.jsonl, or `final/`)?"""
    if (Path(folder) / "final" / "rim.json").is_file():
        return True
    try:
        lines = (Path(folder) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return False
    return any('"event": "done"' in line for line in lines[-3:])


def clean_temporaries(folder: Path) -> list[str]:
    """Remove what a killed process left in `folder` (`.NAME.tmp-PID`, `.step-N.tmp`); a
    `.NAME.old-PID` whose `NAME` is missing (a kill between atomic_dir's two renames) is put
    back as `NAME`. Called under the run's lock, so no live writer owns these. Returns names."""
    done = []
    for root in (Path(folder), Path(folder) / "checkpoints"):
        if not root.is_dir():
            continue
        for path in sorted(root.iterdir()):
            name = path.name
            if not name.startswith(".") or name == LOCK:
                continue
            if ".old-" in name:
                target = root / name[1:].rsplit(".old-", 1)[0]
                if not target.exists():
                    path.rename(target)
                    done.append(f"{path.name} -> {target.name}")
                    continue
            elif ".tmp" not in name:
                continue
            remove(path)
            done.append(path.name)
    return done


def edited_config(folder: Path) -> Path | None:
    """`folder/config.yaml` if the user edited it after the run wrote it, else None."""
    file = Path(folder) / "config.yaml"
    want = _run_record(folder).get("config_sha256")
    if not want or not file.is_file():
        return None
    return file if _sha(file.read_text()) != want else None


# ---------------------------------------------------------------- same recipe on resume


def flatten(data: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, requested: dict) -> dict[str, list]:
    """Keys whose values differ: {key: [saved, requested]}."""
    a, b = flatten(saved), flatten(requested)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


# what a resume can change and the trainer then applies from the resume step (rim.trainer:
# the optimizer groups and LR schedule are rebased, stages extended); everything else (the
# model, method, data, memory, seed, batch) would silently not apply or mix two runs
CHANGEABLE = (
    "train.lr", "train.stage2_lr", "train.weight_decay", "train.warmup", "train.lr_schedule",
    "train.grad_clip", "train.dropout", "train.stage2_dropout", "train.steps", "train.epochs",
    "train.micro_batch_size", "train.eval_every", "train.log_every", "train.save_every",
    "train.keep_last", "train.threads", "train.report_to", "train.tracking_project",
    "curriculum.stage1_steps", "curriculum.stage1_epochs", "curriculum.stage2_steps",
    "curriculum.stage2_epochs", "eval.", "data.valid.",
)  # fmt: skip


def changeable(key: str) -> bool:
    return any(key == c or (c.endswith(".") and key.startswith(c)) for c in CHANGEABLE)


def check_changes(changes: dict[str, list], allowed: list[str], where: str) -> None:
    """Refuse changes not named by `--allow-change KEY` (a key or a whole section), and
    named ones the trainer cannot apply from the resume step."""

    def ok(key: str) -> bool:
        return any(key == a or key.startswith(a.rstrip(".") + ".") for a in allowed)

    fixed = [k for k in changes if ok(k) and not changeable(k)]
    if fixed:
        keys = ", ".join(c.rstrip(".") + (".*" if c.endswith(".") else "") for c in CHANGEABLE)
        raise RimError(
            f"--allow-change: {fixed[0]} cannot change on resume ({changes[fixed[0]][0]!r} -> "
            f"{changes[fixed[0]][1]!r}); start a new run for it. Changeable: {keys}"
        )

    refused = {k: v for k, v in changes.items() if not ok(k)}
    if refused:
        shown = ", ".join(f"{k} ({v[0]!r} -> {v[1]!r})" for k, v in list(refused.items())[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise RimError(
            f"--resume {where}: the recipe differs from the checkpoint's in {shown}{more}; "
            "a resume continues the same recipe (pass --allow-change KEY to change it)"
        )
