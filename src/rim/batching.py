"""Which examples train together: the seeded example order, micro-batches and packed rows.

    stream = make_stream(len(train), cfg.train, lengths)  # lengths: only with group_by_length
    idx = stream.take(cfg.train.batch_size)               # one global batch; resumable by cursor
    chunks = micro_batches(idx, micro, lengths)           # longest first with lengths
    rows = pack_rows([len(p) for p in packed], budget)    # several examples per row

Random order right-pads every micro-batch to its longest example; on GSM8K-Aug about 45%
of the tokens were padding. `train.group_by_length` orders each epoch as Hugging Face's
`group_by_length` sampler does (a seeded permutation cut into mega-batches of 50 global
batches, sorted by length within each, cut into global batches, the batches shuffled), so
a batch holds examples of similar length. `train.pack_tokens` puts several examples in one
row up to a token budget (first-fit decreasing; `rim.layout.concat`). Neither changes which
examples a step sees in total over an epoch, nor the loss each example gets.
"""

from __future__ import annotations

import torch

MEGA = 50  # global batches per mega-batch (HF's `megabatch_mult`)


class ExampleStream:
    """Seeded, resumable order: epoch e is permutation(seed + e); `cursor` counts examples."""

    def __init__(self, n: int, seed: int, cursor: int = 0):
        self.n, self.seed, self.cursor = n, seed, cursor
        self._epoch, self._perm = -1, None

    def order(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s example order: a pure function of (seed, epoch), so resumable."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, i = divmod(self.cursor, self.n)
            if epoch != self._epoch:
                self._perm, self._epoch = self.order(epoch), epoch
            out.append(self._perm[i])
            self.cursor += 1
        return out


class GroupedStream(ExampleStream):
    """`ExampleStream` whose global batches hold examples of similar `lengths`.

    Epoch e: the same permutation as `ExampleStream`, cut into mega-batches of `MEGA`
    global batches, each sorted by length (longest first, ties in permutation order), cut
    into global batches, the full batches shuffled (the same generator, continued). Cuts
    fall where the run's cursor is a multiple of `batch_size`, so when the data does not
    divide into batches, the batch that straddles two epochs (the epoch's first `head`
    examples and the previous epoch's last ones) is the only mixed one.
    """

    def __init__(self, lengths: list[int], seed: int, batch_size: int, cursor: int = 0):
        super().__init__(len(lengths), seed, cursor)
        self.lengths, self.batch_size = list(lengths), batch_size

    def order(self, epoch: int) -> list[int]:
        n, B = self.n, self.batch_size
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        head = min((-epoch * n) % B, n)  # completes the batch the last epoch began
        sized = [perm[:head]] + [perm[i : i + MEGA * B] for i in range(head, n, MEGA * B)]
        ranked = [sorted(m, key=lambda i: -self.lengths[i]) for m in sized]  # stable
        rest = [i for m in ranked[1:] for i in m]
        batches = [rest[i : i + B] for i in range(0, len(rest), B)]
        tail = [batches.pop()] if batches and len(batches[-1]) < B else []
        shuffled = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        return ranked[0] + [i for b in shuffled + tail for i in b]


def make_stream(n: int, train, lengths: list[int] | None = None) -> ExampleStream:
    """The example stream of `train` (a `TrainConfig`): grouped when `lengths` are given."""
    if lengths is None:
        return ExampleStream(n, train.seed)
    return GroupedStream(lengths, train.seed, train.batch_size)


def micro_batches(idx: list[int], micro: int, lengths: list[int] | None = None) -> list[list[int]]:
    """`idx` in chunks of `micro` (at least one, maybe empty: an idle DDP process); with
    `lengths`, sorted longest first so that each chunk pads little."""
    if lengths is not None:
        idx = sorted(idx, key=lambda i: -lengths[i])
    return [idx[i : i + micro] for i in range(0, len(idx), micro)] or [[]]


def pack_rows(lengths: list[int], budget: int | None) -> list[list[int]]:
    """Item indices grouped into rows of at most `budget` tokens (None: one item per row).

    First-fit decreasing: items longest first (ties in order), each into the first row
    with room, else a new row; an item longer than `budget` gets a row of its own. Rows
    come in the order they were opened, items in a row in the order they were placed.

    >>> pack_rows([3, 5, 2, 4], 8)
    [[1, 0], [3, 2]]
    >>> pack_rows([3, 9], 8)
    [[1], [0]]
    """
    if budget is None:
        return [[i] for i in range(len(lengths))]
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, u in enumerate(used):
            if u + lengths[i] <= budget:
                rows[r].append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    return rows


def example_lengths(method, examples: list, stages: list) -> list[int]:
    """Each example's longest training sequence over `stages` (`Method.train_lengths`): the
    one length a grouped order keeps for the whole run, so every epoch stays a permutation
    across stage switches."""
    if not examples:
        return []
    return method.train_lengths(examples, stages).max(axis=0).tolist()


def padding_fraction(lengths: list[list[int]]) -> float:
    """Share of padding tokens when each inner list (a batch of row lengths) is
    right-padded to its longest row: the waste grouping and packing remove."""
    real = sum(sum(b) for b in lengths)
    padded = sum(max(b) * len(b) for b in lengths if b)
    return 1.0 - real / padded if padded else 0.0
