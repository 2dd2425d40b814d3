"""The ProsQA-style generator: every problem is well posed (the answer reachable, the
distractor not, the steps a shortest path), in the shipped files' words, seeded."""

from __future__ import annotations

import json
import re
from collections import deque
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rim.data import generate
from rim.prosqa import CONCEPTS, NAMES

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prosqa"
FACT = re.compile(r"(?:Every )?(\w+) is a (\w+)\.")


def _graph(question: str) -> tuple[dict[str, set[str]], str, tuple[str, str]]:
    facts, ask = question.rsplit(". Is ", 1)
    edges: dict[str, set[str]] = {}
    for u, v in FACT.findall(facts + "."):
        edges.setdefault(u, set()).add(v)
    who, a, b = re.fullmatch(r"(\w+) a (\w+) or (\w+)\?", ask).groups()
    return edges, who, (a, b)


def _dist(edges: dict[str, set[str]], src: str) -> dict[str, int]:
    dist, todo = {src: 0}, deque([src])
    while todo:
        u = todo.popleft()
        for v in edges.get(u, ()):
            if v not in dist:
                dist[v] = dist[u] + 1
                todo.append(v)
    return dist


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_every_problem_is_well_posed(seed: int) -> None:
    (ex,) = generate("prosqa", 1, seed)
    edges, who, (a, b) = _graph(ex.question)
    target = FACT.fullmatch(ex.answer).group(2)
    assert FACT.fullmatch(ex.answer).group(1) == who and target in (a, b)
    neg = b if target == a else a
    dist = _dist(edges, who)
    assert neg not in dist and not edges.get(neg) and not edges.get(target)
    assert 3 <= len(ex.steps) <= 6 and dist[target] == len(ex.steps)
    chain = [FACT.fullmatch(s).groups() for s in ex.steps]
    assert chain[0][0] == who and chain[-1][1] == target
    assert all(x[1] == y[0] for x, y in zip(chain, chain[1:]))
    assert all(v in edges[u] for u, v in chain)
    words = {w for u, vs in edges.items() for w in (u, *vs)}
    assert words <= set(NAMES) | set(CONCEPTS)
    assert any(ex.question.startswith(p) for p in ("Every ", *NAMES))


def test_seeded_and_sized() -> None:
    assert generate("prosqa", 20, 3) == generate("prosqa", 20, 3)
    assert generate("prosqa", 20, 3) != generate("prosqa", 20, 4)
    assert len(generate("prosqa", 7, 0)) == 7


def test_matches_the_shipped_valid_split() -> None:
    """The words are the shipped files', and the sizes are near valid's (17-28 nodes, 3-6
    steps, ~200 words): a tokenizer built on generated data knows every test word."""
    if not DATA.is_dir():
        pytest.skip(f"shared data folder not found at {DATA}")
    real = json.loads((DATA / "prosqa_test.json").read_text())
    assert {s for x in real for s in x["idx_to_symbol"]} <= set(NAMES) | set(CONCEPTS)
    gen = generate("prosqa", 300, 0)
    mean = sum(len(x.question.split()) for x in gen) / len(gen)
    real_mean = sum(len(x["question"].split()) for x in real) / len(real)
    assert abs(mean - real_mean) < 0.2 * real_mean
    assert {len(x.steps) for x in gen} == {len(x["steps"]) for x in real} == {3, 4, 5, 6}
