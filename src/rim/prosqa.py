"""A seeded generator of ProsQA-style problems, to train on when ProsQA's train split is absent.

ProsQA (Coconut, Hao et al. 2024) asks whether a person is one of two concepts, given shuffled
"Every X is a Y." / "Name is a Y." facts of a random DAG: the answer is the one reachable from
the person, the steps are a shortest path to it. Coconut's train split is not shipped here
(`../shared/data/README.md`), its valid and test splits are, with their graphs (`edges`,
`root`, `target`, `neg_target`). This generator is written from that description and from the
structure of the shipped *valid* file (never the test file), whose statistics it matches:

- the 17 person names and 38 nonce concepts of the shipped files (no word the tokenizer
  built on generated data would not know);
- 2-6 people (weights 180/93/21/5/1, valid's), 17-28 nodes, path length 3-6 (124/133/36/7);
- the asked person's world: concepts on levels 1..L, each with 1-3 parents one level up, so
  every path to level l has length l and the target is a leaf at level L;
- a second world of the other people, the distractor a leaf 1-4 levels below one of them
  (weights 64/160/71/5), whose nodes may also point into the first world, never back (so
  the distractor is unreachable from the asked person, as in every shipped problem).

    >>> q, steps, answer = prosqa_problem(__import__("random").Random(0))
    >>> q.endswith("?") and answer.endswith(".") and 3 <= len(steps) <= 6
    True
"""

from __future__ import annotations

import random

NAMES = (
    "Alex Bob Carol Davis Eva Fae Gabriel Jack Max Oliver Polly Rex Sally Sam Stella Tom Wren"
).split()
CONCEPTS = (
    "bompus boompus brimpus chorpus dumpus felpus fompus gerpus gorpus grimpus gwompus hilpus "
    "impus jelpus jompus kerpus lempus lorpus numpus quimpus rempus rompus rorpus scrompus "
    "shumpus sterpus storpus terpus timpus tumpus vumpus worpus wumpus yerpus yimpus yumpus "
    "zhorpus zumpus"
).split()
PEOPLE_WEIGHTS = {2: 180, 3: 93, 4: 21, 5: 5, 6: 1}  # prosqa_valid.json
DEPTH_WEIGHTS = {3: 124, 4: 133, 5: 36, 6: 7}  # steps per problem, prosqa_valid.json
NEG_DEPTH_WEIGHTS = {1: 64, 2: 160, 3: 71, 4: 5}  # distractor below its person, same file


def _pick(rng: random.Random, weights: dict[int, int]) -> int:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _levels(rng: random.Random, n: int, depth: int) -> list[list[int]]:
    """Node ids 0..n-1 spread over levels 1..depth, at least one per level."""
    ids = list(range(n))
    rng.shuffle(ids)
    levels = [[ids[i]] for i in range(depth)]
    for i in ids[depth:]:
        levels[rng.randrange(depth)].append(i)
    return levels


def _wire(rng, tops: list, levels: list[list], edges: set) -> None:
    """Each node of level l gets 1-3 parents on level l - 1 (level 0: `tops`)."""
    above = tops
    for level in levels:
        for node in level:
            for parent in rng.sample(above, min(len(above), rng.choice((1, 1, 2, 2, 3)))):
                edges.add((parent, node))
        above = level


def _graph(rng: random.Random):
    """(edges, root, target, distractor, names of nodes, path root -> target)."""
    people, depth, neg_depth = (
        _pick(rng, PEOPLE_WEIGHTS),
        _pick(rng, DEPTH_WEIGHTS),
        _pick(rng, NEG_DEPTH_WEIGHTS),
    )
    n_concepts = rng.randint(17, 28) - people
    n_mine = max(depth + 1, round(n_concepts * rng.uniform(0.5, 0.7)))
    n_other = max(neg_depth, n_concepts - n_mine)
    n_concepts = n_mine + n_other
    mine = [("c", i) for i in range(n_mine)]
    other = [("c", n_mine + i) for i in range(n_other)]
    root, others = ("p", 0), [("p", i) for i in range(1, people)]
    edges: set = set()
    mine_levels = [[mine[i] for i in lv] for lv in _levels(rng, n_mine, depth)]
    other_levels = [[other[i] for i in lv] for lv in _levels(rng, n_other, neg_depth)]
    _wire(rng, [root], mine_levels, edges)
    _wire(rng, others, other_levels, edges)
    children = {u for u, _ in edges}
    targets = [v for v in mine_levels[-1] if v not in children]
    negs = [v for v in other_levels[-1] if v not in children]
    target, neg = rng.choice(targets), rng.choice(negs)
    for node in [*others, *other]:  # second-world links into the first, never back
        if node != neg and rng.random() < 0.5:
            edges.add((node, rng.choice(mine)))
    path = [target]
    for level in reversed([[root], *mine_levels[:-1]]):
        path.append(rng.choice([u for u in level if (u, path[-1]) in edges]))
    return sorted(edges), root, target, neg, people, n_concepts, path[::-1]


def prosqa_problem(rng: random.Random) -> tuple[str, tuple[str, ...], str]:
    """One problem: (question, steps, answer) in the shipped files' wording."""
    edges, root, target, neg, people, n_concepts, path = _graph(rng)
    names = dict(zip([("p", i) for i in range(people)], rng.sample(NAMES, people)))
    names |= dict(zip([("c", i) for i in range(n_concepts)], rng.sample(CONCEPTS, n_concepts)))

    def fact(u, v) -> str:
        return (
            f"{names[u]} is a {names[v]}." if u[0] == "p" else f"Every {names[u]} is a {names[v]}."
        )

    facts = [fact(u, v) for u, v in edges]
    rng.shuffle(facts)
    a, b = rng.sample([target, neg], 2)
    question = " ".join(facts) + f" Is {names[root]} a {names[a]} or {names[b]}?"
    steps = tuple(fact(u, v) for u, v in zip(path, path[1:]))
    return question, steps, f"{names[root]} is a {names[target]}."
