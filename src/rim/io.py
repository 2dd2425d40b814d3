"""Atomic writes: a file or folder is complete or absent, and a failed write leaves nothing.

Every write of a run's outputs (checkpoints, `best/`, `final/`, `rim export`, `rim eval
--out`, generated data) goes through `atomic_file` or `atomic_dir`: the content goes to a
temporary sibling, then one rename. On any failure the temporary is removed and the old
content is untouched; an OS error (a full disk, a read-only folder) becomes one `StorageError`
line that names the path and the OS's reason (exit 74). A path through a regular file
(`--out FILE/x.json`, `--out FILE` for a folder) is bad input instead: one `RimError` line that
names the file in the way (exit 2). Cleanup never raises, so that line is what the user sees.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from rim.errors import RimError, StorageError

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


def storage_error(path: Path, err: OSError) -> RimError:
    """One line for a failed write: a StorageError (exit 74), or a RimError (exit 2) when a
    regular file stands where the path needs a folder: a wrong path, not a failing disk."""
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = _file_in_the_way(Path(path))
        if blocker is not None:
            at = "" if blocker == Path(path) else f" ({blocker} is a file)"
            return RimError(f"{path}: a file stands where a folder is needed{at}")
    reason = err.strerror or str(err)
    return StorageError(f"{path}: {reason[0].lower() + reason[1:]} (errno {err.errno})")


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest of `path` and its parents that exists and is not a folder, if any."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def check_writable(path: Path, is_file: bool = False) -> None:
    """Fail before a long computation, not after it: `path` (a folder, or with `is_file` a
    file; existing or to be created) must be writable by this process. Racy by nature; the
    write itself reports its own failure."""
    path = Path(path)
    folder = path.parent if is_file else path
    near = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    if not near.is_dir():
        raise storage_error(path, OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
    if not os.access(near, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(near).f_flag & os.ST_RDONLY else errno.EACCES
        raise storage_error(near, OSError(code, os.strerror(code)))


def ensure_dir(folder: Path) -> Path:
    """`mkdir -p folder`, an OS error as one line (`storage_error`)."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise storage_error(Path(folder), err) from None
    return Path(folder)


def remove(path: Path) -> None:
    """Best-effort cleanup; never raises, so the error that called for it is the one reported
    (on a read-only file system even unlinking a missing file fails with EROFS)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _guarded(final: Path, tmp: Path, write: Callable[[Path], None]) -> None:
    try:
        write(tmp)
    except BaseException as exc:
        remove(tmp)
        err = os_error(exc)
        if err is not None and not isinstance(exc, RimError):
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
            with contextlib.suppress(OSError):  # else `.NAME.old-PID` stays, as after a crash
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
