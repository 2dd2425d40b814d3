"""Inference: batching with left padding, the KV cache and shared-prefill any-block answers."""

from __future__ import annotations

import pytest
import torch

from rim.decoders import decode

from .conftest import make_setup

QUESTIONS = ["3 + 4 + 2", "1 + 1", "9 - 4 + 3 + 1", "5"]


def _naive(model, ids: list[int], n: int) -> list[int]:
    """Greedy without a cache: re-run the whole sequence for every token."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_cached_decode_equals_naive_loop(arch):
    cfg, tok, model, method = make_setup(
        "rim", arch, "sdpa", memory__blocks=3, eval__max_new_tokens=5
    )
    method.eos_id = -1  # a random model rarely says EOS: decode the full budget
    out = decode(method, model, QUESTIONS)
    for q, got in zip(QUESTIONS, out.tokens):
        assert got == _naive(model, method.prompt(q), 5)
    assert out.passes == [5] * len(QUESTIONS)  # 1 prefill + 4 decode steps


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_any_block_branches_equal_separate_runs_with_k_blocks(arch):
    cfg, tok, model, method = make_setup(
        "rim", arch, "sdpa", memory__blocks=4, eval__max_new_tokens=4
    )
    method.eos_id = -1
    shared = decode(method, model, QUESTIONS, "all-blocks")
    K = 4
    assert len(shared.tokens) == K * len(QUESTIONS)
    for k in range(1, K + 1):
        alone = decode(method, model, QUESTIONS, blocks=k)
        for b in range(len(QUESTIONS)):
            assert shared.tokens[b * K + k - 1] == alone.tokens[b], (arch, k, b)


def test_blocks_override_changes_the_prompt():
    _, _, _, method = make_setup("rim", "llama", "sdpa", memory__blocks=3)
    q = list(method.question_ids("1 + 1"))
    assert method.prompt("1 + 1") == q + method.mem.blocks(3)
    assert method.prompt("1 + 1", blocks=1) == q + method.mem.block()


@pytest.mark.parametrize("decoder", ["final", "all-blocks"])
def test_decoders_return_the_memory_blocks_hidden_states(decoder):
    """`keep_states`: every layer's states of the K blocks, as a plain forward computes them,
    and the same answers as without."""
    from rim.decoders import DECODERS

    cfg, tok, model, method = make_setup("rim", "llama", "sdpa", memory__blocks=3)
    out = decode(method, model, QUESTIONS, decoder, keep_states=True)
    plain = decode(method, model, QUESTIONS, decoder)
    assert out.tokens == plain.tokens and plain.memory_states is None
    K, Lb = 3, method.mem.block_len
    assert len(out.memory_states) == model.config.num_hidden_layers + 1
    for i, q in enumerate(QUESTIONS):
        prompt = method.prompt(q)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states
        for layer, h in enumerate(out.memory_states):
            assert h.shape == (len(QUESTIONS), K * Lb, model.config.hidden_size)
            torch.testing.assert_close(h[i], ref[layer][0, -K * Lb :], atol=1e-4, rtol=1e-4)
    assert set(DECODERS) >= {"final", "all-blocks"}


def test_early_exit_runs_to_k_like_final_and_stops_at_block_one_like_k_1():
    """The early-exit decoder (blocks one at a time with the KV cache): never stopping gives
    the final decoder's answers with K more passes; stopping at once gives `--blocks 1`."""
    import numpy as np

    import rim  # noqa: F401 (registers early-exit)
    from rim.probe import Probe

    cfg, tok, model, method = make_setup(
        "rim", "llama", "sdpa", memory__blocks=3, eval__max_new_tokens=4
    )
    method.eos_id = -1
    D = model.config.hidden_size
    never = Probe(1, np.zeros(D), np.ones(D), np.zeros(D), -50.0)  # score ~0: never stops
    at_once = Probe(1, np.zeros(D), np.ones(D), np.zeros(D), 50.0)  # score ~1: stops at 1
    full = decode(method, model, QUESTIONS, "early-exit", options={"probe": never})
    final = decode(method, model, QUESTIONS, "final")
    assert full.tokens == final.tokens and full.blocks_used == [3] * len(QUESTIONS)
    assert full.passes == [p + 3 for p in final.passes]
    one = decode(method, model, QUESTIONS, "early-exit", options={"probe": at_once})
    assert one.tokens == decode(method, model, QUESTIONS, "final", blocks=1).tokens
    assert one.blocks_used == [1] * len(QUESTIONS)
    stable = decode(method, model, QUESTIONS, "early-exit")  # no probe: two blocks agree
    assert all(2 <= k <= 3 for k in stable.blocks_used)
