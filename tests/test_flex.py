"""FlexAttention (`model.attn_implementation: flex`, rim.flex): the `mask_mod` is the layout's
mask, a forward through it gives the dense path's logits, and where it cannot run it is
refused in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask, flex_attention

from rim import flex, speed
from rim.config import ModelConfig
from rim.data import generate
from rim.errors import ConfigError
from rim.model import build_model

from .conftest import make_setup

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")

# (method, recipe overrides, stage index in the plan, training progress)
CASES = {
    "rim-stage1-start": ("rim", {}, 0, 0.0),
    "rim-stage1-mid": ("rim", {}, 0, 0.6),
    "rim-stage2": ("rim", {}, 1, 0.0),
    "rim-explain": ("rim", {"curriculum__explain_weight": 0.5}, 0, 0.3),
    "pause": ("pause", {}, 0, 0.0),
    "direct": ("direct", {}, 0, 0.0),
    "cot": ("cot", {}, 0, 0.0),
    "icot-first": ("icot", {"train__batch_size": 8}, 0, 0.0),  # remove0
    "icot-later": ("icot", {"train__batch_size": 8}, 5, 0.5),  # remove5, smoothing on
}


@pytest.fixture
def eager_flex(monkeypatch):
    """transformers compiles FlexAttention (inductor on a CPU: minutes); the test runs it
    eagerly, which is torch's reference implementation of the same kernel."""
    import transformers.integrations.flex_attention as hf_flex

    def eager(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", eager)


def _batches(name: str, packed: bool):
    """(model, method, stage, examples, dense batch, flex batch) of 6 chain examples for
    `CASES[name]`; `packed`: rows of up to twice the longest example (`train.pack_tokens`)."""
    method_name, over, stage_i, progress = CASES[name]
    cfg, tok, model, method = make_setup(method_name, train__epochs=3.0, **over)
    stage = method.plan(64, 4)[stage_i]
    examples = generate("chain", 6, seed=3)
    dense = method.batch(examples, stage, progress)
    if packed:
        budget = 2 * dense.input_ids.shape[1] - 1
        method.common = dataclasses.replace(method.common, pack_tokens=budget)
        dense = method.batch(examples, stage, progress)
    batch = method.batch(examples, stage, progress, mask=flex.Tables.of)
    return model, method, stage, examples, dense, batch


def _mask_of(tables: flex.Tables) -> torch.Tensor:
    """The mask_mod evaluated on every (row, q, kv) by torch's own `create_mask`: (B, L, L)."""
    B, L = tables.seg.shape[0], tables.length
    return create_mask(tables.mask_mod(), B, 1, L, L, device="cpu")[:, 0]


@pytest.mark.parametrize("packed", [False, True], ids=["row-per-example", "packed-rows"])
@pytest.mark.parametrize("name", list(CASES))
def test_mask_mod_equals_the_dense_mask(name, packed):
    """Every method and stage that uses the layout, padded rows included, and rows holding
    several examples (`train.pack_tokens`, positions restarting per example)."""
    *_, dense, batch = _batches(name, packed)
    tables = batch.attention_mask
    assert isinstance(tables, flex.Tables)
    assert torch.equal(batch.input_ids, dense.input_ids)
    assert torch.equal(batch.position_ids, dense.position_ids)
    L = dense.input_ids.shape[1]
    assert tables.length == L
    assert torch.equal(_mask_of(tables), dense.attention_mask[:, 0] == 0)
    if packed:  # a row really holds several examples (positions restart)
        assert (batch.position_ids[:, 1:] == 0).any()
    else:  # and a padded row is among them
        assert (tables.seg[:, :L] == tables.anc.shape[1] - 1).any()


def test_mask_mod_by_hand_two_documents_and_padding():
    """Two `Packed` examples concatenated by hand (segment ids offset, positions restarting)
    beside a shorter, padded row: the mask_mod against `rim.layout.allowed`, cell by cell."""
    from rim.layout import Segment, allowed, collate, concat, pack

    a = pack([Segment((5, 6)), Segment((1, 2), 0), Segment((7,), 1, 1.0)], 0)
    b = pack([Segment((8,)), Segment((3,), 0), Segment((9, 9), 1, 1.0), Segment((4,), 0, 1.0)], 0)
    row = concat([a, b])
    assert row.position_ids == [0, 1, 2, 3, 4, 0, 1, 2, 3, 1]  # b restarts at 0
    tables = flex.Tables.of([row, b])
    got = _mask_of(tables)
    assert torch.equal(got[0], allowed(row))
    n = len(b)
    assert torch.equal(got[1, :n, :n], allowed(b))
    assert torch.equal(got[1, n:], torch.eye(len(row), dtype=torch.bool)[n:])  # padding
    assert not got[1, :n, n:].any()
    assert torch.equal(got, collate([row, b], 0).attention_mask[:, 0] == 0)


@pytest.mark.parametrize(
    "arch, packed", [("llama", False), ("llama", True), ("qwen2", False)],
    ids=["llama-padded", "llama-packed", "qwen2-padded"],
)  # fmt: skip
def test_flex_forward_gives_the_dense_logits(arch, packed, eager_flex):
    """No-grad forward, padded or packed rows: FlexAttention with the BlockMask against sdpa
    with the dense mask, every position (padding too)."""
    model, method, stage, examples, dense, batch = _batches("rim-stage1-mid", packed)
    if arch != "llama":
        _, _, model, _ = make_setup("rim", arch=arch)
    kw = dict(input_ids=dense.input_ids, position_ids=dense.position_ids, use_cache=False)
    with torch.no_grad():
        want = model(attention_mask=dense.attention_mask, **kw).logits
        model.set_attn_implementation(flex.HF_NAME)
        got = model(attention_mask=flex.attention_mask(batch.attention_mask), **kw).logits
    assert flex.enabled(model)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_loss_hook_sends_a_block_mask(eager_flex):
    """`Method.loss` on a flex model: the model gets a BlockMask, the loss is the dense one."""
    from torch.nn.attention.flex_attention import BlockMask

    model, method, stage, examples, *_ = _batches("rim-stage1-mid", False)
    seen = []
    model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(type(kw["attention_mask"])), with_kwargs=True
    )
    with torch.no_grad():
        want = method.loss(model, examples, stage, 0.6, 6, torch.device("cpu"))
        model.set_attn_implementation(flex.HF_NAME)
        got = method.loss(model, examples, stage, 0.6, 6, torch.device("cpu"))
    assert seen == [torch.Tensor, BlockMask]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_cpu_has_no_flex_backward():
    """The reason CPU training is refused; if torch ever adds it, this tells us."""
    q = torch.randn(1, 1, 8, 4, requires_grad=True)
    with pytest.raises(NotImplementedError, match="does not support backward on CPU"):
        flex_attention(q, q, q)


