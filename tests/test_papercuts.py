"""What a first-time user tripped over (issue 28): bench load read after its own run, one help
text for every bench kind, a README table without `any-block`, a chatty ONNX export, a quick
demo's accuracies without their caveat, a deprecated `license` table, and transformers'
`past_key_values` deprecation warning.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import pytest

from .conftest import make_setup

ROOT = Path(__file__).resolve().parents[1]
IDLE, BUSY = (0.1, 0.1, 0.1), (50.0, 50.0, 50.0)


# --------------------------------------------------------------------------- rim bench


@pytest.fixture(scope="module")
def tiny():
    from rim import bench

    return bench.load_bench_model("tiny")


def _bench(kind: str, model):
    """(run the `kind` bench on `model`, the function its timed work goes through)."""
    from rim import bench

    if kind == "latency":
        run = lambda: bench.latency_bench(  # noqa: E731
            model, question_tokens=6, cot_tokens=2, answer_tokens=2, thoughts=2, runs=1, warmup=0
        )
        return run, ("rim.bench.latency", "run_decode")
    if kind == "train":
        run = lambda: bench.train_bench(  # noqa: E731
            model, batch=2, question_tokens=8, steps_per_example=2, step_tokens=3, thoughts=2,
            runs=1, warmup=0, memory=False,
        )  # fmt: skip
        return run, ("rim.bench.training", "_time_steps")
    run = lambda: bench.any_block_bench(  # noqa: E731
        model, batch=4, examples=4, question_tokens=6, blocks=2, runs=1, warmup=0
    )
    return run, ("rim.evaluation", "evaluate")


@pytest.mark.parametrize("kind", ["latency", "train", "any-block"])
def test_bench_reads_the_load_before_its_own_run(kind, tiny, monkeypatch):
    """The 1-minute load average read after the run counts the bench itself (an idle 2-core
    machine read 1.7): the reported load, and the busy note, are the load before the run."""
    import importlib

    run, (module, name) = _bench(kind, tiny)
    mod = importlib.import_module(module)
    ran = []
    timed = getattr(mod, name)

    def timed_and_marked(*a, **k):
        ran.append(True)
        return timed(*a, **k)

    monkeypatch.setattr(mod, name, timed_and_marked)
    monkeypatch.setattr(os, "getloadavg", lambda: BUSY if ran else IDLE)
    res = run()
    assert ran  # the run went through the marked function
    assert res["machine"]["load_avg_1m"] == IDLE[0]
    assert not any("machine busy" in n for n in res["notes"])
    # busy before the run: said so, with the load that was there before
    ran.clear()
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0) if not ran else IDLE)
    res = run()
    assert res["machine"]["load_avg_1m"] == 9.0
    assert any("load average 9.0" in n and "before the run" in n for n in res["notes"])
    tiny.model.eval()  # the train bench leaves the model in training mode


def _help(capsys, *argv: str) -> str:
    from rim.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare words


def test_bench_help_is_per_kind(capsys):
    """Each kind's --help says what it measures and lists its own options and defaults."""
    from rim.bench.run import DEFAULTS
    from rim.cli import parser

    texts = {k: _help(capsys, "bench", k) for k in ("latency", "train", "any-block")}
    assert len(set(texts.values())) == 3
    assert "time to first answer token" in texts["latency"].lower()
    assert "training step" in texts["train"] and "peak memory" in texts["train"]
    assert "after every memory block" in texts["any-block"]
    assert "--cot-tokens" in texts["latency"] and "--cot-tokens" not in texts["train"]
    assert "--cot-tokens" not in texts["any-block"] and "--thoughts" not in texts["any-block"]
    assert "--answer-tokens" not in texts["train"]
    for kind, batch, runs in (("latency", 1, 20), ("train", 16, 10), ("any-block", 64, 7)):
        assert f"batch size (default {batch}" in texts[kind]
        assert f"timed runs (default {runs}" in texts[kind]
        args = parser().parse_args(["bench", kind])  # unset: the kind's default at run time
        assert (args.kind, args.batch, args.runs) == (kind, None, None)
        assert (DEFAULTS[kind]["batch"], DEFAULTS[kind]["runs"]) == (batch, runs)
    # an old command line still parses
    args = parser().parse_args(["bench", "latency", "--model", "tiny", "--runs", "2", "--json"])
    assert (args.model, args.runs, args.json, args.cot_tokens) == ("tiny", 2, True, None)


def test_readme_cli_table_names_every_bench_kind():
    from rim.bench.run import DEFAULTS

    rows = [
        r for r in (ROOT / "README.md").read_text().splitlines() if r.startswith("| `rim bench")
    ]
    assert len(rows) == 1
    command = rows[0].split("` |")[0]
    for kind in DEFAULTS:
        assert kind in command, kind


# --------------------------------------------------------------------------- rim demo


def test_quick_demo_terminal_table_has_the_caveat(tmp_path, monkeypatch, capsys):
    """results.md says `--quick` accuracies are not meaningful; the terminal table too."""
    import rim.demo
    from rim.cli import parser

    def finished(jobs, workers, runner):
        for j in jobs:
            j.state, j.result = "done", {"accuracy": 0.5, "train_s": 1.0}

    monkeypatch.setattr(rim.demo, "run_jobs", finished)
    monkeypatch.setattr(rim.demo, "time_jobs", lambda *a: None)
    monkeypatch.setattr(rim.demo, "plot_accuracy_vs_ttft", lambda *a: None)
    monkeypatch.setattr(rim.demo, "plot_per_block", lambda *a: None)
    printed = {}
    for quick in (True, False):
        argv = ["demo", "--out", str(tmp_path / str(quick)), "--methods", "direct,rim"]
        capsys.readouterr()
        rim.demo.run_demo(parser().parse_args(argv + (["--quick"] if quick else [])))
        printed[quick] = capsys.readouterr().out
    table_end = printed[True].rindex("| rim ")
    assert "not meaningful" in printed[True][table_end:]
    assert "not meaningful" in (tmp_path / "True" / "results.md").read_text()
    assert "not meaningful" not in printed[False]


# --------------------------------------------------------------------------- packaging


def test_license_is_an_spdx_string_and_setuptools_can_build_it():
    """PEP 639's `license = "MIT"` (the table form is deprecated); setuptools reads it from
    77.0 on (76 rejects it: "project.license must be valid exactly by one definition")."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"
    (req,) = [Requirement(r) for r in meta["build-system"]["requires"] if "setuptools" in r]
    assert not req.specifier.contains("76.1.0") and req.specifier.contains("77.0.3")


# --------------------------------------------------------------------------- transformers


def test_gpt2_greedy_decoding_passes_the_cache_api(monkeypatch):
    """No `past_key_values` deprecation (removed in transformers 5.40) from rim's decoders or
    the latency bench's plain transformers loop, on a GPT-2 model."""
    import time

    from transformers.utils import logging as hf_logging

    from rim.bench.latency import plain_loop
    from rim.decoders import decode

    _, tok, model, method = make_setup("rim", arch="gpt2")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    hf_logging.warning_once.cache_clear()  # a warning given once before in this process
    questions = ["3 + 4 - 2", "9 - 1 + 5"]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for decoder in ("final", "all-blocks"):
                decode(method, model, questions, decoder)
            prompt = method.prompt(questions[0])
            plain_loop(model, prompt, 2, 3, time.perf_counter)
            plain_loop(model, prompt, 2, 3, time.perf_counter, thoughts=2, eot_id=tok.eos_token_id)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not [s for s in said if re.search("past_key_values|cache_params", s)], said
