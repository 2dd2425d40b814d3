"""`rim sweep`: a grid of methods x seeds x recipe values as one command, one table, plots.

    rim sweep --config configs/sweeps/width.yaml --out results/width
    rim sweep --config configs/sweeps/width.yaml --out results/width --dry-run   # the plan only
    rim sweep --config G.yaml --out D --set train.steps=20 --workers 2        # a smoke run
    rim sweep --config G.yaml --out D --only 'rim/*' --only '*digits=4*/s0'   # part of it

The grid file (`rim.grid`) names the recipes, methods, seeds and axes. Every run goes
through the demo's runner (`rim.runner`): `rim train`, then `rim eval --split test` of
`best/` (and of each `data.extra_tests` file), `--workers` at a time. A search (a grid part
with fewer seeds than the grid, rim.grid) runs first; then the grid's other seeds of the
`select` value chosen on validation, in the same command. Always resumable: a finished run
of the same resolved recipe is kept, an unfinished one continues from its last checkpoint;
adding a value to an axis runs only the new cells; `--only` trains the matching cells only.
Latency only with `--timing N` (rim.timing), kept by later runs without it.

Writes to --out: results.json (every run; per cell the mean, s.d. and n of each metric;
`best`, the value of the `select` axis chosen on validation), results.md (one table),
accuracy_vs_<axis>.png, per_block.png, and runs/<method>/<values>/seed<s>/ (the run folders).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from rim.config import Config
from rim.errors import ConfigError, RimError
from rim.grid import Grid, load_grid
from rim.io import atomic_file
from rim.machine import describe
from rim.plots import (
    plot_sweep_accuracy,
    plot_sweep_pareto,
    plot_sweep_per_block,
    plot_sweep_per_position,
)
from rim.report import fmt, table
from rim.runner import (
    Job,
    Runner,
    cell_label,
    finished,
    finished_elsewhere,
    format_value,
    keep_if_finished,
    pick_device,
    run_jobs,
    total_steps,
    wanted,
)
from rim.timing import add_timing, keep_timing, timing_table

METRICS = (
    "accuracy",
    "token_accuracy",
    "any_block_accuracy",
    "best_valid_accuracy",
    "forward_passes",
    "generated_tokens",
    "train_s",
)


@dataclass
class Planned:
    """One cell as it will run: its resolved recipe, values on every axis, and jobs."""

    method: str
    values: dict  # every axis of the grid -> this recipe's value of the axis key
    sets: list[str]
    cfg: Config
    recipe: Path
    seeds: int  # planned now; a search's chosen cell gets the grid's seeds later
    jobs: list[Job] = field(default_factory=list)

    @property
    def name(self) -> str:
        label = cell_label(self.values)
        return f"{self.method}/{label}" if label else self.method


# --------------------------------------------------------------------------- planning


def _lookup(d: dict, key: str):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _resolve(grid: Grid, cell, sets: list[str]) -> Planned:
    """The cell's recipe, loaded and checked before anything runs."""
    from rim.assembly import load_recipe

    recipe = cell.recipe
    sets = sets + [f"{k}={json.dumps(v)}" for k, v in cell.overrides.items()]
    label = cell_label(cell.values)
    try:
        cfg = load_recipe(recipe, sets)
    except RimError as err:
        raise ConfigError(f"{grid.path}: {cell.method}/{label}: {err}") from None
    if cfg.method != cell.method:
        raise ConfigError(f"{recipe}: method is {cfg.method!r}, expected {cell.method!r}")
    if cfg.data.test is None:
        raise ConfigError(f"{recipe}: a sweep needs data.test (its runs are tested on it)")
    resolved = cfg.to_dict()
    values = {a.name: _lookup(resolved, a.key) for a in grid.axes}
    return Planned(cell.method, values, sets, cfg, recipe, cell.seeds)


def _check_fair(cells: list[Planned], grid: Grid) -> None:
    """At one grid point every method must train on the same task with the same model."""
    first: dict[str, Planned] = {}
    for c in cells:
        ref = first.setdefault(cell_label(c.values), c)
        for part in ("data", "model"):
            if getattr(c.cfg, part) != getattr(ref.cfg, part):
                raise ConfigError(
                    f"{grid.path}: {c.name}: {part} differs from {ref.name} at the same grid "
                    f"point; set it in the grid (set:) or the recipes' base"
                )


