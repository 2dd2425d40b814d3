"""`rim inspect` (rim.inspection): the report and its parts, pinned against the real code paths.

A random tiny model answers nonsense, so the examples' gold answers are set to its own answer
after one of the blocks (example i: block i mod K): correctness then varies across examples
and blocks, and the probe, the ROC and the early-exit curve have both classes to work on.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rim.data import Example, generate
from rim.decoders import decode
from rim.errors import RimError
from rim.evaluation import gold_answers, records_of
from rim.inspection import checkpoint_probe, inspect_checkpoint, parse_thresholds
from rim.inspection.analyses import (
    collect,
    early_exit_curve,
    stable_stops,
    threshold_stops,
)
from rim.inspection.internals import attention_mass, lens_logits, lens_parts
from rim.probe import PROBE_JSON, Probe

from .conftest import TINY_RECIPE, make_setup, recipe_file

K = 4
PNGS = ("per_block", "roc", "early_exit", "pca_steps", "pca_blocks", "attention")


def _scrambled(arch: str = "llama"):
    """A tiny model with larger random weights, so that it writes ordinary tokens."""
    cfg, tok, model, method = make_setup(
        "rim", arch, "sdpa", memory__blocks=K, eval__max_new_tokens=3
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return method, model


@pytest.fixture(scope="module")
def tiny():
    """(method, model, examples with mixed correctness, a probe on layer 1)."""
    method, model = _scrambled()
    examples = generate("chain", 24, seed=3)
    run = collect(method, model, examples, batch_size=8)
    examples = [
        Example(e.question, e.steps, r.answers[i % K])
        for i, (e, r) in enumerate(zip(examples, run.records))
    ]
    h = run.states[:, :, 1].reshape(-1, run.states.shape[-1])  # (N*K, D)
    rng = np.random.default_rng(0)
    probe = Probe(1, h.mean(0), h.std(0) + 1e-6, rng.normal(size=h.shape[1]) / 8, 0.0)
    return SimpleNamespace(method=method, model=model, examples=examples, probe=probe)


def test_the_report_has_every_section(tiny, tmp_path: Path):
    info = {"source": "checkpoint", "layer": 1, "note": "a test probe"}
    rep = inspect_checkpoint(
        tiny.method, tiny.model, tiny.examples, tmp_path, tiny.probe, info, "tiny, chain",
        thresholds=[0.5, 0.9], timing_examples=2, batch_size=8,
    )  # fmt: skip
    saved = json.loads((tmp_path / "report.json").read_text())
    for key in ("per_block_accuracy", "selection", "roc", "early_exit", "timing", "pca",
                "attention", "logit_lens", "figures", "probe"):  # fmt: skip
        assert key in saved, key
    assert len(saved["per_block_accuracy"]) == K and 0 < saved["probe_auroc"] < 1
    assert set(saved["selection"]) == {"final", "probe", "vote", "oracle"}
    assert [p["threshold"] for p in saved["early_exit"]["thresholds"]] == [0.5, 0.9]
    assert all(v > 0 for v in saved["timing"]["threshold_ttft_ms"].values())
    assert saved["timing"]["final_ttft_ms"] > 0 and saved["timing"]["stable_ttft_ms"] > 0
    assert len(saved["logit_lens"]["top"]) == K and len(saved["attention"]["mass"]) == 2
    md = (tmp_path / "report.md").read_text()
    for name in PNGS:
        assert rep["figures"][name] == f"{name}.png" and (tmp_path / f"{name}.png").is_file()
        assert f"]({name}.png)" in md
    for section in ("Accuracy per block", "correctness probe", "Early exit", "PCA",
                    "Attention", "Logit lens"):  # fmt: skip
        assert section in md, section


def test_without_a_probe_the_report_says_so(tiny, tmp_path: Path):
    (tmp_path / "roc.png").write_bytes(b"an earlier report's")
    info = {"source": None, "layer": None, "note": "no probe: every block answer is wrong"}
    rep = inspect_checkpoint(tiny.method, tiny.model, tiny.examples[:6], tmp_path, None, info,
                             timing_examples=0, batch_size=8)  # fmt: skip
    assert rep["roc"] is None and rep["figures"]["roc"] is None
    assert not (tmp_path / "roc.png").exists()
    assert rep["early_exit"]["thresholds"] == [] and "probe" not in rep["selection"]
    assert rep["pca"]["layer"] == rep["layers"]  # the last layer without a probe
    md = (tmp_path / "report.md").read_text()
    assert "every block answer is wrong" in md and "](roc.png)" not in md


def test_a_method_without_blocks_is_refused(tmp_path: Path):
    direct = SimpleNamespace(name="direct", uses_blocks=False)
    with pytest.raises(RimError, match="method direct has no memory blocks"):
        inspect_checkpoint(direct, None, [Example("1 + 2", (), "3")], tmp_path)


def test_attention_masses_sum_to_one_and_sdpa_comes_back(tiny):
    """Over the question and the blocks, padding included in the batch (left-padded rows)."""
    examples = tiny.examples[:9] + [Example("12 + 34 + 56 + 7", ("46", "102", "109"), "109")]
    lengths = {len(tiny.method.prompt(e.question)) for e in examples}
    assert len(lengths) > 1  # rows of different lengths share a batch
    mass = attention_mass(tiny.method, tiny.model, examples)  # (layers, 1 + K)
    assert mass.shape == (2, 1 + K)
    np.testing.assert_allclose(mass.sum(axis=1), 1.0, atol=1e-5)
    assert tiny.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "llama-lora"])
def test_the_logit_lens_at_the_last_layer_is_the_models_logits(arch: str):
    """`lens_parts` finds the final norm and head (through a LoRA wrapper too), and the last
    layer's lens is the model's own logits at every block's last token."""
    method, model = _scrambled(arch.removesuffix("-lora"))
    if arch.endswith("-lora"):
        from rim.config import ModelConfig
        from rim.model import wrap_lora

        model = wrap_lora(model, ModelConfig(arch="llama"), list(method.tokens.new)).eval()
    examples = generate("chain", 3, seed=5)
    states = collect(method, model, examples, batch_size=3).states  # (N, K, L+1, D)
    L, Lb = states.shape[2] - 1, method.mem.block_len
    assert len(lens_parts(model)) == 2
    for i, e in enumerate(examples):
        prompt = method.prompt(e.question)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([prompt])).logits[0]  # (P, V)
        ends = [len(prompt) - (K - k) * Lb - 1 for k in range(1, K + 1)]  # block k's last token
        lens = lens_logits(model, states[i, :, L], L, L)  # (K, V)
        torch.testing.assert_close(lens, ref[ends].float(), atol=1e-4, rtol=1e-4)


