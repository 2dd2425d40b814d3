"""Serving integrations of `rim export`: an lm-evaluation-harness task that scores exactly like
`rim eval` (real lm_eval, in process), and an ONNX export that ONNX Runtime answers exactly
like `rim generate`. Tiny models trained a few seconds, so their answers vary.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rim.compat import onnx_exporter_saves
from rim.onnx_export import output_to

from .conftest import TINY_RECIPE, rim_main

QUESTIONS = ["3 + 4 - 2", "9 - 1 + 5", "0 + 0 + 7", "8 - 8 + 1", "5 + 5 - 3", "2 + 9 + 9"]
QUESTIONS += ["7 - 3 + 1 + 4", "6 + 2 - 5"]
ROOT = Path(__file__).resolve().parents[1]

RECIPE = copy.deepcopy(TINY_RECIPE)
RECIPE["data"]["train"]["size"] = 256
RECIPE["data"]["valid"]["size"] = 40  # the lm-eval task's default examples (no test split)
RECIPE["curriculum"] |= {"stage1_steps": 60, "stage2_steps": 40}  # ~3 s: answers vary
RECIPE["train"] |= {"lr": 3.0e-3, "log_every": 20}
RECIPE["eval"] |= {"max_new_tokens": 6, "val_limit": 40}
RUNS = {  # name: recipe changes
    "rim_llama": {},
    "direct_llama": {"method": "direct", "train": RECIPE["train"] | {"steps": 100}},
    "rim_gpt2": {"model": {"arch": "gpt2", "size": "tiny"}},
    "rim_lora": {},  # a "pretrained" base (tests/test_export.py) with LoRA: merged on export
}
LORA = ["model.lora_rank=8", "model.lora_alpha=16", "train.lr=3e-3"]


def rim_out(capsys, *args: str) -> list[str]:
    """stdout lines of one `rim ...` call, stripped."""
    capsys.readouterr()
    rim_main(*args)
    return [line.strip() for line in capsys.readouterr().out.splitlines()]


def rim_error(capsys, *args: str) -> str:
    """The one-line error of a `rim ...` call that must fail with exit code 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        rim_main(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rim: error: "), err
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """name -> a trained checkpoint (RUN/final) for each of RUNS."""
    os.environ["RIM_NO_PROGRESS"] = "1"
    from .test_export import make_base

    root = tmp_path_factory.mktemp("serving")
    base, _ = make_base(root / "base")
    out = {}
    for name, change in RUNS.items():
        recipe = root / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(RECIPE | change))
        lora = [f"model.path={base}", *LORA] if name.endswith("lora") else []
        sets = [arg for s in lora for arg in ("--set", s)]
        rim_main("train", "--config", str(recipe), "--out", str(root / name), *sets)
        out[name] = root / name / "final"
    return out


