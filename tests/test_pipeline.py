"""The input pipeline at GSM8K-Aug scale: each split tokenised once (rim.tokenized), the
start-up length check from token counts (`Method.train_lengths`), one host sync per
optimizer step, and the resampled 385k-line file of benchmarks/make_gsm8k_aug_385k.py."""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import rim
from rim.assembly import Setup
from rim.config import Config, CurriculumConfig, MemoryConfig
from rim.data import Example, generate, read_examples
from rim.errors import RimError
from rim.layout import pack
from rim.methods import METHODS, build
from rim.trainer import Trainer
from tests.conftest import SHARED_DATA, make_setup

ROOT = Path(__file__).resolve().parents[1]
AUG = SHARED_DATA / "gsm8k_aug"


def _examples() -> list[Example]:
    """GSM8K-Aug lines (<<calc>> steps), natural-language GSM8K lines, toy tasks, and
    examples with no step or one step."""
    out: list[Example] = []
    if AUG.is_dir():
        out += read_examples(AUG / "valid.txt", limit=40)
        out += read_examples(AUG / "train_no_aug.txt", limit=20)  # sentence steps
    out += generate("chain", 12, seed=0) + generate("mult", 8, seed=0)
    out += [Example("What is 2 + 2?", (), "4"), Example("x?", ("<<1+1=2>>",), "2")]
    return out


def _bpe(texts: list[str]) -> PreTrainedTokenizerFast:
    """A small byte-level BPE (GPT-2's kind: leading spaces are part of tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet
    )
    tok.train_from_iterator(texts, trainer)
    end = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=end, pad_token=end)


def _word(texts: list[str]) -> PreTrainedTokenizerFast:
    from rim.model import build_tokenizer

    return build_tokenizer(texts)


EXAMPLES = _examples()
TEXTS = [e.question for e in EXAMPLES] + [s for e in EXAMPLES for s in e.steps]
TEXTS += [e.answer for e in EXAMPLES] + ["####", " + "]


def _config(method: str, **sections) -> Config:
    cfg = Config(method=method)
    cfg.memory = MemoryConfig(blocks=3, mem_tokens=2)
    cfg.curriculum = CurriculumConfig(
        stage1_epochs=None, stage1_steps=4, stage2_epochs=None, stage2_steps=4, explain_weight=0.5
    )
    cfg.train.batch_size, cfg.train.steps = 8, 40
    for section, values in sections.items():
        setattr(cfg, section, replace(getattr(cfg, section), **values))
    return cfg


def _method(method: str, tokenizer: str = "bpe", **sections):
    tok = (_bpe if tokenizer == "bpe" else _word)(TEXTS)
    return build(_config(method, **sections), tok)


class _NoEncoding:
    """A tokenizer that refuses to encode (decoding, vocabulary and ids still work)."""

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"tokenised again: {args[0]!r}")

    def __getattr__(self, name):
        return getattr(self._tok, name)


# ------------------------------------------------------------------ tokenised once


@pytest.mark.parametrize("tokenizer", ["bpe", "word"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_pretokenized_ids_equal_one_call_per_string(name: str, tokenizer: str):
    """The batch pass gives every question and text the ids of today's one-string calls."""
    m = _method(name, tokenizer)
    tok = m.tokenizer
    m.pretokenize(EXAMPLES)
    assert len(m._questions) == len({e.question for e in EXAMPLES})  # the pass filled it
    for ex in EXAMPLES:
        assert m.question_ids(ex.question) == tuple(tok(ex.question)["input_ids"])
        for text in [*m.texts(ex), m.marker]:
            want = tuple(tok(" " + text, add_special_tokens=False)["input_ids"])
            assert m.text_ids(text) == want, text


