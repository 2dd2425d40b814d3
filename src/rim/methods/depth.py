"""RiM's own modules for depth (ours, issue 31): the state loss's head and the loop projection.

State loss (`memory.state_loss`, off at weight 0). Block t's hidden states at one layer,
pooled (mean over its M + 2 tokens, or its `</b>` token), go through a small head: a
LayerNorm, then per target slot a Linear(D, D) initialised to identity, then the model's own
output embedding, so the vocabulary is not multiplied by the slots. Slot j predicts token j of
step t's first / last n tokens (`target: first | last`), or one slot predicts step t's
distinct tokens as a bag (`target: bag`: the mean NLL of each). Blocks 1..min(T, K) are
supervised, step t on block t, whatever the readouts' annealed weights (in stage 1 the
answer block T + 1 has none: its readout predicts the answer). An example's state loss is
`weight` times the mean over its supervised blocks of the mean slot NLL; like the readout
loss it is summed over examples and divided by the global number of examples.

Loop projection (`memory.loops` > 0): a Linear(D, D) initialised to identity maps a block
token's last-layer state of pass r - 1 to its input embedding in pass r (`rim.methods.looped`).

Both belong to the model (`attach` registers them as one submodule, so the optimizer, DDP,
resumable checkpoints and `best/` see them) and are saved beside the weights as
`rim_depth.safetensors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from rim.batching import pack_rows
from rim.config_depth import StateLossConfig
from rim.data import Example
from rim.errors import ConfigError, RimError
from rim.layout import IGNORE, Segment
from rim.methods.base import attach_module, labelled_forward, row_options

MODULE = "rim_depth"  # the submodule's name on the model
MODULE_FILE = "rim_depth.safetensors"


def identity_linear(dim: int) -> nn.Linear:
    lin = nn.Linear(dim, dim)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(dim))
        lin.bias.zero_()
    return lin


class StateHead(nn.Module):
    """(N, D) pooled block states -> (N, slots, D), read by the model's output embedding."""

    def __init__(self, dim: int, slots: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.slots = nn.ModuleList(identity_linear(dim) for _ in range(slots))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        return torch.stack([s(h) for s in self.slots], dim=1)


def state_layer(cfg: StateLossConfig, num_layers: int) -> int:
    """The hidden_states index the state loss reads (0 = embeddings, L = the last layer)."""
    layer = num_layers // 2 if cfg.layer is None else cfg.layer
    if layer > num_layers:
        raise ConfigError(
            f"memory.state_loss.layer: {layer} is past the model's {num_layers} layers"
        )
    return layer


def build(model, state: StateLossConfig, loops: int) -> nn.ModuleDict:
    dim = model.config.hidden_size
    mods = nn.ModuleDict()
    if state.weight > 0:
        mods["state_head"] = StateHead(dim, 1 if state.target == "bag" else state.tokens)
    if loops > 0:
        mods["loop_projection"] = identity_linear(dim)
    return mods


def attach(model, state: StateLossConfig, loops: int, checkpoint: Path | None):
    """(model, its depth modules or None): registered as `rim_depth`, from `checkpoint`."""
    mods = build(model, state, loops)
    if not len(mods):
        return model, None
    state_layer(state, model.config.num_hidden_layers)  # a layer past the model: refused now
    missing = "memory.loops / memory.state_loss"
    return model, attach_module(model, MODULE, mods, checkpoint, MODULE_FILE, missing)


def save(mods: nn.Module | None, folder: Path, state_dict: dict | None = None) -> None:
    if mods is None:
        return
    from safetensors.torch import save_file

    pre = f"{MODULE}."
    full = {k[len(pre) :]: v for k, v in (state_dict or {}).items() if k.startswith(pre)}
    state = full or mods.state_dict()
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, folder / MODULE_FILE)


def module(method, name: str) -> nn.Module:
    """`method`'s module `name` (`state_head`, `loop_projection`), attached to the model."""
    if method.depth is None or name not in method.depth:
        raise RimError(f"rim: no {name} on the model; call method.attach(model) first")
    return method.depth[name]


def refuse_fsdp(model) -> None:
    name = type(model).__name__
    if "FSDP" in name or "FullyShardedDataParallel" in name:
        raise RimError("memory.loops / memory.state_loss: FSDP is not supported (their modules "
                       "run outside the model's forward); use DDP")  # fmt: skip


