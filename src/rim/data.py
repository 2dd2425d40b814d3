"""Reading, generating and writing reasoning datasets as plain `Example` records.

Every dataset (GSM8K-Aug, k-by-k multiplication, ProsQA, ProntoQA, GSM8K, GSM-Hard, generated
toy tasks) becomes a list of `Example(question, steps, answer)`, so methods never see file
formats. Malformed input raises `DataError` whose one-line message starts with `path:line:`
(or `path:record N:` for JSON arrays) so the user can jump to the bad record.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rim.errors import ConfigError, DataError
from rim.io import atomic_file
from rim.prosqa import prosqa_problem

FORMATS = ("auto", "json", "jsonl", "icot", "gsm8k", "gsmhard")
_MULT_QUESTION = re.compile(r"^[0-9 ]+ \* [0-9 ]+$")
_CALC = re.compile(r"<<[^<>]*>>")
_SENTENCE_END = re.compile(r"(?<=\.)\s+")


@dataclass(frozen=True)
class Example:
    """One problem: question text, zero or more reasoning steps, final answer text.

    `step_sep` is what separates the steps in the source's CoT text, so that CoT-like
    methods write `step_sep.join(steps)`, the chain as written (the iCoT multiplication
    files keep their ` + `), while RiM supervises each step on its own.
    """

    question: str
    steps: tuple[str, ...]
    answer: str
    step_sep: str = " "

    @property
    def cot(self) -> str:
        """The CoT text as the source writes it."""
        return self.step_sep.join(self.steps)

    def __post_init__(self) -> None:
        # Accept lists for convenience but store a tuple so examples stay hashable.
        if not isinstance(self.steps, tuple):
            object.__setattr__(self, "steps", tuple(self.steps))


class _Bad(Exception):
    """A record-level problem; the reader adds the `path:line:` prefix."""


# --------------------------------------------------------------------------- readers


def _split_steps(text: str, step_sep: str, question: str) -> tuple[tuple[str, ...], str]:
    """(steps, the separator that re-joins them into `text`)."""
    text = text.strip()
    if not text:
        return (), " "
    if step_sep == "auto":
        if _MULT_QUESTION.match(question):
            step_sep = " + "
        elif "<<" in text or not any(c.isalpha() for c in text):
            step_sep = " "
        else:
            step_sep = "sentence"
    if step_sep == "sentence":
        parts, join = _SENTENCE_END.split(text), " "
    elif not step_sep.strip() and "\n" not in step_sep:  # a line break splits lines only
        return tuple(text.split()), " "  # already stripped and non-empty
    else:
        parts, join = text.split(step_sep), step_sep
    return tuple(p.strip() for p in parts if p.strip()), join


def _parse_icot(line: str, step_sep: str) -> Example:
    if "||" not in line:
        raise _Bad("missing '||'")
    question, rest = line.split("||", 1)
    cut = rest.rfind("####")
    if cut < 0:
        raise _Bad("missing '####'")
    answer = rest[cut + 4 :].strip()
    steps, join = _split_steps(rest[:cut], step_sep, question)
    return _checked(question, steps, answer, join)


def _checked(question: str, steps: tuple[str, ...], answer: str, step_sep: str = " ") -> Example:
    if not question.strip():
        raise _Bad("empty question")
    if not answer.strip():
        raise _Bad("empty answer")
    return Example(question, steps, answer, step_sep)


def _get(rec: Any, key: str, kind: type) -> Any:
    if not isinstance(rec, dict):
        raise _Bad(f"expected a JSON object, got {type(rec).__name__}")
    if key not in rec:
        raise _Bad(f"missing key {key!r}")
    value = rec[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _Bad(f"key {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _from_record(rec: Any) -> Example:
    question, steps = _get(rec, "question", str), _get(rec, "steps", list)
    for i, step in enumerate(steps):
        if not isinstance(step, str):
            raise _Bad(f"key 'steps' item {i} must be str, got {type(step).__name__}")
    sep = _get(rec, "step_sep", str) if "step_sep" in rec else " "
    return _checked(question, tuple(steps), _get(rec, "answer", str), sep)


def _from_gsm8k(rec: Any) -> Example:
    question, solution = _get(rec, "question", str), _get(rec, "answer", str)
    body, sep, answer = solution.rpartition("####")
    if not sep:
        raise _Bad("key 'answer' has no '####'")
    return _checked(question, tuple(_CALC.findall(body)), answer.strip())


def _format_number(x: float | int) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return repr(x)


def _from_gsmhard(rec: Any) -> Example:
    question = _get(rec, "input", str)
    if "target" not in rec:
        raise _Bad("missing key 'target'")
    target = rec["target"]
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise _Bad(f"key 'target' must be a number, got {type(target).__name__}")
    if not math.isfinite(target):
        raise _Bad(f"key 'target' must be finite, got {target!r}")
    return _checked(question, (), _format_number(target))


_RECORD_PARSERS: dict[str, Callable[[Any], Example]] = {
    "jsonl": _from_record,
    "gsm8k": _from_gsm8k,
    "gsmhard": _from_gsmhard,
}


_BREAK = re.compile(r"\r\n|\r|\n")  # Unix, Windows and classic Mac (CR-only) line ends


def _lines(path: Path, where: str) -> list[str]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = len(_BREAK.findall(data[: e.start].decode("utf-8", "replace"))) + 1
        raise DataError(f"{where}:{line}: not valid UTF-8") from None
    text = text.removeprefix("\ufeff")
    return text.split("\n") if "\r" not in text else _BREAK.split(text)  # the same; faster


def _detect(path: Path, where: str, lines: list[str]) -> str:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return "icot"
    if suffix == ".json":
        return "json"
    if suffix != ".jsonl":
        raise DataError(f"{where}: cannot detect the format of a '{suffix}' file; set format")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = _loads(line, where, lineno)
        keys = rec.keys() if isinstance(rec, dict) else ()
        if "input" in keys and "target" in keys:
            return "gsmhard"
        if "steps" in keys:
            return "jsonl"
        if "question" in keys and "####" in str(rec.get("answer", "")):
            return "gsm8k"
        raise DataError(f"{where}:{lineno}: cannot detect the JSONL format from the keys")
    raise DataError(f"{where}: no examples")


def _loads(text: str, where: str, lineno: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}:{lineno + e.lineno - 1}: invalid JSON: {e.msg}") from None


def _json_records(lines: list[str], where: str, limit: int | None) -> list[Example]:
    """A JSON array of records; errors name the record."""
    text = "\n".join(lines)
    if not text.strip():
        return []
    records = _loads(text, where, 1)
    if not isinstance(records, list):
        raise DataError(f"{where}:1: expected a JSON array of records")
    out = []
    for i, rec in enumerate(records[:limit], 1):
        try:
            out.append(_from_record(rec))
        except _Bad as e:
            raise DataError(f"{where}:record {i}: {e}") from None
    return out


def _line_records(
    lines: list[str], where: str, format: str, limit: int | None, step_sep: str
) -> list[Example]:
    """One example per non-blank line (iCoT text or JSONL); errors name file:line."""
    out: list[Example] = []
    for lineno, line in enumerate(lines, 1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        try:
            if format == "icot":
                out.append(_parse_icot(line, step_sep))
            else:
                out.append(_RECORD_PARSERS[format](_loads(line, where, lineno)))
        except _Bad as e:
            raise DataError(f"{where}:{lineno}: {e}") from None
    return out


def read_examples(
    path: str | Path, format: str = "auto", limit: int | None = None, *, step_sep: str = "auto"
) -> list[Example]:
    """Read up to `limit` examples from a data file in one of `FORMATS`.

    iCoT text lines (`question||steps #### answer`) follow Coconut's `gsm_icot.py`: the question
    is everything before the first `||` (not stripped), the answer everything after the last
    `####` (stripped); an empty steps part gives no steps (Coconut would give `[""]`).
    `step_sep="auto"` chooses the split per line, because the shipped files differ:
    a multiplication question (`^[0-9 ]+ \\* [0-9 ]+$`) splits on ` + ` (a partial product with
    its running sum is one step; a 1-digit multiplier still gives one step, so generated data
    round-trips); steps with `<<` (GSM8K-Aug) or without any letter (generated `chain`) split on
    whitespace; otherwise the steps are natural language (`train_no_aug.txt`) and split into
    sentences after each `. `, keeping the period (abbreviations like "Mr. " split too; accepted).
    Pass `step_sep=" "`, `" + "`, `"sentence"` or any literal separator to force one.
    Each example keeps the separator it was split on (`Example.step_sep`, one space for
    whitespace and sentence splits), so `Example.cot` is the CoT text as written.
    """
    where = str(path)
    if format not in FORMATS:
        raise DataError(
            f"{where}: unknown format {format!r} (expected one of {', '.join(FORMATS)})"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"data.limit: must be a positive int or null, got {limit!r}")
    p = Path(path)
    if not p.exists():
        raise DataError(f"{where}: no such file")
    if not p.is_file():
        raise DataError(f"{where}: not a regular file")
    lines = _lines(p, where)
    if format == "auto":
        format = _detect(p, where, lines)
    if format == "json":
        out = _json_records(lines, where, limit)
    else:
        out = _line_records(lines, where, format, limit, step_sep)
    if not out:
        raise DataError(f"{where}: no examples")
    return out


# --------------------------------------------------------------------------- writers


def format_icot(ex: Example, step_sep: str | None = None) -> str:
    """One iCoT text line (no newline); `step_sep=None` = the example's own separator."""
    if "||" in ex.question or any("####" in s for s in (ex.question, *ex.steps, ex.answer)):
        raise ValueError("example text contains the '||' or '####' delimiter")
    sep = ex.step_sep if step_sep is None else step_sep
    line = f"{ex.question}||{sep.join(ex.steps)} #### {ex.answer}"
    if "\n" in line or "\r" in line:
        raise ValueError("example text contains a line break")
    return line


