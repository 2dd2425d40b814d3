"""iCoT-SI pinned to the authors' code, `da03/Internalize_CoT_Step_by_Step` (`src/train.py`,
`src/data.py`, `src/model.py`), read by hand; the expected data below are written out, not
computed by rim.

- Layout: the original trains on `' {q} <eos> ' + cot + ' <eos> ' + ans + ' <eos>'` (GPT-2
  tokens), supervises everything after the first <eos>, and removes `to_remove` tokens right
  after it (capped at the second <eos>). rim lays out `q`, then the readout
  `cot[removed:] #### answer` and <eos>; the documented differences (docs/baselines.md)
  are its separators only: no <eos> after the question or the CoT (the answer marker
  `####`, which the original also writes, ends the CoT) and no GPT-2 ' ' token before them.
- Schedule: one more token every round(steps_per_epoch / remove_per_epoch) steps.
- Smoothing: `compute_lambda_distribution`.
- Loss: `CrossEntropyLoss()` (mean over the batch's target tokens) on right-padded ids.
"""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from rim.config import Config
from rim.curriculum import Stage, icot_offset, icot_offset_probs
from rim.data import Example, read_examples
from rim.layout import IGNORE, pack
from rim.methods import build
from rim.methods.icot import ICoT, Removal

from .conftest import make_setup

CPU = torch.device("cpu")

# the first line of shared/data/4_by_4_mult/valid.txt
LINE = (
    "5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) + 0 0 5 9 0 7 0 "
    "( 5 5 6 0 2 8 0 ) + 0 0 0 0 6 4 9 0 #### 5 5 6 0 8 2 0 1"
)

# The original's training sequence as GPT-2 tokens ('G' = GPT-2's leading-space mark 'Ġ',
# 'G' alone = the ' ' token before each <eos>, E = <|endoftext|>), at removal 0, 8, 16 and
# all (removal 47 = every CoT token including the ' ' before the second <eos>). Tokens
# before `|` have label -100; every token after it is a target. Digits, ' +', ' (', ' )'
# and ' *' are one GPT-2 token each; ' ####' is written as one unit here.
ORIGINAL = {
    0: "G5 G6 G3 G2 G* G7 G4 G3 G4 G E | G5 G5 G5 G6 G1 G+ G0 G0 G6 G4 G9 G0 G( G5 G5 G1 G1 "
    "G1 G1 G) G+ G0 G0 G5 G9 G0 G7 G0 G( G5 G5 G6 G0 G2 G8 G0 G) G+ G0 G0 G0 G0 G6 G4 G9 "
    "G0 G E G#### G5 G5 G6 G0 G8 G2 G0 G1 G E",
    8: "G5 G6 G3 G2 G* G7 G4 G3 G4 G E | G6 G4 G9 G0 G( G5 G5 G1 G1 G1 G1 G) G+ G0 G0 G5 "
    "G9 G0 G7 G0 G( G5 G5 G6 G0 G2 G8 G0 G) G+ G0 G0 G0 G0 G6 G4 G9 G0 G E G#### G5 G5 G6 "
    "G0 G8 G2 G0 G1 G E",
    16: "G5 G6 G3 G2 G* G7 G4 G3 G4 G E | G1 G1 G1 G) G+ G0 G0 G5 G9 G0 G7 G0 G( G5 G5 G6 "
    "G0 G2 G8 G0 G) G+ G0 G0 G0 G0 G6 G4 G9 G0 G E G#### G5 G5 G6 G0 G8 G2 G0 G1 G E",
    47: "G5 G6 G3 G2 G* G7 G4 G3 G4 G E | E G#### G5 G5 G6 G0 G8 G2 G0 G1 G E",
}


def to_rim(layout: str) -> tuple[list[str], list[str]]:
    """(context, targets) of an ORIGINAL layout with rim's documented separator differences:
    no ' ' tokens, no <eos> but the last, and the question's first token without its space."""
    context, targets = (part.split() for part in layout.split("|"))
    context = [t for t in context if t not in ("G", "E")]
    context[0] = context[0].removeprefix("G")
    targets = [t for t in targets if t != "G"]
    targets = [t for t in targets[:-1] if t != "E"] + targets[-1:]
    return context, targets