def plan(grid: Grid, out: Path, cli_sets: list[str] | None = None) -> list[Planned]:
    """One `Planned` cell per distinct recipe (two parts naming the same run share it, with
    the more seeds of the two), a job per seed of its part, in
    OUT/runs/<method>/<values>/seed<s>."""
    sets = [f"{k}={json.dumps(v)}" for k, v in grid.set.items()] + list(cli_sets or [])
    cells: dict[str, Planned] = {}
    for cell in grid.cells():
        p = _resolve(grid, cell, sets)
        seen = cells.setdefault(p.name, p)
        if seen is not p and seen.cfg.to_dict() != p.cfg.to_dict():
            raise ConfigError(
                f"{grid.path}: {p.name}: two cells of one label but different recipes "
                "(make the differing key the first of its axis)"
            )
        seen.seeds = max(seen.seeds, p.seeds)
    planned = list(cells.values())
    for p in planned:
        add_jobs(p, range(p.seeds), out, grid)
    _check_fair(planned, grid)
    return planned


def add_jobs(p: Planned, seeds: range, out: Path, grid: Grid) -> list[Job]:
    """`p`'s jobs of these seeds (appended to `p.jobs`); a run of the same recipe and seed
    finished elsewhere (`reuse`; or here, under a name since changed by a new axis) is kept."""
    folder, steps = out / "runs" / p.method / cell_label(p.values), total_steps(p.cfg)
    new = [
        Job(p.method, s, p.recipe, folder / f"seed{s}", p.sets, steps, values=p.values)
        for s in seeds
    ]
    for j in new:  # its recipe resolved once, for its own folder and every candidate
        want = wanted(j)
        if not finished(j, want) and (there := finished_elsewhere(j, (out, *grid.reuse), want)):
            j.out, j.reused = there, True
    p.jobs += new
    return new


def follow_ups(grid: Grid, cells: list[Planned], out: Path, ended_only: bool = True) -> list[Job]:
    """After a search (a part with fewer seeds than the grid, rim.grid): the grid's other
    seeds of each value chosen on validation (`select_best`), as new jobs of its cell.

    `ended_only`: only searches whose runs have all ended (done or failed), so that a
    search still running chooses nothing yet; each search is followed up once (its chosen
    cell then holds the grid's seeds)."""
    if not grid.select:
        return []
    groups: dict[tuple, list[Planned]] = {}
    for c in cells:
        groups.setdefault(search_group(c.method, c.values, grid.select), []).append(c)
    ended = [
        c
        for group in groups.values()
        if not ended_only or all(j.state in ("done", "failed") for g in group for j in g.jobs)
        for c in group
    ]
    by_name = {c.name: c for c in cells}
    new: list[Job] = []
    for b in select_best([_cell_record(c) for c in ended], grid.select):
        c = by_name[b["cell"]]
        new += add_jobs(c, range(len(c.jobs), grid.seeds), out, grid)
    return new


# --------------------------------------------------------------------------- summary


def aggregate(xs: list[float]) -> dict:
    """Mean, sample s.d. (None from one value) and n of `xs`."""
    return {
        "mean": statistics.fmean(xs) if xs else None,
        "sd": statistics.stdev(xs) if len(xs) > 1 else None,
        "n": len(xs),
    }


def _run_record(j: Job, out: Path) -> dict:
    rec = {"cell": j.cell, "method": j.method, "values": j.values, "seed": j.seed}
    run = Path(os.path.relpath(j.out, out)).as_posix()  # ../width/runs/...: reused from there
    rec |= {"run": run, "state": j.state, "kept": j.kept, "reused": j.reused}
    if j.error:
        rec["error"] = j.error.splitlines()[0]
    return rec | {k: v for k, v in j.result.items() if k not in ("checkpoint", "data")}


