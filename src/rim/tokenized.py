"""Each split tokenised once per run: one batch call of the fast tokenizer per kind of string.

A method tokenises segments separately (`Method.question_ids`, `Method.text_ids`), so the
same question and step strings come back every epoch. A bounded cache smaller than the data
(GSM8K-Aug has 385,620 questions) re-tokenises most of them each time; encoding one string
per call also pays Python's per-call overhead millions of times. `TokenTable` holds the ids of
every string a split needs, filled by `Method.pretokenize` (run by `rim.assembly.assemble`)
with `tokenizer(list_of_texts)`, which the Rust tokenizer encodes in parallel. It lives in
memory for the run; its key is its tokenizer (a table belongs to one `Method`) and the
string itself, so other data or another tokenizer never read stale ids.

The ids are those of the one-string call, by construction: the same tokenizer call on a
list (no padding, no truncation) encodes each item as it would alone. tests/test_pipeline.py
holds this on GSM8K-Aug lines and on the toy tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

Ids = tuple[int, ...]
CHUNK = 16_384  # strings per batch call: bounds the intermediate encodings' memory


class TokenTable:
    """`str -> ids` for one way of encoding (`encode`: a list of strings -> lists of ids).

    Only `fill` adds strings: a string the pass did not foresee (a prompt at inference) is
    the caller's to encode, so a long-lived server's table does not grow with its requests.
    """

    def __init__(self, encode: Callable[[list[str]], list[list[int]]]):
        self.encode = encode
        self.ids: dict[str, Ids] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def fill(self, texts: Iterable[str]) -> int:
        """Encode the strings of `texts` not yet in the table, in batch calls; returns how
        many were new."""
        new = [t for t in dict.fromkeys(texts) if t not in self.ids]
        for i in range(0, len(new), CHUNK):
            chunk = new[i : i + CHUNK]
            self.ids.update(zip(chunk, map(tuple, self.encode(chunk))))
        return len(new)

    def get(self, text: str) -> Ids | None:
        """The ids of `text`, or None if the pass did not encode it."""
        return self.ids.get(text)


def counts(ids: Iterable[Ids]) -> np.ndarray:
    """Lengths of `ids` as an int64 array: the token counts a length check sums."""
    return np.fromiter(map(len, ids), dtype=np.int64)


def ragged(flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(N, max(lengths)) rows of `flat`, which holds the rows concatenated, zero-padded.

    >>> ragged(np.array([1, 2, 3]), np.array([2, 0, 1])).tolist()
    [[1, 2], [0, 0], [3, 0]]
    """
    n = len(lengths)
    out = np.zeros((n, int(lengths.max(initial=0))), dtype=flat.dtype)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = flat
    return out