def write_examples(examples: Iterable[Example], path: str | Path) -> Path:
    """Write JSONL `{question, steps, answer}` atomically, so readers never see half a file.

    A separator other than one space is kept as `step_sep`, so the CoT text round-trips.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for ex in examples:
        rec = {"question": ex.question, "steps": list(ex.steps), "answer": ex.answer}
        if ex.step_sep != " ":
            rec["step_sep"] = ex.step_sep
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    atomic_file(p, "".join(lines))
    return p


# --------------------------------------------------------------------------- generators


def _digits(x: int, width: int) -> str:
    """`x` zero-padded to `width` digits, least-significant first, space-separated."""
    s = str(x).zfill(width)
    if len(s) > width:
        raise ValueError(f"{x} has more than {width} digits")
    return " ".join(reversed(s))


def mult_example(
    a: int, b: int, digits_a: int | None = None, digits_b: int | None = None, steps: str = "full"
) -> Example:
    """`a * b` in the exact iCoT format of the shipped k-by-k multiplication files.

    Step i is `a * b_i` padded to `digits_a + 1` digits and shifted by i zeros; with
    `steps="full"` every step but the first and last also shows the running sum in `( ... )`.
    `steps="columns"` (ours, not iCoT's) writes column sums instead: step t is the sum of
    `a_i * b_j` over i + j = t, before any carry, so every step is computable from the
    question alone and the answer is their carried sum.

    >>> format_icot(mult_example(2967, 6361))[:44]
    '7 6 9 2 * 1 6 3 6||7 6 9 2 0 + 0 2 0 8 7 1 ('
    >>> mult_example(12, 34, steps="columns").steps  # 2*4, 2*3 + 1*4, 1*3: 8 + 10*10 + 3*100
    ('8 0 0', '0 1 0', '3 0 0')
    """
    da = digits_a or len(str(a))
    db = digits_b or len(str(b))
    bs = [int(c) for c in reversed(str(b).zfill(db))]
    if steps == "columns":
        ai = [int(c) for c in reversed(str(a).zfill(da))]
        col = [sum(ai[i] * bs[t - i] for i in range(max(0, t - db + 1), min(da, t + 1)))
               for t in range(da + db - 1)]  # fmt: skip
        out = [_digits(c, len(str(81 * min(da, db)))) for c in col]
    else:
        out = []
        for i, d in enumerate(bs):
            step = _digits(a * d * 10**i, da + 1 + i)
            if steps == "full" and 0 < i < db - 1:
                step += f" ( {_digits(a * (b % 10 ** (i + 1)), da + 1 + i)} )"
            out.append(step)
    question = f"{_digits(a, da)} * {_digits(b, db)}"
    return Example(question, tuple(out), _digits(a * b, da + db), " + ")


def _positive(gen: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"generator {gen!r}: option {name!r} must be a positive int, got {value!r}"
        )
    return value


def _gen_mult(
    n: int,
    rng: random.Random,
    digits: int = 4,
    digits_a: int | None = None,
    digits_b: int | None = None,
    steps: str = "full",
    exclude: list | None = None,
    questions: str | None = None,
) -> list[Example]:
    """k-by-k products; operands have exactly k digits (the files never start with a 0).

    `exclude`: splits (a file path, or a `data.<split>` mapping: `{path: ...}` or
    `{generator: mult, size, seed, options}`) whose questions are never drawn, so a train
    set shares no question with the valid and test splits it is scored on; a drawn
    excluded product is drawn again. `questions`: a file whose first n questions are taken
    in order instead of drawn, their chains rebuilt with `steps` (a shipped test split
    with column steps: the same questions and answers, scored as the file is).
    """
    da = _positive("mult", "digits_a", digits if digits_a is None else digits_a)
    db = _positive("mult", "digits_b", digits if digits_b is None else digits_b)
    _positive("mult", "digits", digits)
    if steps not in ("full", "partial", "columns"):
        raise ConfigError(
            f"generator 'mult': option 'steps' must be full, partial or columns, got {steps!r}"
        )
    if questions is not None:
        fixed = [[int("".join(reversed(w.split()))) for w in e.question.split(" * ")]
                 for e in native_split(path=questions)]  # fmt: skip
        if n > len(fixed):
            raise ConfigError(f"generator 'mult': option 'questions': {n} > {len(fixed)} lines")
        return [mult_example(a, b, da, db, steps) for a, b in fixed[:n]]
    held = _excluded_questions(exclude)
    if sum(_drawable(q, da, db) for q in held) >= 81 * 10 ** (da + db - 2):  # every a * b
        raise ConfigError("generator 'mult': option 'exclude' leaves no product to draw")
    out = []
    while len(out) < n:
        a = rng.randint(10 ** (da - 1), 10**da - 1)
        b = rng.randint(10 ** (db - 1), 10**db - 1)
        ex = mult_example(a, b, da, db, steps)
        if ex.question not in held:
            out.append(ex)
    return out


def _drawable(question: str, da: int, db: int) -> bool:
    """A question `_gen_mult` may draw: da- and db-digit operands without a leading 0."""
    operands = [w.split() for w in question.split(" * ")]  # digits least-significant first
    return [(len(w), bool(w) and w[-1] != "0") for w in operands] == [(da, True), (db, True)]


def _excluded_questions(exclude: list | None) -> set[str]:
    """The questions of every split in a generator's `exclude` option."""
    if exclude is None:
        return set()
    if not isinstance(exclude, list):
        raise ConfigError(f"generator 'mult': option 'exclude' must be a list, got {exclude!r}")
    held: set[str] = set()
    for split in exclude:
        if isinstance(split, str):
            split = {"path": split}
        if not isinstance(split, dict):
            raise ConfigError(
                f"generator 'mult': option 'exclude': expected a path or a split mapping, "
                f"got {split!r}"
            )
        try:
            held |= {e.question for e in native_split(**split)}
        except TypeError as err:  # an unknown key of the mapping
            raise ConfigError(f"generator 'mult': option 'exclude': {err}") from None
    return held


def _gen_chain(n: int, rng: random.Random, terms: int = 3, max_value: int = 9) -> list[Example]:
    """`3 + 4 - 2`: steps are the running results; never negative, so the vocabulary stays tiny."""
    _positive("chain", "max_value", max_value)
    if _positive("chain", "terms", terms) < 2:
        raise ConfigError(f"generator 'chain': option 'terms' must be >= 2, got {terms!r}")
    out = []
    for _ in range(n):
        total = rng.randint(0, max_value)
        parts, steps = [str(total)], []
        for _ in range(terms - 1):
            x = rng.randint(0, max_value)
            op = rng.choice("+-") if x <= total else "+"
            total = total + x if op == "+" else total - x
            parts += [op, str(x)]
            steps.append(str(total))
        out.append(Example(" ".join(parts), tuple(steps), str(total)))
    return out


def _gen_pick(
    n: int, rng: random.Random, length: int = 5, first: int = 2, second: int = 4
) -> list[Example]:
    """`7 3 9 1 4`: step = the digit at position `first`, answer = it and the one at `second`.

    Deliberately easy (two positional look-ups), with 10**length distinct questions so
    held-out examples are really unseen: the pipeline's learning smoke test.
    """
    _positive("pick", "length", length)
    for name, pos in (("first", first), ("second", second)):
        if not 1 <= pos <= length:
            raise ConfigError(f"generator 'pick': option {name!r} must be in 1..{length}")
    out = []
    for _ in range(n):
        digits = [rng.randint(0, 9) for _ in range(length)]
        a, b = digits[first - 1], digits[second - 1]
        out.append(Example(" ".join(map(str, digits)), (str(a),), f"{a} {b}"))
    return out


_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen"
).split()


