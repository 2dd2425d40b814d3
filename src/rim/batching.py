"""Which examples train together: the seeded example order, micro-batches and packed rows.

    lengths = StageLengths(method, train, plan, batch_size)  # only with group_by_length
    stream = make_stream(len(train), cfg.train, lengths)     # lengths None: random order
    idx = stream.take(cfg.train.batch_size)                  # a global batch; resumable
    chunks = micro_batches(idx, micro, lengths.at(stage))    # longest first
    rows = pack_rows([len(p) for p in packed], budget)       # several examples per row

Random order right-pads every micro-batch to its longest example; on GSM8K-Aug about 45%
of the tokens were padding. `train.group_by_length` orders each epoch as Hugging Face's
`group_by_length` sampler does (a seeded permutation cut into mega-batches of 50 global
batches, sorted by length within each, cut into global batches, the batches shuffled), so
a batch holds examples of similar length. `train.pack_tokens` puts several examples in one
row up to a token budget (first-fit decreasing; `rim.layout.concat`). Neither changes which
examples an epoch sees, nor the loss each example gets.

Lengths change between stages (RiM's stage 2 has other readouts, iCoT removes tokens), so
an epoch is grouped by the lengths of the stage that trains its middle example and each
step's micro-batches by the current stage's: both functions of the plan, so a resumed run
takes the same batches. On GSM8K-Aug valid + test (RiM, GPT-2 recipe, micro-batches of 32)
that leaves ~3.5% padding instead of ~35-46% (`train.pack_tokens` within micro-batches of
32: ~6-17%, the last row of each is part-filled).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
    """`ExampleStream` whose global batches hold examples of similar length.

    Epoch e: the same permutation as `ExampleStream`, cut into mega-batches of `MEGA`
    global batches, each sorted by length (longest first, ties in permutation order), cut
    into global batches, the full batches shuffled (the same generator, continued). Cuts
    fall where the run's cursor is a multiple of `batch_size`, so when the data does not
    divide into batches, the batch that straddles two epochs (the epoch's first `head`
    examples and the previous epoch's last ones) is the only mixed one. `lengths`: one
    list, or a function of the epoch (`StageLengths.of_epoch`) that must be pure, so
    that the order stays a function of (seed, epoch): resumable from any cursor.
    """

    def __init__(
        self,
        lengths: Sequence[int] | Callable[[int], Sequence[int]],
        n: int,
        seed: int,
        batch_size: int,
        cursor: int = 0,
    ):
        super().__init__(n, seed, cursor)
        self.lengths = lengths if callable(lengths) else (lambda epoch: lengths)
        self.batch_size = batch_size

    def order(self, epoch: int) -> list[int]:
        n, B, lengths = self.n, self.batch_size, self.lengths(epoch)
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        head = min((-epoch * n) % B, n)  # completes the batch the last epoch began
        sized = [perm[:head]] + [perm[i : i + MEGA * B] for i in range(head, n, MEGA * B)]
        ranked = [sorted(m, key=lambda i: -lengths[i]) for m in sized]  # stable
        rest = [i for m in ranked[1:] for i in m]
        batches = [rest[i : i + B] for i in range(0, len(rest), B)]
        tail = [batches.pop()] if batches and len(batches[-1]) < B else []
        shuffled = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        return ranked[0] + [i for b in shuffled + tail for i in b]


class StageLengths:
    """Every example's training length at a stage (`Method.train_lengths`, vectorised),
    for the stage being trained (micro-batches) and for the stage that trains the middle
    of an epoch (`of_epoch`, the grouped order): a function of the plan, so resumable."""

    def __init__(self, method, examples: list, plan: list, batch_size: int):
        self.method, self.examples, self.plan = method, examples, plan
        self.batch_size = batch_size
        self._cache: dict[int, list[int]] = {}  # stage index -> lengths; the last two

    def at(self, stage) -> list[int]:
        if stage.index not in self._cache:
            lengths = self.method.train_lengths(self.examples, [stage])[0].tolist()
            self._cache = {k: v for k, v in list(self._cache.items())[-1:]}
            self._cache[stage.index] = lengths
        return self._cache[stage.index]

    def of_epoch(self, epoch: int) -> list[int]:
        """The lengths at the stage that trains epoch `epoch`'s middle example (RiM's stage 2
        starts just after an epoch boundary: its first epoch is grouped for stage 2)."""
        n = len(self.examples)
        step = (epoch * n + n // 2) // self.batch_size  # 0-based step taking that example
        for stage in self.plan:
            if step < stage.steps:
                return self.at(stage)
            step -= stage.steps
        return self.at(self.plan[-1])


def make_stream(n: int, train, lengths: StageLengths | None = None) -> ExampleStream:
    """The example stream of `train` (a `TrainConfig`): grouped when `lengths` are given."""
    if lengths is None:
        return ExampleStream(n, train.seed)
    return GroupedStream(lengths.of_epoch, n, train.seed, train.batch_size)


def micro_batches(
    idx: list[int], micro: int, lengths: Sequence[int] | None = None
) -> list[list[int]]:
    """`idx` in chunks of `micro` (at least one, maybe empty: an idle DDP process); with
    `lengths` (the current stage's), sorted longest first so that each chunk pads little."""
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


def padding_fraction(lengths: list[list[int]]) -> float:
    """Share of padding tokens when each inner list (a batch of row lengths) is
    right-padded to its longest row: the waste grouping and packing remove."""
    real = sum(sum(b) for b in lengths)
    padded = sum(max(b) * len(b) for b in lengths if b)
    return 1.0 - real / padded if padded else 0.0