def gpt2_like_tokenizer():
    """GPT-2's byte-level pre-tokenizer over a word-level vocabulary: on this data every
    pre-token is one GPT-2 token, so the ids are GPT-2's tokenization up to renumbering."""
    from transformers import PreTrainedTokenizerFast

    units = [p + c for p in ("", "Ġ") for c in "0123456789+()*"] + ["Ġ####", "Ġ", "<unk>"]
    tok = Tokenizer(models.WordLevel({u: i for i, u in enumerate(units)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)


def rim_layout(m: ICoT, ex: Example, removed: int | None) -> tuple[list[str], list[str]]:
    st = Stage("s", 0, 1, 1e-3, None, Removal(removed or 0, removed is None))
    p = pack(m.segments(ex, st, 0.0), m.eos_id)
    names = [t.replace("Ġ", "G") for t in m.tokenizer.convert_ids_to_tokens(p.input_ids)]
    first = next(i for i, label in enumerate(p.labels) if label != IGNORE)
    targets = m.tokenizer.convert_ids_to_tokens([x for x in p.labels if x != IGNORE])
    targets = ["E" if t == m.tokenizer.eos_token else t.replace("Ġ", "G") for t in targets]
    return names[: first + 1], targets


@pytest.fixture(scope="module")
def icot() -> ICoT:
    cfg = Config(method="icot")
    cfg.icot.removal_smoothing_lambda = None  # the layout without offsets
    return build(cfg, gpt2_like_tokenizer())


@pytest.mark.parametrize("removed", [0, 8, 16, None])
def test_layout_matches_the_original(icot: ICoT, removed: int | None, tmp_path) -> None:
    (tmp_path / "valid.txt").write_text(LINE + "\n")
    ex = read_examples(tmp_path / "valid.txt")[0]
    context, targets = to_rim(ORIGINAL[47 if removed is None else removed])
    assert rim_layout(icot, ex, removed) == (context, targets)


def test_the_cot_keeps_its_plus_tokens(icot: ICoT, shared_data) -> None:
    """47 removable tokens in the original (46 + the ' ' before <eos>): rim's CoT is 46."""
    ex = read_examples(shared_data / "4_by_4_mult/valid.txt", limit=1)[0]
    assert LINE.startswith(ex.question + "||" + ex.cot + " #### ")
    targets = ORIGINAL[0].split("|")[1].split()
    cot = targets[: targets.index("E")]
    assert len(cot) == 47 and len(icot.cot_ids(ex)) == len([t for t in cot if t != "G"]) == 46
    gsm = read_examples(shared_data / "gsm8k_aug/valid.txt", limit=1)[0]
    assert gsm.cot == "<<4-2=2>> <<2/.5=4>> <<12/4=3>> <<100*3=300>>"


# ---------------------------------------------------------------- the schedule


def removal_per_step(cfg: Config, n_train: int) -> list[int | str]:
    m = build(cfg, gpt2_like_tokenizer())
    out: list[int | str] = []
    for s in m.plan(n_train, 3):
        out += ["all" if s.payload.all else s.payload.removed] * s.steps
    return out


@pytest.mark.parametrize(
    ("remove_per_epoch", "beyond", "start", "expected"),
    [
        # 10 steps an epoch, 4 tokens an epoch: round(2.5) = 2 steps a token (halves to even)
        (4, None, 0, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]),
        (8, None, 0, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]),  # round(1.25) = 1
        (30, None, 0, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),  # round(0.33) = 0: every step
        (4, 3, 0, [0, 0, 1, 1, 2, 2, "all", "all", "all", "all", "all", "all"]),
        (4, 7, 5, [5, 5, 6, 6, "all", "all", "all", "all", "all", "all", "all", "all"]),
        (2.7, None, 0, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]),  # round(3.7) = 4
    ],
)
def test_removal_per_optimizer_step_is_the_originals(remove_per_epoch, beyond, start, expected):
    cfg = Config(method="icot")
    cfg.train.batch_size, cfg.train.steps = 8, 12  # 80 examples: 10 steps an epoch
    cfg.icot.remove_per_epoch = remove_per_epoch
    cfg.icot.remove_all_when_remove_beyond = beyond
    cfg.icot.remove_start_from = start
    assert removal_per_step(cfg, 80) == expected


def test_a_fresh_optimizer_without_warmup_at_every_increment() -> None:
    cfg = Config(method="icot")
    cfg.train.batch_size, cfg.train.steps = 8, 12
    cfg.icot.remove_all_when_remove_beyond = 3
    cfg.icot.remove_per_epoch = 4
    plan = build(cfg, gpt2_like_tokenizer()).plan(80, 3)
    # the original resets at steps 2, 4 and 6 (when the count rises) and never after
    assert [s.payload.start for s in plan] == [0, 2, 4, 6]
    assert [s.warmup for s in plan] == [0.0] * 4 and plan[-1].steps == 6


# ---------------------------------------------------------------- removal smoothing


def test_offset_distribution_is_the_originals() -> None:
    p = icot_offset_probs(4.0)  # compute_lambda_distribution(4): (1 - e^-4) e^(-4 k)
    assert p[:4] == pytest.approx([0.98168436, 0.01798018, 3.2931842e-4, 6.0316772e-6], rel=1e-6)
    assert len(p) == 100 and sum(p) == pytest.approx(1.0)
    draws = [icot_offset(4.0, 0, step, "x") for step in range(20_000)]
    assert draws.count(0) / len(draws) == pytest.approx(0.98168, abs=0.004)
    assert draws.count(1) / len(draws) == pytest.approx(0.01798, abs=0.004)