@pytest.mark.parametrize("name", sorted(METHODS))
def test_training_sequences_need_no_tokenizer_call_after_the_pass(name: str):
    """Every stage's sequences (and the length check) read ids from the pass: the method
    foresees every string it encodes, so no epoch tokenises again."""
    m = _method(name, coconut={"max_stage": 2, "epochs_per_stage": None, "steps_per_stage": 2})
    stages = m.plan(len(EXAMPLES), max(len(e.steps) for e in EXAMPLES))
    m.pretokenize(EXAMPLES)
    want = [[m.train_length(ex, s) for ex in EXAMPLES] for s in stages]
    m.tokenizer = _NoEncoding(m.tokenizer)
    m._question.cache_clear(), m._text.cache_clear()  # no answer from today's caches
    for stage in stages:
        for ex in EXAMPLES:
            m.segments(ex, stage, 0.5)
    assert m.train_lengths(EXAMPLES, stages).tolist() == want


def test_word_tokenizer_vocabulary_in_first_appearance_order():
    """The word-level vocabulary built from distinct chunks is the per-text loop's, ids and
    order, unusual whitespace included (a tiny model's ids never change)."""
    from rim.model import _WORD, SPECIALS

    texts = TEXTS + ["a\u00a0b\u2028c\x1cd", "12 apples.", "x_y\tz", "12 apples."]
    want: dict[str, int] = {}
    for t in [*SPECIALS.values(), *"0123456789"]:
        want.setdefault(t, len(want))
    for text in texts:
        for word in re.findall(_WORD, text):
            want.setdefault(word, len(want))
    got = _word(texts).get_vocab()
    assert {w: got[w] for w in want} == want and len(got) == len(want)


# ------------------------------------------------------------------ lengths from counts