# ---------------------------------------------------------------- the state loss


@dataclass
class StateTargets:
    """The supervised blocks of a batch: where they are and what they predict."""

    rows: torch.Tensor  # (N,) batch row of each supervised block
    cols: torch.Tensor  # (N, Lb) its token columns in that row
    ids: torch.Tensor  # (N, S) target ids, IGNORE where none
    weights: torch.Tensor  # (N,) weight / (the example's supervised blocks)


def step_targets(cfg: StateLossConfig, steps: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Per step, the ids its block predicts: distinct tokens (bag), or the first / last n."""
    n = cfg.tokens
    if cfg.target == "bag":
        return [tuple(dict.fromkeys(s)) for s in steps]
    return [tuple(s[:n]) if cfg.target == "first" else tuple(s[-n:]) for s in steps]


def targets(
    cfg: StateLossConfig, items: list[tuple[int, int, int, list[tuple[int, ...]]]], Lb: int
) -> StateTargets:
    """`items`: per example (row, column of its first block, blocks, its steps' ids).

    Block t (t <= min(T, blocks)) predicts step t; `last` right-aligns a short step (its
    last token in the last slot), `first` left-aligns it; empty steps are not supervised.
    """
    rows, cols, ids, weights = [], [], [], []
    width = 1 if cfg.target == "bag" else cfg.tokens
    for row, start, blocks, steps in items:
        tgt = step_targets(cfg, steps[:blocks])
        sup = [t for t in range(len(tgt)) if tgt[t]]
        for t in sup:
            slot = [IGNORE] * max(width, len(tgt[t]))
            at = len(slot) - len(tgt[t]) if cfg.target == "last" else 0
            slot[at : at + len(tgt[t])] = tgt[t]
            rows.append(row)
            cols.append(range(start + t * Lb, start + (t + 1) * Lb))
            ids.append(slot)
            weights.append(cfg.weight / len(sup))
    S = max((len(i) for i in ids), default=1)
    out = np.full((len(ids), S), IGNORE, dtype=np.int64)
    for i, s in enumerate(ids):
        out[i, : len(s)] = s
    return StateTargets(
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(np.array([list(c) for c in cols], dtype=np.int64).reshape(-1, Lb)),
        torch.from_numpy(out),
        torch.tensor(weights, dtype=torch.float32),
    )


def state_loss(
    model, head: StateHead, cfg: StateLossConfig, hidden: torch.Tensor, tg: StateTargets,
    num_examples: int,
) -> torch.Tensor:  # fmt: skip
    """Sum of each supervised block's weighted mean slot NLL, / `num_examples`.

    `hidden` (B, L, D): the chosen layer's states; `tg`'s columns index its L axis."""
    if not len(tg.rows):
        return hidden.sum() * 0.0
    dev = hidden.device
    rows, cols = tg.rows.to(dev), tg.cols.to(dev)
    block = hidden[rows[:, None], cols]  # (N, Lb, D)
    pooled = block.mean(1) if cfg.pool == "mean" else block[:, -1]  # (N, D)
    lm_head = extract_model_from_parallel(model).get_output_embeddings()
    logp = lm_head(head(pooled)).float().log_softmax(-1)  # (N, slots, V)
    ids = tg.ids.to(dev)  # (N, S)
    if cfg.target == "bag":  # every bag token is read from the one slot
        logp = logp.expand(-1, ids.shape[1], -1)
    valid = ids != IGNORE
    nll = -logp.gather(-1, ids.clamp(min=0)[..., None])[..., 0] * valid  # (N, S)
    per_block = nll.sum(1) / valid.sum(1)  # (N,)
    return (per_block * tg.weights.to(dev)).sum() / num_examples


def packed_loss(
    method, model, examples: list[Example], stage, progress: float, num_examples: int, device
) -> torch.Tensor:
    """The packed RiM loss (`Method.loss`'s batch, one forward pass) plus the state loss on
    that pass's hidden states; several examples per row as `Method.batch` packs them."""
    batch = method.batch(examples, stage, progress, *row_options(model)).to(device)
    segs = [method.segments(ex, stage, progress) for ex in examples]
    rows = pack_rows([sum(len(s.ids) for s in sg) for sg in segs], method.common.pack_tokens)
    items = []
    for r, row in enumerate(rows):  # the same rows `Method.batch` laid out
        offset = 0
        for i in row:
            items.append(_item(method, r, offset, segs[i], examples[i]))
            offset += sum(len(s.ids) for s in segs[i])
    cfg = method.settings.memory.state_loss
    tg = targets(cfg, items, method.mem.block_len)
    out, loss = labelled_forward(model, batch, num_examples, output_hidden_states=True)
    layer = state_layer(cfg, len(out.hidden_states) - 1)
    head = module(method, "state_head")
    return loss + state_loss(model, head, cfg, out.hidden_states[layer], tg, num_examples)


def _item(method, row: int, offset: int, segs: list[Segment], ex: Example):
    """(row, first block column, blocks, step ids) of one example laid out from `offset`."""
    blocks = sum(1 for s in segs if s.kind == "block")
    steps = [method.text_ids(s) for s in ex.steps]
    return row, offset + len(segs[0].ids), blocks, steps


@torch.no_grad()
def state_accuracy(method, model, examples: list[Example], batch_size: int = 64) -> dict:
    """How well the state head reads step t's target from block t, at inference's prefill
    (K blocks after the question; looped: pass R's states, as the loss reads them).

    The loss alone cannot say whether a block holds its step: a falling NLL may come from
    the head's prior over digits. Per block t (examples with >= t steps): `state_accuracy`
    counts a block right when every target token is read (`_slots_right`),
    `state_token_accuracy` is the share of tokens read."""
    cfg = method.settings.memory.state_loss
    head = module(method, "state_head")
    w = next(head.parameters())  # its device and dtype, which the kept states are not in
    lm_head = extract_model_from_parallel(model).get_output_embeddings()
    K, Lb = method.mem.num_blocks, method.mem.block_len
    bag = cfg.target == "bag"
    exact: dict[int, list[bool]] = {}
    slots: dict[int, list[float]] = {}
    model.eval()
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo : lo + batch_size]
        tgts = [step_targets(cfg, [method.text_ids(s) for s in e.steps[:K]]) for e in chunk]
        pre = method.prefill(model, [method.prompt(e.question) for e in chunk], K * Lb)
        layer = state_layer(cfg, len(pre.states) - 1)
        h = pre.states[layer].reshape(len(chunk), K, Lb, -1)  # (B, K, Lb, D)
        pooled = h.mean(2) if cfg.pool == "mean" else h[:, :, -1]  # (B, K, D)
        pooled = pooled.reshape(len(chunk) * K, -1).to(w.device, w.dtype)  # (B*K, D)
        logits = lm_head(head(pooled))  # (B*K, slots, V)
        if bag:  # its one slot's top-n tokens, n the longest step's
            n = min(max((len(t) for ts in tgts for t in ts), default=1), logits.shape[-1])
            guess = logits[:, 0].topk(n, -1).indices  # (B*K, n)
        else:
            guess = logits.argmax(-1)  # (B*K, slots)
        guess = guess.reshape(len(chunk), K, -1).cpu()  # (B, K, slots or n)
        for steps, g in zip(tgts, guess):
            for t, tgt in enumerate(steps):
                if tgt:
                    right = _slots_right(g[t].tolist(), tgt, cfg.target)
                    exact.setdefault(t + 1, []).append(all(right))
                    slots.setdefault(t + 1, []).append(sum(right) / len(right))
    return {
        "state_accuracy_per_block": [float(np.mean(exact[t])) for t in sorted(exact)],
        "state_token_accuracy_per_block": [float(np.mean(slots[t])) for t in sorted(slots)],
    }


def _slots_right(guess: list[int], tgt: tuple[int, ...], target: str) -> list[bool]:
    """Per target token, whether the head read it: `last` right-aligns a short target and
    `first` left-aligns it (as `targets`); `bag`: it is among the top len(bag) tokens."""
    if target == "bag":
        top = set(guess[: len(tgt)])
        return [t in top for t in tgt]
    got = guess[-len(tgt) :] if target == "last" else guess[: len(tgt)]
    return [a == b for a, b in zip(got, tgt)]
