"""`rim bench`: schema and bookkeeping on a tiny model (timing targets live in docs/benchmarks.md,
not here: CI machines are shared and noisy)."""

from __future__ import annotations

import json
import math

import pytest

from rim import bench
from rim.curriculum import Stage
from rim.methods.rim import Grounding

Q, COT, ANS, THOUGHTS = 12, 5, 3, 4


@pytest.fixture(scope="module")
def tiny():
    return bench.load_bench_model("tiny")


def test_latency_json_schema_and_counts(capsys):
    from rim.cli import main

    main(
        [
            "bench",
            "latency",
            "--model",
            "tiny",
            "--runs",
            "2",
            "--warmup",
            "1",
            "--question-tokens",
            str(Q),
            "--cot-tokens",
            str(COT),
            "--answer-tokens",
            str(ANS),
            "--thoughts",
            str(THOUGHTS),
            "--threads",
            "1",
            "--json",
        ]
    )
    res = json.loads(capsys.readouterr().out)
    methods = {"direct", "rim", "coconut", "cot"}
    assert set(res["ms"]) == methods and set(res["latency_ms"]) == methods
    assert set(res["ratios"]) == {"rim/direct", "coconut/rim", "cot/rim"}
    assert {"cpu", "cores", "device", "torch"} <= set(res["machine"])
    assert all(v > 0 for v in res["ms"].values())
    assert all(math.isfinite(v) and v > 0 for v in res["ratios"].values())
    assert res["ratios"]["rim/direct"] == pytest.approx(res["ms"]["rim"] / res["ms"]["direct"])
    assert set(res["paired_ratios"]) == set(res["ratios"])
    assert set(res["plain_ms"]) == methods and set(res["overhead"]) == methods
    c = res["counts"]
    # the configured number of tokens, and sequential passes: prefill + one per further token
    assert c["direct"]["generated_tokens"] == c["rim"]["generated_tokens"] == ANS
    assert c["coconut"]["generated_tokens"] == ANS
    assert c["cot"]["generated_tokens"] == COT + ANS
    assert c["direct"]["forward_passes"] == c["rim"]["forward_passes"] == ANS
    assert c["cot"]["forward_passes"] == 1 + COT + ANS - 1
    # x<bot>, thoughts 1..n-1, thought n with <eot> (the original's n + 1), then a pass per token
    assert c["coconut"]["forward_passes"] == THOUGHTS + 1 + ANS - 1
    for n in methods:
        assert c[n]["forward_passes"] == c[n]["expected_forward_passes"]
        assert c[n]["same_tokens_as_plain"], n  # the plain loop computes the same answer
    assert c["direct"]["prompt_tokens"] == Q
    assert c["rim"]["prompt_tokens"] == Q + 8 * 4  # K=8 blocks of M+2=4 tokens
    assert c["coconut"]["prompt_tokens"] == Q + 1  # <bot>


def test_latency_batch_and_cot_ttft_index(tiny):
    res = bench.latency_bench(
        tiny,
        batch=3,
        question_tokens=Q,
        cot_tokens=COT,
        answer_tokens=2,
        thoughts=3,
        runs=1,
        warmup=0,
        methods=("direct", "cot"),
        plain=False,
    )
    assert res["counts"]["cot"]["generated_tokens"] == COT + 2
    assert res["ms"]["rim"] is None and res["ratios"]["cot/rim"] is None
    # CoT's first answer token comes after its reasoning tokens
    assert res["ms"]["cot"] < res["latency_ms"]["cot"]
    assert "plain_ms" not in res


def test_missing_method_is_skipped_with_a_note(tiny, monkeypatch):
    from rim import methods

    reduced = {k: v for k, v in methods.METHODS.items() if k != "coconut"}
    monkeypatch.setattr(methods, "METHODS", reduced)
    res = bench.latency_bench(
        tiny, question_tokens=Q, cot_tokens=2, answer_tokens=1, runs=1, warmup=0, plain=False
    )
    assert res["ms"]["coconut"] is None and res["ratios"]["coconut/rim"] is None
    assert any("coconut" in n for n in res["notes"])


