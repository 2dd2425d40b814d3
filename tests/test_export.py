"""`rim export`: a plain HF folder that answers exactly like `rim generate`; LoRA merged.

Also: with a pretrained model, training changes only the new token rows among the
embeddings (METHOD.md section 2).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .conftest import TINY_RECIPE, rim_main

QUESTIONS = ["3 + 4 - 2", "9 - 1 + 5", "0 + 0 + 7", "8 - 8 + 1", "5 + 5 - 3", "2 + 9 + 9"]

RECIPE = copy.deepcopy(TINY_RECIPE)
RECIPE["train"]["log_every"] = 5
RECIPE["eval"]["max_new_tokens"] = 6


def make_base(folder: Path) -> tuple[Path, int]:
    """A tiny "pretrained" Llama and a tokenizer with an eos but no pad token (like Llama)."""
    from transformers import PreTrainedTokenizerFast

    from rim.config import ModelConfig
    from rim.data import generate
    from rim.model import build_model, build_tokenizer

    ex = generate("chain", 200, seed=0)
    words = build_tokenizer([e.question for e in ex] + [s for e in ex for s in e.steps])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=words.backend_tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    assert tok.pad_token is None
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="llama", size="tiny"), len(tok), max_positions=128)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, len(tok)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One model trained from scratch and one LoRA run on a pretrained base (a few steps)."""
    import os

    os.environ["RIM_NO_PROGRESS"] = "1"
    root = tmp_path_factory.mktemp("export")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    base, vocab = make_base(root / "base")
    rim_main("train", "--config", str(recipe), "--out", str(root / "scratch"))
    rim_main(
        "train",
        "--config",
        str(recipe),
        "--out",
        str(root / "lora"),
        "--set",
        f"model.path={base}",
        "--set",
        "model.lora_rank=4",
        "--set",
        "model.lora_alpha=8",
        "--set",
        "train.lr=1e-4",
    )  # answers not yet all EOS
    return {"root": root, "base": base, "vocab": vocab}


def rim_generate(checkpoint: Path, capsys) -> list[str]:
    capsys.readouterr()
    rim_main("generate", "--checkpoint", str(checkpoint), *QUESTIONS)
    return [line.strip() for line in capsys.readouterr().out.splitlines()]


def plain_transformers(folder: Path) -> dict:
    """Answers from AutoModelForCausalLM.generate on the text prompt; no rim code involved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((folder / "rim.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    res = {"answers": [], "prompts": [], "tokens": [], "model": model, "tok": tok}
    for q in QUESTIONS:
        enc = tok(meta["prompt_template"].format(question=q), return_tensors="pt")
        out = model.generate(**enc)  # greedy, eos/pad and length from generation_config.json
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        res["answers"].append(tok.decode(new, skip_special_tokens=True).strip())
        res["prompts"].append(enc["input_ids"][0].tolist())
        res["tokens"].append([t for t in new if t != tok.eos_token_id])
    tok.padding_side = "left"  # a server batches: left padding gives the same tokens
    enc = tok(
        [meta["prompt_template"].format(question=q) for q in QUESTIONS],
        return_tensors="pt",
        padding=True,
    )
    out = model.generate(**enc)[:, enc["input_ids"].shape[1] :].tolist()
    res["batched"] = [
        [t for t in row if t not in (tok.eos_token_id, tok.pad_token_id)] for row in out
    ]
    return res


def check_export(checkpoint: Path, out: Path, capsys) -> tuple[object, object]:
    from rim.reasoner import Reasoner

    rim_main("export", "--checkpoint", str(checkpoint), "--out", str(out))
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "rim.json",
        "generation_config.json",
        "prompt_template.txt",
    } <= names
    assert not any(n.startswith("adapter") for n in names)  # merged, not an adapter
    meta = json.loads((out / "rim.json").read_text())
    assert (meta["blocks"], meta["mem_tokens"], meta["method"]) == (3, 2, "rim")
    assert meta["template_tokenizes_exactly"] is True
    from rim.decoders import decode

    expected = rim_generate(checkpoint, capsys)
    got = plain_transformers(out)
    model, tok, prompts = got["model"], got["tok"], got["prompts"]
    assert got["answers"] == expected
    r = Reasoner.load(str(checkpoint))
    for q, ids in zip(QUESTIONS, prompts):
        assert ids == r.method.prompt(q)  # the text template reproduces the training prompt
    # token for token too (a barely trained model may emit block tokens, which decode to "")
    assert got["tokens"] == decode(r.method, r.model, QUESTIONS).tokens
    assert any(got["tokens"])
    assert got["batched"] == got["tokens"]
    for name in ("start", "mem", "end"):  # block tokens stay special (never split, skipped)
        assert tok.convert_tokens_to_ids(meta["tokens"][name]) == meta["token_ids"][name]
        assert meta["tokens"][name] in tok.all_special_tokens
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, r.model(ids).logits, rtol=1e-5, atol=1e-5)
    return model, tok


def test_export_from_scratch_answers_like_rim_generate(runs, capsys) -> None:
    check_export(runs["root"] / "scratch" / "final", runs["root"] / "ex_scratch", capsys)


def test_export_lora_merges_and_answers_like_rim_generate(runs, capsys) -> None:
    ckpt = runs["root"] / "lora" / "final"
    assert json.loads((ckpt / "rim.json").read_text())["adapter"] is True
    model, tok = check_export(ckpt, runs["root"] / "ex_lora", capsys)
    assert tok.pad_token == tok.eos_token  # the base had no pad token: eos pads
    assert not any("lora" in n for n, _ in model.named_parameters())
    base = load_file(runs["base"] / "model.safetensors")["model.embed_tokens.weight"]
    merged = model.get_input_embeddings().weight
    assert merged.shape[0] == runs["vocab"] + 3  # the three block tokens were added
    assert torch.equal(merged[: runs["vocab"]], base)  # pretrained rows untouched


def test_pretrained_training_changes_only_new_token_rows(runs, tmp_path) -> None:
    """LoRA run: embedding and (tied) output rows of the old vocabulary stay bit-identical."""
    from rim.assembly import assemble
    from rim.config import load_config
    from rim.trainer import Trainer

    recipe = runs["root"] / "recipe.yaml"
    cfg = load_config(recipe, [f"model.path={runs['base']}", "model.lora_rank=4", "train.lr=0.05"])
    setup = assemble(cfg, log=lambda *a: None)
    model = setup.model
    V, H = len(setup.tokenizer), model.config.hidden_size
    new = torch.arange(runs["vocab"], V)

    def rows():
        with torch.no_grad():
            emb = model.get_input_embeddings()(torch.arange(V)).clone()  # (V, H)
            out = model.get_output_embeddings()(torch.eye(H)).T.clone()  # (V, H)
        return emb, out

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(
        not p.requires_grad
        for n, p in model.named_parameters()
        if "embed_tokens.token_adapter.base_layer" in n
    )
    emb0, out0 = rows()
    tr = Trainer(setup, tmp_path / "run")
    stage = tr.plan[0]
    tr.new_optimizer(stage)
    for _ in range(3):
        tr.step(stage)
    emb1, out1 = rows()
    old = slice(0, runs["vocab"])
    assert torch.equal(emb1[old], emb0[old]) and torch.equal(out1[old], out0[old])
    assert (emb1[new] - emb0[new]).abs().amax(-1).min() > 0  # every new row learned
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        if n in lora:
            changed = not torch.equal(p, lora[n])
            assert changed or "lora_A" in n, n  # B starts at 0 and moves first
