"""Sequence layout and attention mask (METHOD.md section 4): many readouts in one forward pass.

A training sequence is a tree of *segments* laid out left to right. Each segment sees its
ancestors and itself causally, nothing else; its position ids continue right after its
parent's last token. For RiM: `x` is the root, block `m_k` hangs under `m_{k-1}`, readout
`R_k` hangs under `m_k`. So `R_k` sees `x, m_1..m_k` and itself, never another readout or a
later block, and nothing attends to a readout: exactly the plain causal run of
`x ++ m_1..m_k ++ R_k`. Direct answering and CoT are the one-readout special case.

A readout with target tokens `t_1..t_n` holds inputs `t_1..t_n`; the parent's last token
predicts `t_1`, and `t_n` predicts EOS. Each readout's tokens share its weight equally, so
the loss of a readout is `weight * mean token NLL`. A readout with a *cue* (explain mode's
`<|explain|>`) starts with input-only tokens: the cue's last token predicts `t_1`, so two
readouts (the answer, and the step behind the cue) can hang under the same block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE = -100


@dataclass(frozen=True)
class Segment:
    ids: tuple[int, ...]
    parent: int = -1  # index of the parent segment; -1 for the root
    weight: float | None = None  # a readout's loss weight; None = not supervised
    kind: str = "x"  # x | block | readout | thought: for inspection only
    cue: int = 0  # a readout's leading input-only tokens: the parent does not predict them


@dataclass
class Packed:
    """One laid-out training sequence (lists, so it is cheap to build in data loading)."""

    input_ids: list[int]
    labels: list[int]
    weights: list[float]
    position_ids: list[int]
    segment: list[int]  # segment index of each token
    ancestors: list[frozenset[int]] = field(default_factory=list)  # per segment, incl. itself

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(segments: list[Segment], eos_id: int) -> Packed:
    """Lay out `segments` (parents before children) with labels, weights and positions.

    >>> x = Segment((5, 6))
    >>> blk = Segment((1, 2), parent=0, kind="block")
    >>> out = Segment((7,), parent=1, weight=1.0, kind="readout")
    >>> p = pack([x, blk, out], eos_id=0)
    >>> p.input_ids, p.position_ids
    ([5, 6, 1, 2, 7], [0, 1, 2, 3, 4])
    >>> p.labels   # block's last token predicts 7, the readout then predicts EOS
    [-100, -100, -100, 7, 0]
    >>> p.weights
    [0.0, 0.0, 0.0, 0.5, 0.5]
    >>> cued = Segment((9, 7), parent=1, weight=1.0, cue=1)   # 9: the cue, input only
    >>> pack([x, blk, out, cued], eos_id=0).labels   # the cue predicts 7, 7 predicts EOS
    [-100, -100, -100, 7, 0, 7, 0]
    """
    input_ids: list[int] = []
    labels: list[int] = []
    weights: list[float] = []
    position_ids: list[int] = []
    seg_of: list[int] = []
    last_index: list[int] = []  # index in the sequence of each segment's last token
    last_pos: list[int] = []  # position id of each segment's last token
    ancestors: list[frozenset[int]] = []
    for s, seg in enumerate(segments):
        if not seg.ids:
            raise ValueError(f"segment {s} is empty")
        if seg.parent >= s:
            raise ValueError(f"segment {s}: parent {seg.parent} must come before it")
        start_pos = 0 if seg.parent < 0 else last_pos[seg.parent] + 1
        anc = frozenset({s}) | (ancestors[seg.parent] if seg.parent >= 0 else frozenset())
        ancestors.append(anc)
        first = len(input_ids)
        input_ids.extend(seg.ids)
        position_ids.extend(range(start_pos, start_pos + len(seg.ids)))
        seg_of.extend([s] * len(seg.ids))
        labels.extend([IGNORE] * len(seg.ids))
        weights.extend([0.0] * len(seg.ids))
        if seg.weight is not None:
            if seg.parent < 0:
                raise ValueError("the root segment cannot be a readout")
            if not 0 <= seg.cue <= len(seg.ids):
                raise ValueError(f"segment {s}: cue {seg.cue} outside 0..{len(seg.ids)}")
            targets = list(seg.ids[seg.cue :]) + [eos_id]
            w = seg.weight / len(targets)
            before = [last_index[seg.parent]] if seg.cue == 0 else []
            pred = before + list(range(first + max(seg.cue - 1, 0), first + len(seg.ids)))
            for i, t in zip(pred, targets):
                if labels[i] != IGNORE:
                    raise ValueError(f"segment {s}: its parent already predicts another readout")
                labels[i] = t
                weights[i] = w
        last_index.append(len(input_ids) - 1)
        last_pos.append(position_ids[-1])
    return Packed(input_ids, labels, weights, position_ids, seg_of, ancestors)


def allowed(p: Packed) -> torch.Tensor:
    """Boolean (L, L) matrix: query i may attend key j.

    >>> p = pack([Segment((5,)), Segment((1,), 0), Segment((7,), 1, 1.0), Segment((8,), 0, 1.0)], 0)
    >>> allowed(p).int().tolist()   # the last readout hangs under x: it sees x, not the block
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
    """
    n_seg = len(p.ancestors)
    anc = torch.zeros(n_seg, n_seg, dtype=torch.bool)  # (S, S): row sees column's segment
    for s, a in enumerate(p.ancestors):
        anc[s, list(a)] = True
    seg = torch.tensor(p.segment)
    L = len(seg)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return anc[seg[:, None], seg[None, :]] & causal  # (L, L)


def concat(items: list[Packed]) -> Packed:
    """Several examples in one row (`train.pack_tokens`): the document level of the tree.

    Each example keeps its own position ids (restarting at 0) and its segments are
    renumbered after the previous example's, so the ancestor sets of two examples are
    disjoint and `allowed` never lets a token see another example. Labels stay where they
    are: a label is predicted at its own position, never from the next example.

    >>> a, b = pack([Segment((5, 6))], 0), pack([Segment((7,)), Segment((8,), 0, 1.0)], 0)
    >>> row = concat([a, b])
    >>> row.position_ids, row.segment
    ([0, 1, 0, 1], [0, 0, 1, 2])
    >>> allowed(row).int().tolist()   # the second example sees only itself
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    """
    if len(items) == 1:
        return items[0]
    out = Packed([], [], [], [], [], [])
    for p in items:
        base = len(out.ancestors)
        out.input_ids += p.input_ids
        out.labels += p.labels
        out.weights += p.weights
        out.position_ids += p.position_ids
        out.segment += [s + base for s in p.segment]
        out.ancestors += [frozenset(a + base for a in anc) for anc in p.ancestors]
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L), IGNORE where no loss
    weights: torch.Tensor  # (B, L) float loss weight per label
    position_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, 1, L, L) additive float: 0 allowed, dtype-min blocked
    # (or, from `collate(..., mask=rim.flex.Tables.of)`, the tree as FlexAttention tables)

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in vars(self).values()))

    def pin_memory(self) -> Batch:
        """Page-locked copies (the DataLoader's pin thread calls this: `rim.pipeline`)."""
        return Batch(*(t.pin_memory() for t in vars(self).values()))


def collate(
    items: list[Packed], pad_id: int, dtype: torch.dtype = torch.float32, mask=None
) -> Batch:
    """Right-pad `items` into a batch with a 4-D additive mask; padded keys are blocked.

    A padded query row sees only itself, so no softmax row is empty. `mask`: a function of
    `items` that builds the mask instead (`rim.flex.Tables.of`: no dense mask at all).

    >>> b = collate([pack([Segment((5, 6))], 0), pack([Segment((5,))], 0)], pad_id=9)
    >>> b.input_ids.tolist(), tuple(b.attention_mask.shape)
    ([[5, 6], [5, 9]], (2, 1, 2, 2))
    >>> (b.attention_mask[1, 0] == 0).int().tolist()
    [[1, 0], [0, 1]]
    """
    B, L = len(items), max(len(p) for p in items)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    weights = torch.zeros(B, L)
    position_ids = torch.zeros(B, L, dtype=torch.long)
    ok = torch.eye(L, dtype=torch.bool).repeat(B, 1, 1) if mask is None else None  # (B, L, L)
    for b, p in enumerate(items):
        n = len(p)
        input_ids[b, :n] = torch.tensor(p.input_ids)
        labels[b, :n] = torch.tensor(p.labels)
        weights[b, :n] = torch.tensor(p.weights)
        position_ids[b, :n] = torch.tensor(p.position_ids)
        if ok is not None:
            ok[b, :n, :n] = allowed(p)
    if mask is not None:
        return Batch(input_ids, labels, weights, position_ids, mask(items))
    mask = torch.zeros(B, 1, L, L, dtype=dtype)
    mask.masked_fill_(~ok[:, None], torch.finfo(dtype).min)
    return Batch(input_ids, labels, weights, position_ids, mask)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL of `labels` (B, L) under `logits` (B, L, V), in fp32; 0 where the label is IGNORE.

    Any leading shape: the gathered logits (N, V) of the labelled positions and their labels
    (N,) give (N,) (`rim.methods.base.labelled_head`)."""
    V = logits.shape[-1]
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE,
        reduction="none",
    ).reshape(labels.shape)  # fmt: skip


def weighted_nll(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, num_examples: int
) -> torch.Tensor:
    """Sum of per-token weight * NLL, divided by `num_examples`: the one training loss.

    Dividing by the global number of examples (not tokens) makes gradient accumulation and
    multi-process training exact: (batch 8 x accumulation 1) == (batch 1 x accumulation 8).
    A readout's tokens each weigh weight / length, so a readout counts its mean token NLL.
    """
    return (token_nll(logits, labels) * weights).sum() / num_examples


def weighted_loss(logits: torch.Tensor, batch: Batch, num_examples: int) -> torch.Tensor:
    """Sum over readouts of weight * mean token NLL, divided by `num_examples`."""
    return weighted_nll(logits, batch.labels, batch.weights, num_examples)


def render(p: Packed, names: list[str] | None = None) -> str:
    """ASCII picture of the mask: one row per query token, `#` = may attend.

    >>> x = Segment((5, 6)); m = Segment((1,), 0, kind="block"); r = Segment((7,), 1, 1.0)
    >>> print(render(pack([x, m, r], 0), ["x", "x", "m1", "R1"]))
        x  x m1 R1
    x   #  .  .  .
    x   #  #  .  .
    m1  #  #  #  .
    R1  #  #  #  #
    """
    ok = allowed(p)
    names = names or [str(t) for t in p.input_ids]
    w = max(len(n) for n in names)
    lines = [" " * w + " " + " ".join(n.rjust(w) for n in names)]
    for i, n in enumerate(names):
        cells = " ".join(("#" if ok[i, j] else ".").rjust(w) for j in range(len(names)))
        lines.append(n.ljust(w) + " " + cells)
    return "\n".join(line.rstrip() for line in lines)