def _cell_record(c: Planned) -> dict:
    done = [j.result for j in c.jobs if j.state == "done"]
    steps, batch = c.jobs[0].total_steps, c.cfg.train.batch_size
    rec = {"cell": c.name, "method": c.method, "values": c.values, "sets": c.sets}
    rec |= {"steps": steps, "batch_size": batch, "train_examples": steps * batch}
    rec |= {"runs": len(c.jobs), "n": len(done)}
    for name, key in (("valid_by_seed", "best_valid_accuracy"),
                      ("valid_tokens_by_seed", "best_valid_token_accuracy")):  # fmt: skip
        got = {str(j.seed): j.result.get(key) for j in c.jobs if j.state == "done"}
        rec[name] = {k: v for k, v in got.items() if v is not None}
    rec["metrics"] = {
        k: aggregate([r[k] for r in done if r.get(k) is not None])
        for k in METRICS
        if any(r.get(k) is not None for r in done)
    }
    names = dict.fromkeys(k for r in done for k in r.get("extra_tests", {}))
    if names:  # data.extra_tests: accuracy on each other test file
        rec["extra_tests"] = {
            k: aggregate([r["extra_tests"][k] for r in done if k in r.get("extra_tests", {})])
            for k in names
        }
    if done and all("per_block_accuracy" in r for r in done):
        cols = list(zip(*(r["per_block_accuracy"] for r in done)))
        aggs = [aggregate(list(col)) for col in cols]
        rec["per_block_accuracy"] = {
            "mean": [a["mean"] for a in aggs],
            "sd": [a["sd"] for a in aggs],
            "n": len(done),
        }
    shapes = {repr(_shape(r.get("per_position_accuracy"))) for r in done}
    if done and len(shapes) == 1 and "None" not in shapes:  # fixed-width answers (products)
        rows = [r["per_position_accuracy"] for r in done]
        mean = [[statistics.fmean(v) for v in zip(*cols)] for cols in zip(*rows)]
        rec["per_position_accuracy"] = {"mean": mean, "n": len(done)}
    return rec


def _shape(rows: list[list[float]] | None) -> tuple | None:
    return None if rows is None else (len(rows), len(rows[0]) if rows else 0)


def _mean(cell: dict, metric: str):
    return cell["metrics"].get(metric, {}).get("mean")


def search_group(method: str, values: dict, axis: str) -> tuple[str, str]:
    """The candidates one `select: axis` chooses between: a method at the same values of
    the other axes (`select_best`, and `follow_ups`, which waits for all of them)."""
    return method, cell_label({k: v for k, v in values.items() if k != axis})


def select_best(cells: list[dict], axis: str) -> list[dict]:
    """Per method and values of the other axes: the `axis` value of the best mean
    validation accuracy (never the test split), and that cell's test accuracy. A tie (all at
    0 exact, say) goes to the best mean valid token accuracy, then to the first value.

    Candidates are scored on the seeds all of them have finished, so a value with one more
    lucky seed finished cannot win by it (a sweep stopped part way, or runs reused from
    another sweep, leave cells with different seeds).
    """
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault(search_group(c["method"], c["values"], axis), []).append(c)
    best = []
    for (method, _), group in groups.items():
        scored = [c for c in group if c.get("valid_by_seed")]
        seeds = sorted(
            set.intersection(*(set(c["valid_by_seed"]) for c in scored)) if scored else []
        )
        if len(scored) < 2 or not seeds:  # nothing to choose between
            continue
        score = {c["cell"]: statistics.fmean(c["valid_by_seed"][s] for s in seeds) for c in scored}
        tokens = {c["cell"]: _mean_tokens(c, seeds) for c in scored}
        top = max(scored, key=lambda c: (score[c["cell"]], tokens[c["cell"]]))
        best.append(
            {
                "method": method,
                "values": {k: v for k, v in top["values"].items() if k != axis},
                "select": axis,
                "chosen": top["values"][axis],
                "cell": top["cell"],
                "seeds": [int(s) for s in seeds],
                "valid_accuracy": score[top["cell"]],
                "test_accuracy": top["metrics"].get("accuracy"),
                "candidates": {format_value(c["values"][axis]): score[c["cell"]] for c in scored},
                "candidate_tokens": {
                    format_value(c["values"][axis]): tokens[c["cell"]] for c in scored
                },
            }
        )
    return best


def _mean_tokens(cell: dict, seeds: list[str]) -> float:
    """Mean valid token accuracy over `seeds` (-1 where a run has none: it never wins a tie)."""
    got = cell.get("valid_tokens_by_seed", {})
    return statistics.fmean(got[s] for s in seeds) if all(s in got for s in seeds) else -1.0


def results(grid: Grid, cells: list[Planned], out: Path, machine: dict, command: str) -> dict:
    """results.json's dict: the grid, every run, every cell's aggregate, the selection."""
    jobs = [j for c in cells for j in c.jobs]
    d, base = cells[0].cfg.data, cells[0].cfg
    res = {
        "grid": {
            "file": grid.path.as_posix(),
            "axes": {a.name: a.key for a in grid.axes},
            "methods": grid.methods,
            "seeds": grid.seeds,
            "select": grid.select,
        },
        "task": {
            "generator": d.train.generator,
            "path": d.train.path,
            "sizes": {s: _split_size(getattr(d, s)) for s in ("train", "valid", "test")},
        },
        "model": f"{base.model.arch} {base.model.size}",
        "runs": [_run_record(j, out) for j in jobs],
        "cells": [_cell_record(c) for c in cells],
        "machine": machine,
        "command": command,
        "failed": [f"{j.name}: {j.error.splitlines()[0]}" for j in jobs if j.state == "failed"],
    }
    if grid.select:
        res["best"] = select_best(res["cells"], grid.select)
    return res