def _gen_pairsum(
    n: int,
    rng: random.Random,
    pairs: int = 8,
    low: int = 7,
    high: int = 11,
    per_step: int = 1,
    min_pairs: int | None = None,
) -> list[Example]:
    """`6 + 6 , 0 + 4 , ... ; above twelve`: how many pair sums exceed the final threshold?

    The demo's toy task (docs/toy_task.md). Steps: one flag per pair (`yes` if x + y > t),
    each computable from the question in parallel, which is the width memory blocks add;
    answer: the count. The threshold comes last, as a word (its own token), so question
    positions cannot precompute the flags: a direct answer must compare every sum with it at
    one position. `per_step` flags make one step (pairs must divide evenly), so T = pairs /
    per_step steps need T + 1 memory blocks. `min_pairs` makes the step count vary: each
    question gets between `min_pairs` and `pairs` pairs, uniformly (the variable-step task of
    docs/inspect.md, for memory allocated by difficulty).
    """
    _positive("pairsum", "pairs", pairs)
    _positive("pairsum", "per_step", per_step)
    if pairs % per_step:
        raise ConfigError("generator 'pairsum': pairs must be a multiple of per_step")
    if not 0 <= low <= high <= 18:
        raise ConfigError("generator 'pairsum': options need 0 <= low <= high <= 18")
    if min_pairs is not None and not (
        _positive("pairsum", "min_pairs", min_pairs) <= pairs and min_pairs % per_step == 0
    ):
        raise ConfigError(
            "generator 'pairsum': min_pairs must be <= pairs and a multiple of per_step"
        )
    out = []
    for _ in range(n):
        size = (
            pairs
            if min_pairs is None
            else per_step * rng.randint(min_pairs // per_step, pairs // per_step)
        )
        xy = [(rng.randrange(10), rng.randrange(10)) for _ in range(size)]
        t = rng.randint(low, high)
        flags = [x + y > t for x, y in xy]
        question = " ".join(f"{x} + {y} ," for x, y in xy) + f" ; above {_NUMBER_WORDS[t]}"
        words = ["yes" if f else "no" for f in flags]
        steps = tuple(" ".join(words[i : i + per_step]) for i in range(0, size, per_step))
        out.append(Example(question, steps, str(sum(flags))))
    return out


def _gen_prosqa(n: int, rng: random.Random) -> list[Example]:
    """ProsQA-style problems (`rim.prosqa`), to train on and score on the shipped ProsQA test."""
    return [Example(q, steps, a) for q, steps, a in (prosqa_problem(rng) for _ in range(n))]


GENERATORS: dict[str, Callable[..., list[Example]]] = {
    "pairsum": _gen_pairsum,
    "prosqa": _gen_prosqa,
    "mult": _gen_mult,
    "chain": _gen_chain,
    "pick": _gen_pick,
}


def generate(name: str, n: int, seed: int, **options: Any) -> list[Example]:
    """`n` examples from generator `name`; the same seed always gives the same examples."""
    if name not in GENERATORS:
        raise ConfigError(f"unknown generator {name!r} (known: {', '.join(sorted(GENERATORS))})")
    fn = GENERATORS[name]
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("n", "rng")]
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"generator {name!r}: unknown option {key!r} (known: {', '.join(allowed)})"
            )
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"generator {name!r}: size must be a non-negative int, got {n!r}")
    return fn(n, random.Random(seed), **options)


