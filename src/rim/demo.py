"""`rim demo`: every method on one toy task, one table and two plots (the README's first command).

    rim demo --out runs/demo                      # `make demo`: all methods, 1 seed
    rim demo --quick --out runs/demo_quick        # < 5 minutes on 2 CPU cores, a smoke test
    rim demo --seeds 3 --methods direct,rim --workers 2

Every method trains from the same data, tokenizer recipe, model size, trainer and evaluator:
`configs/demo/<method>.yaml`, each on `configs/demo/base.yaml` (the task and all sizes live
there only). `--quick` applies the overrides in `QUICK` to every recipe. Seed s sets
`train.seed` (so also the model's initialisation); the data splits never change.

One job = one (method, seed), run by `rim.runner` (the runner `rim sweep` uses too): `python
-m rim train` (checkpoint `best/` chosen on the valid split), then `python -m rim eval` of
`best/` on the test split in the same worker slot, so `--workers` jobs run in parallel (one
core each); on a GPU they run one after another on it.
Batch-1 latency (TTFT, full answer) is timed afterwards, one run at a time, so that a
training neighbour never inflates another method's milliseconds.

Writes to --out: results.json, results.md, accuracy_vs_ttft.png, rim_per_block.png and
runs/<method>/seed<s>/ (train.log, metrics.jsonl, best/, test_eval.json).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from rim.errors import RimError
from rim.io import atomic_file
from rim.machine import describe
from rim.plots import plot_accuracy_vs_ttft, plot_per_block, task_line
from rim.report import fmt, table
from rim.runner import Job, Runner, pick_device, run_jobs
from rim.runner import total_steps as _total_steps

# `--quick`: the same recipes, shrunk (applied after the recipe, before validation).
QUICK: dict[str, object] = {
    "model.size": "tiny",
    "data.train.size": 1000,
    "data.valid.size": 64,
    "data.test.size": 200,
    "train.batch_size": 32,
    "train.steps": 60,  # direct, cot, pause, icot
    "train.eval_every": 30,
    "curriculum.stage1_steps": 40,  # rim: 40 + 20
    "curriculum.stage2_steps": 20,
    "coconut.steps_per_stage": 10,  # coconut: 5 stages x 10, then 10 fully latent
    "coconut.steps": 60,
    "train.log_every": 10,  # the progress display reads the step from metrics.jsonl
    "eval.val_limit": 64,
    "eval.timing_examples": 8,
}
QUICK_CAVEAT = (
    "[demo] --quick: a smoke test (tiny model, a few dozen steps); the accuracies above are "
    "not meaningful, run `rim demo` without --quick to compare methods"
)

RESULT_KEYS = (
    "accuracy",
    "token_accuracy",
    "any_block_accuracy",
    "forward_passes",
    "generated_tokens",
    "ttft_ms",
    "latency_ms",
    "train_s",
)


def config_dir() -> Path:
    """configs/demo of the checkout (editable install), else of the working directory."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "configs" / "demo" / "base.yaml").is_file():
            return root / "configs" / "demo"
    raise RimError("configs/demo/base.yaml not found (run from the rim checkout)")


# --------------------------------------------------------------------------- planning


def _methods(spec: str | None) -> list[str]:
    """The methods to run: `spec` (comma-separated) or every registered one with a recipe."""
    from rim.methods import METHODS

    if spec is None:
        spec = ",".join(METHODS)
    names = list(dict.fromkeys(m.strip() for m in spec.split(",") if m.strip()))
    if not names:
        raise RimError("--methods: no method given")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise RimError(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(METHODS)})")
    ready = []
    for m in names:
        if not (config_dir() / f"{m}.yaml").is_file():
            print(f"[demo] note: no recipe configs/demo/{m}.yaml; {m} skipped")
        else:
            ready.append(m)
    if not ready:
        raise RimError("--methods: none of the methods can run")
    return ready


def plan_jobs(methods: list[str], seeds: int, out: Path, sets: list[str]) -> tuple[list[Job], dict]:
    """One job per (method, seed), every recipe validated before anything starts."""
    from rim.assembly import load_recipe

    jobs, cfgs = [], {}
    for m in methods:
        recipe = config_dir() / f"{m}.yaml"
        cfgs[m] = load_recipe(recipe, sets)  # a bad override fails here, not in a worker
        if cfgs[m].method != m:
            raise RimError(f"{recipe}: method is {cfgs[m].method!r}, expected {m!r}")
        if cfgs[m].data.test is None:
            raise RimError(f"{recipe}: the demo needs data.test")
        first = cfgs[methods[0]]
        for part in ("data", "model"):  # the comparison is only fair on the same task and model
            if getattr(cfgs[m], part) != getattr(first, part):
                raise RimError(
                    f"{recipe}: {part} differs from {methods[0]}.yaml; set it in base.yaml"
                )
        for s in range(seeds):
            jobs.append(
                Job(m, s, recipe, out / "runs" / m / f"seed{s}", sets, _total_steps(cfgs[m]))
            )
    return jobs, cfgs


