"""Time to first answer token of several checkpoints, measured together in one process.

    rim sweep --config configs/sweeps/mult.yaml --out results/mult --report-only --timing 32

A sweep's training runs are timed beside other work (`--timing-examples 0` in their
evaluations), so their latencies cannot be compared. Here every checkpoint answers the same
number of its test questions, batch 1, greedy, each with its own decoder (`final`), in
rounds: question i of every checkpoint, then question i + 1, the order rotated each round,
so that a load change on the machine hits all of them alike. Medians; the ratio to direct
at the same grid point is the number to quote ("measured in one run").
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path


def time_together(checkpoints: dict[str, Path], questions: int, device: str = "cpu") -> dict:
    """{name: {"ttft_ms", "latency_ms", "questions"}} for each checkpoint, on the
    first `questions` questions of its recipe's test split, interleaved (module docstring)."""
    import torch  # here: `rim sweep` imports this module for its tables

    from rim.decoding import wall_clock
    from rim.reasoner import Reasoner
    from rim.sources import load_split

    runs = {}
    for name, path in checkpoints.items():
        r = Reasoner.load(str(path), device)
        test = load_split(r.config.data.test, "data.test")[:questions]
        runs[name] = (r, [e.question for e in test])
    clock = wall_clock(torch.device(device))
    for r, qs in runs.values():  # warm-up: one untimed answer each
        _one(r, qs[0], clock)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(max(len(qs) for _, qs in runs.values())):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            r, qs = runs[name]
            if i < len(qs):
                times[name].append(_one(r, qs[i], clock))
    return {name: _summary(t) for name, t in times.items()}


def _one(r, question: str, clock) -> tuple[float, float]:
    """(TTFT ms, full-answer ms) of one batch-1 answer with the `final` decoder."""
    from rim.evaluation import answer_times

    return answer_times(r.method, r.model, question, clock)


def _summary(times: list[tuple[float, float]]) -> dict:
    ttft, full = zip(*times)
    return {
        "ttft_ms": statistics.median(ttft),
        "latency_ms": statistics.median(full),
        "questions": len(times),
    }


def add_timing(res: dict, out: Path, questions: int, device: str = "cpu") -> None:
    """`rim sweep --timing N`: each cell's lowest finished seed's `best/`, timed together;
    `res["timing"]` gets each cell's medians and its TTFT over direct's at the same grid
    point (the same values of the axes direct takes part in)."""
    done = sorted((r for r in res["runs"] if r["state"] == "done"), key=lambda r: r["seed"])
    picks: dict[str, Path] = {}
    for r in done:  # a committed run folder keeps no weights (results/.gitignore)
        if (out / r["run"] / "best").is_dir():
            picks.setdefault(r["cell"], out / r["run"] / "best")
    missing = {r["cell"] for r in done} - set(picks)
    if missing:
        print(f"[sweep] timing: no best/ weights here for {', '.join(sorted(missing))}: not timed")
    if not picks:
        return
    print(f"[sweep] timing {len(picks)} checkpoints together, {questions} questions each")
    timed = time_together(picks, questions, device)
    cells = {c["cell"]: c for c in res["cells"]}
    for name, t in timed.items():
        base = direct_at(cells[name], res["cells"], res["grid"]["axes"])
        if base is not None and base["cell"] in timed:
            t["ttft_vs_direct"] = t["ttft_ms"] / timed[base["cell"]]["ttft_ms"]
    import torch

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res["timing"] = {
        "questions": questions, "threads": torch.get_num_threads(), "measured": when,
        "cells": timed,
    }  # fmt: skip
    refresh_accuracy(res)


def keep_timing(res: dict, before: dict | None) -> None:
    """A sweep run without `--timing` keeps the last measured timing (results.json's), for
    the cells still in the grid, with today's accuracies: the times are not measured again
    (a rewrite of the tables must not lose them), and say when they were."""
    old = (before or {}).get("timing")
    if not old:
        return
    names = {c["cell"] for c in res["cells"]}
    kept = {k: v for k, v in old["cells"].items() if k in names}
    if kept:
        res["timing"] = old | {"cells": kept}
        refresh_accuracy(res)


def refresh_accuracy(res: dict) -> None:
    """Each timed cell's test accuracy: its mean over the seeds finished now."""
    cells = {c["cell"]: c for c in res["cells"]}
    for name, t in res["timing"]["cells"].items():
        t["accuracy"] = cells[name]["metrics"].get("accuracy", {}).get("mean")


def direct_at(cell: dict, cells: list[dict], axes: dict[str, str]) -> dict | None:
    """The direct cell that agrees with `cell` on every axis direct's grid part sets (`axes`:
    name -> recipe key). An axis only other methods vary (`memory.loops`) is not compared:
    direct's cell shows that axis's recipe default, which says nothing about direct.

    >>> d = {"method": "direct", "values": {"digits": 4, "loops": 0}, "sets": ["a.digits=4"]}
    >>> r = {"method": "rim", "values": {"digits": 4, "loops": 2}, "sets": ["a.digits=4"]}
    >>> direct_at(r, [d], {"digits": "a.digits", "loops": "memory.loops"}) is d
    True
    """
    from rim.grid import set_axes

    for c in cells:
        if c["method"] == "direct" and all(
            cell["values"].get(a) == c["values"].get(a) for a in set_axes(c, axes)
        ):
            return c
    return None


def timing_table(res: dict) -> list[str]:
    """The markdown section of `res["timing"]`, cells by TTFT ([] without timing)."""
    t = res.get("timing")
    if not t:
        return []
    rows = sorted(t["cells"].items(), key=lambda kv: kv[1]["ttft_ms"])
    lines = [
        "| cell | test acc | TTFT ms | TTFT / direct | full answer ms |",
        "|---|---|---|---|---|",
    ]
    for name, c in rows:
        acc = "-" if c["accuracy"] is None else f"{c['accuracy']:.3f}"
        ratio = f"{c['ttft_vs_direct']:.2f}x" if "ttft_vs_direct" in c else "-"
        lines.append(f"| {name} | {acc} | {c['ttft_ms']:.1f} | {ratio} | {c['latency_ms']:.1f} |")
    return [
        "", "## Latency, measured together", "",
        f"Batch 1, greedy, the first {t['questions']} test questions of each cell's lowest "
        f"finished seed, all checkpoints in one process ({t['threads']} threads), in rotating "
        f"rounds (`rim.timing`), measured {t.get('measured', 'with the tables')}; test acc: "
        "today's mean over seeds. TTFT: medians. Ratios to direct hold; absolute times "
        "depend on the machine's load.", "", *lines,
    ]  # fmt: skip