def _gap_threshold(scores: np.ndarray) -> float:
    """A threshold inside the widest gap between the middle scores: a KV-cache pass that
    differs in the last float bit cannot flip a stop."""
    s = np.unique(scores.ravel())
    mid = s[len(s) // 4 : 3 * len(s) // 4 + 1]
    i = int(np.argmax(np.diff(mid)))
    return float((mid[i] + mid[i + 1]) / 2)


def test_the_simulated_early_exit_curve_is_the_real_decoder(tiny):
    """The report's curve (from one all-blocks run) against the `early-exit` decoder itself,
    with the same probe: same blocks, same answers, so the same accuracy and mean blocks."""
    method, model, examples = tiny.method, tiny.model, tiny.examples
    run = collect(method, model, examples, batch_size=8)
    scores = tiny.probe.score(run.states)  # (N, K)
    t = _gap_threshold(scores)
    curve = early_exit_curve(run, scores, [t])
    questions, golds = [e.question for e in examples], gold_answers(method, examples)
    rules = [(tiny.probe, threshold_stops(scores, t), curve["thresholds"][0]),
             (None, stable_stops(run.first), curve["stable"])]  # fmt: skip
    for probe, used, point in rules:
        out = decode(method, model, questions, "early-exit",
                     options={"threshold": t, "probe": probe})  # fmt: skip
        real = records_of(method, out, golds, 0)
        assert out.blocks_used == used.tolist()
        assert [r.final for r in real] == [r.answers[u - 1] for r, u in zip(run.records, used)]
        assert point["accuracy"] == pytest.approx(np.mean([r.correct[-1] for r in real]))
        assert point["mean_blocks"] == pytest.approx(np.mean(out.blocks_used))
    assert 1 < curve["thresholds"][0]["mean_blocks"] < K  # the probe's stops vary
    assert 0 < curve["thresholds"][0]["accuracy"] < 1


def test_a_missing_probe_is_fitted_on_valid_and_saved(tiny, tmp_path: Path):
    args = (tiny.method, tiny.model, lambda: tiny.examples, 8)
    probe, info = checkpoint_probe(tmp_path, *args, same_data=True)
    assert info["source"] == "fitted" and "SAME data" in info["note"]
    assert (tmp_path / PROBE_JSON).is_file() and info["layer"] == probe.layer
    again, info = checkpoint_probe(tmp_path, *args, same_data=False)
    assert info["source"] == "checkpoint" and again.layer == probe.layer


@pytest.mark.parametrize("text", ["0.5,x", "1.5", "0", ""])
def test_bad_thresholds_are_one_line(text: str):
    with pytest.raises(RimError, match="--thresholds"):
        parse_thresholds(text)
    assert parse_thresholds("0.9, 0.5,0.9") == [0.5, 0.9]


def test_rim_inspect_from_the_cli(tmp_path: Path, monkeypatch, capsys):
    """Train the shared tiny recipe, then `rim inspect` it: the report folder is complete."""
    from rim.cli import main

    monkeypatch.setenv("RIM_NO_PROGRESS", "1")
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["curriculum"]["stage1_steps"], recipe["curriculum"]["stage2_steps"] = 3, 2
    run = tmp_path / "run"
    threads = torch.get_num_threads()  # training sets train.threads for this process
    try:
        main(["train", "--config", str(recipe_file(recipe, tmp_path)), "--out", str(run)])
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "report"
    capsys.readouterr()
    main(["inspect", "--checkpoint", str(run / "best"), "--out", str(out), "--limit", "8",
          "--timing-examples", "1", "--thresholds", "0.5,0.9"])  # fmt: skip
    printed = capsys.readouterr().out
    assert f"wrote {out / 'report.md'}" in printed and "final-block accuracy" in printed
    rep = json.loads((out / "report.json").read_text())
    assert rep["n"] == 8 and rep["blocks"] == 3
    # the tiny run is barely trained: a probe needs right and wrong answers on data.valid
    fitted = (run / "best" / PROBE_JSON).is_file()
    assert rep["probe"]["source"] == ("fitted" if fitted else None)
    for name in ("per_block", "early_exit", "pca_steps", "pca_blocks", "attention"):
        assert (out / f"{name}.png").is_file()
    with pytest.raises(SystemExit) as stop:
        main(["inspect", "--checkpoint", str(run / "best"), "--out", str(out),
              "--thresholds", "2"])  # fmt: skip
    assert stop.value.code == 2 and "--thresholds" in capsys.readouterr().err
