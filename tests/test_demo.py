"""`rim demo` orchestration (two methods, a shrunken quick run) and the recipes' `base:` include."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rim.config import load_config, read_recipe
from rim.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"

# The quick demo, shrunk further: a few optimizer steps on a few hundred examples.
TINY = {
    "train.steps": 8,
    "curriculum.stage1_steps": 5,
    "curriculum.stage2_steps": 3,
    "coconut.steps_per_stage": 1,  # 5 stages, then 3 steps fully latent
    "coconut.steps": 8,
    "data.train.size": 200,
    "data.valid.size": 32,
    "data.test.size": 48,
    "train.eval_every": 4,
    "eval.timing_examples": 2,
}


# --------------------------------------------------------------------------- base: include


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_base_include_merges_recursively_and_the_recipe_wins(tmp_path):
    _write(
        tmp_path / "base.yaml",
        "method: direct\ntrain: {lr: 1.0e-3, steps: 50}\n"
        "data:\n  train: {generator: chain, size: 100, seed: 0, options: {terms: 3}}\n",
    )
    _write(tmp_path / "mid.yaml", "base: base.yaml\ntrain: {steps: 70}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    child = _write(
        sub / "child.yaml", "base: ../mid.yaml\nmethod: rim\ndata: {train: {size: 300}}\n"
    )
    cfg = load_config(child, ["train.lr=0.5"])
    assert cfg.method == "rim"  # the recipe overrides its base
    assert cfg.train.steps == 70  # the middle recipe overrides the first base
    assert cfg.train.lr == 0.5  # --set overrides all files
    assert cfg.data.train.size == 300 and cfg.data.train.options == {"terms": 3}  # merged
    assert cfg.data.train.generator == "chain"
    assert "base" not in read_recipe(child)


def test_base_include_errors_name_the_file(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)
    missing = _write(tmp_path / "m.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: no such config file"):
        load_config(missing)
    bad = _write(tmp_path / "bad.yaml", "base: [x]\n")
    with pytest.raises(ConfigError, match="base: expected a file name"):
        load_config(bad)
    typo = _write(tmp_path / "typo.yaml", "base: c.yaml\n")
    _write(tmp_path / "c.yaml", "train: {stepz: 3}\n")
    with pytest.raises(ConfigError, match="train.stepz: unknown config key"):
        load_config(typo)


@pytest.mark.parametrize("method", ["direct", "cot", "pause", "rim", "coconut", "icot", "codi"])
def test_every_demo_recipe_validates_and_shares_the_base(method):
    from rim.demo import QUICK

    cfg = load_config(DEMO / f"{method}.yaml")
    base = read_recipe(DEMO / "base.yaml")
    assert cfg.method == method
    assert cfg.data.train.generator == base["data"]["train"]["generator"]
    assert cfg.model.size == base["model"]["size"] and cfg.train.steps == base["train"]["steps"]
    quick = load_config(DEMO / f"{method}.yaml", [f"{k}={json.dumps(v)}" for k, v in QUICK.items()])
    assert quick.train.steps == QUICK["train.steps"]


# --------------------------------------------------------------------------- orchestration


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width > 100 and height > 100


@pytest.fixture(scope="module")
def demo(tmp_path_factory, monkeypatch_module):
    from rim.cli import parser
    from rim.demo import run_demo

    monkeypatch_module.setenv("RIM_NO_PROGRESS", "1")
    out = tmp_path_factory.mktemp("demo")
    args = parser().parse_args(
        [
            "demo",
            "--quick",
            "--out",
            str(out),
            "--methods",
            "direct,rim",
            "--seeds",
            "1",
            "--workers",
            "2",
        ]
    )
    returned = run_demo(args, overrides=TINY)
    return out, returned


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_demo_writes_results_json(demo):
    out, returned = demo
    res = json.loads((out / "results.json").read_text())
    assert res == json.loads(json.dumps(returned))
    assert set(res["methods"]) == {"direct", "rim"}
    assert res["failed"] == []
    for name, r in res["methods"].items():
        for key in (
            "accuracy",
            "token_accuracy",
            "ttft_ms",
            "latency_ms",
            "forward_passes",
            "generated_tokens",
            "train_s",
        ):
            assert isinstance(r[key], float), (name, key)
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["token_accuracy"] <= 1.0
        assert r["accuracy_sd"] is None and r["n_seeds"] == 1  # no s.d. from one seed
        assert [s["seed"] for s in r["seeds"]] == [0]
        assert r["accuracy"] == r["seeds"][0]["accuracy"]
        assert r["ttft_ms"] > 0 and r["latency_ms"] >= r["ttft_ms"] - 1e-9
        assert all(s["n"] == TINY["data.test.size"] for s in r["seeds"])  # the test split
        assert all((Path(s["run"]) / "train.log").is_file() for s in r["seeds"])
    rim, direct = res["methods"]["rim"], res["methods"]["direct"]
    K = res["config"]["resolved"]["rim"]["memory"]["blocks"]
    assert len(rim["per_block_accuracy"]) == K == len(rim["per_block_accuracy_sd"])
    assert all(0.0 <= a <= 1.0 for a in rim["per_block_accuracy"])
    assert rim["any_block_accuracy"] >= rim["accuracy"] - 1e-9
    assert "per_block_accuracy" not in direct and "any_block_accuracy" not in direct
    assert res["task"]["generator"] == "pairsum"  # the task of configs/demo/base.yaml
    assert res["task"]["sizes"]["test"] == TINY["data.test.size"]
    assert res["task"]["seeds"]["test"] not in (
        res["task"]["seeds"]["train"],
        res["task"]["seeds"]["valid"],
    )
    assert res["config"]["quick"] is True and res["config"]["seeds"] == 1
    assert res["config"]["resolved"]["rim"]["train"]["steps"] == TINY["train.steps"]
    assert res["machine"]["device"] in ("cpu", "cuda")
    assert res["command"].startswith("rim demo --out ") and "--quick" in res["command"]


def test_demo_resume_keeps_finished_jobs_of_the_same_recipe(demo):
    """`--resume`: a finished job of the same recipe is kept as it is; one that does not match
    (here: rim's run folder claims another seed) goes through `rim train --resume-if-exists`
    again, which continues from its checkpoint and refuses a changed recipe."""
    from rim.cli import parser
    from rim.demo import run_demo

    out, first = demo
    logs = {m: (out / "runs" / m / "seed0" / "train.log").read_text() for m in ("direct", "rim")}
    cfg = out / "runs" / "rim" / "seed0" / "config.yaml"
    cfg.write_text(cfg.read_text().replace("seed: 0", "seed: 7", 1))
    argv = ["demo", "--quick", "--out", str(out), "--methods", "direct,rim", "--resume"]
    again = run_demo(parser().parse_args(argv + ["--seeds", "1"]), overrides=TINY)
    direct = out / "runs" / "direct" / "seed0" / "train.log"
    assert direct.read_text() == logs["direct"]  # kept: no new command in its log
    assert again["methods"]["direct"]["accuracy"] == first["methods"]["direct"]["accuracy"]
    rim_log = (out / "runs" / "rim" / "seed0" / "train.log").read_text()
    assert rim_log.startswith(logs["rim"]) and "--resume-if-exists" in rim_log[len(logs["rim"]) :]
    assert not again["failed"]
    assert again["command"].endswith("--resume")


def test_demo_writes_markdown_and_plots(demo):
    out, _ = demo
    md = (out / "results.md").read_text()
    assert "| method | final-block acc (mean ± s.d.) | any-block acc | TTFT ms" in md
    assert md.count("\n| direct |") == 1 and md.count("\n| rim |") == 1
    assert "Machine: " in md and "Command: `rim demo --out" in md
    for name in ("accuracy_vs_ttft.png", "rim_per_block.png"):
        assert _is_png(out / name), name
        assert f"]({name})" in md


def test_summary_is_the_mean_and_sd_over_seeds(tmp_path):
    from rim.demo import Job, summarise

    def job(method, seed, acc, per_block=None, state="done"):
        result = {
            "accuracy": acc,
            "token_accuracy": acc,
            "ttft_ms": 1.0 + seed,
            "latency_ms": 2.0,
            "forward_passes": 3.0,
            "generated_tokens": 2.0,
            "train_s": 10.0,
            "n": 4,
        }
        if per_block:
            result |= {"per_block_accuracy": per_block, "any_block_accuracy": max(per_block)}
        return Job(method, seed, tmp_path, tmp_path / f"{method}{seed}", [], 1, state, 0.0, result)

    jobs = [
        job("rim", 0, 0.5, [0.25, 0.5]),
        job("rim", 1, 0.75, [0.5, 0.75]),
        job("direct", 0, 0.25),
        job("direct", 1, 0.0, state="failed"),
    ]
    out = summarise(jobs)
    rim, direct = out["rim"], out["direct"]
    assert rim["accuracy"] == 0.625 and rim["accuracy_sd"] == pytest.approx(0.17677669)
    assert rim["ttft_ms"] == 1.5 and rim["n_seeds"] == 2
    assert rim["per_block_accuracy"] == [0.375, 0.625]
    assert rim["per_block_accuracy_sd"] == pytest.approx([0.17677669] * 2)
    assert rim["any_block_accuracy"] == 0.625
    assert direct["n_seeds"] == 1 and direct["accuracy"] == 0.25  # failed runs are left out
    assert direct["accuracy_sd"] is None and "per_block_accuracy" not in direct


def test_demo_rejects_unknown_methods(tmp_path):
    from rim.cli import parser
    from rim.demo import run_demo
    from rim.errors import RimError

    args = parser().parse_args(["demo", "--out", str(tmp_path), "--methods", "direct,nope"])
    with pytest.raises(RimError, match="unknown nope"):
        run_demo(args)


def test_demo_skips_a_registered_method_without_a_demo_recipe(tmp_path, monkeypatch, capsys):
    """One registry (rim.methods.METHODS): a method registered but without
    configs/demo/<name>.yaml is skipped with a note; by default every registered one runs."""
    import rim.demo
    from rim.demo import _methods
    from rim.methods import METHODS

    (tmp_path / "direct.yaml").write_text("method: direct\n")
    monkeypatch.setattr(rim.demo, "config_dir", lambda: tmp_path)
    assert _methods("direct, icot,direct") == ["direct"]
    assert "no recipe configs/demo/icot.yaml; icot skipped" in capsys.readouterr().out
    assert _methods(None) == ["direct"]
    assert capsys.readouterr().out.count("skipped") == len(METHODS) - 1


@settings(max_examples=50, deadline=None)
@given(y=st.floats(0, 1), sd=st.one_of(st.none(), st.floats(0, 1)))
def test_error_bars_stay_within_accuracy_range(y: float, sd: float | None) -> None:
    from rim.plots import _clipped

    below, above = _clipped(y, sd)
    assert 0 <= below <= (sd or 0) and 0 <= above <= (sd or 0)
    assert y - below >= 0 and y + above <= 1 + 1e-12


# --------------------------------------------------------------------------- progress in a log


class _FakeRunner:
    """Each job trains, then tests (its metrics say `done`, as `rim train --test` writes
    them before scoring) and finishes, after short sleeps (no subprocesses)."""

    def run(self, job):
        import time

        job.state = "train"
        time.sleep(1.3)  # longer than the display's 1 s poll: each phase is seen
        job.out.mkdir(parents=True)
        (job.out / "metrics.jsonl").write_text('{"step": 10}\n{"event": "done"}\n')
        time.sleep(1.3)
        job.state, job.result = "done", {"accuracy": 0.5, "train_s": 1.0}
        return job

    def stop(self) -> None:
        pass


def test_progress_in_a_log_is_one_line_per_event(tmp_path, capsys, monkeypatch):
    """Not a terminal (CI, `make demo > log`): no carriage returns, one line per job event,
    and status lines only as often as `Status` allows (here: every poll, to see them)."""
    from rim.demo import Job, run_jobs
    from rim.progress import Status

    monkeypatch.delenv("RIM_NO_PROGRESS", raising=False)
    jobs = [Job(m, 0, tmp_path / "r.yaml", tmp_path / m, [], 10) for m in ("direct", "rim")]
    run_jobs(jobs, 1, _FakeRunner(), status=Status(every=0.0))
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "\r" not in text
    lines = text.splitlines()
    for name in ("direct/s0", "rim/s0"):
        assert lines.count(f"[demo] {name}: training") == 1
        assert lines.count(f"[demo] {name}: test evaluation") == 1
        assert lines.count(f"[demo] {name}: test accuracy 0.500, trained 1s") == 1
    status = [ln for ln in lines if "jobs done" in ln]
    assert status and all(ln.startswith("[demo] ") for ln in status)
    assert len(lines) == 6 + len(status)


def test_status_lines_are_rate_limited():
    from rim.progress import STATUS_EVERY, Status

    clock = iter([0.0, 1.0, STATUS_EVERY - 0.1, STATUS_EVERY, STATUS_EVERY + 5])
    s = Status(clock=lambda: next(clock))
    assert [s.due(), s.due(), s.due(), s.due()] == [False, False, True, False]
