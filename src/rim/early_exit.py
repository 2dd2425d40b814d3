"""The `early-exit` decoder: memory allocated by difficulty (the paper's outlook).

The question is prefilled alone, then the memory blocks go in one at a time with the KV
cache; a row stops adding blocks once the correctness probe (rim.probe, saved in the
checkpoint) scores its current block at least `threshold`, or, without a probe, once the
first answer token has not changed for two blocks. The answer is then decoded greedily
after the block it stopped at, exactly as the final decoder would after that many blocks.

    rim eval --checkpoint RUN/best --split test --decoder early-exit --threshold 0.9

Each block is one more sequential forward pass (1 + k passes before the first answer token,
against 1 for the final decoder): on a batch-1 accelerator where a pass costs its launch
time, stopping early can cost more time than the skipped block tokens save.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from rim.compat import cache_of, with_cache
from rim.decoders import Decoder, Request, register
from rim.decoding import Decoded, Prefill, greedy, left_pad, positions

THRESHOLD = 0.9  # default probe score to stop at


def _block_pass(model, cache, mask, pos, block: torch.Tensor, active: torch.Tensor, probe):
    """One block for every row (B, Lb); rows not `active` see it masked out and keep their
    positions. Returns the new mask, positions, last-token logits (B, V) and probe scores."""
    B, Lb = block.shape
    mask = torch.cat([mask, active[:, None].to(mask.dtype).expand(B, Lb)], dim=1)
    bpos = pos[:, None] + torch.arange(Lb, device=block.device)  # (B, Lb)
    out = model(
        input_ids=block, attention_mask=mask, position_ids=bpos, **with_cache(cache),
        use_cache=True, output_hidden_states=probe is not None, logits_to_keep=1,
    )  # fmt: skip
    scores = None
    if probe is not None:
        h = out.hidden_states[probe.layer][:, -1].float().cpu().numpy()  # (B, D)
        scores = torch.from_numpy(probe.score_layer(h))  # (B,)
    pos = torch.where(active, pos + Lb, pos)
    return mask, pos, out.logits[:, -1].float(), scores


def early_exit(req: Request, threshold: float = THRESHOLD, probe=None) -> Decoded:
    """Blocks one at a time until each row's stop rule fires (or K), then greedy decoding."""
    m, model = req.method, req.model
    K = (req.blocks or m.mem.num_blocks) if m.uses_blocks else 0
    ids, mask = left_pad(req.questions, m.pad_id, next(model.parameters()).device)
    pos = positions(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **with_cache(DynamicCache()),
                use_cache=True, logits_to_keep=1)  # fmt: skip
    cache, pos = cache_of(out), pos[:, -1] + 1  # (B,) next position
    B = ids.shape[0]
    block = torch.tensor(m.mem.block(), device=ids.device).expand(B, -1)  # (B, Lb)
    active = torch.ones(B, dtype=torch.bool, device=ids.device)
    used = torch.zeros(B, dtype=torch.long)
    logits = torch.zeros(B, out.logits.shape[-1], device=ids.device)
    last_first, same = torch.full((B,), -1), torch.zeros(B, dtype=torch.long)
    for k in range(1, K + 1):
        mask, pos, lg, scores = _block_pass(model, cache, mask, pos, block, active, probe)
        logits = torch.where(active[:, None], lg, logits)
        used = torch.where(active.cpu(), torch.full_like(used, k), used)
        first = lg.argmax(-1).cpu()
        same = torch.where(first == last_first, same + 1, torch.zeros_like(same))
        last_first = first
        stop = scores >= threshold if scores is not None else same >= 1  # 2 blocks agree
        active = active & ~stop.to(active.device)
        if not active.any():
            break
    state = Prefill(cache, mask, logits, pos, 1)
    dec = greedy(model, state, m.eos_id, m.max_new_tokens(), req.clock, req.start)
    dec.passes = [p + int(u) for p, u in zip(dec.passes, used)]  # + one pass per block
    dec.blocks_used = used.tolist()
    return dec


def _run(req: Request) -> Decoded:
    opts = req.options or {}
    return early_exit(req, opts.get("threshold", THRESHOLD), opts.get("probe"))


register(Decoder("early-exit", _run, True, "blocks one at a time until the probe is confident"))