# --------------------------------------------------------------------------- report

COLUMNS = [  # (metric, header, format)
    ("any_block_accuracy", "any-block acc", ".3f"),
    ("best_valid_accuracy", "best valid acc", ".3f"),
    ("forward_passes", "forward passes", ".2f"),
    ("generated_tokens", "generated tokens", ".2f"),
    ("train_s", "train s", ".0f"),
]


def _pm(agg: dict | None) -> str:
    """`0.625 ± 0.177` (mean ± s.d.), `0.625` from one run, `-` from none."""
    if not agg or agg["mean"] is None:
        return "-"
    return fmt(agg["mean"], ".3f") + (f" ± {agg['sd']:.3f}" if agg["sd"] is not None else "")


def markdown_table(res: dict) -> str:
    """One row per cell: its method and axis values, then the metrics (means over seeds)."""
    axes = list(res["grid"]["axes"])
    extra = list(dict.fromkeys(k for c in res["cells"] for k in c.get("extra_tests", {})))
    header = ["method", *axes, "test acc (mean ± s.d.)", *(f"{k} acc" for k in extra)]
    header += [h for _, h, _ in COLUMNS] + ["train examples", "runs"]
    rows = []
    for c in res["cells"]:
        row = [
            c["method"],
            *(fmt(c["values"][a], "") for a in axes),
            _pm(c["metrics"].get("accuracy")),
            *(_pm(c.get("extra_tests", {}).get(k)) for k in extra),
        ]
        row += [fmt(_mean(c, k), spec) for k, _, spec in COLUMNS]
        rows.append(row + [str(c["train_examples"]), f"{c['n']}/{c['runs']}"])
    return table(header, rows)


def best_table(res: dict) -> str:
    """The `select` axis chosen on validation: per method (and other axes), its test accuracy."""
    axis = res["grid"]["select"]
    others = [a for a in res["grid"]["axes"] if a != axis]
    header = ["method", *others, f"{axis} (best valid)", "valid acc", "test acc (mean ± s.d.)"]
    header += [f"valid acc per {axis}", "scored on seeds"]
    rows = []
    for b in res["best"]:
        toks = b.get("candidate_tokens", {})
        tie = len(set(b["candidates"].values())) < len(b["candidates"])  # then tokens decide
        tried = ", ".join(
            f"{k}: {fmt(v, '.3f')}"
            + (f" (tokens {toks[k]:.3f})" if tie and toks.get(k, -1) >= 0 else "")
            for k, v in b["candidates"].items()
        )
        row = [b["method"], *(fmt(b["values"][a], "") for a in others), format_value(b["chosen"])]
        seeds = ", ".join(str(x) for x in b["seeds"])
        rows.append(row + [fmt(b["valid_accuracy"], ".3f"), _pm(b["test_accuracy"]), tried, seeds])
    return table(header, rows)


def _split_size(split) -> int | str:
    """A generated split's size; a file split's name (its `size` means nothing)."""
    if split is None:
        return "none"
    if split.generator is not None:
        return split.size
    return Path(split.path).name + (f" (first {split.limit})" if split.limit else "")