# --------------------------------------------------------------------------- timing


TIMING_ROUNDS = 3


def time_jobs(jobs: list[Job], test: list, n: int, device: str) -> None:
    """Batch-1 TTFT and latency of each `best/`, one run at a time (no training neighbours).

    Methods are timed in interleaved rounds and each gets the median of its round medians,
    so a burst of load from elsewhere on the machine does not land on one method only.
    """
    import torch
    from transformers.utils import logging as hf_logging

    from rim.evaluation import latency
    from rim.reasoner import Reasoner

    hf_logging.disable_progress_bar()  # "Loading weights" bars would break the table output
    if device == "cpu":
        torch.set_num_threads(1)  # as in training: one core per process
    done = [j for j in jobs if j.state == "done"]
    models = {j.name: Reasoner.load(str(j.out / "best"), device) for j in done}
    rounds: dict[str, list[dict]] = {j.name: [] for j in done}
    for _ in range(TIMING_ROUNDS):
        for j in done:
            r = models[j.name]
            rounds[j.name].append(latency(r.method, r.model, test[:n], None, torch.device(device)))
    for j in done:
        for key in ("ttft_ms", "latency_ms"):
            vals = [t[key] for t in rounds[j.name] if t[key] is not None]
            j.result[key] = statistics.median(vals) if vals else None
        j.result["timing_examples"] = min(n, len(test))


# --------------------------------------------------------------------------- results


