"""Looped memory (`memory.loops`) and the state loss (`memory.state_loss`), issue 31.

Off, both leave RiM's loss and gradients bit for bit; on, the loss and gradients equal an
unrolled reference written here (per example, plain causal runs with `inputs_embeds`, no
mask, no cache, default positions); the state loss separates the true step-to-block targets
from shuffled ones after a few steps; looped models decode with the final and all-blocks
decoders (branch k as a model given k blocks), not with a probe."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from rim.config_depth import StateLossConfig
from rim.data import Example
from rim.errors import ConfigError, RimError
from rim.methods.base import Method
from rim.methods.depth import MODULE, MODULE_FILE

from .conftest import TINY_RECIPE, make_setup, rim_main

CPU = torch.device("cpu")
# questions of different lengths, 1..3 steps (stage 1: 2..4 blocks) of 1..4 tokens: padding
# in every part, steps longer and shorter than the state loss's slots
EXAMPLES = [
    Example("6 + 6 - 4", ("6 + 6 12", "8"), "8"),
    Example("9 + 3", ("12",), "12"),
    Example("6 - 4 + 5 + 2 - 1", ("2", "2 + 5", "9"), "8"),
]


def setup(**over):
    """(method, model) on a tiny Llama, K = 3, the method's modules attached."""
    over = {"memory__blocks": 3, **over}
    _, _, model, m = make_setup(**over)
    return m, m.attach(model)


def stages(m):
    return {s.name: s for s in m.plan(len(EXAMPLES), 3)}


# ---------------------------------------------------------------- the unrolled reference


def plain(model, embeds: torch.Tensor):
    return model(inputs_embeds=embeds, output_hidden_states=True)


def reference_loss(m, model, examples, stage, progress: float, state_on: bool) -> torch.Tensor:
    """RiM's loss after R loops, one example and one readout at a time."""
    E, Lb = model.get_input_embeddings(), m.mem.block_len
    total = 0.0
    for ex in examples:
        segs = m.segments(ex, stage, progress)
        nb = sum(s.kind == "block" for s in segs)
        q = list(segs[0].ids)
        blocks = [t for s in segs[1 : nb + 1] for t in s.ids]
        inp, out = unrolled(m, model, q, blocks)
        for s in segs[nb + 1 :]:  # readout under block s.parent, after the last pass
            prefix = inp[:, : len(q) + s.parent * Lb]
            logits = plain(model, torch.cat([prefix, E(torch.tensor([s.ids]))], 1)).logits[0]
            target = list(s.ids[s.cue :]) + [m.eos_id]
            start = prefix.shape[1] + s.cue - 1
            nll = F.cross_entropy(logits[start : start + len(target)].float(), torch.tensor(target))
            total = total + s.weight * nll
        if state_on:
            total = total + reference_state(m, model, out, len(q), nb, ex)
    return total / len(examples)


def unrolled(m, model, q: list[int], blocks: list[int]):
    """(inputs, outputs) of the last of 1 + R plain runs over question and blocks."""
    mem, E = m.settings.memory, model.get_input_embeddings()
    inp = E(torch.tensor([q + blocks]))  # (1, P, D)
    out = plain(model, inp)
    for _ in range(mem.loops):  # the whole sequence again: the question is unchanged
        h = out.hidden_states[-1]
        src = h[:, len(q) :] if mem.loop_input == "own" else h[:, len(q) - 1 : -1]
        inp = torch.cat([E(torch.tensor([q])), m.depth["loop_projection"](src)], dim=1)
        out = plain(model, inp)
    return inp, out


