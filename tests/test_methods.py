"""Baselines iCoT-SI and Coconut: curricula, Coconut's cached thought passes against naive
no-cache loops, gradients through thoughts, and short end-to-end training runs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rim.curriculum import Stage
from rim.data import Example
from rim.layout import Segment, collate, pack, weighted_loss
from rim.methods import build
from rim.methods.base import readout
from rim.methods.coconut import Coconut, Latent
from rim.methods.icot import ICoT, Removal

from .conftest import make_setup

CPU = torch.device("cpu")
EXAMPLES = [  # different question lengths and numbers of steps (3, 1, 0)
    Example("9 + 9 - 3 + 1", ("18", "15", "16"), "16"),
    Example("2 + 3", ("5",), "5"),
    Example("4 - 4", (), "0"),
]


def stage(k: int = 0, removed: int = 0) -> Stage:
    return Stage("s", 0, 1, 1e-3, None, Latent(k) if k else Removal(removed))


def coconut_setup(arch: str = "llama", attn: str = "sdpa", **over):
    """make_setup for Coconut: its three tokens are added, as `rim.methods.build` does."""
    from rim.model import resize_for

    cfg, tok, model, _ = make_setup("cot", arch, attn, **over)
    cfg.method = "coconut"
    m = build(cfg, tok)
    torch.manual_seed(1)
    resize_for(model, tok)
    return cfg, tok, model, m


@pytest.fixture(scope="module")
def coco():
    return coconut_setup(coconut__thoughts_per_step=2, coconut__max_stage=2)


def tokens(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens(list(ids))


# ---------------------------------------------------------------- iCoT


def test_icot_plan_one_stage_per_removed_token():
    """The original's schedule (tests/test_fidelity_icot.py pins it to its code)."""
    cfg, _, _, m = make_setup("icot", train__batch_size=8, train__steps=12)
    assert isinstance(m, ICoT)
    cfg.icot.remove_per_epoch = 1  # 16 examples at batch 8: 2 steps an epoch, 2 per token
    cfg.icot.remove_all_when_remove_beyond = 4
    plan = m.plan(16, 3)
    assert [s.steps for s in plan] == [2, 2, 2, 2, 4]
    assert [s.payload.removed for s in plan] == [0, 1, 2, 3, 4]
    assert [s.payload.all for s in plan] == [False] * 4 + [True]
    assert [s.payload.start for s in plan] == [0, 2, 4, 6, 8]
    assert [s.index for s in plan] == [0, 1, 2, 3, 4]
    assert {s.warmup for s in plan} == {0.0}  # the original resets without warm-up
    assert m.meta(plan)["removed_tokens"] == 4 and m.meta(plan)["removed_all"]
    # a removal stage's end only restarts the optimizer: validated at eval_every, not there
    assert [s.validate_at_end for s in plan] == [False] * 4 + [True]
    cfg.icot.max_remove = 2  # ours: the count freezes, the steps after it are one stage
    assert [(s.steps, s.payload.removed) for s in m.plan(16, 3)] == [(2, 0), (2, 1), (8, 2)]


def test_icot_epoch_schedule_is_the_old_one():
    """`icot.schedule: epoch` (+ warmup: null) restores rim's per-epoch removal."""
    cfg, _, _, m = make_setup("icot", train__batch_size=8, train__steps=5)
    cfg.icot.schedule, cfg.icot.remove_per_epoch, cfg.icot.warmup = "epoch", 3, None
    plan = m.plan(16, 3)  # 2 steps per epoch
    assert [s.steps for s in plan] == [2, 2, 1]
    assert [s.payload.removed for s in plan] == [0, 3, 6]
    assert {s.warmup for s in plan} == {None}
    assert all(s.validate_at_end for s in plan)  # epoch ends: validated, as before
    assert m.meta(plan)["removed_tokens"] == 6
    cfg.icot.max_remove = 4
    cfg.train.steps, cfg.train.epochs = None, 3.0
    m = build(cfg, m.tokenizer)
    plan = m.plan(16, 3)
    assert [s.steps for s in plan] == [2, 2, 2]
    assert [s.payload.removed for s in plan] == [0, 3, 4]


def test_icot_removes_tokens_from_the_left():
    cfg, tok, _, m = make_setup("icot")
    cfg.icot.removal_smoothing_lambda = None
    ex = Example("9 + 9 - 3", ("18", "15"), "15")  # CoT tokens: 1 8 1 5

    def target(r: int, every: bool = False) -> list[str]:
        st = Stage("s", 0, 1, 1e-3, None, Removal(r, every))
        (x, out) = m.segments(ex, st, 0.0)
        assert tokens(tok, x.ids) == ["<bos>", "9", "+", "9", "-", "3"]
        return tokens(tok, out.ids)

    assert target(0) == ["1", "8", "1", "5", "#", "#", "#", "#", "1", "5"]
    assert target(3) == ["5", "#", "#", "#", "#", "1", "5"]  # mid-step cut
    assert target(9) == ["#", "#", "#", "#", "1", "5"]  # capped at the CoT
    assert target(1, every=True) == ["#", "#", "#", "#", "1", "5"]
    assert m.first_answer_index(list(m.target(ex, 0))) == 8  # after the marker


