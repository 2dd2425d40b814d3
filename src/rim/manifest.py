"""Manifests: the size and sha256 of every file of a folder, written last, checked on load.

Every resumable checkpoint and every `best/` and `final/` ends with `manifest.json`. It tells
a complete folder from a half-written one and an intact file from a truncated or flipped one.
It protects against corruption, NOT against tampering: there is no key, so whoever can edit a
file can rewrite its manifest too. What protects a user from a run folder written by someone
else is that rim only ever reads data from it (safetensors, JSON, YAML on typed dataclasses,
a tokenizer's JSON), never code: see docs/reliability.md, "Threat model".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rim.errors import RimError
from rim.io import write_bytes

MANIFEST = "manifest.json"
CHEAP_BYTES = 256 << 20  # below this a folder's hashes are always checked (~0.5 s); above: sizes


def sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, run_id: str | None = None) -> None:
    """Sizes and hashes of every file in `folder`: written last, it marks the folder complete."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    entry = {p.name: {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}
    record = {"format": 1, "run_id": run_id, "files": entry}
    write_bytes(folder / MANIFEST, json.dumps(record, indent=2).encode())


def member(folder: Path, name: object, where: str) -> Path:
    """`folder/name` for a file name read from metadata, refused unless it lies inside `folder`.

    No absolute paths, no `..`, no symlink that leads out: a run folder or export from someone
    else must not make rim read (or hash, or hand to a runtime) a file elsewhere.

    >>> member(Path("ckpt"), "model.onnx", "rim.json").name
    'model.onnx'
    >>> member(Path("ckpt"), "../secret", "rim.json")
    Traceback (most recent call last):
    rim.errors.RimError: rim.json: '../secret' lies outside ckpt (only files inside the folder are read)
    """
    bad = not isinstance(name, str) or not name or Path(name).is_absolute() or "\\" in name
    if not bad:
        path = folder / name
        root = folder.resolve()
        bad = ".." in Path(name).parts or not path.resolve().is_relative_to(root)
    if bad:
        raise RimError(
            f"{where}: {name!r} lies outside {folder} (only files inside the folder are read)"
        )
    return path


def read_manifest(folder: Path) -> dict:
    file = folder / MANIFEST
    if not file.is_file():
        raise RimError(f"{file}: missing (an incomplete checkpoint)")
    try:
        data = json.loads(file.read_bytes())
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise RimError(f"{file}: not a valid manifest") from None
    return data


def check_files(folder: Path, files: dict, hashes: bool = True) -> str | None:
    """None if every listed file is inside `folder`, present, of its size (and hash)."""
    for name, want in files.items():
        try:
            file = member(folder, name, str(folder / MANIFEST))
        except RimError as err:
            return str(err)
        if file.is_symlink() or not file.is_file():
            return f"{file}: missing"
        size = file.stat().st_size
        if size != want.get("size"):
            return f"{file}: {size} bytes, the manifest says {want.get('size')} (truncated?)"
        if hashes and sha256(file) != want.get("sha256"):
            return f"{file}: content differs from the manifest (damaged or edited)"
    return None


def verify_folder(folder: Path, hashes: bool | None = None) -> None:
    """Check a model folder (`best/`, `final/`) against its manifest; one line naming the
    damaged file. Sizes always; hashes when `hashes` (None: when the folder is small).
    A folder without a manifest (written before rim had them) is accepted as it is."""
    if not (folder / MANIFEST).exists():
        return
    files = read_manifest(folder)["files"]
    if hashes is None:
        hashes = sum(int(w.get("size") or 0) for w in files.values()) <= CHEAP_BYTES
    problem = check_files(folder, files, hashes)
    if problem:
        raise RimError(f"{problem}; the checkpoint is damaged (copy it again, or retrain)")