def test_question_text_has_the_requested_length(tiny):
    for n in (2, 7, 60):
        text = bench.question_text(tiny.tokenizer, n)
        assert len(tiny.tokenizer(text)["input_ids"]) == n


def test_coconut_split():
    assert bench.coconut_split(6) == (2, 3)
    assert bench.coconut_split(5) == (1, 5)
    assert bench.coconut_split(0) == (2, 0)


def test_named_sizes_use_their_family_vocabulary():
    assert bench.FAMILY["gpt2"] == ("gpt2", 50257)
    assert bench.FAMILY["llama-1b"][1] == bench.FAMILY["llama-3b"][1] == 128256


def test_naive_per_readout_loss_equals_packed_loss(tiny):
    """The naive alternative computes the same loss and gradients, with K passes instead of one."""
    rim = bench.make_method("rim", tiny.tokenizer, blocks=5, never_stop=False)
    exs = bench.gsm8k_like(3, question_tokens=15, steps=4, step_tokens=4, seed=1)
    s1 = Stage("stage1", 0, 1, 1e-3, None, Grounding(4))
    model = tiny.model.eval()
    batches = bench.naive_batches(rim, exs, s1, 0.3)
    assert len(batches) == 4  # steps 2-4 and the answer: step 1 has faded out at p = 0.3
    model.zero_grad()
    packed = rim.loss(model, exs, s1, 0.3, 3, tiny.device)
    packed.backward()
    g_packed = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()
    naive = bench.naive_step(rim, model, exs, s1, 0.3, 3, tiny.device)
    g_naive = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()
    assert naive == pytest.approx(packed.item(), rel=1e-5)
    # a relative norm, not per element: near-zero entries carry only rounding noise
    assert float((g_naive - g_packed).norm() / g_packed.norm()) < 1e-5


def test_train_bench_returns_three_entries(tiny):
    res = bench.train_bench(
        tiny,
        batch=2,
        question_tokens=20,
        steps_per_example=3,
        step_tokens=4,
        thoughts=2,
        runs=1,
        warmup=1,
    )
    names = {"rim_packed", "rim_naive", "coconut"}
    assert set(res["examples_per_s"]) == names
    assert all(res["examples_per_s"][n] > 0 for n in names)
    assert set(res["peak_mb"]) == names and set(res["ms"]) == names
    assert res["ratios"]["packed/naive"] > 0 and res["ratios"]["packed/coconut"] > 0
    t = res["tokens_per_batch"]
    assert t["rim_packed"] < t["rim_naive"]  # the question and blocks are shared
    json.dumps(res)
    tiny.model.eval()


def test_any_block_ratio_is_finite(tiny):
    res = bench.any_block_bench(
        tiny, batch=8, examples=8, question_tokens=10, blocks=3, runs=1, warmup=0
    )
    assert math.isfinite(res["ratios"]["any/final"]) and res["ratios"]["any/final"] > 0


def test_any_block_branches_match_separate_runs(tiny):
    """Branch k of the shared any-block decode sees exactly `x ++ m_1..m_k` (left padding too)."""
    from rim.decoders import decode

    m = bench.make_method("rim", tiny.tokenizer, blocks=3)
    K = 3
    texts = [bench.question_text(tiny.tokenizer, n, seed=n) for n in (4, 9)]
    any_out = decode(m, tiny.model, texts, "all-blocks")
    for k in range(1, K + 1):
        one = decode(m, tiny.model, texts, blocks=k)
        assert [any_out.tokens[b * K + k - 1] for b in range(2)] == one.tokens


def test_bench_cli_errors_name_the_flag():
    from rim.errors import RimError

    with pytest.raises(RimError, match="--model"):
        bench.load_bench_model("no-such-size")
    with pytest.raises(RimError, match="--dtype"):
        bench.parse_dtype("float8")