# --------------------------------------------------------------------------- splits and stats


def native_split(
    path: str | None = None,
    format: str = "auto",
    generator: str | None = None,
    size: int = 1000,
    seed: int = 0,
    options: dict | None = None,
    limit: int | None = None,
) -> list[Example]:
    """One split from a file (`data.path`) or a seeded generator (`data.generator`)."""
    if (path is None) == (generator is None):
        raise ConfigError("exactly one of data.path and data.generator must be set")
    if path is not None:
        return read_examples(path, format, limit)
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"data.options: must be a mapping, got {type(options).__name__}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"data.limit: must be a positive int or null, got {limit!r}")
    n = size if limit is None else min(size, limit)
    return generate(str(generator), n, seed, **(options or {}))


def dataset_stats(examples: list[Example]) -> dict[str, float | int]:
    """Sizes worth logging: catches empty steps or truncated answers at a glance."""
    n = len(examples)
    steps = [len(e.steps) for e in examples]
    return {
        "n": n,
        "mean_steps": sum(steps) / n if n else 0.0,
        "max_steps": max(steps, default=0),
        "mean_question_chars": sum(len(e.question) for e in examples) / n if n else 0.0,
        "mean_answer_chars": sum(len(e.answer) for e in examples) / n if n else 0.0,
    }
