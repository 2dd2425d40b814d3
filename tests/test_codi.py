"""CODI: config checks, cached inference against a naive loop (and its pass count), training
lowers the loss, and checkpoints (projection included) answer through the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rim.errors import ConfigError
from rim.methods.codi import PROJECTION, PROJECTION_FILE

from .conftest import TINY_RECIPE, rim_main
from .test_fidelity_codi import codi_setup


@pytest.mark.parametrize(
    "key,value",
    [("latents", 0), ("distill_loss", "mse"), ("reduction", "token"), ("teacher_weight", -1.0)],
)
def test_config_errors_name_the_key(key, value):
    from rim.config import load_config

    with pytest.raises(ConfigError, match=f"codi.{key}"):
        load_config(None, ["method=codi", f"codi.{key}={value}"])


def naive_greedy(model, m, question: str, steps: int) -> list[int]:
    """No cache: every latent re-runs the whole sequence of embeddings."""
    emb = model.get_input_embeddings()
    E = emb(torch.tensor([m.prompt(question)]))  # (1, P, D)
    for _ in range(m.settings.latents):
        h = model(inputs_embeds=E, output_hidden_states=True).hidden_states[-1][:, -1:]
        E = torch.cat([E, m.project(h)], dim=1)
    E = torch.cat([E, emb(torch.tensor([[m.eot_id]]))], dim=1)
    out = []
    for _ in range(steps):
        nxt = int(model(inputs_embeds=E).logits[0, -1].argmax())
        if nxt == m.eos_id:
            break
        out.append(nxt)
        E = torch.cat([E, emb(torch.tensor([[nxt]]))], dim=1)
    return out


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("gpt2", "eager")])
def test_decode_matches_naive_loop_with_n_plus_1_passes(arch, attn):
    from rim.decoders import decode

    cfg, _, model, m = codi_setup(arch, attn, codi__latents=3, eval__max_new_tokens=2)
    qs = ["3 + 4", "9 - 1 + 5 + 2"]  # different lengths: left padding
    budget = m.max_new_tokens()
    out = decode(m, model, qs)
    for q, got, passes in zip(qs, out.tokens, out.passes):
        with torch.no_grad():
            ref = naive_greedy(model, m, q, budget)
        assert got == ref
        assert passes == 3 + 1 + min(len(ref), budget - 1)  # x<bot>, 2 latents, latent+<eot>


def test_per_example_reduction_is_exact_under_accumulation():
    from rim.curriculum import Stage

    from .test_fidelity_codi import EXAMPLES

    _, _, model, m = codi_setup(codi__reduction="example", codi__latents=2)
    s, cpu = Stage("s", 0, 1, 1e-3), torch.device("cpu")
    whole = m.loss(model, EXAMPLES, s, 0.0, 2, cpu)
    parts = sum(m.loss(model, [ex], s, 0.0, 2, cpu) for ex in EXAMPLES)
    assert whole.item() == pytest.approx(parts.item(), rel=1e-5)


# ---------------------------------------------------------------- training and checkpoints

RECIPE = copy.deepcopy(TINY_RECIPE)
RECIPE["method"] = "codi"
RECIPE["codi"] = {"latents": 2}
RECIPE["train"] |= {"steps": 30, "batch_size": 8, "eval_every": 0, "save_every": 15}
RECIPE["eval"] |= {"max_new_tokens": 3, "val_limit": 8}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import os

    os.environ["RIM_NO_PROGRESS"] = "1"
    root = tmp_path_factory.mktemp("codi")
    (root / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    rim_main("train", "--config", str(root / "recipe.yaml"), "--out", str(root / "run"))
    return root


@pytest.mark.slow
def test_training_lowers_the_loss_and_saves_the_projection(run):
    records = [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) < 0.8 * sum(losses[:5])
    best = run / "run" / "best"
    prj = load_file(best / PROJECTION_FILE)
    assert {"1.weight", "3.weight", "ln.weight"} <= set(prj)
    assert not any(k.startswith(PROJECTION) for k in load_file(best / "model.safetensors"))
    (ckpt,) = sorted((run / "run" / "checkpoints").glob("step-*"))[-1:]
    assert any(k.startswith(PROJECTION) for k in load_file(ckpt / "weights.safetensors"))


@pytest.mark.slow
def test_checkpoint_answers_through_the_cli(run, capsys):
    from rim.decoders import decode
    from rim.reasoner import Reasoner

    best = run / "run" / "best"
    r = Reasoner.load(str(best))
    torch.testing.assert_close(r.method.projection.state_dict(), load_file(best / PROJECTION_FILE))
    assert decode(r.method, r.model, ["3 + 4"]).passes[0] >= 2 + 1
    capsys.readouterr()
    rim_main("generate", "--checkpoint", str(best), "3 + 4", "2 - 1")
    assert r.generate(["3 + 4", "2 - 1"]) == capsys.readouterr().out.splitlines()
    rim_main("eval", "--checkpoint", str(best), "--split", "valid", "--timing-examples", "1")
    res = json.loads((best / "eval.json").read_text())
    assert res["forward_passes"] >= 3 and 0.0 <= res["accuracy"] <= 1.0
    with pytest.raises(SystemExit):
        rim_main("export", "--checkpoint", str(best), "--out", str(run / "exported"))
    assert "method codi needs sequential forward passes" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_run_freezes_the_new_rows_and_reloads(tmp_path):
    """model.path + LoRA: the adapter, the projection file; <bot>/<eot> rows stay frozen."""
    from rim.assembly import assemble
    from rim.config import load_config
    from rim.reasoner import Reasoner
    from rim.trainer import Trainer

    from .test_export import make_base

    base, _ = make_base(tmp_path / "base")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    over = [f"model.path={base}", "model.lora_rank=4", "model.lora_alpha=8", "train.steps=2"]
    setup = assemble(load_config(recipe, over + ["train.save_every=0"]), log=lambda *a: None)
    trainable = [n for n, p in setup.model.named_parameters() if p.requires_grad]
    assert any(PROJECTION in n for n in trainable) and any("lora_" in n for n in trainable)
    assert not any("trainable_tokens" in n for n in trainable)
    Trainer(setup, tmp_path / "run").fit()
    r = Reasoner.load(str(tmp_path / "run" / "final"))
    assert hasattr(r.model, "peft_config") and len(r.generate(["3 + 4"])) == 1