@pytest.fixture(scope="module")
def hf_export(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "rim-chain"
    rim_main("export", "--checkpoint", str(runs["rim_llama"]), "--out", str(out))
    return out


# ---------------------------------------------------------------- lm-evaluation-harness


def test_lm_eval_task_folder_is_self_contained(hf_export) -> None:
    task = hf_export / "lm_eval"
    assert sorted(p.name for p in task.iterdir()) == [
        "data.jsonl",
        "rim_rim_chain.yaml",
        "utils.py",
    ]
    assert (task / "utils.py").read_bytes() == (ROOT / "src/rim/answers.py").read_bytes()
    assert "import rim" not in (task / "utils.py").read_text()
    rows = [json.loads(line) for line in (task / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 40  # the recipe has no test split: its valid split
    text = (task / "rim_rim_chain.yaml").read_text()
    meta = json.loads((hf_export / "rim.json").read_text())
    template = meta["prompt_template"]
    assert json.dumps("{{question}}" + template.format(question="")) in text
    assert "do_sample: false" in text and "max_gen_toks: 6" in text


def test_lm_eval_data_flag_any_format_and_limit(runs, tmp_path, capsys) -> None:
    from rim.data import format_icot, generate

    data = tmp_path / "extra.txt"  # iCoT text: a format rim reads, not JSONL
    data.write_text("\n".join(format_icot(e) for e in generate("chain", 30, seed=7)) + "\n")
    out = tmp_path / "ex"
    args = ("--lm-eval-data", str(data), "--lm-eval-limit", "12")
    lines = rim_out(
        capsys, "export", "--checkpoint", str(runs["direct_llama"]), "--out", str(out), *args
    )
    assert any(f"--include_path {out / 'lm_eval'} --tasks rim_ex" in line for line in lines)
    rows = [json.loads(x) for x in (out / "lm_eval" / "data.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == [e.question for e in generate("chain", 12, seed=7)]


def test_lm_eval_exact_match_equals_rim_eval(runs, hf_export, tmp_path, capsys) -> None:
    """Real lm_eval (`simple_evaluate`, the `hf` model, batch 8 with left padding) on the
    exported task: the same accuracy as `rim eval` and the same correct examples."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = hf_export / "lm_eval" / "data.jsonl"
    report = tmp_path / "eval.json"
    rim_out(capsys, "eval", "--checkpoint", str(runs["rim_llama"]), "--data", str(data),
            "--out", str(report), "--timing-examples", "0", "--batch-size", "16")  # fmt: skip
    records = json.loads(report.read_text())["records"]
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_export},dtype=float32",
        tasks=["rim_rim_chain"],
        task_manager=TaskManager(include_path=str(hf_export / "lm_eval")),
        batch_size=8,
        device="cpu",
        log_samples=True,
    )
    acc = res["results"]["rim_rim_chain"]["exact_match,rim_normalize"]
    samples = sorted(res["samples"]["rim_rim_chain"], key=lambda s: s["doc_id"])
    assert len(samples) == len(records) == 40
    assert [s["filtered_resps"][0] for s in samples] == [r["answers"][-1] for r in records]
    assert [bool(s["exact_match"]) for s in samples] == [r["correct"][-1] for r in records]
    assert acc == pytest.approx(json.loads(report.read_text())["accuracy"])
    assert len({r["answers"][-1] for r in records}) > 2  # answers vary: a real comparison


# ---------------------------------------------------------------- ONNX Runtime


@pytest.fixture(scope="module")
def onnx_exports(runs, tmp_path_factory) -> dict[str, Path]:
    for module in ("onnxruntime", "onnx", "onnxscript"):  # the extra rim[onnx]
        pytest.importorskip(module)
    if not onnx_exporter_saves():
        pytest.skip("transformers < 5.23: its exporter cannot write rim's ONNX folder")
    root = tmp_path_factory.mktemp("onnx")
    for name, ckpt in runs.items():
        with output_to(root / f"{name}.terminal"):  # a user's terminal, C++ lines included
            rim_main("export", "--checkpoint", str(ckpt), "--out", str(root / name),
                     "--format", "onnx")  # fmt: skip
    return {name: root / name for name in runs}


def test_onnx_export_prints_two_lines_and_logs_the_rest(onnx_exports) -> None:
    """The exporter's ~25 lines (torch.onnx progress, torch.export notes, transformers
    warnings) go to OUT/onnx_export.log; the terminal gets rim's two lines."""
    out = onnx_exports["rim_llama"]
    said = (out.parent / "rim_llama.terminal").read_text()
    lines = [line for line in said.splitlines() if line.strip()]
    assert len(lines) <= 2, "\n".join(lines)
    assert lines[-1].endswith(f'rim generate --runtime onnx --checkpoint {out} "QUESTION"')
    assert "onnx_export.log" in lines[-1]
    log = (out / "onnx_export.log").read_text()
    assert "[torch.onnx]" in log and (out / "model.onnx").is_file()


@pytest.mark.parametrize("name", list(RUNS))
def test_onnx_runtime_answers_like_rim_generate(runs, onnx_exports, name, capsys) -> None:
    from rim.decoders import decode
    from rim.onnx_runtime import OnnxReasoner
    from rim.reasoner import Reasoner

    folder = onnx_exports[name]
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "rim.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert not (folder / "model.safetensors").exists()  # the weights live in the graph's data
    expected = rim_out(capsys, "generate", "--checkpoint", str(runs[name]), *QUESTIONS)
    got = rim_out(capsys, "generate", "--runtime", "onnx", "--checkpoint", str(folder),
                  "--threads", "1", *QUESTIONS)  # fmt: skip
    assert got == expected
    r, ort = Reasoner.load(str(runs[name])), OnnxReasoner(folder, threads=1)
    assert all(ort.prompt(q) == r.method.prompt(q) for q in QUESTIONS)  # question + K blocks
    tokens = [ort.tokens(ort.prompt(q)) for q in QUESTIONS]
    assert tokens == decode(r.method, r.model, QUESTIONS).tokens  # token for token, EOS out
    assert any(tokens) and len({tuple(t) for t in tokens}) > 1


def test_onnx_export_runs_without_rim_or_torch(onnx_exports) -> None:
    """The runner copied into the export answers with onnxruntime, numpy and tokenizers alone."""
    folder = onnx_exports["rim_llama"]
    blocked = "import sys; sys.modules.update(torch=None, transformers=None, rim=None); "
    run = "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    script = folder / "onnx_runtime.py"
    cmd = [sys.executable, "-c", blocked + run, str(script), str(folder), *QUESTIONS[:3]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder, timeout=120)
    assert out.returncode == 0, out.stderr
    from rim.onnx_runtime import OnnxReasoner

    assert out.stdout.splitlines() == OnnxReasoner(folder, threads=1).generate(QUESTIONS[:3])


def test_onnx_errors_are_one_line(runs, onnx_exports, hf_export, tmp_path, capsys, monkeypatch):
    folder = str(onnx_exports["rim_llama"])
    err = rim_error(capsys, "generate", "--runtime", "onnx", "--checkpoint", str(hf_export), "q")
    assert "no ONNX model" in err and "--format onnx" in err
    err = rim_error(
        capsys, "generate", "--runtime", "onnx", "--checkpoint", folder, "--blocks", "2", "q"
    )
    assert "--blocks" in err
    assert "--runtime" in rim_error(
        capsys, "generate", "--runtime", "tf", "--checkpoint", folder, "q"
    )
    ckpt = str(runs["rim_llama"])
    err = rim_error(
        capsys, "export", "--checkpoint", ckpt, "--out", str(tmp_path / "a"), "--format", "gguf"
    )
    assert "--format gguf" in err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "onnxscript" else real(n, *a)
    )
    err = rim_error(
        capsys, "export", "--checkpoint", ckpt, "--out", str(tmp_path / "b"), "--format", "onnx"
    )
    assert "pip install 'rim[onnx]'" in err and "onnxscript" in err
    assert not (tmp_path / "b").exists()