def test_icot_smoothing_is_a_function_of_seed_step_and_example():
    cfg, _, model, m = make_setup("icot", train__batch_size=4)
    cfg.icot.removal_smoothing_lambda = 0.5  # large offsets, so they show
    exs = [Example(f"{i} + 1", (str(i + 1), "0", "0", "0", "0", "0"), "0") for i in range(4)]
    st = Stage("s", 0, 10, 1e-3, None, Removal(0, False, 20))
    a = [m.removal(ex, st, 0.3) for ex in exs]
    assert a == [m.removal(ex, st, 0.3) for ex in exs]  # no global RNG state
    steps = [[m.removal(ex, st, k / 10) for k in range(10)] for ex in exs]
    assert len({tuple(s) for s in steps}) > 1 and max(max(s) for s in steps) > 0
    # micro-batching leaves the loss unchanged (offsets do not depend on batch position)
    whole = m.loss(model, exs, st, 0.3, 4, CPU)
    cfg.icot.loss = "example"
    whole_ex = m.loss(model, exs, st, 0.3, 4, CPU)
    halves_ex = m.loss(model, exs[:2], st, 0.3, 4, CPU) + m.loss(model, exs[2:], st, 0.3, 4, CPU)
    assert whole_ex.item() == pytest.approx(halves_ex.item(), abs=1e-6)
    assert whole.item() != pytest.approx(whole_ex.item(), abs=1e-6)


# ---------------------------------------------------------------- Coconut: training loss


def test_coconut_stage0_is_cot_with_bot_eot(coco):
    cfg, tok, model, m = coco
    assert m.plan(16, 3)[0].payload.k == 0
    got = m.loss(model, EXAMPLES, stage(0), 0.0, 4, CPU)
    packed = []
    for ex in EXAMPLES:
        prefix, n, target = m.parts(ex, 0)
        assert n == 0
        packed.append(pack([Segment(prefix + (m.eot_id,)), readout(target, 0, 1.0)], m.eos_id))
    batch = collate(packed, m.pad_id)
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).logits
    assert got.item() == pytest.approx(weighted_loss(logits, batch, 4).item(), abs=1e-5)


def naive_thoughts(model, prefix, n: int) -> torch.Tensor:
    """Re-run the whole growing sequence for every thought: no cache, no padding."""
    E = model.get_input_embeddings()(torch.tensor([prefix]))  # (1, L, D)
    for _ in range(n):
        h = model(inputs_embeds=E, output_hidden_states=True).hidden_states[-1][:, -1:]
        E = torch.cat([E, h], dim=1)  # (1, L + i + 1, D)
    return E


def naive_loss(model, m: Coconut, ex: Example, k: int) -> torch.Tensor:
    prefix, n, target = m.parts(ex, k)
    E = naive_thoughts(model, prefix, n)
    tail = model.get_input_embeddings()(torch.tensor([(m.eot_id,) + target]))
    logits = model(inputs_embeds=torch.cat([E, tail], dim=1)).logits[0, -len(target) - 1 :]
    return F.cross_entropy(logits, torch.tensor(target + (m.eos_id,)))


@pytest.mark.parametrize(
    "arch,attn,pad", [("llama", "sdpa", False), ("gpt2", "eager", False), ("llama", "sdpa", True)]
)
def test_coconut_loss_matches_naive_loop(arch, attn, pad):
    cfg, _, model, m = coconut_setup(
        arch, attn, coconut__thoughts_per_step=2, coconut__pad_latent_to_max=pad
    )
    k = 2  # thoughts per row: c * min(k, max_stage) = 4 each (the original), or capped at the
    # example's steps (pad_latent_to_max: false): 4, 2, 0, a batch that mixes thought counts
    assert [m.parts(ex, k)[1] for ex in EXAMPLES] == ([4, 4, 4] if pad else [4, 2, 0])
    got = m.loss(model, EXAMPLES, stage(k), 0.0, 5, CPU)
    with torch.no_grad():
        ref = sum(naive_loss(model, m, ex, k) for ex in EXAMPLES) / 5
    assert got.item() == pytest.approx(ref.item(), abs=1e-4)


