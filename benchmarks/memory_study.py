"""The working-memory study of docs/inspect.md: explain mode against the paper's schedule, and
the probe, selection and early exit, on the demo task and the variable-step task, 3 seeds.

    python benchmarks/memory_study.py --out runs/memory_study                # all jobs
    python benchmarks/memory_study.py --out runs/memory_study --reuse-demo runs/demo6
    python benchmarks/memory_study.py --out runs/memory_study --summarize    # tables only

One job = one (recipe, seed): `rim train` (best/ chosen on valid), `rim probe` (fitted on
valid), then `rim eval --split test --select final,probe,vote,oracle` (and `--explain` for
explain-mode recipes). A job whose `test_eval.json` exists is done; a stopped one resumes
from its last checkpoint, so the study can be stopped and started again. `--reuse-demo D`
takes the paper-schedule demo checkpoints from a finished `rim demo --out D` (same recipe,
same seeds) instead of training them again. Jobs run `--workers` at a time, one thread each.
Writes OUT/summary.json and OUT/summary.md (mean +- s.d. over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = {  # name: (recipe, task, explain)
    "demo_rim": ("configs/demo/rim.yaml", "demo", False),
    "demo_explain": ("configs/inspect/demo_rim_explain.yaml", "demo", True),
    "varpairs_rim": ("configs/inspect/varpairs_rim.yaml", "varpairs", False),
    "varpairs_explain": ("configs/inspect/varpairs_rim_explain.yaml", "varpairs", True),
}
SELECT = "final,probe,vote,oracle"


def _rim(args: list[str], log: Path) -> None:
    env = os.environ | {"RIM_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    with log.open("a") as f:
        r = subprocess.run([sys.executable, "-m", "rim", *args], stdout=f, stderr=f, env=env)
    if r.returncode:
        raise RuntimeError(f"rim {args[0]} failed (exit {r.returncode}); see {log}")


def _job(out: Path, name: str, seed: int, reuse: Path | None, sets: list[str]) -> str:
    recipe, _, explain = STUDY[name]
    run = out / name / f"seed{seed}"
    run.parent.mkdir(parents=True, exist_ok=True)
    result, log, trained = run / "test_eval.json", run.with_suffix(".log"), run.with_suffix(".ok")
    if result.is_file():
        return f"{name}/s{seed}: done before"
    best = run / "best"
    if reuse is not None and name == "demo_rim":
        best = reuse / "runs" / "rim" / f"seed{seed}" / "best"
        if not best.is_dir():
            raise RuntimeError(f"--reuse-demo: no {best}")
    elif not trained.is_file():
        train = ["train", "--config", str(ROOT / recipe), "--out", str(run)]
        sets = [x for kv in [*sets, f"train.seed={seed}"] for x in ("--set", kv)]
        _rim(train + sets + ["--resume-if-exists"], log)
        trained.write_text("trained\n")
    run.mkdir(exist_ok=True)
    select = SELECT
    try:
        _rim(["probe", "--checkpoint", str(best), "--split", "valid"], log)
    except RuntimeError:  # e.g. every valid block answer right (or wrong): no probe to fit
        select = SELECT.replace("probe,", "")
    ev = ["eval", "--checkpoint", str(best), "--split", "test", "--select", select]
    ev += ["--timing-examples", "0", "--out", str(result)] + (["--explain"] if explain else [])
    _rim(ev, log)
    return f"{name}/s{seed}: done"


def _stat(xs: list[float | None]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} +- {sd:.3f}"


def _row(res: list[dict]) -> dict:
    sel = lambda h: [r["selection"].get(h) for r in res]  # noqa: E731
    return {
        "seeds": len(res),
        "accuracy": [r["accuracy"] for r in res],
        "step_accuracy": [r.get("step_accuracy") for r in res],
        "quiet_after_steps": [r.get("quiet_after_steps") for r in res],
        "step_accuracy_per_block": [r.get("step_accuracy_per_block") for r in res],
        "per_block_accuracy": [r.get("per_block_accuracy") for r in res],
        "probe_auroc": [r.get("probe_auroc") for r in res],
        **{f"select_{h}": sel(h) for h in SELECT.split(",")},
    }


def summarize(out: Path, seeds: int) -> dict:
    rows = {}
    for name in STUDY:
        res = [out / name / f"seed{s}" / "test_eval.json" for s in range(seeds)]
        found = [json.loads(p.read_text()) for p in res if p.is_file()]
        if found:
            rows[name] = _row(found)
    lines = [
        "| run | seeds | answer acc | step acc | quiet after steps | probe | vote | oracle "
        "| probe AUROC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        cells = [r["accuracy"], r["step_accuracy"], r["quiet_after_steps"]]
        cells += [r["select_probe"], r["select_vote"], r["select_oracle"], r["probe_auroc"]]
        lines.append(f"| {name} | {r['seeds']} | " + " | ".join(_stat(c) for c in cells) + " |")
    for name, r in rows.items():
        per = [p for p in r["step_accuracy_per_block"] if p]
        if per:
            mean = [statistics.mean(col) for col in zip(*per)]
            lines.append(f"\n{name}: step accuracy per block " + " ".join(f"{a:.3f}" for a in mean))
    summary = {"rows": rows, "seeds": seeds}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/memory_study")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--only", help="comma-separated study names (default all)")
    p.add_argument("--reuse-demo", help="a finished `rim demo --out` folder (paper schedule)")
    p.add_argument("--summarize", action="store_true", help="only write the summary")
    p.add_argument("--set", action="append", default=[], help="KEY=V for every training (smoke)")
    a = p.parse_args(argv)
    out = Path(a.out)
    names = a.only.split(",") if a.only else list(STUDY)
    reuse = Path(a.reuse_demo) if a.reuse_demo else None
    if not a.summarize:
        jobs = [(n, s) for s in range(a.seeds) for n in names]
        with ThreadPoolExecutor(a.workers) as pool:
            futures = [pool.submit(_job, out, n, s, reuse, a.set) for n, s in jobs]
            for f in futures:
                print(f"[study] {f.result()}", flush=True)
    summarize(out, a.seeds)


if __name__ == "__main__":
    main()
