"""Answer extraction and normalisation."""

from __future__ import annotations

import pytest

from rim.evaluation import normalize, token_accuracy

from .conftest import make_setup


def test_cot_answer_is_split_on_marker_tokens_not_text():
    _, tok, _, method = make_setup("cot", "llama", "sdpa")
    steps = list(method.reasoning_ids(("7", "9")))
    answer = list(method.answer_ids("9"))  # marker + answer
    generated = steps + answer
    # the word-level tokenizer decodes "####" as "# # # #": text splitting would fail
    assert "####" not in tok.decode(generated)
    got = tok.decode(method.answer_tokens(generated), skip_special_tokens=True)
    assert normalize(got) == "9"
    assert method.answer_tokens(steps) == []  # no marker, no answer
    assert method.first_answer_index(generated) == len(steps) + len(answer) - 1


def test_direct_answer_is_everything_generated():
    _, _, _, method = make_setup("direct", "llama", "sdpa")
    assert method.answer_tokens([5, 6]) == [5, 6]


def test_normalize_and_token_accuracy():
    assert normalize("1,080") == normalize("1080") == "1080"
    assert normalize("-3.50") == "-3.5"
    assert normalize("Polly is a rempus .") == normalize("polly is a rempus.")
    assert token_accuracy("123", "124") == 2 / 3
    assert token_accuracy("", "") == 1.0


def test_mean_prompt_tokens_counts_only_the_blocks_a_decoder_used():
    from rim.data import generate
    from rim.evaluation import evaluate

    _, _, model, method = make_setup("rim", memory__blocks=3, eval__max_new_tokens=2)
    exs = generate("chain", 6, seed=3)
    q = sum(len(method.question_ids(e.question)) for e in exs) / len(exs)
    Lb = method.mem.block_len
    full = evaluate(method, model, exs, decoder="final", timing_examples=0, progress=False)
    assert full["mean_prompt_tokens"] == pytest.approx(q + 3 * Lb)
    opts = {"threshold": 0.0, "probe": None}  # no probe: stop once two blocks agree
    early = evaluate(method, model, exs, decoder="early-exit", timing_examples=0, progress=False,
                     options=opts)  # fmt: skip
    assert early["mean_prompt_tokens"] == pytest.approx(q + early["mean_blocks"] * Lb)
