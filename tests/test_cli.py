"""The command line documents itself: a version, and help text on every option."""

from __future__ import annotations

import pytest

from rim import __version__
from rim.cli import main, parser


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"rim {__version__}"


def test_every_option_has_help() -> None:
    commands = parser()._subparsers._group_actions[0].choices  # argparse's sub-commands
    bare = [
        f"rim {name} {a.option_strings[0] if a.option_strings else a.dest}"
        for name, sub in commands.items()
        for a in sub._actions
        if not a.help and a.dest != "help"
    ]
    assert not bare, f"options without help text: {bare}"
