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
from rim.io import atomic_file

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


def write_run(folder: Path, run_id: str, config_text: str) -> None:
    """`config.yaml` and `run.json` (its hash, to tell a user's later edit from our copy)."""
    atomic_file(Path(folder) / "config.yaml", config_text)
    record = {"run_id": run_id, "config_sha256": _sha(config_text)}
    atomic_file(Path(folder) / RUN_FILE, json.dumps(record) + "\n")


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


def check_changes(changes: dict[str, list], allowed: list[str], where: str) -> None:
    """Refuse changes not named by `--allow-change KEY` (a key or a whole section)."""

    def ok(key: str) -> bool:
        return any(key == a or key.startswith(a.rstrip(".") + ".") for a in allowed)

    refused = {k: v for k, v in changes.items() if not ok(k)}
    if refused:
        shown = ", ".join(f"{k} ({v[0]!r} -> {v[1]!r})" for k, v in list(refused.items())[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise RimError(
            f"--resume {where}: the recipe differs from the checkpoint's in {shown}{more}; "
            "a resume continues the same recipe (pass --allow-change KEY to change it)"
        )