SETTINGS = {  # name: (method, recipe sections) covering every branch of each train_lengths
    "rim": ("rim", {}),
    "rim-absolute": ("rim", {"curriculum": {"schedule": "absolute", "explain_weight": 0.0}}),
    "rim-uniform": ("rim", {"curriculum": {"schedule": "uniform"}}),
    "pause": ("pause", {}),
    "direct": ("direct", {}),
    "cot": ("cot", {}),
    "cot-space": ("cot", {"data": {"cot_join": "space"}}),
    "icot": ("icot", {"icot": {"removal_smoothing_lambda": None, "remove_per_epoch": 8}}),
    "coconut": ("coconut", {"coconut": {"epochs_per_stage": None, "steps_per_stage": 1}}),
    "coconut-unpadded": (
        "coconut",
        {"coconut": {"epochs_per_stage": None, "steps_per_stage": 1, "pad_latent_to_max": False}},
    ),
    "codi": ("codi", {}),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_train_lengths_equal_the_packed_lengths(setting: str):
    """Every method, every stage: the counted length is the laid-out sequence's (`pack` of
    the stage's segments at progress 0; CODI: its student / teacher `train_length`)."""
    name, sections = SETTINGS[setting]
    m = _method(name, **sections)
    stages = m.plan(len(EXAMPLES), max(len(e.steps) for e in EXAMPLES))
    assert len(stages) >= (2 if name in ("rim", "icot", "coconut") else 1)
    got = m.train_lengths(EXAMPLES, stages)
    assert got.shape == (len(stages), len(EXAMPLES)) and got.dtype == np.int64
    for s, stage in enumerate(stages):
        if name == "codi":
            want = [m.train_length(ex, stage) for ex in EXAMPLES]
        else:
            want = [len(pack(m.segments(ex, stage, 0.0), m.eos_id)) for ex in EXAMPLES]
        assert got[s].tolist() == want, stage.name


def test_train_lengths_leave_out_faded_readouts(monkeypatch):
    """A stage-1 readout of weight 0 is not laid out; its tokens are not counted either
    (no shipped schedule fades a step at progress 0, so a schedule that does is patched in)."""
    import rim.methods.rim as rim_module

    def faded(T, progress, schedule="relative", T_max=None):
        return [0.0 if t % 2 else 1.0 for t in range(1, T + 1)] + [1.0]

    monkeypatch.setattr(rim_module, "stage1_weights", faded)
    m = _method("rim")
    stage = m.plan(len(EXAMPLES), max(len(e.steps) for e in EXAMPLES))[0]
    want = [len(pack(m.segments(ex, stage, 0.0), m.eos_id)) for ex in EXAMPLES]
    assert m.train_lengths(EXAMPLES, [stage])[0].tolist() == want


def test_length_check_counts_without_laying_out(monkeypatch, capsys):
    """`check_lengths` reads `train_lengths` (never one `train_length` per example), names
    the first example over the limit with its packed length, and skips the long ones."""
    from rim.assembly import check_lengths

    m = _method("rim")
    stages = m.plan(len(EXAMPLES), max(len(e.steps) for e in EXAMPLES))
    need = [max(len(pack(m.segments(ex, s, 0.0), m.eos_id)) for s in stages) for ex in EXAMPLES]
    limit = sorted(need)[len(need) // 2]
    first = next(i for i, n in enumerate(need) if n > limit)

    def per_example(*args):
        raise AssertionError("laid out one example at a time")

    monkeypatch.setattr(type(m), "train_length", per_example)
    cfg = _config("rim", data={"max_length": limit, "too_long": "error"})
    with pytest.raises(RimError) as err:
        check_lengths(m, None, EXAMPLES, cfg, "data.train")
    want = f"data.train: example {first + 1} needs {need[first]} tokens > max_length {limit}"
    assert str(err.value) == want
    cfg.data = replace(cfg.data, too_long="skip")
    kept = check_lengths(m, None, EXAMPLES, cfg, "data.train")
    assert kept == [ex for ex, n in zip(EXAMPLES, need) if n <= limit]
    assert f"skipped {len(EXAMPLES) - len(kept)} examples" in capsys.readouterr().out


# ------------------------------------------------------------------ one sync per step


def test_one_host_sync_per_optimizer_step(monkeypatch):
    """The loss is summed on the device over micro-batches and read once per optimizer step,
    with the gradient norm (the non-finite check): 1 read by rim's code for 1 or 4
    micro-batches (the data order's CPU permutation and torch's own reads aside)."""
    cfg, tok, model, method = make_setup("rim")
    cfg.train.batch_size, cfg.train.threads = 4, 1
    data = generate("chain", 8, seed=0)
    ours, order = Path(rim.__file__).parent, Path(rim.__file__).parent / "batching.py"
    reads = []
    for name in ("item", "tolist", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            caller = Path(sys._getframe(1).f_code.co_filename)
            if caller.is_relative_to(ours) and caller != order:
                reads.append(f"{_name} in {caller.name}:{sys._getframe(1).f_lineno}")
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    losses = {}
    for micro in (1, 4):
        cfg.train.micro_batch_size = micro
        trainer = Trainer(Setup(cfg, model, tok, method, data, data), ROOT / "unused")
        trainer.new_optimizer(trainer.plan[0])
        torch.manual_seed(0)
        reads.clear()
        losses[micro] = trainer.step(trainer.plan[0])
        assert len(reads) == 1, (micro, reads)
    assert isinstance(losses[1], float) and losses[1] > 0


# ------------------------------------------------------------------ the 385k-line file


def _maker():
    path = ROOT / "benchmarks" / "make_gsm8k_aug_385k.py"
    spec = importlib.util.spec_from_file_location("make_gsm8k_aug_385k", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resampled_aug_file_is_seeded_and_reads_as_aug(shared_data, tmp_path: Path):
    """Lines drawn with replacement from the shipped valid + test, the same for a seed."""
    make = _maker()
    source = set(make.source_lines())
    assert len(source) > 1000
    for name, seed in (("a.txt", 3), ("b.txt", 3), ("c.txt", 4)):
        make.main([str(tmp_path / name), "--n", "300", "--seed", str(seed)])
    a, b, c = ((tmp_path / n).read_text().splitlines() for n in ("a.txt", "b.txt", "c.txt"))
    assert a == b != c and len(a) == 300 and set(a) <= source
    assert len(set(a)) < 300  # with replacement
    got = read_examples(tmp_path / "a.txt")
    assert len(got) == 300 and all("<<" in e.steps[0] for e in got if e.steps)
    make.main([str(tmp_path / "d.txt"), "--n", "300", "--seed", "3", "--distinct"])
    unique = read_examples(tmp_path / "d.txt")
    assert len({e.question for e in unique}) == 300
    assert [e.steps for e in unique] == [e.steps for e in got]