def _sd(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def summarise(jobs: list[Job]) -> dict[str, dict]:
    """Per method: means over seeds of every result key, s.d. of accuracies, per-seed dicts."""
    out: dict[str, dict] = {}
    for m in dict.fromkeys(j.method for j in jobs):
        runs = [j for j in jobs if j.method == m and j.state == "done"]
        if not runs:
            continue
        seeds = [
            {"seed": j.seed, "run": str(j.out)}
            | {k: v for k, v in j.result.items() if k not in ("checkpoint", "data")}
            for j in runs
        ]
        row: dict = {}
        for key in RESULT_KEYS:
            vals = [s[key] for s in seeds if s.get(key) is not None]
            if vals:
                row[key] = statistics.fmean(vals)
        row["accuracy_sd"] = _sd([s["accuracy"] for s in seeds])
        if "any_block_accuracy" in row:
            row["any_block_accuracy_sd"] = _sd([s["any_block_accuracy"] for s in seeds])
        if all("per_block_accuracy" in s for s in seeds):
            cols = list(zip(*(s["per_block_accuracy"] for s in seeds)))
            row["per_block_accuracy"] = [statistics.fmean(c) for c in cols]
            row["per_block_accuracy_sd"] = [_sd(list(c)) for c in cols]
        row["n_seeds"] = len(seeds)
        row["seeds"] = seeds
        out[m] = row
    return out


def markdown_table(methods: dict[str, dict]) -> str:
    """The demo's results table: one row per method, means over seeds."""
    header = [
        "method",
        "final-block acc (mean ± s.d.)",
        "any-block acc",
        "TTFT ms",
        "latency ms",
        "forward passes",
        "generated tokens",
        "train s",
    ]
    rows = []
    for name, r in methods.items():
        acc = fmt(r["accuracy"], ".3f") + (
            f" ± {r['accuracy_sd']:.3f}" if r.get("accuracy_sd") is not None else ""
        )
        rows.append(
            [
                name,
                acc,
                fmt(r.get("any_block_accuracy"), ".3f"),
                fmt(r.get("ttft_ms"), ".2f"),
                fmt(r.get("latency_ms"), ".2f"),
                fmt(r.get("forward_passes"), ".2f"),
                fmt(r.get("generated_tokens"), ".2f"),
                fmt(r.get("train_s"), ".0f"),
            ]
        )
    return table(header, rows)


def _budget(c: dict) -> str:
    pairs = {(c["steps"][m], c["batch_size"][m]) for m in c["steps"]}
    if len(pairs) == 1:
        ((steps, bs),) = pairs
        return f"every method trains {steps} optimizer steps of {bs} examples"
    return "; ".join(f"{m} {c['steps'][m]} x {c['batch_size'][m]}" for m in c["steps"])


def write_markdown(path: Path, res: dict, plots: list[str]) -> None:
    c, m = res["config"], res["machine"]
    notes = [
        "# rim demo",
        "",
        f"Task: {task_line(res['task'])}. Model: {c['model']}. "
        f"Seeds: {c['seeds']}"
        + (" (`--quick`: accuracies are not meaningful)." if c["quick"] else ".")
        + f" Budget: {_budget(c)}.",
        "",
        markdown_table(res["methods"]),
        "",
        "Accuracy: exact-match fraction on the test split (a separate generator seed), after "
        "the last memory block for block methods (any-block: right after at least one block); "
        "checkpoint chosen on the valid split; mean ± s.d. over seeds. TTFT (time to first "
        "answer token) and latency (full answer): medians of "
        f"{c['timing_examples']} batch-1 greedy runs on {m['device']} (median of "
        f"{TIMING_ROUNDS} interleaved rounds), one process at a time. "
        "Forward passes and generated tokens: means per test question. Train s: training "
        "wall time per run (validation included).",
        "",
        f"Machine: {m['summary']}. Demo wall time: {res['wall_s'] / 60:.1f} min. "
        "Training is reproducible on one machine, not across machines (float summation "
        "order differs), so accuracies from another CPU differ by run-to-run noise.",
        "",
        f"Command: `{res['command']}`",
    ]
    if res.get("failed"):
        notes += ["", "Failed runs: " + "; ".join(res["failed"])]
    notes += [""] + [f"![{p}]({p})" for p in plots]
    atomic_file(path, "\n".join(notes) + "\n")


# --------------------------------------------------------------------------- plots


def _command(args) -> str:
    from rim.methods import METHODS

    methods = args.methods or ",".join(METHODS)
    cmd = f"rim demo --out {args.out} --seeds {args.seeds} --methods {methods}"
    cmd += f" --workers {args.workers}" + (" --quick" if args.quick else "")
    return cmd + (" --resume" if getattr(args, "resume", False) else "")


def run_demo(args, overrides: dict | None = None) -> dict:
    """Train, evaluate and report every method of `args.methods`; returns results.json's dict.

    `overrides`: extra `key: value` recipe overrides applied after `QUICK` (tests shrink
    the quick demo further with it).
    """
    if args.seeds < 1 or args.workers < 1:
        raise RimError("--seeds and --workers must be >= 1")
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device, workers = pick_device(args.workers, "demo")
    over = (QUICK if args.quick else {}) | (overrides or {})
    sets = [f"{k}={json.dumps(v)}" for k, v in over.items()]
    methods = _methods(args.methods)
    jobs, cfgs = plan_jobs(methods, args.seeds, out, sets)
    base = cfgs[methods[0]]
    print(
        f"[demo] {len(jobs)} jobs ({', '.join(methods)} x {args.seeds} seed(s)), "
        f"{workers} at a time on {device}; logs in {out / 'runs'}/<method>/seed<s>/train.log"
    )
    machine = describe(device).demo_dict(workers)
    runner = Runner(device, resume=getattr(args, "resume", False))
    run_jobs(jobs, workers, runner)
    from rim.sources import load_split

    test = load_split(base.data.test, "data.test")
    time_jobs(jobs, test, base.eval.timing_examples, device)
    res = assemble(jobs, cfgs, base, args, machine, over)
    res["wall_s"] = time.perf_counter() - t0
    atomic_file(out / "results.json", json.dumps(res, indent=2))
    for old in ("accuracy_vs_ttft.png", "rim_per_block.png"):  # never leave a stale plot
        (out / old).unlink(missing_ok=True)
    plots = [
        p
        for p in (
            plot_accuracy_vs_ttft(res, out / "accuracy_vs_ttft.png"),
            plot_per_block(res, out / "rim_per_block.png"),
        )
        if p
    ]
    write_markdown(out / "results.md", res, [p.name for p in plots])
    print("\n" + markdown_table(res["methods"]))
    if args.quick:  # the caveat results.md has, where the numbers are read first
        print(QUICK_CAVEAT)
    written = [out / "results.json", out / "results.md", *plots]
    print(f"\n[demo] {res['wall_s']:.0f}s; wrote " + ", ".join(map(str, written)))
    if res["failed"]:
        raise RimError(f"{len(res['failed'])} demo run(s) failed: {res['failed'][0]}")
    return res


def assemble(jobs, cfgs, base, args, machine, over) -> dict:
    d = base.data
    task = {
        "generator": d.train.generator,
        "path": d.train.path,
        "options": d.train.options,
        "sizes": {s: getattr(d, s).size for s in ("train", "valid", "test")},
        "seeds": {s: getattr(d, s).seed for s in ("train", "valid", "test")},
    }
    config = {
        # relative to the checkout: results carry no path of the machine that wrote them
        "recipes": {m: f"configs/demo/{m}.yaml" for m in cfgs},
        "overrides": over,
        "quick": args.quick,
        "seeds": args.seeds,
        "model": f"{base.model.arch} {base.model.size}",
        "timing_examples": min(base.eval.timing_examples, d.test.size),
        "timing_rounds": TIMING_ROUNDS,
        "steps": {m: _total_steps(c) for m, c in cfgs.items()},
        "batch_size": {m: c.train.batch_size for m, c in cfgs.items()},
        "resolved": {m: c.to_dict() for m, c in cfgs.items()},
    }
    return {
        "methods": summarise(jobs),
        "task": task,
        "config": config,
        "machine": machine,
        "command": _command(args),
        "failed": [f"{j.name}: {j.error.splitlines()[0]}" for j in jobs if j.state == "failed"],
    }
