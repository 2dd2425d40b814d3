"""Atomic writes: a file or folder is complete or absent, and a failed write leaves nothing.

Every write of a run's outputs (checkpoints, `best/`, `final/`, `rim export`, `rim eval
--out`, generated data) goes through `atomic_file` or `atomic_dir`: the content goes to a
temporary sibling, then one rename. On any failure the temporary is removed and the old
content is untouched; an OS error (a full disk, a read-only folder) becomes one `StorageError`
line that names the path and the OS's reason.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from rim.errors import StorageError

# what libraries that write through their own C code say instead of raising OSError
_OS_TEXT = {os.strerror(e).lower(): e for e in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)}


def os_error(exc: BaseException) -> OSError | None:
    """The OS error behind `exc` (its cause chain, or a known strerror in its message)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(exc).lower()
    for message, code in _OS_TEXT.items():
        if message in text or "unexpected pos" in text:  # torch's zip writer on a full disk
            return OSError(code if message in text else errno.ENOSPC, os.strerror(code))
    return None


def storage_error(path: Path, err: OSError) -> StorageError:
    reason = err.strerror or str(err)
    return StorageError(f"{path}: {reason[0].lower() + reason[1:]} (errno {err.errno})")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _guarded(final: Path, tmp: Path, write: Callable[[Path], None]) -> None:
    try:
        write(tmp)
    except BaseException as exc:
        remove(tmp)
        err = os_error(exc)
        if err is not None and not isinstance(exc, StorageError):
            raise storage_error(final, err) from None
        raise


def atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder through `write(tmp)`, then rename it to `final` (replacing an old one).

    The old folder is moved aside only after the new one is complete; a crash between the
    two renames leaves `.NAME.old-PID` (and no `final`), never a half-written `final`.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    remove(tmp)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise storage_error(tmp, err) from None
    _guarded(final, tmp, write)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    except OSError as err:
        remove(tmp)
        if old.exists() and not final.exists():
            old.rename(final)
        raise storage_error(final, err) from None
    remove(old)
    return final


def atomic_file(final: Path, data: bytes | str) -> Path:
    """Write `data` to `final` through a temporary file and `os.replace`."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    raw = data.encode("utf-8") if isinstance(data, str) else data

    _guarded(final, tmp, lambda path: write_bytes(path, raw))
    try:
        os.replace(tmp, final)
    except OSError as err:
        remove(tmp)
        raise storage_error(final, err) from None
    return final


def write_bytes(path: Path, data: bytes) -> None:
    """A plain write into a folder that `atomic_dir` will rename (one place to inject faults)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the data is on disk before the rename that publishes it
