"""Tests for rim.data: the real shipped files, the generators, error messages, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rim.data import (
    GENERATORS,
    Example,
    dataset_stats,
    format_icot,
    generate,
    mult_example,
    native_split,
    read_examples,
    write_examples,
)
from rim.errors import ConfigError, DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data folder not found at {DATA}")
    return DATA


# --------------------------------------------------------------------------- real files


@pytest.mark.parametrize(
    ("rel", "count"),
    [
        ("gsm8k_aug/valid.txt", 500),
        ("gsm8k_aug/test.txt", 1319),
        ("gsm8k_aug/train_no_aug.txt", 6973),
        ("4_by_4_mult/valid.txt", 1000),
        ("4_by_4_mult/test_bigbench.txt", 1000),
        ("5_by_5_mult/valid.txt", 1000),
        ("5_by_5_mult/test_bigbench.implicit_chain_of_thought.txt", 1000),
        ("prosqa/prosqa_valid.json", 300),
        ("prosqa/prosqa_test.json", 500),
        ("prontoqa/prontoqa_valid.json", 200),
        ("prontoqa/prontoqa_test.json", 800),
        ("gsm8k/test.jsonl", 1319),
        ("gsm8k/train.jsonl", 7473),
        ("gsm_hard/gsmhardv2.jsonl", 1319),
    ],
)
def test_counts(data: Path, rel: str, count: int) -> None:
    assert len(read_examples(data / rel)) == count


def test_gsm8k_aug_first_record(data: Path) -> None:
    ex = read_examples(data / "gsm8k_aug/valid.txt", limit=1)
    assert len(ex) == 1
    assert ex[0].question.startswith("John cuts his grass to 2 inches.")
    assert ex[0].question.endswith("How much does he pay per year?")
    assert ex[0].steps == ("<<4-2=2>>", "<<2/.5=4>>", "<<12/4=3>>", "<<100*3=300>>")
    assert ex[0].answer == "300"
    test = read_examples(data / "gsm8k_aug/test.txt")
    assert max(len(e.steps) for e in test) == 8
    assert test[24].steps == () and test[24].answer == "26"  # line 25: "...|| #### 26"
    assert all(s.startswith("<<") and s.endswith(">>") for e in test for s in e.steps)


def test_train_no_aug_sentences(data: Path) -> None:
    ex = read_examples(data / "gsm8k_aug/train_no_aug.txt", limit=2)
    assert ex[0].steps == (
        "The annual budget for policing is 32 / 2 = $16 million.",
        "The combined budget for education and policing is 16 + 12 = $28 million.",
        "There is 32 - 28 = $4 million to manage public spaces.",
    )
    assert ex[0].answer == "4"


def test_mult_first_record(data: Path) -> None:
    ex = read_examples(data / "4_by_4_mult/test_bigbench.txt", limit=1)[0]
    assert ex == Example(
        "7 6 9 2 * 1 6 3 6",
        (
            "7 6 9 2 0",
            "0 2 0 8 7 1 ( 7 8 9 0 8 1 )",
            "0 0 1 0 9 8 0 ( 7 8 0 1 7 0 1 )",
            "0 0 0 2 0 8 7 1",
        ),
        "7 8 0 3 7 8 8 1",
        step_sep=" + ",  # the CoT text as written keeps its ` + ` (issue 11)
    )
    line = (data / "4_by_4_mult/test_bigbench.txt").read_text().splitlines()[0]
    assert ex.cot == line.split("||")[1].split(" #### ")[0]
    assert all(len(e.steps) == 5 for e in read_examples(data / "5_by_5_mult/valid.txt"))


def test_prosqa_prontoqa(data: Path) -> None:
    pros = read_examples(data / "prosqa/prosqa_valid.json")  # README "#179" is 0-based
    assert pros[179].answer == "Polly is a rempus."
    assert pros[179].steps == (
        "Polly is a yerpus.",
        "Every yerpus is a brimpus.",
        "Every brimpus is a rempus.",
    )
    assert all(3 <= len(e.steps) <= 6 for e in pros)
    pronto = read_examples(data / "prontoqa/prontoqa_valid.json")
    assert all(len(e.steps) == 6 for e in pronto)
    assert pronto[0].steps[0] == "Alex is a tumpus. Tumpuses are gorpuses."
    assert pronto[0].answer == "True"
    assert sum(e.answer == "True" for e in pronto) == 89
    assert len(read_examples(data / "prontoqa/prontoqa_valid.json", limit=7)) == 7


def test_gsm8k_matches_gsm8k_aug_test(data: Path) -> None:
    orig = read_examples(data / "gsm8k/test.jsonl")
    assert orig[0].steps == ("<<16-3-4=9>>", "<<9*2=18>>") and orig[0].answer == "18"
    assert orig == read_examples(data / "gsm8k_aug/test.txt")


def test_gsmhard(data: Path) -> None:
    ex = read_examples(data / "gsm_hard/gsmhardv2.jsonl")
    assert ex[0].answer == "-9867630" and ex[0].steps == ()
    assert ex[0].question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert ex[7].answer == "3244047.0999999996"
    assert not any(e.answer.endswith(".0") for e in ex)


@pytest.mark.parametrize("k", [4, 5])
def test_mult_regenerated_byte_identical(data: Path, k: int) -> None:
    for name in ("valid.txt", "test_bigbench.txt", "test_bigbench.implicit_chain_of_thought.txt"):
        raw = (data / f"{k}_by_{k}_mult" / name).read_bytes()
        lines = raw.decode().splitlines()
        assert len(lines) == 1000
        out = []
        for line in lines:  # each line from its question alone
            a, b = (int(x.replace(" ", "")[::-1]) for x in line.split("||")[0].split(" * "))
            assert 10 ** (k - 1) <= a < 10**k and 10 ** (k - 1) <= b < 10**k  # no leading 0
            out.append(format_icot(mult_example(a, b, k, k), " + ") + "\n")
        assert "".join(out).encode() == raw  # the whole file, byte for byte


# --------------------------------------------------------------------------- generators


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_deterministic(name: str) -> None:
    a = generate(name, 50, seed=1)
    assert a == generate(name, 50, seed=1)
    assert a != generate(name, 50, seed=2)
    assert len(a) == 50


@pytest.mark.parametrize(
    ("name", "options", "sep"),
    [
        ("mult", {}, " + "),
        ("mult", {"digits": 5}, " + "),
        ("mult", {"digits_a": 3, "digits_b": 1}, " + "),
        ("mult", {"digits": 4, "steps": "partial"}, " + "),
        ("mult", {"digits": 4, "steps": "columns"}, " + "),
        ("chain", {}, " "),
        ("chain", {"terms": 2, "max_value": 9}, " "),
    ],
)
def test_generated_roundtrip_icot(tmp_path: Path, name: str, options: dict, sep: str) -> None:
    exs = generate(name, 40, seed=3, **options)
    path = tmp_path / "gen.txt"
    path.write_text("".join(format_icot(e, sep) + "\n" for e in exs))
    assert read_examples(path) == exs  # auto step splitting recovers the steps


def test_mult_options() -> None:
    ex = generate("mult", 20, seed=0, digits=3)
    assert all(e.question.count(" ") == 6 and len(e.steps) == 3 for e in ex)
    part = generate("mult", 20, seed=0, digits=3, steps="partial")
    assert all("(" not in s for e in part for s in e.steps)
    assert [e.answer for e in part] == [e.answer for e in ex]
    odd = generate("mult", 5, seed=0, digits_a=2, digits_b=3)[0]
    a, b = odd.question.split(" * ")
    assert len(a.split()) == 2 and len(b.split()) == 3 and len(odd.answer.split()) == 5


def _number(reversed_digits: str) -> int:
    return int(reversed_digits.replace(" ", "")[::-1])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.data())
def test_mult_column_steps_carry_to_the_product(da: int, db: int, data) -> None:
    """Column t is the sum of a_i * b_j over i + j = t (no carry): every column at the same
    width, and the columns, carried, give the product."""
    a = data.draw(st.integers(10 ** (da - 1), 10**da - 1))
    b = data.draw(st.integers(10 ** (db - 1), 10**db - 1))
    ex = mult_example(a, b, da, db, "columns")
    assert len(ex.steps) == da + db - 1 and len({len(s) for s in ex.steps}) == 1
    assert sum(_number(s) * 10**t for t, s in enumerate(ex.steps)) == a * b == _number(ex.answer)
    ai, bj = str(a)[::-1], str(b)[::-1]
    t = data.draw(st.integers(0, da + db - 2))
    pairs = [(i, t - i) for i in range(da) if 0 <= t - i < db]
    assert _number(ex.steps[t]) == sum(int(ai[i]) * int(bj[j]) for i, j in pairs)


@pytest.mark.parametrize("k", [4, 5])
def test_mult_questions_of_a_file_with_another_chain(data: Path, k: int) -> None:
    """`questions: FILE` takes the file's questions in order: with iCoT's steps, the file
    itself; with column steps, its questions and answers."""
    path = data / f"{k}_by_{k}_mult" / "test_bigbench.txt"
    shipped = read_examples(path)
    assert generate("mult", 1000, seed=9, digits=k, questions=str(path)) == shipped
    cols = generate("mult", 50, seed=9, digits=k, steps="columns", questions=str(path))
    assert [(e.question, e.answer) for e in cols] == [(e.question, e.answer) for e in shipped[:50]]
    assert {len(e.steps) for e in cols} == {2 * k - 1}
    with pytest.raises(ConfigError, match="option 'questions': 1001 > 1000 lines"):
        generate("mult", 1001, seed=9, digits=k, questions=str(path))


def test_chain_values() -> None:
    for e in generate("chain", 200, seed=5, terms=3):
        toks = e.question.split()
        assert len(toks) == 5 and len(e.steps) == 2
        total = int(toks[0])
        for op, x in zip(toks[1::2], toks[2::2]):
            total += int(x) if op == "+" else -int(x)
        assert e.steps[-1] == e.answer == str(total)
        assert all(int(s) >= 0 for s in e.steps)
        assert set(e.question) <= set("0123456789+- ")


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    pairs=st.sampled_from([2, 4, 6, 8, 12]),
    group=st.sampled_from([1, 2]),
)
def test_pairsum_values(seed: int, pairs: int, group: int) -> None:
    """Flags are x + y > t in pair order, `per_step` of them a step; the answer counts them."""
    words = "zero one two three four five six seven eight nine ten eleven twelve".split()
    for e, flat in zip(
        generate("pairsum", 5, seed, pairs=pairs, per_step=group),
        generate("pairsum", 5, seed, pairs=pairs),
    ):
        body, threshold = e.question.split(" ; above ")
        t = words.index(threshold)
        sums = [int(p.split(" + ")[0]) + int(p.split(" + ")[1]) for p in body.split(" ,")[:-1]]
        flags = ["yes" if s > t else "no" for s in sums]
        assert len(sums) == pairs and e.answer == str(flags.count("yes"))
        assert len(e.steps) == pairs // group and " ".join(e.steps).split() == flags
        assert (flat.question, flat.answer) == (e.question, e.answer)  # grouping changes steps only


@pytest.mark.parametrize(
    ("name", "options", "needle"),
    [
        ("nope", {}, "nope"),
        ("pairsum", {"pairs": 6, "per_step": 4}, "multiple of per_step"),
        ("pairsum", {"low": 9, "high": 3}, "low <= high"),
        ("mult", {"digitz": 3}, "digitz"),
        ("mult", {"digits": 0}, "digits"),
        ("mult", {"steps": "some"}, "steps"),
        ("chain", {"terms": 1}, "terms"),
        ("chain", {"max_value": "9"}, "max_value"),
    ],
)
def test_generator_config_errors(name: str, options: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        generate(name, 3, 0, **options)


# --------------------------------------------------------------------------- native_split, stats


def test_native_split(tmp_path: Path) -> None:
    assert native_split(generator="chain", size=10, seed=1) == generate("chain", 10, 1)
    assert len(native_split(generator="mult", size=10, options={"digits": 2}, limit=4)) == 4
    path = write_examples(generate("chain", 5, 0), tmp_path / "x.jsonl")
    assert native_split(str(path), limit=2) == generate("chain", 2, 0)
    for kwargs in ({}, {"path": str(path), "generator": "chain"}):
        with pytest.raises(ConfigError, match="data.path") as err:
            native_split(**kwargs)
        assert "data.generator" in str(err.value)


def test_dataset_stats() -> None:
    exs = [Example("ab", ("1", "2"), "3"), Example("abcd", (), "45")]
    assert dataset_stats(exs) == {
        "n": 2,
        "mean_steps": 1.0,
        "max_steps": 2,
        "mean_question_chars": 3.0,
        "mean_answer_chars": 1.5,
    }
    assert dataset_stats([])["n"] == 0


def test_example_steps_tuple() -> None:
    ex = Example("q", ["a", "b"], "c")  # type: ignore[arg-type]
    assert ex.steps == ("a", "b") and hash(ex) == hash(Example("q", ("a", "b"), "c"))


# --------------------------------------------------------------------------- errors


def _error(path: Path, fmt: str = "auto") -> str:
    with pytest.raises(DataError) as err:
        read_examples(path, fmt)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))
    return msg[len(str(path)) :]


GOOD = {"question": "q", "steps": ["s"], "answer": "a"}


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("a.txt", "q||s #### a\nq2 s #### a\n", ":2: missing '||'"),
        ("b.txt", "\n\nq||s a\n", ":3: missing '####'"),
        ("c.txt", "q||s #### a\n  ||s #### a\n", ":2: empty question"),
        ("d.txt", "q||s #### a\nq||s ####  \n", ":2: empty answer"),
        ("e.jsonl", json.dumps(GOOD) + "\n\n{bad json\n", ":3: invalid JSON"),
        ("f.jsonl", json.dumps(GOOD) + "\n" + json.dumps({"question": "q", "steps": []}), ":2: missing key 'answer'"),
        ("g.jsonl", json.dumps({**GOOD, "steps": "s"}), ":1: key 'steps' must be list"),
        ("h.jsonl", json.dumps({**GOOD, "steps": [1]}), ":1: key 'steps' item 0 must be str"),
        ("i.jsonl", json.dumps({**GOOD, "answer": 3}), ":1: key 'answer' must be str"),
        ("j.jsonl", json.dumps({**GOOD, "question": " "}), ":1: empty question"),
        ("k.json", "[\n" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD) + ",\n]", ":4: invalid JSON"),
        ("l.json", json.dumps([GOOD] * 4 + [{"question": "q", "steps": []}]), ":record 5: missing key 'answer'"),
        ("m.json", json.dumps([GOOD, {**GOOD, "answer": ""}]), ":record 2: empty answer"),
        ("n.json", json.dumps(GOOD), ":1: expected a JSON array"),
        ("o.json", json.dumps([GOOD, "x"]), ":record 2: expected a JSON object"),
        ("p.txt", "", ": no examples"),
        ("q.txt", "\n  \n", ": no examples"),
        ("r.json", "[]", ": no examples"),
        ("s.jsonl", "", ": no examples"),
        ("t.jsonl", json.dumps({"foo": 1}), ":1: cannot detect"),
        ("u.csv", "a,b\n", ": cannot detect the format of a '.csv' file"),
        ("v.jsonl", json.dumps({"question": "q", "answer": "x\n#### 3"}) + "\n" + json.dumps({"question": "q", "answer": "x"}), ":2: key 'answer' has no '####'"),
        ("w.jsonl", json.dumps({"input": "q", "code": "", "target": 2.0}) + "\n" + json.dumps({"input": "q", "target": "2"}), ":2: key 'target' must be a number"),
        ("x.jsonl", json.dumps({"input": "q", "code": ""}), ":1: cannot detect"),
    ],
)  # fmt: skip
def test_read_errors(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    assert _error(path).startswith(expected)


def test_explicit_format_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text(json.dumps({"input": "q", "code": ""}) + "\n")
    assert _error(path, "gsmhard").startswith(":1: missing key 'target'")
    assert _error(path, "gsm8k").startswith(":1: missing key 'question'")
    msg = _error(path, "xml")
    assert msg.startswith(": unknown format 'xml'")
    assert _error(tmp_path / "missing.json") == ": no such file"
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"q||s #### a\n\xff\xfe||x #### y\n")
    assert _error(bad).startswith(":2: not valid UTF-8")


def test_gsm8k_and_gsmhard_parsing(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    recs = [
        {"question": "Q?", "answer": "A <<1+1=2>>2 and <<2*3=6>>6.\nNo calc here.\n#### 1,080"},
        {"question": "R?", "answer": "#### 5 "},
    ]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert read_examples(path) == [
        Example("Q?", ("<<1+1=2>>", "<<2*3=6>>"), "1,080"),
        Example("R?", (), "5"),
    ]
    hard = tmp_path / "h.jsonl"
    targets = [-9867630.0, 2.5, 7, 1e20]
    hard.write_text("".join(json.dumps({"input": "q", "target": t}) + "\n" for t in targets))
    answers = [e.answer for e in read_examples(hard)]
    assert answers == ["-9867630", "2.5", "7", "100000000000000000000"]


def test_step_sep_override(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_text("Q||One. Two three. #### 1\n")
    assert read_examples(path)[0].steps == ("One.", "Two three.")
    assert read_examples(path, step_sep=" ")[0].steps == ("One.", "Two", "three.")
    path.write_text("Q||a ; b #### 1\n")
    assert read_examples(path, step_sep=" ; ")[0].cot == "a ; b"
    with pytest.raises(ValueError):
        format_icot(Example("a||b", (), "c"))


def test_write_examples_atomic(tmp_path: Path) -> None:
    exs = generate("chain", 3, 0)
    out = write_examples(exs, tmp_path / "sub" / "o.jsonl")
    assert [p.name for p in out.parent.iterdir()] == ["o.jsonl"]  # no temp file left behind
    assert json.loads(out.read_text().splitlines()[0]).keys() == {"question", "steps", "answer"}
    mult = generate("mult", 2, 0)
    assert read_examples(write_examples(mult, tmp_path / "m.jsonl")) == mult  # keeps ` + `
    assert mult[0].step_sep == " + "
    with pytest.raises(AttributeError):
        write_examples([exs[0], object()], out)  # type: ignore[list-item]
    assert read_examples(out) == exs  # the failed write left the old file intact
    assert [p.name for p in out.parent.iterdir()] == ["o.jsonl"]


# --------------------------------------------------------------------------- properties

_TEXT_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r|")
_text = st.text(_TEXT_CHARS, min_size=1, max_size=30).filter(
    lambda s: s.strip() == s and s and "####" not in s
)
_question = st.text(_TEXT_CHARS, min_size=1, max_size=40).filter(
    lambda s: s.strip() and "####" not in s
)
_step = st.text(_TEXT_CHARS, min_size=1, max_size=12).filter(
    lambda s: not any(c.isspace() for c in s) and "####" not in s
)
_example = st.builds(Example, _question, st.lists(_step, max_size=5).map(tuple), _text)


@settings(max_examples=150, deadline=None)
@given(st.lists(_example, min_size=1, max_size=5))
def test_icot_roundtrip_property(tmp_path_factory: pytest.TempPathFactory, exs: list) -> None:
    path = tmp_path_factory.mktemp("icot") / "x.txt"
    path.write_text("".join(format_icot(e) + "\n" for e in exs), encoding="utf-8")
    assert read_examples(path, step_sep=" ") == exs


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.builds(
            Example,
            _question,
            st.lists(st.text(max_size=20), max_size=4).map(tuple),
            st.text(min_size=1).filter(str.strip),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_jsonl_roundtrip_property(tmp_path_factory: pytest.TempPathFactory, exs: list) -> None:
    path = write_examples(exs, tmp_path_factory.mktemp("jsonl") / "x.jsonl")
    assert read_examples(path) == exs


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**16))
def test_pairsum_min_pairs_varies_the_step_count(min_pairs, seed):
    """The variable-step task: every count in min_pairs..8 steps, flags consistent."""
    exs = generate("pairsum", 200, seed, min_pairs=min_pairs)
    counts = {len(e.steps) for e in exs}
    assert min(counts) >= min_pairs and max(counts) <= 8
    assert len(counts) == 9 - min_pairs  # 200 draws reach every count
    for e in exs:
        assert e.question.count(",") == len(e.steps)
        assert int(e.answer) == e.steps.count("yes")
    assert generate("pairsum", 20, seed) == generate("pairsum", 20, seed, min_pairs=None)
