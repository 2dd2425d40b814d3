"""Markdown report pieces shared by `rim eval`, `rim demo` and `rim bench`.

One number formatter and one table writer, so every table in the repository renders a missing
figure as `-` and lays out its rows the same way.
"""

from __future__ import annotations

from collections.abc import Iterable


def fmt(v, spec: str = ".1f") -> str:
    """`v` formatted with `spec`; `-` for a figure that was not measured (None)."""
    return "-" if v is None else format(v, spec)


def table(header: list[str], rows: Iterable[list[str]]) -> str:
    """A Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def format_table(rows: dict[str, dict], fields: list[tuple[str, str, str]]) -> str:
    """A Markdown table: one row per name; `fields` = (key, header, format)."""
    header = ["method"] + [h for _, h, _ in fields]
    # format(v, "") is str(v): an empty spec prints the value as it is
    cells = (
        [name] + [fmt(r.get(key), spec) for key, _, spec in fields] for name, r in rows.items()
    )
    return table(header, cells)