def reference_state(m, model, out, q_len: int, nb: int, ex: Example) -> torch.Tensor:
    """weight x mean over blocks t <= min(T, blocks) of step t's mean NLL under the head."""
    cfg, Lb = m.settings.memory.state_loss, m.mem.block_len
    layer = (len(out.hidden_states) - 1) // 2 if cfg.layer is None else cfg.layer
    h = out.hidden_states[layer][0]  # (P, D)
    terms = []
    for t, step in enumerate(ex.steps[:nb]):
        ids = list(m.text_ids(step))
        block = h[q_len + t * Lb : q_len + (t + 1) * Lb]
        pooled = block.mean(0) if cfg.pool == "mean" else block[-1]
        logp = model.get_output_embeddings()(m.depth["state_head"](pooled[None]))[0]
        logp = logp.float().log_softmax(-1)  # (slots, V)
        if cfg.target == "bag":
            nll = -logp[0, list(dict.fromkeys(ids))].mean()
        elif cfg.target == "first":
            tg = ids[: cfg.tokens]
            nll = -logp[torch.arange(len(tg)), tg].mean()
        else:
            tg = ids[-cfg.tokens :]
            nll = -logp[torch.arange(cfg.tokens - len(tg), cfg.tokens), tg].mean()
        terms.append(nll)
    return cfg.weight * torch.stack(terms).mean()


