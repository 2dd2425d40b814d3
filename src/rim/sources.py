"""Where a split's examples come from: rim's own files and generators (rim.data) or a
Hugging Face `datasets` source (rim.datasets_io), chosen from the split's path and format.

rim.data stays free of `datasets` (an optional extra), so the choice is made here, above
both readers; training, `rim eval` and the demo all load their splits through `load_split`.
"""

from __future__ import annotations

from rim import datasets_io
from rim.config import SplitConfig
from rim.data import FORMATS, Example, native_split, read_examples
from rim.errors import ConfigError, DataError


def read_path(
    path: str,
    format: str = "auto",
    limit: int | None = None,
    *,
    columns: dict | None = None,
    steps_sep: str | None = None,
    split: str | None = None,
    key: str = "data.<split>",
) -> list[Example]:
    """Examples from one data file or folder, in any format rim reads (`rim eval --data`)."""
    if format not in (*FORMATS, "datasets"):
        known = ", ".join((*FORMATS, "datasets"))
        raise DataError(f"{path}: unknown format {format!r} (expected one of {known})")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"data.limit: must be a positive int or null, got {limit!r}")
    if datasets_io.is_source(path, format):
        return datasets_io.read_dataset(path, columns, steps_sep, split, limit, key)
    if columns or steps_sep is not None or split is not None:
        raise ConfigError(
            f"{key}: columns, steps_sep and split are for a datasets source; {path} is read "
            "by rim's own reader (set format: datasets to read it with datasets)"
        )
    return read_examples(path, format, limit)


def load_split(split: SplitConfig, key: str = "data.<split>") -> list[Example]:
    """One split of a recipe (`data.train`, ...): a file, a `datasets` source or a generator."""
    if split.path is None:
        return native_split(
            generator=split.generator, size=split.size, seed=split.seed,
            options=split.options, limit=split.limit,
        )  # fmt: skip
    return read_path(
        split.path, split.format, split.limit, columns=split.columns,
        steps_sep=split.steps_sep, split=split.split, key=key,
    )  # fmt: skip
