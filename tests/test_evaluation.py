"""Answer extraction and normalisation."""

from __future__ import annotations

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
