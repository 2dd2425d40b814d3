"""Inside the forward pass: where the answer position attends, and what each block "says".

Attention mass: from the position that emits the first answer token (block K's last token in
the final decoder's prompt) to the question and to each block, per layer, averaged over heads
and examples. It needs the attention weights, which only the eager implementation returns,
so the model is switched to eager for that pass and back afterwards.

Logit lens: a block's last-token state at layer l through the model's final norm and LM head
gives the token that state would emit. Hugging Face's last hidden state is already normed
(`hidden_states[-1]` is the final norm's output), so the last layer goes through the head
only: the lens there is exactly the model's logits (pinned by tests/test_inspect.py).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import numpy as np
import torch

from rim.data import Example
from rim.decoding import left_pad, positions
from rim.errors import RimError

FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm")  # Llama/Qwen2, GPT-2, ...
ATTENTION_BATCH = 8  # attention weights are (B, heads, P, P) per layer: keep B small
LENS_ROWS = 1024  # states through the LM head at once: (rows, vocab) logits


def _inner(model):
    """The transformers model under a peft wrapper (LoRA checkpoints), else `model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def eager_attention(model):
    """`model` with eager attention (which returns attention weights), restored on exit."""
    inner = _inner(model)
    before = inner.config._attn_implementation
    _set_attention(inner, "eager")
    try:
        yield model
    finally:
        _set_attention(inner, before)


def _set_attention(inner, name: str) -> None:
    if hasattr(inner, "set_attn_implementation"):
        inner.set_attn_implementation(name)
    else:  # older transformers: attention modules read the config at every forward
        inner.config._attn_implementation = name


@torch.no_grad()
def attention_mass(method, model, examples: list[Example]) -> np.ndarray:
    """(layers, 1 + K) attention of the first-answer-token position to [question, block 1..K],
    averaged over heads and examples; each row sums to 1 (padding gets no attention)."""
    K, Lb = method.mem.num_blocks, method.mem.block_len
    device = next(model.parameters()).device
    total = None
    with eager_attention(model):
        for lo in range(0, len(examples), ATTENTION_BATCH):
            prompts = [method.prompt(e.question) for e in examples[lo : lo + ATTENTION_BATCH]]
            ids, mask = left_pad(prompts, method.pad_id, device)  # (B, P)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                        output_attentions=True, use_cache=False, logits_to_keep=1)  # fmt: skip
            B, P = ids.shape
            rows = []
            for a in out.attentions:  # (B, H, P, P) per layer
                last = a[:, :, -1].float()  # (B, H, P): from the last prompt position
                q = last[..., : P - K * Lb].sum(-1, keepdim=True)  # (B, H, 1)
                blocks = last[..., P - K * Lb :].reshape(B, -1, K, Lb).sum(-1)  # (B, H, K)
                rows.append(torch.cat([q, blocks], dim=-1).mean(1).sum(0))  # (1 + K,)
            chunk = torch.stack(rows).cpu().numpy()  # (layers, 1 + K), summed over B
            total = chunk if total is None else total + chunk
    if total is None:
        raise RimError("inspect: no examples to read attention from")
    return total / len(examples)


# ---------------------------------------------------------------- logit lens


def lens_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(final norm, LM head) of a causal LM: `model.model.norm` for Llama and Qwen2,
    `model.transformer.ln_f` for GPT-2, found through the base model and the output
    embeddings so that LoRA-wrapped checkpoints work too."""
    inner = _inner(model)
    base = getattr(inner, "base_model", inner)  # the decoder stack (LlamaModel, GPT2Model)
    for name in FINAL_NORMS:
        norm = getattr(base, name, None)
        if isinstance(norm, torch.nn.Module):
            break
    else:
        raise RimError(f"inspect: no final norm found in {type(base).__name__} (logit lens)")
    head = model.get_output_embeddings()
    if head is None:
        raise RimError(f"inspect: {type(inner).__name__} has no LM head (logit lens)")
    return norm, head


@torch.no_grad()
def lens_logits(model, h: np.ndarray, layer: int, n_layers: int, parts=None) -> torch.Tensor:
    """(n, V) logits of (n, D) states of `layer` (0 = embeddings .. n_layers = last, which is
    already normed, so it goes through the head only)."""
    norm, head = parts or lens_parts(model)
    w = next(head.parameters())
    x = torch.from_numpy(np.ascontiguousarray(h)).to(w.device, w.dtype)
    if layer < n_layers:
        x = norm(x)
    return head(x).float()


def lens_top1(model, states: np.ndarray) -> np.ndarray:
    """(N, K, L+1) top-1 token id of every block state at every layer through the lens."""
    N, K, L1, D = states.shape
    parts = lens_parts(model)
    out = np.zeros((N * K, L1), dtype=np.int64)
    for layer in range(L1):
        flat = states[:, :, layer].reshape(N * K, D)
        for lo in range(0, N * K, LENS_ROWS):
            logits = lens_logits(model, flat[lo : lo + LENS_ROWS], layer, L1 - 1, parts)
            out[lo : lo + LENS_ROWS, layer] = logits.argmax(-1).cpu().numpy()
    return out.reshape(N, K, L1)


def lens_summary(top1: np.ndarray, examples: list[Example], method) -> dict:
    """The most frequent top-1 token per (block, layer) with its share of the examples, and
    the grounding readout: per (block k, layer), the share of the examples with a step k
    whose top-1 token is the first token of gold step k (what stage 1 trained it to emit)."""
    N, K, L1 = top1.shape
    tok = method.tokenizer
    top = [[_most_common(top1[:, k, layer], tok) for layer in range(L1)] for k in range(K)]
    grounding = []
    for k in range(K):
        has = [
            i for i, e in enumerate(examples) if k < len(e.steps) and method.text_ids(e.steps[k])
        ]
        if not has:
            grounding.append(None)
            continue
        gold = np.array([method.text_ids(examples[i].steps[k])[0] for i in has])  # (n,)
        hits = top1[has, k, :] == gold[:, None]  # (n, L+1)
        grounding.append({"examples": len(has), "share": hits.mean(axis=0).tolist()})
    return {"top": top, "grounding": grounding}


def _most_common(ids: np.ndarray, tok) -> dict:
    (token, count), = Counter(ids.tolist()).most_common(1)  # fmt: skip
    return {"id": int(token), "token": tok.decode([token]), "share": count / len(ids)}
