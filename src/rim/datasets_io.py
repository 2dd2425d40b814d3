"""Hugging Face `datasets` sources: a split from a local folder or parquet/arrow/CSV/JSON files.

    data:
      train: {path: data/train.parquet, columns: {question: problem, answer: solution}}
      valid: {path: data/saved, split: validation}            # a save_to_disk DatasetDict
      test:  {path: data/test.jsonl, format: datasets, steps_sep: "\\n"}

A path is a `datasets` source when `format: datasets`, or when it is a folder or ends in
`.parquet`, `.arrow` or `.csv` (JSON and JSONL stay rim's own reader unless `format:
datasets`). A `save_to_disk` folder is read with `datasets.load_from_disk`, any other folder
(a dataset repository's files, e.g. `data/train-00000-of-00002.parquet`) and files with
`datasets.load_dataset`; a glob such as `data/train-*.parquet` names several files.
Nothing is downloaded: these are local files, and the builders are the ones `datasets` ships.

`columns` maps rim's fields (question, steps, answer and the optional step_sep) to the
source's columns; unmapped fields are read from columns of the same name. Steps are a list
column of strings, or a text column split by `steps_sep`; `columns: {steps: null}` reads no
steps (an answer-only test set). Every record is checked like rim's own readers check theirs,
and a bad one is a one-line `DataError` naming the source and the row, counted from 0 as
`dataset[row]` counts: `data/x.parquet: row 3: column 'solution' (answer) must be a string`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rim import progress
from rim.data import Example, _Bad, _checked, _split_steps
from rim.errors import DataError, RimError

EXTRA = "pip install 'rim[data]'"
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}
BUILDERS[".jsonl"] = "json"
DETECTED = (".parquet", ".arrow", ".csv")  # suffixes read through `datasets` under `auto`
_GLOB = set("*?[")
_FIELDS = {"question": "question", "steps": "steps", "answer": "answer", "step_sep": "step_sep"}


def is_source(path: str, format: str) -> bool:
    """Is `path` (with this `format`) read through `datasets` rather than rim's own readers?"""
    if format == "datasets":
        return True
    if format != "auto":
        return False
    return Path(path).suffix.lower() in DETECTED or Path(path).is_dir()


def _datasets():
    try:
        import datasets
    except ImportError:
        raise RimError(f"reading a datasets source needs `datasets` ({EXTRA})") from None
    return datasets


@contextlib.contextmanager
def _quiet(datasets) -> Iterator[None]:
    """No redrawn `datasets` bars in a log (rim.progress): one would be one endless line."""
    was = datasets.is_progress_bar_enabled()
    if not progress.live():
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def _pick_split(found: Any, where: str, split: str | None) -> Any:
    """The one split asked for (or the only one) of a DatasetDict; a Dataset as it is."""
    if not hasattr(found, "keys"):
        if split is not None:
            raise DataError(f"{where}: a single dataset has no splits; remove split: {split}")
        return found
    names = list(found.keys())
    if split is None and len(names) == 1:
        return found[names[0]]
    if split is None or split not in found:
        ask = "set split to one of" if split is None else f"no split {split!r}; it has"
        raise DataError(f"{where}: {ask} {', '.join(names)}")
    return found[split]