def test_gpt2_is_refused():
    with pytest.raises(ConfigError, match=r"^model.attn_implementation: flex: GPT2LMHeadModel"):
        build_model(ModelConfig(arch="gpt2", attn_implementation="flex"), vocab_size=32)
    model = build_model(ModelConfig(arch="qwen2", attn_implementation="flex"), vocab_size=32)
    assert flex.enabled(model)


def _check(method: str, device: str, **over):
    cfg, _, _, m = make_setup(method, **({"train__epochs": 1.0} | over))
    cfg.model.attn_implementation = "flex"
    speed.check(cfg, m, m.plan(64, 4), torch.device(device))


def test_flex_training_refusals():
    """One line naming the key: CPU training, latent-pass methods, attention dropout."""
    _check("rim", "cuda")  # a GPU: fine
    with pytest.raises(ConfigError, match=r"^model.attn_implementation: flex: .*CPU"):
        _check("rim", "cpu")
    for name in ("coconut", "codi"):
        with pytest.raises(ConfigError, match=rf"^model.attn_implementation: flex: {name} "):
            _check(name, "cuda")
    with pytest.raises(ConfigError, match=r"^train.stage2_dropout: 0.1 sets attention dropout"):
        _check("rim", "cuda", train__stage2_dropout=0.1)
    with pytest.raises(ConfigError, match=r"^train.dropout: 0.2 sets attention dropout"):
        _check("cot", "cuda", train__dropout=0.2, train__stage2_dropout=0.1)
    _check("cot", "cuda", train__stage2_dropout=0.1)  # cot has no stage 2: unused, fine


def test_trainer_refuses_flex_on_cpu(tmp_path):
    from rim.assembly import assemble
    from rim.config import Config, DataConfig, SplitConfig, TrainConfig
    from rim.trainer import Trainer

    cfg = Config(
        method="direct",
        model=ModelConfig(arch="llama", size="tiny", attn_implementation="flex"),
        data=DataConfig(
            train=SplitConfig(generator="chain", size=8), valid=SplitConfig(generator="chain")
        ),
        train=TrainConfig(steps=1, batch_size=4),
    )
    setup = assemble(cfg, log=lambda *_: None)
    with pytest.raises(ConfigError, match="no backward on a CPU"):
        Trainer(setup, tmp_path / "run")


def test_validation_decodes_with_sdpa():
    _, _, model, _ = make_setup("rim")
    model.set_attn_implementation(flex.HF_NAME)
    with flex.sdpa_inside(model):
        assert model.config._attn_implementation == "sdpa"
    assert flex.enabled(model)