def loss_and_grads(model, fn, *args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`fn(*args)` and the gradient of every parameter of `model` that got one."""
    model.zero_grad(set_to_none=True)
    loss = fn(*args)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same(a, b, atol: float = 1e-5) -> None:
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, atol=atol, rtol=0)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=0, msg=name)


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "key,value",
    [("loops", -1), ("loop_input", "next"), ("state_loss.weight", -1),
     ("state_loss.target", "all"), ("state_loss.tokens", 0), ("state_loss.pool", "max"),
     ("state_loss.stages", "[3]"), ("state_loss.layer", -2)],
)  # fmt: skip
def test_config_errors_name_the_key(key, value):
    from rim.config import load_config

    with pytest.raises(ConfigError, match=f"memory.{key}"):
        load_config(None, [f"memory.{key}={value}"])


def test_refusals_are_one_line():
    with pytest.raises(ConfigError, match="train.pack_tokens: memory.loops"):
        make_setup(memory__loops=1, train__pack_tokens=64)
    _, _, model, m = make_setup(memory__state_loss=StateLossConfig(weight=1.0, layer=9))
    with pytest.raises(ConfigError, match="memory.state_loss.layer: 9 is past"):
        m.attach(model)  # the tiny model has 2 layers


# ---------------------------------------------------------------- off: today's RiM, exactly


def test_off_is_todays_rim_bit_for_bit(tmp_path):
    """The demo recipe's model (shrunk data), defaults and explicit zeros: `RiM.loss` is
    `Method.loss`, loss and every gradient equal bit for bit; so is the state-loss path's
    readout part (its head attached, weight 0)."""
    from rim.assembly import assemble
    from rim.config import load_config

    small = ["data.train.size=16", "data.valid.size=4", "data.test.size=4"]
    zeros = ["memory.loops=0", "memory.state_loss.weight=0", "memory.loop_input=previous"]
    for extra in ([], zeros):
        s = assemble(load_config("configs/demo/rim.yaml", small + extra), log=lambda _: None)
        m, model, exs = s.method, s.model, s.train[:6]
        assert m.depth is None and MODULE not in dict(model.named_children())
        for stage in m.plan(16, 8):
            args = (model, exs, stage, 0.3, len(exs), CPU)
            ours = loss_and_grads(model, m.loss, *args)
            today = loss_and_grads(model, Method.loss, m, *args)
            assert_same(ours, today, atol=0.0)
    from rim.methods import depth

    weighed = small + ["memory.state_loss.weight=1"]
    s = assemble(load_config("configs/demo/rim.yaml", weighed), log=lambda _: None)
    m, model, exs = s.method, s.model, s.train[:6]
    m.settings.memory.state_loss.weight = 0.0  # the head is attached; its term weighs 0
    args = (model, exs, m.plan(16, 8)[0], 0.3, len(exs), CPU)
    loss, grads = loss_and_grads(model, depth.packed_loss, m, *args)
    head = {n: grads.pop(n) for n in list(grads) if n.startswith(MODULE)}
    assert head and not any(g.any() for g in head.values())
    assert_same((loss, grads), loss_and_grads(model, Method.loss, m, *args), atol=0.0)


# ---------------------------------------------------------------- on: equal to the reference


@pytest.mark.parametrize(
    "loops,loop_input,state",
    [(1, "own", None), (2, "own", None), (1, "previous", None), (2, "previous", "last")],
)
def test_looped_loss_and_gradients_equal_the_unrolled_reference(loops, loop_input, state):
    over = {"memory__loops": loops, "memory__loop_input": loop_input}
    if state:
        over["memory__state_loss"] = StateLossConfig(weight=0.7, target=state, tokens=2)
    m, model = setup(**over)
    torch.nn.init.normal_(m.depth["loop_projection"].weight, 0.0, 0.5)  # not the identity
    on = state is not None
    for name, stage in stages(m).items():
        progress = 0.5 if name == "stage1" else 0.0  # stage 1: some readouts faded out
        args = (model, EXAMPLES, stage, progress, len(EXAMPLES), CPU)
        ours = loss_and_grads(model, m.loss, *args)
        state_on = on and name == "stage1"  # state_loss.stages: [1]
        ref = loss_and_grads(model, reference_loss, m, model, EXAMPLES, stage, progress, state_on)
        assert_same(ours, ref)
        assert ours[1][f"{MODULE}.loop_projection.weight"].abs().sum() > 0


def test_looped_reference_is_sensitive():
    """The comparison can fail: own and previous, or R and R + 1, give other losses."""
    m, model = setup(memory__loops=1)
    stage = stages(m)["stage2"]
    ours = m.loss(model, EXAMPLES, stage, 0.0, len(EXAMPLES), CPU)
    m.settings.memory.loop_input = "previous"
    assert abs(ours - reference_loss(m, model, EXAMPLES, stage, 0.0, False)) > 1e-4
    m.settings.memory.loop_input, m.settings.memory.loops = "own", 2
    assert abs(ours - reference_loss(m, model, EXAMPLES, stage, 0.0, False)) > 1e-4


def test_explain_readouts_hang_under_the_last_pass():
    m, model = setup(memory__loops=1, curriculum__explain_weight=0.5)
    stage = stages(m)["stage2"]
    args = (model, EXAMPLES, stage, 0.0, len(EXAMPLES), CPU)
    ours = loss_and_grads(model, m.loss, *args)
    ref = loss_and_grads(model, reference_loss, m, model, EXAMPLES, stage, 0.0, False)
    assert_same(ours, ref)


@pytest.mark.parametrize(
    "target,pool,pack", [("last", "mean", None), ("first", "last", 40), ("bag", "mean", 40)]
)
def test_state_loss_equals_the_reference(target, pool, pack):
    """R = 0: the packed pass (several examples per row with `pack`) plus the state term."""
    cfg = StateLossConfig(weight=0.5, target=target, tokens=2, pool=pool, stages=[1, 2])
    m, model = setup(memory__state_loss=cfg, train__pack_tokens=pack)
    for stage in stages(m).values():
        args = (model, EXAMPLES, stage, 0.4, len(EXAMPLES), CPU)
        ours = loss_and_grads(model, m.loss, *args)
        ref = loss_and_grads(model, reference_loss, m, model, EXAMPLES, stage, 0.4, True)
        assert_same(ours, ref)


def test_state_loss_gradient_reaches_the_head_and_only_layers_below():
    """The state term alone: the head and the layers up to the chosen one get gradients, the
    layers above it none (layer 1 of 2)."""
    from rim.methods import depth

    m, model = setup(memory__state_loss=StateLossConfig(weight=1.0, layer=1))
    stage = stages(m)["stage1"]
    args = (model, EXAMPLES, stage, 0.0, len(EXAMPLES), CPU)
    _, full = loss_and_grads(model, depth.packed_loss, m, *args)
    _, base = loss_and_grads(model, Method.loss, m, *args)
    diff = {n: full[n] - base.get(n, 0.0) for n in full}
    assert diff[f"{MODULE}.state_head.slots.7.weight"].abs().sum() > 0  # `last`: right-aligned
    assert diff[f"{MODULE}.state_head.slots.0.weight"].abs().sum() == 0  # 1-token steps
    assert diff["model.layers.0.mlp.up_proj.weight"].abs().sum() > 0
    assert diff["model.layers.1.mlp.up_proj.weight"].abs().max() == 0


def test_state_loss_learns_the_true_targets_over_shuffled_ones():
    """Step t is a fixed word per block; a few steps of training make the state loss of the
    true step-to-block targets far lower than that of the steps rotated across blocks."""
    from rim.methods import depth

    m, model = setup(memory__state_loss=StateLossConfig(weight=1.0, target="bag"))
    rng = random.Random(0)
    digits = "1 2 3 4 5 6 7 8 9".split()

    def example() -> Example:
        q = [rng.choice(digits) for _ in range(3)]
        return Example(" ".join(q), ("4", "5", "6"), q[-1])

    train, test = [example() for _ in range(160)], [example() for _ in range(16)]
    stage = stages(m)["stage1"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for i in range(20):
        opt.zero_grad()
        m.loss(model, train[8 * i : 8 * i + 8], stage, 0.0, 8, CPU).backward()
        opt.step()
    model.eval()

    def state_term(exs) -> float:
        with torch.no_grad():
            args = (model, exs, stage, 0.0, len(exs), CPU)
            return float(depth.packed_loss(m, *args) - Method.loss(m, *args))

    rotated = [dataclasses.replace(e, steps=e.steps[1:] + e.steps[:1]) for e in test]
    true, shuffled = state_term(test), state_term(rotated)
    assert true < 0.5 * shuffled, (true, shuffled)
    read = depth.state_accuracy(m, model, test)["state_accuracy_per_block"]
    misread = depth.state_accuracy(m, model, rotated)["state_accuracy_per_block"]
    assert min(read) == 1.0 and max(misread) == 0.0, (read, misread)


@pytest.mark.parametrize(
    "loops,target,pool", [(0, "last", "mean"), (0, "bag", "last"), (1, "first", "mean")]
)
def test_state_accuracy_is_what_a_plain_run_reads(loops, target, pool):
    """`state_accuracy` (batched prefill, K blocks, left padding) equals the head's reading
    of each block in a plain run per example; with training so the counts are not all 0."""
    from rim.methods import depth

    cfg = StateLossConfig(weight=1.0, target=target, tokens=2, pool=pool)
    m, model = setup(memory__state_loss=cfg, memory__loops=loops)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        m.loss(model, EXAMPLES, stages(m)["stage1"], 0.0, 3, CPU).backward()
        opt.step()
    model.eval()
    exact, tokens = {}, {}
    with torch.no_grad():
        for ex in EXAMPLES:
            q = list(m.question_ids(ex.question))
            _, out = unrolled(m, model, q, m.prompt(ex.question)[len(q) :])
            h = out.hidden_states[(len(out.hidden_states) - 1) // 2][0]  # (P, D)
            for t, step in enumerate(ex.steps[:3]):
                ids = list(m.text_ids(step))
                Lb = m.mem.block_len
                block = h[len(q) + t * Lb : len(q) + (t + 1) * Lb]  # (Lb, D)
                pooled = block.mean(0) if pool == "mean" else block[-1]
                logits = model.get_output_embeddings()(m.depth["state_head"](pooled[None]))[0]
                if target == "bag":
                    want = list(dict.fromkeys(ids))
                    top = set(logits[0].topk(len(want)).indices.tolist())
                    right = [i in top for i in want]
                else:
                    want = ids[:2] if target == "first" else ids[-2:]
                    at = 0 if target == "first" else 2 - len(want)
                    right = [int(logits[at + j].argmax()) == i for j, i in enumerate(want)]
                exact.setdefault(t, []).append(all(right))
                tokens.setdefault(t, []).append(sum(right) / len(right))
    rep = depth.state_accuracy(m, model, EXAMPLES, batch_size=2)
    mean = lambda d: [sum(d[t]) / len(d[t]) for t in sorted(d)]  # noqa: E731
    assert rep["state_accuracy_per_block"] == pytest.approx(mean(exact))
    assert rep["state_token_accuracy_per_block"] == pytest.approx(mean(tokens))
    assert sum(mean(tokens)) > 0


# ---------------------------------------------------------------- inference


def reference_greedy(m, model, question: str, n: int, blocks: int | None = None) -> list[int]:
    """Prefill, R loops, then n greedy tokens, each a plain run of the whole sequence."""
    mem, E = m.settings.memory, model.get_input_embeddings()
    q = list(m.question_ids(question))
    inp = E(torch.tensor([m.prompt(question, blocks)]))
    for _ in range(mem.loops):
        h = plain(model, inp).hidden_states[-1]
        src = h[:, len(q) :] if mem.loop_input == "own" else h[:, len(q) - 1 : -1]
        inp = torch.cat([E(torch.tensor([q])), m.depth["loop_projection"](src)], dim=1)
    out = []
    for _ in range(n):
        nxt = int(plain(model, inp).logits[0, -1].argmax())
        out.append(nxt)
        inp = torch.cat([inp, E(torch.tensor([[nxt]]))], dim=1)
    return out


@pytest.mark.parametrize("loops,loop_input", [(1, "own"), (2, "previous")])
def test_final_decoder_runs_prefill_loops_and_greedy(loops, loop_input):
    from rim.decoders import decode
    from rim.methods.registry import build

    over = {"memory__loops": loops, "memory__loop_input": loop_input, "memory__blocks": 3}
    cfg, tok, model, _ = make_setup(**over, eval__max_new_tokens=3)
    m = build(cfg, tok, eos_id=-1)  # an EOS no token has: every row decodes 3 tokens
    model = m.attach(model)
    torch.nn.init.normal_(m.depth["loop_projection"].weight, 0.0, 0.5)
    qs = [e.question for e in EXAMPLES]  # different lengths: left padding
    out = decode(m, model, qs)
    with torch.no_grad():
        for q, got in zip(qs, out.tokens):
            assert got == reference_greedy(m, model, q, 3)
    assert out.passes == [1 + loops + 3 - 1] * len(qs)


@pytest.mark.parametrize("loops,loop_input", [(1, "own"), (2, "previous")])
def test_all_blocks_decoder_answers_as_a_model_given_k_blocks(loops, loop_input):
    """Branch k of the all-blocks decoder (one prefill, R passes, one shared cache) writes
    the tokens of a plain run given only blocks 1..k, looped R times; the step readouts of
    stage 1 (`rim.explain.step_accuracy`, the trainer's grounding curve) read the same."""
    from rim.decoders import decode, default_for
    from rim.methods.registry import build

    over = {"memory__loops": loops, "memory__loop_input": loop_input, "memory__blocks": 3}
    cfg, tok, model, _ = make_setup(**over, eval__max_new_tokens=3)
    m = build(cfg, tok, eos_id=-1)  # an EOS no token has: every row decodes 3 tokens
    model = m.attach(model)
    torch.nn.init.normal_(m.depth["loop_projection"].weight, 0.0, 0.5)
    assert default_for(m) == "all-blocks"
    qs = [e.question for e in EXAMPLES]  # different lengths: left padding
    out = decode(m, model, qs, "all-blocks")
    assert out.rows_per_question == 3 and out.passes == [1 + loops + 3 - 1] * 9
    with torch.no_grad():
        for i, q in enumerate(qs):
            for k in (1, 2, 3):
                assert out.tokens[3 * i + k - 1] == reference_greedy(m, model, q, 3, k), (q, k)
    assert out.tokens[2::3] == decode(m, model, qs).tokens  # after block K: the final decoder


def test_probe_and_explain_refuse_a_looped_model_in_one_line():
    from rim.decoders import decode
    from rim.explain import explain
    from rim.probe import block_states

    m, model = setup(memory__loops=1, curriculum__explain_weight=0.5)
    with pytest.raises(RimError, match="--decoder early-exit: memory.loops is 1"):
        decode(m, model, ["6 + 6"], "early-exit")
    with pytest.raises(RimError, match="probe: memory.loops is 1"):
        block_states(m, model, EXAMPLES)
    with pytest.raises(RimError, match="--explain: memory.loops is 1"):
        explain(m, model, ["6 + 6"])


@pytest.mark.parametrize("loops", [0, 2])
def test_latency_bench_counts_the_loops(loops):
    """1 + R passes before the first answer token, the same tokens as plain transformers
    calls (prefill, crop, `inputs_embeds` passes: `rim.bench.latency._plain_loops`)."""
    from rim import bench

    res = bench.latency_bench(
        bench.load_bench_model("tiny"), question_tokens=9, answer_tokens=3, loops=loops,
        runs=1, warmup=0, methods=("direct", "rim"),
    )  # fmt: skip
    c = res["counts"]["rim"]
    assert c["forward_passes"] == c["expected_forward_passes"] == 1 + loops + 3 - 1
    assert c["same_tokens_as_plain"] and res["config"]["loops"] == loops


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_lora_run_trains_the_modules_and_reloads(tmp_path):
    """model.path + LoRA: the modules train beside the adapter; the looped loss still equals
    the reference through PEFT; `final/` answers with 1 + R passes."""
    import copy

    from rim.assembly import assemble
    from rim.config import load_config
    from rim.decoders import decode
    from rim.reasoner import Reasoner
    from rim.trainer import Trainer

    from .test_export import make_base

    base, _ = make_base(tmp_path / "base")
    recipe = copy.deepcopy(TINY_RECIPE) | {"memory": {"blocks": 3, "mem_tokens": 2, "loops": 2}}
    recipe["memory"]["state_loss"] = {"weight": 0.5, "target": "first", "tokens": 2}
    recipe["curriculum"] |= {"stage1_steps": 2, "stage2_steps": 1}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    over = [f"model.path={base}", "model.lora_rank=4", "model.lora_alpha=8"]
    s = assemble(load_config(tmp_path / "recipe.yaml", over), log=lambda *a: None)
    trainable = [n for n, p in s.model.named_parameters() if p.requires_grad]
    assert any(n.startswith(MODULE) for n in trainable) and any("lora_" in n for n in trainable)
    stage, exs = s.method.plan(64, 2)[0], s.train[:3]
    s.model.eval()  # LoRA's dropout off for the comparison
    with torch.no_grad():
        ours = s.method.loss(s.model, exs, stage, 0.0, 3, CPU)
        ref = reference_loss(s.method, s.model, exs, stage, 0.0, True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    Trainer(s, tmp_path / "run").fit()
    r = Reasoner.load(str(tmp_path / "run" / "final"))
    assert hasattr(r.model, "peft_config") and r.method.depth is not None
    out = decode(r.method, r.model, ["3 + 4"])
    assert out.passes[0] - len(out.tokens[0]) in (2, 3)  # 1 + R, then a pass per token


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import copy
    import os

    os.environ["RIM_NO_PROGRESS"] = "1"
    root = tmp_path_factory.mktemp("looped")
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["memory"] |= {
        "loops": 1,
        "loop_input": "previous",
        "state_loss": {"weight": 0.5, "target": "last", "tokens": 1},
    }
    recipe["curriculum"] |= {"stage1_steps": 3, "stage2_steps": 2}
    recipe["train"] |= {"save_every": 2}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))  # fmt: skip
    rim_main("train", "--config", str(root / "recipe.yaml"), "--out", str(root / "run"))
    return root / "run"


@pytest.mark.slow
def test_checkpoints_hold_the_modules_and_answer_with_their_passes(run, capsys):
    from rim.reasoner import Reasoner

    best = run / "best"
    saved = load_file(best / MODULE_FILE)
    assert {"loop_projection.weight", "state_head.slots.0.weight"} <= set(saved)
    assert not any(k.startswith(MODULE) for k in load_file(best / "model.safetensors"))
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert any(k.startswith(MODULE) for k in load_file(ckpt / "weights.safetensors"))
    r = Reasoner.load(str(best))
    torch.testing.assert_close(r.method.depth.state_dict(), saved)
    assert json.loads((best / "rim.json").read_text())["loops"] == 1
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [x for x in logged if "valid_accuracy" in x]
    assert {x["stage"] for x in valid} == {"stage1", "stage2"}  # every validation reads the head
    reads = [x["valid_state_token_accuracy_per_block"] for x in valid]
    assert all(1 <= len(r) <= 3 and all(0 <= a <= 1 for a in r) for r in reads), reads
    grounding = [x for x in valid if x["stage"] == "stage1"]  # the readouts after pass R
    assert grounding and all("valid_step_accuracy_per_block" in x for x in grounding)
    rim_main("eval", "--checkpoint", str(best), "--split", "valid", "--timing-examples", "1")
    res = json.loads((best / "eval.json").read_text())
    assert len(res["per_block_accuracy"]) == 3  # all-blocks: the default for looped ones too
    assert 1 <= len(res["state_token_accuracy_per_block"]) <= 3  # what the head reads
    # 1 + R passes before the first answer token (R = 1), one per further token (+ EOS's)
    assert {x["passes"] - x["tokens"] for x in res["records"]} <= {1, 2}
    capsys.readouterr()
    for argv in (
        ["export", "--checkpoint", str(best), "--out", str(run / "exported")],
        ["generate", "--checkpoint", str(best), "--decoder", "early-exit", "3 + 4"],
    ):
        with pytest.raises(SystemExit):
            rim_main(*argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "memory.loops" in err[0], err  # fmt: skip


@pytest.mark.slow
def test_a_training_checkpoint_loads_for_inference(run, tmp_path):
    """`RUN/checkpoints/step-N` is a model too (`rim eval --checkpoint` reads any saved step):
    the last one answers as `final/` (the same weights, the loop projection and state head
    included); one without its tokenizer, or sharded, is refused in one line."""
    import shutil

    from rim.checkpoint import STATE_FILE
    from rim.manifest import write_manifest
    from rim.reasoner import Reasoner

    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    a, b = Reasoner.load(str(ckpt)), Reasoner.load(str(run / "final"))
    torch.testing.assert_close(a.method.depth.state_dict(), b.method.depth.state_dict())
    qs = [e.question for e in EXAMPLES]
    assert a.generate(qs, decoder="all-blocks") == b.generate(qs, decoder="all-blocks")
    rim_main("eval", "--checkpoint", str(ckpt), "--split", "valid", "--timing-examples", "0")
    assert len(json.loads((ckpt / "eval.json").read_text())["per_block_accuracy"]) == 3
    for broken, problem in (("no_tok", "without its tokenizer"), ("sharded", r"sharded \(FSDP\)")):
        copy = shutil.copytree(ckpt, tmp_path / broken)
        if broken == "no_tok":
            for f in copy.glob("tokenizer*"):
                f.unlink()
        else:
            state = json.loads((copy / STATE_FILE).read_text()) | {"sharded": True}
            (copy / STATE_FILE).write_text(json.dumps(state))
        write_manifest(copy, None)
        with pytest.raises(RimError, match=f"--checkpoint {copy}: a .*{problem}"):
            Reasoner.load(str(copy))
