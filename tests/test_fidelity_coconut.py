"""Coconut pinned to its authors' code (facebookresearch/coconut, read by hand).

The expected layouts, plans and pass counts below are data written from `dataset.py`
(`get_cot_latent_dataset`, `get_question_latent_dataset`), `run.py` (the epoch loop) and
`coconut.py` (`Coconut.forward`), not derived from rim's code; `original_forward` re-states
that forward (iterative hidden-state replacement over the whole sequence with the KV cache)
so that rim's loss can be checked against it numerically. Setting throughout: c_thought = 2,
max_latent_stage = 2, pad_latent_to_max = True (every shipped recipe of the original).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from rim.compat import cache_of, with_cache
from rim.curriculum import Stage
from rim.data import Example
from rim.layout import IGNORE
from rim.methods import build
from rim.methods.coconut import Coconut, Latent

from .conftest import make_setup

CPU = torch.device("cpu")
EXAMPLES = {
    "three": Example("9 + 9 - 3 + 1", ("18", "15", "16"), "16"),
    "one": Example("2 + 3", ("5",), "5"),
}

# (example, stage) -> (tokens without a label, tokens with a label), as `get_cot_latent_dataset`
# builds them: question ++ <bot> ++ <latent> x c*n ++ <eot> ++ steps[skip:] ++ "### answer" <eos>,
# labels -100 up to <eot>. Stage k <= max: skip = k, n = k, whatever the number of steps; a
# stage above max: every step skipped, n = max. Q = question, S<i> = step i, A = answer.
ORIGINAL = {
    ("three", 0): (["Q", "<bot>", "<eot>"], ["S1", "S2", "S3", "A", "<eos>"]),
    ("three", 1): (["Q", "<bot>", "L", "L", "<eot>"], ["S2", "S3", "A", "<eos>"]),
    ("three", 2): (["Q", "<bot>", "L", "L", "L", "L", "<eot>"], ["S3", "A", "<eos>"]),
    ("three", 3): (["Q", "<bot>", "L", "L", "L", "L", "<eot>"], ["A", "<eos>"]),
    ("one", 0): (["Q", "<bot>", "<eot>"], ["S1", "A", "<eos>"]),
    ("one", 1): (["Q", "<bot>", "L", "L", "<eot>"], ["A", "<eos>"]),
    ("one", 2): (["Q", "<bot>", "L", "L", "L", "L", "<eot>"], ["A", "<eos>"]),
    ("one", 3): (["Q", "<bot>", "L", "L", "L", "L", "<eot>"], ["A", "<eos>"]),
}
# `get_question_latent_dataset` at the last stages: question ++ <bot> ++ <latent> x c*max ++ <eot>
ORIGINAL_PROMPT = ["Q", "<bot>", "L", "L", "L", "L", "<eot>"]
# `Coconut.forward`: one pass up to the first <latent>, one per further <latent>, one for the
# rest (the last latent with <eot> and the target): gen_forward_cnt += max_n_latents + 1
ORIGINAL_PASSES = {0: 1, 1: 3, 2: 5, 3: 5}


def coconut_setup(arch: str = "llama", attn: str = "sdpa", **over):
    from rim.methods import build
    from rim.model import resize_for

    over = {"coconut__thoughts_per_step": 2, "coconut__max_stage": 2} | over
    cfg, tok, model, _ = make_setup("cot", arch, attn, **over)
    cfg.method = "coconut"
    m = build(cfg, tok)
    torch.manual_seed(1)
    resize_for(model, tok)
    return cfg, tok, model, m


@pytest.fixture(scope="module")
def coco():
    return coconut_setup()


def expand(m: Coconut, ex: Example, symbols: list[str]) -> list[int]:
    """Token ids of a symbolic layout (rim's tokenisation of each part)."""
    special = {"<bot>": m.bot_id, "L": m.thought_id, "<eot>": m.eot_id, "<eos>": m.eos_id}
    ids: list[int] = []
    for s in symbols:
        if s in special:
            ids.append(special[s])
        elif s == "Q":
            ids += m.question_ids(ex.question)
        elif s == "A":
            ids += m.answer_ids(ex.answer)  # the marker, then the answer: the original's "### "
        else:
            ids += m.text_ids(ex.steps[int(s[1:]) - 1])
    return ids


def original_layout(m: Coconut, name: str, k: int) -> tuple[list[int], list[int]]:
    head, tail = ORIGINAL[name, k]
    ex = EXAMPLES[name]
    head_ids, tail_ids = expand(m, ex, head), expand(m, ex, tail)
    return head_ids + tail_ids, [IGNORE] * len(head_ids) + tail_ids


def stage(k: int) -> Stage:
    return Stage(f"stage{k}", 0, 1, 1e-3, None, Latent(k))


# ---------------------------------------------------------------- layout


@pytest.mark.parametrize("name,k", sorted(ORIGINAL))
def test_training_sequence_and_labels_match_the_original(coco, name, k):
    _, _, _, m = coco
    ids, labels = original_layout(m, name, k)
    assert m.layout(EXAMPLES[name], k) == (ids, labels)
    assert m.train_length(EXAMPLES[name], stage(k)) == len(ids) - 1  # the last input (EOS) unused


def test_thoughts_capped_by_steps_only_when_asked():
    """`pad_latent_to_max: false` is rim's earlier layout, not the original's (see the docs)."""
    _, _, _, m = coconut_setup(coconut__pad_latent_to_max=False)
    one = EXAMPLES["one"]
    assert [m.parts(one, k)[1] for k in (1, 2, 3)] == [2, 2, 2]
    assert [m.parts(EXAMPLES["three"], k)[1] for k in (1, 2, 3)] == [2, 4, 4]


def test_inference_prompt_matches_the_original(coco):
    _, _, _, m = coco
    ex = EXAMPLES["three"]
    got = m.prompt(ex.question) + [m.thought_id] * m.thoughts() + [m.eot_id]
    assert got == expand(m, ex, ORIGINAL_PROMPT)


# ---------------------------------------------------------------- plan (run.py's epoch loop)


def test_plan_follows_the_epoch_loop(coco):
    """`for epoch in range(num_epochs)`: stage = epoch // epochs_per_stage, a fresh AdamW
    each epoch (reset_optimizer), no warm-up; stages above max train the all-latent layout."""
    cfg, _, _, m = coco
    c = cfg.coconut
    c.epochs_per_stage, c.steps_per_stage, c.epochs, c.steps = 2.0, None, 9.0, None
    cfg.train.batch_size = 5
    m = build(cfg, m.tokenizer)
    plan = m.plan(10, 3)  # 2 optimizer steps per epoch
    # epochs 0..8 -> stages 0 0 1 1 2 2 3 3 4; stages 3 and 4 both drop every step (k = 3)
    assert [s.payload.k for s in plan] == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert [s.steps for s in plan] == [2] * 9
    assert all(s.warmup == 0.0 for s in plan)
    assert [s.selects_best for s in plan] == [False] * 6 + [True] * 3
    c.reset_optimizer = False
    assert [(s.payload.k, s.steps) for s in m.plan(10, 3)] == [(0, 4), (1, 4), (2, 4), (3, 6)]


@pytest.mark.parametrize(
    "recipe,ks",
    [  # args/gsm_coconut.yaml: epochs 3..24 (resume 3 after a CoT run), 3 per stage, max 3
        ("gsm8k/gpt2_coconut.yaml", [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 13),
        # args/prosqa_coconut.yaml (and prontoqa): 50 epochs, 5 per stage, max 6
        ("prosqa/gpt2_coconut.yaml", [k for k in range(7) for _ in range(5)] + [7] * 15),
        ("prontoqa/gpt2_coconut.yaml", [k for k in range(7) for _ in range(5)] + [7] * 15),
    ],
)
def test_recipes_train_the_originals_epochs(recipe, ks):
    from pathlib import Path

    from rim.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / recipe)
    _, tok, _, _ = coconut_setup()
    c = cfg.coconut
    m = build(cfg, tok)
    plan = m.plan(1280, 6)  # 10 optimizer steps an epoch at the original's batch of 128
    assert cfg.train.batch_size == 128 and all(s.steps == 10 for s in plan)
    assert [s.payload.k for s in plan] == ks
    assert all(s.warmup == 0.0 and s.lr == 1e-4 for s in plan)
    assert (c.pad_latent_to_max, c.reset_optimizer, cfg.train.weight_decay) == (True, True, 0.01)
    assert (cfg.model.full_finetune, cfg.train.mixed_precision, cfg.train.grad_clip) == (
        True,
        "no",
        0.0,
    )


# ---------------------------------------------------------------- the forward, numerically


def original_forward(model, ids: list[int], labels: list[int], latent_id: int):
    """`Coconut.forward` of the original for one sequence: (mean label NLL, passes).

    Pass 0 runs up to the first <latent>; each further pass runs one position, after the
    embedding of the next <latent> has been replaced by the last hidden state of the position
    before it; the last pass runs the rest of the sequence. Logits are concatenated and the
    loss is the shifted cross-entropy over the labels.
    """
    x = torch.tensor([ids])  # (1, L)
    L = x.shape[1]
    embeds = model.get_input_embeddings()(x)  # (1, L, D)
    latents = [i for i, t in enumerate(ids) if t == latent_id]
    lo, hi = 0, latents[0] if latents else L
    cache, logits, passes = DynamicCache(), [], 0
    for p in range(len(latents)):
        assert cache.get_seq_length() == lo  # the original slices its cache to [:lo]: a no-op
        out = model(
            inputs_embeds=embeds[:, lo:hi],
            attention_mask=torch.ones(1, hi, dtype=torch.long),
            position_ids=torch.arange(lo, hi)[None],
            **with_cache(cache),
            use_cache=True,
            output_hidden_states=True,
        )
        passes += 1
        logits.append(out.logits)
        cache, h = cache_of(out), out.hidden_states[-1]  # h: (1, hi - lo, D)
        embeds = embeds.clone()
        embeds[0, latents[p]] = h[0, latents[p] - 1 - lo]
        lo, hi = hi, (L if p + 1 >= len(latents) else hi + 1)
    out = model(
        inputs_embeds=embeds[:, lo:hi],
        attention_mask=torch.ones(1, hi, dtype=torch.long),
        position_ids=torch.arange(lo, hi)[None],
        **with_cache(cache),
        use_cache=True,
    )
    passes += 1
    logits.append(out.logits)
    full = torch.cat(logits, dim=1)[0]  # (L, V)
    loss = F.cross_entropy(full[:-1].float(), torch.tensor(labels[1:]), ignore_index=IGNORE)
    return loss, passes


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("gpt2", "eager")])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_loss_equals_the_original_forward(arch, attn, k):
    _, _, model, m = coconut_setup(arch, attn)
    refs = []
    with torch.no_grad():
        for name, ex in EXAMPLES.items():
            ids, labels = original_layout(m, name, k)
            ref, passes = original_forward(model, ids, labels, m.thought_id)
            assert passes == ORIGINAL_PASSES[k]
            got = m.loss(model, [ex], stage(k), 0.0, 1, CPU)
            assert got.item() == pytest.approx(ref.item(), rel=1e-5)
            refs.append(ref.item())
        # a batch: the mean of per-example losses (the original averages over the batch's
        # tokens instead; the same for one example, see docs/baselines.md)
        got = m.loss(model, list(EXAMPLES.values()), stage(k), 0.0, len(EXAMPLES), CPU)
    assert got.item() == pytest.approx(sum(refs) / len(refs), rel=1e-5)