def test_smoothing_applies_from_removal_zero(icot: ICoT) -> None:
    """The original samples offsets whenever lambda is finite, also before any removal."""
    ex = Example("5 6 3 2 * 7 4 3 4", ("5 5 5 6 1", "0 0 6 4 9 0"), "5 5", " + ")
    cfg = Config(method="icot")
    cfg.icot.removal_smoothing_lambda = 0.7
    m = build(cfg, icot.tokenizer)
    st = Stage("s", 0, 50, 1e-3, None, Removal(0, False, 0))
    got = [m.removal(ex, st, k / 50) for k in range(50)]
    assert min(got) == 0 and max(got) >= 2
    k = next(r for r in got if r > 0)
    assert m.target(ex, k) == m.cot_ids(ex)[k:] + m.answer_ids(ex.answer)


# ---------------------------------------------------------------- the loss


def original_loss(model, seqs: list[tuple[list[int], int, int, int]], eos: int) -> torch.Tensor:
    """The original's step: removal by slicing, `batch_ids` padding, `compute_loss`.

    seqs: (ids = question + cot + answer, first target index, cot length, to_remove).
    """
    kept, labels = [], []
    for ids, start, n_cot, to_remove in seqs:
        cut = min(start + to_remove, start + n_cot)  # removal_to capped at the CoT's end
        x = ids[:start] + ids[cut:]
        kept.append(x)
        labels.append([IGNORE] * start + x[start:])
    L = max(len(x) for x in kept)
    input_ids = torch.full((len(kept), L), eos)  # (B, L), padded with <eos>
    lab = torch.full((len(kept), L), IGNORE)  # (B, L), padded with -100
    for b, (x, y) in enumerate(zip(kept, labels)):
        input_ids[b, : len(x)], lab[b, : len(y)] = torch.tensor(x), torch.tensor(y)
    logits = model(input_ids=input_ids).logits  # (B, L, V): no mask, no position ids
    V = logits.shape[-1]
    return torch.nn.CrossEntropyLoss()(logits[:, :-1].reshape(-1, V), lab[:, 1:].reshape(-1))


def test_loss_equals_the_originals_token_mean() -> None:
    cfg, _, model, m = make_setup("icot")
    cfg.icot.removal_smoothing_lambda = 0.5  # offsets, passed to the re-statement
    exs = [
        Example("9 + 9 - 3 + 1", ("18", "15", "16"), "16"),
        Example("2 + 3", ("5",), "5"),
        Example("7 - 1 + 2", ("6", "8"), "8"),
        Example("4 - 4", (), "0"),
    ]
    st = Stage("s", 0, 10, 1e-3, None, Removal(1, False, 30))
    seqs = []
    for ex in exs:
        q, cot, ans = m.question_ids(ex.question), m.cot_ids(ex), m.answer_ids(ex.answer)
        seqs.append((list(q + cot + ans) + [m.eos_id], len(q), len(cot), m.removal(ex, st, 0.2)))
    assert any(s[3] > 1 for s in seqs), "some example has a smoothing offset"
    with torch.no_grad():
        want = original_loss(model, seqs, m.eos_id)
        assert m.loss(model, exs, st, 0.2, 4, CPU).item() == pytest.approx(want.item(), abs=2e-6)
        # micro-batches of 2: the original's `--accumulate 2` (each loss divided by 2)
        halves = [m.loss(model, exs[i : i + 2], st, 0.2, 4, CPU) for i in (0, 2)]
        orig = [original_loss(model, seqs[i : i + 2], m.eos_id) / 2 for i in (0, 2)]
        assert sum(halves).item() == pytest.approx(sum(orig).item(), abs=2e-6)
        cfg.icot.loss = "example"  # rim's per-example mean: a different number
        per_example = m.loss(model, exs, st, 0.2, 4, CPU).item()
    assert not math.isclose(per_example, want.item(), abs_tol=1e-4)


def test_demo_step_count_is_the_plans() -> None:
    """`rim demo` counts steps per method by name: for iCoT it must be the sum of the plan."""
    from pathlib import Path

    from rim.config import load_config
    from rim.demo import QUICK, _total_steps

    recipe = Path(__file__).resolve().parents[1] / "configs" / "demo" / "icot.yaml"
    for sets in ([], [f"{k}={v}" for k, v in QUICK.items()]):
        cfg = load_config(recipe, sets)
        plan = build(cfg, gpt2_like_tokenizer()).plan(cfg.data.train.size, 8)
        assert sum(s.steps for s in plan) == _total_steps(cfg)
        assert plan[-1].payload.all and len(plan) == 9  # 8 flags, then one final stage
