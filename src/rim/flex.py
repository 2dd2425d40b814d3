"""FlexAttention for packed training (`model.attn_implementation: flex`), for accelerators.

The dense 4-D additive mask of `rim.layout.collate` rules out every fused kernel that skips
masked blocks. Here the same segment tree becomes a `mask_mod` over two small tensors (each
token's segment; each row's ancestor sets) and one `BlockMask` per batch, passed as
`attention_mask` to a stock HF model loaded with `attn_implementation="flex_attention"`
(Llama, Qwen2; GPT-2's class does not support it). Compiled FlexAttention (transformers
compiles it) then skips the blocks nothing attends to.

Query i may attend key j iff j <= i and j's segment is an ancestor of (or is) i's segment:
`rim.layout.allowed`, row by row. A padded query sees only itself, as in `collate`, so no
softmax row is empty. The document level needs no table of its own: a row holding several
examples (`rim.layout.concat`) numbers each example's segments after the previous one's, so
two examples' ancestor sets are disjoint and a document-id test would never decide a pair.
On a CPU FlexAttention has no backward (torch 2.13: "FlexAttention does not support
backward on CPU"), so training there is refused; the dense sdpa mask is the CPU path.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rim.errors import ConfigError
from rim.layout import Packed

HF_NAME = "flex_attention"  # transformers' name of the implementation
KEY = "model.attn_implementation"
BLOCK = 128  # FlexAttention's default block size: the lookup tables are padded to it


def hf_attn(name: str) -> str:
    """The transformers `attn_implementation` of a recipe's value (`flex` -> flex_attention)."""
    return HF_NAME if name == "flex" else name


def enabled(model) -> bool:
    """Whether `model` (maybe under DDP, peft or torch.compile) runs FlexAttention."""
    core = getattr(model, "module", model)
    cfg = getattr(core, "config", None)
    return getattr(cfg, "_attn_implementation", None) == HF_NAME


def check_class(hf_config) -> None:
    """Refuse flex for a model whose transformers class cannot run it (GPT-2)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    except KeyError:  # not a causal LM transformers knows: it will say so itself
        return
    if not getattr(cls, "_supports_flex_attn", False):
        raise ConfigError(
            f"{KEY}: flex: {cls.__name__} does not support FlexAttention in transformers "
            "(Llama and Qwen2 do); use sdpa"
        )


def check_training(device: torch.device, dropouts: dict[str, float | None]) -> None:
    """Refuse flex training where it cannot run: on a CPU, or with attention dropout."""
    if device.type == "cpu":
        raise ConfigError(
            f"{KEY}: flex: FlexAttention has no backward on a CPU (torch: 'FlexAttention does "
            "not support backward on CPU'); train with sdpa there, flex on a GPU"
        )
    for key, p in dropouts.items():
        if p:
            raise ConfigError(
                f"{key}: {p} sets attention dropout, which FlexAttention does not have "
                f"(transformers refuses it); set it to null or use {KEY}: sdpa"
            )


@dataclass
class Tables:
    """A right-padded batch's segment tree as lookup tables (what `mask_mod` indexes).

    seg: (B, Lp) per token, Lp = the longest row rounded up to `BLOCK` (the kernel may read
    past the end of the last block); padding has segment S, the last row and column of `anc`:
    no ancestors. anc: (B, S + 1, S + 1), anc[b, s, t] = segment t is an ancestor of (or is)
    segment s in row b. `length`: L, the padded batch's length.
    """

    seg: torch.Tensor
    anc: torch.Tensor
    length: int

    @classmethod
    def of(cls, items: list[Packed]) -> Tables:
        """The tables of `items` as `rim.layout.collate` pads them (`collate(mask=Tables.of)`)."""
        B = len(items)
        L = max(len(p) for p in items)
        Lp = -(-L // BLOCK) * BLOCK
        S = max(len(p.ancestors) for p in items)
        seg = torch.full((B, Lp), S, dtype=torch.long)
        anc = torch.zeros(B, S + 1, S + 1, dtype=torch.bool)
        for b, p in enumerate(items):
            seg[b, : len(p)] = torch.tensor(p.segment, dtype=torch.long)
            for i, a in enumerate(p.ancestors):
                anc[b, i, list(a)] = True
        return cls(seg, anc, L)

    def to(self, device, non_blocking: bool = False) -> Tables:
        seg, anc = (t.to(device, non_blocking=non_blocking) for t in (self.seg, self.anc))
        return Tables(seg, anc, self.length)

    def pin_memory(self) -> Tables:
        return Tables(self.seg.pin_memory(), self.anc.pin_memory(), self.length)

    def mask_mod(self) -> Callable:
        """`mask_mod(b, h, q_idx, kv_idx)`: may query q_idx of row b attend key kv_idx."""
        seg, anc = self.seg, self.anc

        def mask_mod(b, h, q_idx, kv_idx):
            tree = anc[b, seg[b, q_idx], seg[b, kv_idx]] & (kv_idx <= q_idx)
            return tree | (q_idx == kv_idx)  # a padded query: itself only

        return mask_mod

    def block_mask(self):
        """The batch's `BlockMask`, on the tables' device (compiled construction on a GPU,
        as transformers builds its own; eager on a CPU, where compiling costs minutes)."""
        from torch.nn.attention.flex_attention import create_block_mask

        B, L, device = self.seg.shape[0], self.length, self.seg.device
        return create_block_mask(
            self.mask_mod(), B, None, L, L, device=device, _compile=device.type != "cpu"
        )


def attention_mask(mask):
    """What the model gets: a `BlockMask` for `Tables` (on their device), else `mask` itself."""
    return mask.block_mask() if isinstance(mask, Tables) else mask


@contextmanager
def sdpa_inside(model):
    """`model` with sdpa attention inside, restored on exit: decoding (validation) with a KV
    cache and 2-D masks gains nothing from FlexAttention, which would rebuild and recompile a
    `BlockMask` at every generated token."""
    core = getattr(model, "module", model)
    core = core.get_base_model() if hasattr(core, "get_base_model") else core
    if not enabled(core):
        yield model
        return
    core.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        core.set_attn_implementation(HF_NAME)