# ---------------------------------------------------------------- sequential passes


class Counter:
    """Counts forward calls of a model (sequential passes)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.n += 1


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_training_takes_the_originals_passes(coco, k):
    _, _, model, m = coco
    count = Counter(model)
    try:
        with torch.no_grad():
            m.loss(model, list(EXAMPLES.values()), stage(k), 0.0, 2, CPU)
    finally:
        count.handle.remove()
    assert count.n == ORIGINAL_PASSES[k]


def test_inference_takes_the_originals_passes(coco):
    _, _, model, m = coco
    count = Counter(model)
    try:
        state = m.prefill(model, [m.prompt(ex.question) for ex in EXAMPLES.values()])
    finally:
        count.handle.remove()
    # generate(): forward (max_n_latents + 1 passes) gives the first token; evaluation counts
    # from `state.passes`, one more per further token
    assert count.n == state.passes == ORIGINAL_PASSES[3]


@pytest.mark.parametrize("quick", [False, True])
def test_demo_counts_the_steps_the_plan_trains(quick):
    import json
    from pathlib import Path

    from rim.config import load_config
    from rim.demo import QUICK, _total_steps

    sets = [f"{k}={json.dumps(v)}" for k, v in QUICK.items()] if quick else []
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/demo/coconut.yaml", sets)
    _, tok, _, _ = coconut_setup()
    plan = build(cfg, tok).plan(cfg.data.train.size, 8)
    assert sum(s.steps for s in plan) == _total_steps(cfg) == cfg.train.steps
    assert plan[-1].payload.k == cfg.coconut.max_stage + 1  # the fully latent stage