def _open(path: str, where: str, split: str | None, text: list[str]) -> Any:
    """The source as one `datasets.Dataset`; unreadable input is a DataError naming it.

    CSV has no types, so the `text` columns are read as written (pandas would make an
    answer `007` the integer 7)."""
    datasets = _datasets()
    p = Path(path)
    globbed = bool(_GLOB & set(path))
    if not globbed and not p.exists():
        raise DataError(f"{where}: no such file or folder")
    try:
        with _quiet(datasets):
            if p.is_dir() and any((p / f).is_file() for f in ("state.json", "dataset_dict.json")):
                return _pick_split(datasets.load_from_disk(path), where, split)
            if p.is_dir():  # a folder of data files: `datasets` infers the builder and splits
                return _pick_split(datasets.load_dataset(path), where, split)
            builder = BUILDERS.get(p.suffix.lower())
            if builder is None:
                known = ", ".join(BUILDERS)
                raise DataError(f"{where}: no datasets builder for '{p.suffix}' files ({known})")
            if split is not None:
                raise DataError(f"{where}: files make one split; remove split: {split}")
            csv = {"converters": dict.fromkeys(text, str)} if builder == "csv" else {}
            return datasets.load_dataset(builder, data_files=path, split="train", **csv)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{where}: cannot read it with datasets: {first}") from None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(row: dict, field: str, columns: dict[str, str]) -> str:
    value = row[field]
    if not isinstance(value, str):
        name = f"column {columns[field]!r}{_alias(field, columns)}"
        raise _Bad(f"{name} must be a string, got {_kind(value)}")
    return value


def _alias(field: str, columns: dict[str, str]) -> str:
    return f" ({field})" if columns[field] != field else ""


def _steps(row: dict, columns: dict[str, str], steps_sep: str | None) -> tuple[tuple, str]:
    """(steps, their separator): a list column as it is, a text column split."""
    if columns.get("steps") is None:
        return (), " "
    value, name = row["steps"], f"column {columns['steps']!r}{_alias('steps', columns)}"
    if steps_sep is not None:
        if not isinstance(value, str):
            raise _Bad(f"{name} must be a string (steps_sep is set), got {_kind(value)}")
        return _split_steps(value, steps_sep, row["question"])
    if not isinstance(value, list):
        hint = " (set steps_sep to split a text column)" if isinstance(value, str) else ""
        raise _Bad(f"{name} must be a list of strings, got {_kind(value)}{hint}")
    for i, step in enumerate(value):
        if not isinstance(step, str):
            raise _Bad(f"{name} item {i} must be a string, got {_kind(step)}")
    if row.get("step_sep") is None:  # no column, or a record without one: one space
        return tuple(value), " "
    return tuple(value), _text(row, "step_sep", columns)


def _example(row: dict, columns: dict[str, str], steps_sep: str | None) -> Example:
    question = _text(row, "question", columns)
    answer = _text(row, "answer", columns)
    steps, sep = _steps(row, columns, steps_sep)
    return _checked(question, steps, answer, sep)


def _column_map(ds: Any, where: str, mapped: dict, key: str) -> dict[str, str]:
    """rim field -> the source's column (None: not read); a missing column is an error that
    names the columns the source does have and the recipe key that maps one."""
    names = list(ds.column_names)
    columns = _FIELDS | dict(mapped)
    if "step_sep" not in mapped and "step_sep" not in names:
        columns["step_sep"] = None  # optional: rim's own JSONL keeps a non-space separator
    for field, column in columns.items():
        if column is not None and column not in names:
            how = f"{key}.columns.{field}" if key.startswith("data.") else "data.<split>.columns"
            raise DataError(
                f"{where}: no column {column!r} for {field} (columns: {', '.join(names)}; "
                f"map one with {how})"
            )
    return columns


def read_dataset(
    path: str,
    columns: dict | None = None,
    steps_sep: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    key: str = "data.<split>",
) -> list[Example]:
    """Up to `limit` examples from a `datasets` source (see the module docstring); `key`
    is the recipe's name for the split, for the hints in errors."""
    where = str(path)
    wanted = _FIELDS | dict(columns or {})
    ds = _open(str(path), where, split, [c for c in wanted.values() if c is not None])
    cols = _column_map(ds, where, columns or {}, key)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    used = sorted({c for c in cols.values() if c is not None})
    table = ds.select_columns(used).to_dict()  # whole columns: one conversion each
    out = []
    for i in range(len(ds)):
        row = {f: table[c][i] for f, c in cols.items() if c is not None}
        try:
            out.append(_example(row, cols, steps_sep))
        except _Bad as e:
            raise DataError(f"{where}: row {i}: {e}") from None
    if not out:
        raise DataError(f"{where}: no examples")
    return out