def write_markdown(path: Path, res: dict, plots: list[str]) -> None:
    g, m = res["grid"], res["machine"]
    axes = ", ".join(f"{a} = `{k}`" for a, k in g["axes"].items()) or "none"
    t = res["task"]
    sizes = " / ".join(f"{s} {n}" for s, n in t["sizes"].items())
    lines = [
        f"# rim sweep: {Path(g['file']).stem}",
        "",
        f"Grid: `{g['file']}` (axes: {axes}); methods {', '.join(g['methods'])}; "
        f"{g['seeds']} seed(s) per cell. Task: {t['generator'] or t['path']} ({sizes} "
        f"examples). Model: {res['model']}.",
        "",
        markdown_table(res),
        "",
        "Test acc: exact-match fraction on the test split (after the last memory block for "
        "block methods; any-block: after at least one), of the checkpoint chosen on the valid "
        "split (`<file> acc`: on the recipe's data.extra_tests file of that name); mean ± s.d. "
        "over seeds. Best valid acc: the best validation accuracy during "
        "training (what chose that checkpoint). Train examples: optimizer steps x batch size. "
        "Runs: finished / planned.",
    ]
    if res.get("best"):
        lines += ["", f"## {g['select']} chosen on validation", "", best_table(res), ""]
        lines += [
            f"Each {g['select']} value is scored by its mean best validation accuracy over "
            "the seeds every candidate has finished; a tie goes to the mean valid token "
            "accuracy of those best/ checkpoints (tokens); the test split never takes part in "
            "the choice. Test acc: the chosen cell's, over all its finished seeds."
        ]
    if res.get("report_only"):  # a rewrite of the tables: its wall time says nothing of the runs
        wall = "Tables rewritten with `--report-only`: nothing trained in this invocation"
    else:
        wall = f"Wall time of this invocation: {res['wall_s'] / 60:.1f} min (finished runs it "
        wall += "kept cost none)"
    lines += timing_table(res)
    lines += ["", f"Machine: {m['summary']}. {wall}."]
    cpus = Counter(r.get("cpu") or "not recorded" for r in res["runs"] if r["state"] == "done")
    if cpus:  # kept runs may come from other machines (float sums differ between CPUs)
        lines += ["", "Trained on: " + "; ".join(f"{c} ({n} runs)" for c, n in cpus.items())]
    reused = Counter(r["run"].split("/runs/")[0] for r in res["runs"] if r.get("reused"))
    if reused:  # runs of the same recipe another sweep trained (the grid's `reuse`)
        lines += [
            "",
            "Taken from other sweeps: "
            + "; ".join(f"{n} runs from `{d}`" for d, n in reused.items()),
        ]
    lines += ["", f"Command: `{res['command']}`"]  # the one that trains the runs
    if res.get("report_only"):
        lines[-1] += " (these tables: the same with `--report-only`)"
    if res["failed"]:
        lines += ["", "Failed runs: " + "; ".join(res["failed"])]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    atomic_file(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- entry point


def _command(args) -> str:
    """The command that trains the runs (a `--report-only` rewrite names it too)."""
    cmd = f"rim sweep --config {args.config} --out {args.out} --workers {args.workers}"
    return cmd + "".join(f" --set {s}" for s in args.set)


def print_plan(cells: list[Planned], grid: Grid) -> None:
    """`--dry-run`: the cells, their seeds, budgets and overrides; nothing runs or is written."""
    rows = []
    for c in cells:
        j = c.jobs[0]
        sets = " ".join(
            s for s in c.sets if s.split("=", 1)[0] in {k for a in grid.axes for k in a.keys}
        )
        seeds = f"0-{len(c.jobs) - 1}" if len(c.jobs) > 1 else "0"
        seeds += " (search)" if len(c.jobs) < grid.seeds else ""
        examples = str(j.total_steps * c.cfg.train.batch_size)
        rows.append([c.name, seeds, str(j.total_steps), examples, sets])
    print(table(["cell", "seeds", "steps", "train examples", "grid overrides"], rows))
    jobs = [j for c in cells for j in c.jobs]
    print(f"\n[sweep] {len(cells)} cells, {len(jobs)} runs")
    searches: dict[tuple, int] = {}  # (method, other axes) -> the chosen value's seeds to come
    for c in cells:
        if len(c.jobs) < grid.seeds:
            others = {k: v for k, v in c.values.items() if k != grid.select}
            searches[(c.method, cell_label(others))] = grid.seeds - len(c.jobs)
    if searches:
        print(
            f"[sweep] then {sum(searches.values())} runs more: seeds up to {grid.seeds - 1} of "
            f"the {grid.select} chosen on validation by each of {len(searches)} searches"
        )
    if reused := [j for j in jobs if j.reused]:
        print(f"[sweep] {len(reused)} of them finished elsewhere, kept there: a `reuse` folder "
              "or this one under a cell name an axis has since changed")  # fmt: skip
    if missing := [f for f in grid.reuse if not (f / "runs").is_dir()]:  # training refuses it
        print(f"[sweep] reuse: nothing in {', '.join(map(str, missing))} yet")


def _previous(out: Path) -> dict | None:
    """The results.json an earlier sweep into `out` wrote (None if none or unreadable)."""
    try:
        return json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return None


def _write(out: Path, res: dict) -> list[Path]:
    atomic_file(out / "results.json", json.dumps(res, indent=2))
    for old in [*out.glob("accuracy_vs_*.png"), out / "per_block.png", out / "per_position.png"]:
        old.unlink(missing_ok=True)  # never a stale plot
    made = (plot_sweep_accuracy(res, out), plot_sweep_per_block(res, out),
            plot_sweep_per_position(res, out), plot_sweep_pareto(res, out))  # fmt: skip
    plots = [p for p in made if p]
    write_markdown(out / "results.md", res, [p.name for p in plots])
    return [out / "results.json", out / "results.md", *plots]


def _execute(grid: Grid, cells: list[Planned], args, workers: int, runner: Runner) -> None:
    """Run (resuming) every job, and each search's follow-ups (`follow_ups`) as soon as the
    search ends; with --report-only, keep the finished ones and run nothing."""
    out = Path(args.out)
    if args.report_only:  # the finished runs' results (a sweep still running)
        for j in [j for c in cells for j in c.jobs]:
            keep_if_finished(j)
        for j in follow_ups(grid, cells, out, ended_only=False):  # chosen on what finished
            keep_if_finished(j)
        return
    # cheapest first, then seed by seed: a stopped sweep has its small cells whole and one
    # seed of every cell at a budget before a second (stable: the plan's method order);
    # a search's follow-ups join that order when it ends, not after the whole grid
    order, only = (lambda j: (j.total_steps, j.seed)), getattr(args, "only", None)
    jobs = sorted((j for c in cells for j in c.jobs if _chosen(j, only)), key=order)

    def more() -> list[Job]:
        new = [j for j in follow_ups(grid, cells, out) if _chosen(j, only)]
        for name in dict.fromkeys(j.cell for j in new):
            print(f"[sweep] {name}: {grid.select} chosen on validation; its other seeds queued")
        return new

    run_jobs(jobs, workers, runner, tag="sweep", more=more, key=order)


def _chosen(job: Job | Planned, only: list[str] | None) -> bool:
    """Whether `--only` lets it train: a pattern matches its cell or a run (`rim/*/s0`)."""
    names = [job.name] + ([job.cell] if isinstance(job, Job) else [j.name for j in job.jobs])
    return not only or any(fnmatch(n, p) for n in names for p in only)


def run_sweep(args) -> dict:
    """Plan, run (resuming), summarise and report a grid; returns results.json's dict."""
    if args.workers < 1:
        raise RimError("--workers must be >= 1")
    t0 = time.perf_counter()
    grid = load_grid(args.config, need_reuse=not args.dry_run)
    out = Path(args.out)
    cells = plan(grid, out, args.set)
    for pattern in getattr(args, "only", None) or []:  # one line, not an empty sweep
        if not any(_chosen(c, [pattern]) for c in cells):
            raise ConfigError(f"--only {pattern}: no cell of {args.config} matches it")
    if args.dry_run:
        print_plan([c for c in cells if _chosen(c, getattr(args, "only", None))], grid)
        return {}
    n = sum(len(c.jobs) for c in cells)
    device, workers = pick_device(args.workers, "sweep")
    out.mkdir(parents=True, exist_ok=True)
    at = f"{workers} at a time on {device}; logs in {out / 'runs'}/<method>/<values>/seed<s>"
    print(f"[sweep] {n} runs ({len(cells)} cells), {at}/train.log")
    machine = describe(device).demo_dict(workers)
    runner = Runner(device, resume=True)
    _execute(grid, cells, args, workers, runner)
    jobs = [j for c in cells for j in c.jobs]  # with the searches' follow-ups
    res = results(grid, cells, out, machine, _command(args))
    if args.timing:  # the finished runs' TTFT, measured together (rim.timing)
        add_timing(res, out, args.timing, device)
    else:  # an earlier --timing's measurement stays, with today's accuracies
        keep_timing(res, _previous(out))
    res["wall_s"] = time.perf_counter() - t0
    res["report_only"] = bool(args.report_only)
    written = _write(out, res)
    print("\n" + markdown_table(res))
    if res.get("best"):
        print("\n" + best_table(res))
    kept = sum(j.kept for j in jobs)
    done = f"{kept} of {len(jobs)} runs finished before, kept"
    print(f"\n[sweep] {res['wall_s']:.0f}s ({done}); wrote " + ", ".join(map(str, written)))
    if args.report_only and kept < len(jobs):
        print(f"[sweep] --report-only: {len(jobs) - kept} run(s) not finished, not run")
    if res["failed"]:
        raise RimError(f"{len(res['failed'])} sweep run(s) failed: {res['failed'][0]}")
    return res
