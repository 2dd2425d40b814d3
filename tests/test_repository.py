"""A fresh clone on a new machine has only what git tracks: no links out, no machine paths.

A committed `.venv` link to an absolute path once made both README commands fail on every
machine but the one that wrote it; these tests keep that class of fault out.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# an absolute path of some machine: /tmp/..., /root/..., a home folder, a mount or work tree
MACHINE_PATH = re.compile(
    r"(?<![\w.~$-])/(?:tmp|root|home|Users|work|mnt|opt|srv|scratch|private|var/folders)/"
)
# documentation examples may show where a user might put things (`--out /tmp/x`); this
# file's own examples are the pattern's test cases
DOC_EXAMPLES = re.compile(r"^(docs/.*\.md|README\.md|tests/test_repository\.py)$")


def tracked() -> list[tuple[str, str]]:
    """(mode, path) of every tracked file; skips outside a git checkout (e.g. an sdist)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-s", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    rows = []
    for entry in filter(None, out.split("\0")):
        meta, path = entry.split("\t", 1)
        rows.append((meta.split()[0], path))
    return rows


def test_no_tracked_link_points_outside_the_repository() -> None:
    bad = []
    for mode, path in tracked():
        if mode != "120000":  # git's mode for a symbolic link
            continue
        target = os.readlink(ROOT / path) if (ROOT / path).is_symlink() else ""
        resolved = (ROOT / path).parent / target
        if os.path.isabs(target) or not resolved.resolve().is_relative_to(ROOT.resolve()):
            bad.append(f"{path} -> {target}")
    assert not bad, f"tracked links that leave the repository: {bad}"


def test_no_tracked_file_holds_a_machine_path() -> None:
    bad = []
    for mode, path in tracked():
        if mode == "120000" or DOC_EXAMPLES.match(path):
            continue
        try:
            text = (ROOT / path).read_text()
        except (UnicodeDecodeError, OSError):  # binary files (plots) and deleted ones
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                bad.append(f"{path}:{n}: {line.strip()[:80]}")
    assert not bad, "absolute machine paths in tracked files:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("line", "found"),
    [
        ("lrwx .venv -> /tmp/venvtest/.venv", True),
        ('"rim": "/work/main/configs/demo/rim.yaml"', True),
        ("cache in /root/.cache/huggingface", True),
        ("see /home/alice/runs", True),
        ("configs/demo/rim.yaml and runs/tmp/x", False),
        ("https://example.org/tmp/file", False),
        ("~/tmp/ and $HOME/work/ are a user's own", False),
    ],
)
def test_the_machine_path_pattern(line: str, found: bool) -> None:
    assert bool(MACHINE_PATH.search(line)) == found


def test_venv_is_ignored_as_a_folder_and_as_a_link(tmp_path: Path) -> None:
    """`.venv/` in .gitignore matches only a folder: a `.venv` link was committed that way."""
    tracked()  # skips outside a checkout
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    (repo / ".venv").symlink_to(tmp_path / "elsewhere")  # a dangling link
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ".venv" not in status