def test_coconut_gradients_flow_through_thoughts(coco, monkeypatch):
    import rim.methods.coconut as coconut

    cfg, _, model, m = coco
    seen: dict[str, list[torch.Tensor]] = {"q": [], "thoughts": []}
    feeding = coconut._feeding

    def record(model, where, values):  # the last thought enters with <eot> and the target
        seen["thoughts"].append(values)
        return feeding(model, where, values)

    monkeypatch.setattr(coconut, "_feeding", record)
    h1 = model.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: seen["q"].append(out)
    )
    h2 = model.register_forward_pre_hook(
        lambda mod, args, kw: (
            seen["thoughts"].append(kw["inputs_embeds"])
            if kw.get("inputs_embeds") is not None
            else None
        ),
        with_kwargs=True,
    )
    try:
        loss = m.loss(model, EXAMPLES[:2], stage(1), 0.0, 2, CPU)
    finally:
        h1.remove()
        h2.remove()
    q, thoughts = seen["q"][0], seen["thoughts"]  # (B, P, D) question embeddings; (B, 1, D) each
    assert len(thoughts) == 2 and all(t.requires_grad for t in thoughts)  # none detached
    for t in thoughts:  # the part of dL/dq that goes through thought t
        (g,) = torch.autograd.grad(loss, t, retain_graph=True)
        (through,) = torch.autograd.grad(t, q, grad_outputs=g, retain_graph=True)  # (B, P, D)
        for b, ex in enumerate(EXAMPLES[:2]):
            L = len(m.question_ids(ex.question))
            assert through[b, -L - 1 :].abs().sum(-1).gt(0).all()  # question tokens + <bot>
    loss2 = m.loss(model, EXAMPLES[:2], stage(1), 0.0, 2, CPU)
    loss2.backward()
    grad = model.get_input_embeddings().weight.grad
    assert grad[m.bot_id].abs().sum() > 0 and grad[m.eot_id].abs().sum() > 0


# ---------------------------------------------------------------- Coconut: inference


def test_coconut_decode_matches_naive_greedy(coco):
    from rim.decoders import decode

    cfg, _, model, m = coco
    cfg.eval.cot_max_new_tokens = 6
    m = build(cfg, m.tokenizer)
    n = m.thoughts()
    assert n == 4
    qs = [ex.question for ex in EXAMPLES]
    out = decode(m, model, qs)
    emb = model.get_input_embeddings()
    for q, got, passes in zip(qs, out.tokens, out.passes):
        with torch.no_grad():
            E = naive_thoughts(model, m.prompt(q), n)
            E = torch.cat([E, emb(torch.tensor([[m.eot_id]]))], dim=1)
            ref, steps = [], 0
            for _ in range(6):
                nxt = int(model(inputs_embeds=E).logits[0, -1].argmax())
                steps += 1
                if nxt == m.eos_id:
                    break
                ref.append(nxt)
                E = torch.cat([E, emb(torch.tensor([[nxt]]))], dim=1)
        assert got == ref
        # n + 1 passes to the first token (the original's: thought n goes with <eot>), then one
        # per further token
        assert passes == n + 1 + (steps - 1)


def test_coconut_works_with_peft():
    from rim.config import ModelConfig
    from rim.decoders import decode
    from rim.model import wrap_lora

    cfg, _, model, m = coconut_setup(coconut__max_stage=1, coconut__thoughts_per_step=1)
    lora = wrap_lora(
        model,
        ModelConfig(lora_rank=4, lora_alpha=8, lora_dropout=0.0),
        [m.bot_id, m.thought_id, m.eot_id],
    )
    loss = m.loss(lora, EXAMPLES[:2], stage(1), 0.0, 2, CPU)
    loss.backward()
    assert torch.isfinite(loss)
    cfg.eval.cot_max_new_tokens = 3
    m = build(cfg, m.tokenizer)
    assert decode(m, lora, ["2 + 3"]).passes[0] <= 1 + 1 + 2  # 1 thought: 2 passes, 2 tokens


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("method", ["icot", "coconut"])
def test_short_training_run_saves_and_loads(method, tmp_path):
    from rim.assembly import assemble
    from rim.config import (
        CoconutConfig,
        Config,
        DataConfig,
        EvalConfig,
        ICoTConfig,
        ModelConfig,
        SplitConfig,
        TrainConfig,
    )
    from rim.reasoner import Reasoner
    from rim.trainer import Trainer

    cfg = Config(
        method=method,
        model=ModelConfig(arch="llama", size="tiny"),
        data=DataConfig(
            train=SplitConfig(generator="chain", size=16, seed=0),
            valid=SplitConfig(generator="chain", size=4, seed=1),
            max_length=128,
        ),
        train=TrainConfig(lr=1e-3, batch_size=8, steps=3, log_every=1),
        eval=EvalConfig(batch_size=4, cot_max_new_tokens=8, val_limit=4),
        coconut=CoconutConfig(  # stages 0 and 1, then 1 step fully latent
            max_stage=1,
            thoughts_per_step=1,
            steps_per_stage=1,
            epochs_per_stage=None,
            epochs=None,
            steps=3,
        ),
        icot=ICoTConfig(remove_per_epoch=2),
    )
    setup = assemble(cfg, log=lambda *a: None)
    Trainer(setup, tmp_path).fit()
    assert (tmp_path / "best").is_dir() and (tmp_path / "final").is_dir()
    meta = json.loads((tmp_path / "final" / "rim.json").read_text())
    assert meta["method"] == method
    answers = Reasoner.load(str(tmp_path / "best")).generate(["3 + 4", "2 - 1"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
