"""Answer normalisation, and the hooks an lm-evaluation-harness task calls: standard library only.

`rim export` copies this file verbatim into `EXPORT/lm_eval/utils.py`, so lm-eval scores an
exported model with the very function `rim eval` uses (`rim.evaluation` imports `normalize`
from here), and the task folder needs no rim install. Keep it free of rim, torch and
third-party imports at module level: lm-eval imports it by file path.

lm-eval hooks (named in the task YAML with `!function utils.NAME`):
    load_docs          `custom_dataset`: the task's JSONL beside this file, as a test split
    normalize_answers  a `custom` filter: each response normalised with the doc's marker
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_NUM = re.compile(r"^[-+]?\d+(?:\.\d+)?$")


def normalize(text: str, marker: str = "####") -> str:
    """Canonical answer text: after the last marker, trimmed, numbers made canonical.

    >>> normalize("#### 1,000"), normalize("4.0"), normalize(" The answer is 7 . ")
    ('1000', '4', 'the answer is 7')
    >>> normalize("1 2") == normalize("12")  # digit-split tokenisers decode with spaces
    True
    >>> normalize("#### 0 3 5 9 0 6 5 0"), normalize("3 5 9 0 6 5 0")  # iCoT: reversed digits
    ('03590650', '3590650')

    A digit string with a leading zero is kept as written, not read as a number: iCoT's
    products are written least significant digit first, padded with zeros, so a dropped
    zero is a wrong product (and position i stays digit i: `rim.evaluation`).
    """
    if marker and marker in text:
        text = text.rsplit(marker, 1)[1]
    text = text.strip().lower()
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # thousands separators
    text = re.sub(r"(?<=\d) (?=\d)", "", text)  # "1 2" -> "12"
    text = re.sub(r"\s+([.,!?;:])", r"\1", text)  # "rempus ." -> "rempus."
    text = text.rstrip(".").strip()
    if _NUM.match(text) and not re.match(r"^0\d", text):
        value = float(text)
        text = str(int(value)) if value == int(value) else repr(value)
    return text


def load_docs(data_file: str = "data.jsonl", **_metadata) -> dict:
    """lm-eval `custom_dataset`: `{"test": Dataset}` from the JSONL beside this file.

    A path relative to this file (not to the working directory), so the export folder can
    be moved or copied. lm-eval also passes the task's `metadata`, which is not needed here.
    """
    import datasets  # lm-eval's own dependency; imported here so rim does not need it

    path = Path(__file__).resolve().parent / data_file
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {"test": datasets.Dataset.from_list(rows)}


def normalize_answers(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval `custom` filter: every response normalised as `rim eval` does, with the
    marker of its doc (CoT-style methods answer after the last `####`)."""
    return [[normalize(r, doc.get("marker", "")) for r in rs] for rs, doc in zip(resps, docs)]
