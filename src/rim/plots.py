"""Plots of demo and sweep results: accuracy against TTFT or a grid axis, accuracy per block.

Every figure is written whole or not at all (`_save`: rendered in memory, one atomic write).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from rim.grid import set_axes
from rim.io import atomic_file
from rim.runner import format_value


def task_line(task: dict) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in (task["options"] or {}).items())
    return (
        f"{task['generator'] or task['path']}({opts}): train {task['sizes']['train']} / "
        f"valid {task['sizes']['valid']} / test {task['sizes']['test']} examples"
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    _pyplot().close(fig)
    return atomic_file(path, buf.getvalue())


def _subtitle(res: dict) -> str:
    c = res["config"]
    seeds = f"{c['seeds']} seed" + ("s" if c["seeds"] > 1 else "")
    quick = ", --quick" if c["quick"] else ""
    return f"{task_line(res['task'])}; {c['model']}; {seeds}{quick}; {res['machine']['device']}"


def _place_labels(ax, points: list[tuple[str, float, float, str]]) -> None:
    """Name each point, trying offsets until the label box overlaps no earlier label or point."""
    fig = ax.figure
    fig.canvas.draw()
    px = fig.dpi / 72  # pixels per point
    xy = [ax.transData.transform((x, y)) for _, x, y, _ in points]
    taken = [(u - 6 * px, v - 6 * px, u + 6 * px, v + 6 * px) for u, v in xy]  # the markers
    offsets = [(8, 5), (8, -15), (-8, 5), (-8, -15), (8, 17), (8, -27), (-8, 17), (-8, -27)]
    offsets += [(8, 29), (-8, 29), (8, 41), (-8, 41)]
    frame = ax.get_window_extent()
    for (name, x, y, color), (u, v) in zip(points, xy):
        w, h = (6.5 * len(name) + 4) * px, 13 * px
        for dx, dy in offsets:
            x0 = u + dx * px - (w if dx < 0 else 0)
            box = (x0, v + dy * px, x0 + w, v + dy * px + h)
            inside = (
                frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] <= frame.y1 - h
            )
            if inside and not any(
                box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken
            ):
                break
        taken.append(box)
        ax.annotate(
            name,
            (x, y),
            textcoords="offset points",
            xytext=(dx, dy),
            fontsize=11,
            color=color,
            ha="right" if dx < 0 else "left",
            va="bottom",
        )


def _clipped(y: float, sd: float | None) -> tuple[float, float]:
    """(below, above) error-bar lengths of y ± sd, cut at the [0, 1] range of an accuracy."""
    sd = sd or 0.0
    return (min(sd, y), min(sd, 1.0 - y))


def plot_accuracy_vs_ttft(res: dict, path: Path) -> Path | None:
    """One labelled point per method: TTFT (x) against final-block accuracy (y), s.d. bars."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = {m: r for m, r in res["methods"].items() if r.get("ttft_ms")}
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    points = []
    for i, (m, r) in enumerate(rows.items()):
        y = r["accuracy"]
        below, above = _clipped(y, r.get("accuracy_sd"))
        ax.errorbar(
            r["ttft_ms"], y, yerr=[[below], [above]], fmt="o", ms=8, capsize=4, color=f"C{i}"
        )
        per_seed = [s["accuracy"] for s in r.get("seeds", [])]
        if len(per_seed) > 1:  # each seed too: a mean +- s.d. can hide a split (e.g. 0.6, 1, 1)
            ax.plot([r["ttft_ms"]] * len(per_seed), per_seed, "x", ms=5, color=f"C{i}", alpha=0.6)
        points.append((m, r["ttft_ms"], r["accuracy"], f"C{i}"))
    xs = [r["ttft_ms"] for r in rows.values()]
    log = max(xs) / max(min(xs), 1e-9) > 5
    if log:
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.6, max(xs) * 2.5)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xlim(0, max(xs) * 1.3)
    ax.set_ylim(-0.1, 1.05)  # room for names under points at 0
    scale = ", log scale" if log else ""
    ax.set_xlabel(f"time to first answer token (ms, median of batch-1 runs{scale})")
    ax.set_ylabel("final-block accuracy on the test split (fraction)")
    seeds = res["config"]["seeds"]
    bars = "error bars: ± s.d. over seeds, x: each seed" if seeds > 1 else "1 seed: no error bars"
    ax.set_title(f"Accuracy vs time to first answer token ({bars})\n" + _subtitle(res), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    _place_labels(ax, points)
    return _save(fig, path)


def plot_per_block(res: dict, path: Path) -> Path | None:
    """RiM's accuracy after each memory block k = 1..K (mean ± s.d.), pause and direct beside."""
    methods = res["methods"]
    if "per_block_accuracy" not in methods.get("rim", {}):
        print("[demo] note: no RiM results, so no rim_per_block.png")
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, m in enumerate(("rim", "pause")):
        r = methods.get(m, {})
        if "per_block_accuracy" not in r:
            continue
        y = r["per_block_accuracy"]
        sd = list(zip(*(_clipped(a, s) for a, s in zip(y, r["per_block_accuracy_sd"]))))
        k = list(range(1, len(y) + 1))
        n = r["n_seeds"]
        for seed in r["seeds"] if n > 1 else []:
            ax.plot(k, seed["per_block_accuracy"], color=f"C{i}", lw=0.8, alpha=0.35)
        what = f"mean ± s.d. over {n} seeds; thin: each seed" if n > 1 else "1 seed"
        ax.errorbar(
            k,
            y,
            yerr=sd,
            fmt="o",
            capsize=4,
            color=f"C{i}",
            ls="-" if m == "rim" else "--",
            label=f"{m} ({what})",
        )
        ax.set_xticks(k)
    if "direct" in methods:
        ax.axhline(methods["direct"]["accuracy"], color="gray", ls=":", label="direct (no blocks)")
    ax.set_ylim(-0.03, 1.05)
    ax.set_xlabel("memory blocks before the answer, k (answer decoded after block k)")
    ax.set_ylabel("accuracy on the test split (fraction)")
    ax.set_title(
        "RiM: accuracy of the answer decoded after memory block k\n" + _subtitle(res), fontsize=10
    )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9, framealpha=0.8)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------- entry point


# --------------------------------------------------------------------------- sweeps


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def numeric_axis(res: dict) -> str | None:
    """The sweep's first axis with numbers in every cell and more than one value: the x axis."""
    for a in res["grid"]["axes"]:
        vals = [c["values"][a] for c in res["cells"]]
        if all(_is_number(v) for v in vals) and len(set(vals)) > 1:
            return a
    return None


def _series(res: dict, axis: str | None) -> dict[str, list[dict]]:
    """Cells with results, one series per method and values of the other varying axes."""
    cells = [c for c in res["cells"] if c["n"] and "accuracy" in c["metrics"]]
    vary: dict[str, list[str]] = {}  # per method: the other axes it takes several values on
    for m in dict.fromkeys(c["method"] for c in cells):
        own = [c["values"] for c in cells if c["method"] == m]
        axes = [a for a in res["grid"]["axes"] if a != axis]
        vary[m] = [a for a in axes if len({repr(v[a]) for v in own}) > 1]
    out: dict[str, list[dict]] = {}
    for c in cells:
        m = c["method"]
        label = m + "".join(f" {a}={format_value(c['values'][a])}" for a in vary[m])
        out.setdefault(label, []).append(c)
    if axis is not None:
        for group in out.values():
            group.sort(key=lambda c: c["values"][axis])
    return out


def _sweep_subtitle(res: dict) -> str:
    g = res["grid"]
    seeds = f"{g['seeds']} seed" + ("s" if g["seeds"] > 1 else "")
    task = res["task"]["generator"] or res["task"]["path"]
    return f"{Path(g['file']).name}: {task}; {res['model']}; {seeds} per cell; {res['machine']['device']}"


def _offsets(xs: list[float], n: int, log: bool):
    """Small horizontal shifts per series, so error bars at one x do not hide each other."""
    span = (max(xs) / min(xs)) if log else (max(xs) - min(xs)) or 1.0

    def shift(x: float, i: int) -> float:
        d = 0.012 * (i - (n - 1) / 2)
        return x * span**d if log else x + d * span

    return shift


def plot_sweep_accuracy(res: dict, out: Path) -> Path | None:
    """Test accuracy (mean ± s.d. over seeds, x: each seed) against the first numeric axis."""
    axis = numeric_axis(res)
    if axis is None:
        print("[sweep] note: no numeric axis with two values, so no accuracy plot")
        return None
    series = _series(res, axis)
    if not series:
        return None
    xs = sorted({c["values"][axis] for g in series.values() for c in g})
    log = min(xs) > 0 and not all(float(x).is_integer() for x in xs) and max(xs) / min(xs) >= 3
    shift = _offsets(xs, len(series), log)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (label, cells) in enumerate(series.items()):
        x = [shift(c["values"][axis], i) for c in cells]
        acc = [c["metrics"]["accuracy"] for c in cells]
        y = [a["mean"] for a in acc]
        err = list(zip(*(_clipped(m, a["sd"]) for m, a in zip(y, acc))))
        ax.errorbar(x, y, yerr=err, fmt="o-", ms=6, capsize=4, color=f"C{i}", label=label)
        for xi, c in zip(x, cells):
            seeds = [
                r["accuracy"] for r in res["runs"] if r["cell"] == c["cell"] and "accuracy" in r
            ]
            if len(seeds) > 1:
                ax.plot([xi] * len(seeds), seeds, "x", ms=5, color=f"C{i}", alpha=0.5)
            if c["n"] < c["runs"]:  # a cell still running: say how many seeds it holds
                mean = c["metrics"]["accuracy"]["mean"]
                ax.annotate(f"{c['n']}/{c['runs']} seeds", (xi, mean), textcoords="offset points",
                            xytext=(6, -12), fontsize=8, color=f"C{i}")  # fmt: skip
    if log:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(xs, [format_value(x) for x in xs])
    ax.set_ylim(-0.03, 1.05)
    ax.set_xlabel(f"{axis} ({res['grid']['axes'][axis]})")
    ax.set_ylabel("final-block accuracy on the test split (fraction)")
    bars = "mean ± s.d. over seeds, x: each seed" if res["grid"]["seeds"] > 1 else "1 seed"
    ax.set_title(f"Test accuracy vs {axis} ({bars})\n" + _sweep_subtitle(res), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9, framealpha=0.8)
    fig.tight_layout()
    return _save(fig, out / f"accuracy_vs_{axis}.png")


def _pick(res: dict, cells: list[dict], axis: str | None) -> dict:
    """The cell of a series the per-block plot shows: the `select` axis's best-valid value
    when the x axis is the one chosen on validation, else the largest x."""
    if axis is None:
        return cells[-1]
    if res["grid"].get("select") == axis:
        scored = [c for c in cells if "best_valid_accuracy" in c["metrics"]]
        if scored:
            return max(scored, key=lambda c: c["metrics"]["best_valid_accuracy"]["mean"])
    return max(cells, key=lambda c: c["values"][axis])


def plot_sweep_per_block(res: dict, out: Path) -> Path | None:
    """Accuracy after each memory block k of the block methods (mean ± s.d. over seeds), at the
    largest value of the x axis (or the one chosen on validation); others as flat lines."""
    axis = numeric_axis(res)
    series = _series(res, axis)  # without a numeric axis: one cell each
    picks = {label: _pick(res, cells, axis) for label, cells in series.items()}
    if not any("per_block_accuracy" in c for c in picks.values()):
        print("[sweep] note: no block method finished, so no per_block.png")
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    K = 1
    for i, (label, c) in enumerate(picks.items()):
        at = f" ({axis}={format_value(c['values'][axis])})" if axis else ""
        if "per_block_accuracy" not in c:
            acc = c["metrics"]["accuracy"]["mean"]
            ax.axhline(acc, color=f"C{i}", ls=":", label=f"{label}{at}, no blocks")
            continue
        pb = c["per_block_accuracy"]
        k = list(range(1, len(pb["mean"]) + 1))
        K = max(K, len(k))
        err = list(zip(*(_clipped(m, s) for m, s in zip(pb["mean"], pb["sd"]))))
        ax.errorbar(
            k, pb["mean"], yerr=err, fmt="o-", ms=5, capsize=3, color=f"C{i}", label=label + at
        )
    ax.set_xticks(range(1, K + 1, 1 if K <= 20 else 2))
    ax.set_ylim(-0.03, 1.05)
    ax.set_xlabel("memory blocks before the answer, k (answer decoded after block k)")
    ax.set_ylabel("accuracy on the test split (fraction)")
    where = "best valid" if res["grid"].get("select") == axis else "largest"
    what = f" at the {where} {axis}" if axis else ""
    ax.set_title(f"Accuracy after memory block k{what}\n" + _sweep_subtitle(res), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9, framealpha=0.8)
    fig.tight_layout()
    return _save(fig, out / "per_block.png")


def plot_sweep_per_position(res: dict, out: Path) -> Path | None:
    """Accuracy of each answer position (mean over seeds), one panel per value of the x axis:
    where depth runs out on a carry chain (iCoT writes a product least significant digit
    first, so position i is digit i). Per method the cell of the best validation accuracy
    (never test); a block method's answers after earlier blocks as faint lines."""
    cells = [c for c in res["cells"] if c.get("per_position_accuracy")]
    if not cells:
        return None
    axis = numeric_axis(res)
    panels = sorted({c["values"][axis] for c in cells}) if axis else [None]
    methods = list(dict.fromkeys(c["method"] for c in cells))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, v in zip(axes[0], panels):
        for i, m in enumerate(methods):
            group = [
                c for c in cells if c["method"] == m and (axis is None or c["values"][axis] == v)
            ]
            if not group:
                continue
            c = max(group, key=lambda c: _mean_or(c, "best_valid_accuracy"))
            rows = c["per_position_accuracy"]["mean"]
            x = list(range(len(rows[-1])))
            for k, row in enumerate(rows[:-1]):  # after block k + 1 (block methods)
                ax.plot(x, row, "-", lw=1, color=f"C{i}", alpha=0.15 + 0.45 * k / len(rows))
            extra = f", after each of {len(rows)} blocks (faint)" if len(rows) > 1 else ""
            n = c["per_position_accuracy"]["n"]
            seeds = f"{n} seed" + ("s" if n > 1 else "")
            ax.plot(x, rows[-1], "o-", ms=4, color=f"C{i}", label=f"{m} ({seeds}){extra}")
        ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel("answer position (digit i of the product, least significant first)")
        ax.set_title(f"{axis} = {format_value(v)}" if axis else "", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8, framealpha=0.8)  # each panel: its own methods, seeds
    axes[0][0].set_ylabel("accuracy of the position on the test split")
    fig.suptitle("Per-position accuracy (mean over seeds)\n" + _sweep_subtitle(res), fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "per_position.png")


def _mean_or(cell: dict, metric: str, default: float = -1.0) -> float:
    got = cell["metrics"].get(metric, {}).get("mean")
    return default if got is None else got


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (lower x, higher y), by x.

    >>> pareto([(1.0, 0.2), (2.0, 0.1), (3.0, 0.9), (4.0, 0.9)])
    [0, 2]
    """
    best, front = -math.inf, []
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1])):
        if points[i][1] > best:
            best = points[i][1]
            front.append(i)
    return front


def plot_sweep_pareto(res: dict, out: Path) -> Path | None:
    """Test accuracy against TTFT (measured together: `rim sweep --timing`), one panel per
    value of the x axis, the pareto front (no cell both faster and more accurate) marked."""
    timed = (res.get("timing") or {}).get("cells", {})
    cells = [
        c for c in res["cells"] if c["cell"] in timed and timed[c["cell"]]["accuracy"] is not None
    ]
    if not cells:
        return None
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = numeric_axis(res)
    panels = sorted({c["values"][axis] for c in cells}) if axis else [None]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    for ax, v in zip(axes[0], panels):
        group = [c for c in cells if axis is None or c["values"][axis] == v]
        pts = [(timed[c["cell"]]["ttft_ms"], timed[c["cell"]]["accuracy"]) for c in group]
        front = pareto(pts)
        for i, level in _label_levels(pts):
            (x, y), c = pts[i], group[i]
            ax.plot(x, y, "o", ms=7, color="C0" if i in front else "C7")
            label = c["cell"].split("/", 1)[0] + _variant(c, axis, res["grid"].get("axes"))
            ax.annotate(label, (x, y), fontsize=7, textcoords="offset points",
                        xytext=(3, 5 + 11 * level), rotation=25)  # fmt: skip
        fx, fy = zip(*(pts[i] for i in front))
        ax.step(fx, fy, where="post", color="C0", alpha=0.6, label="pareto front")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        lo, hi = min(x for x, _ in pts), max(x for x, _ in pts)
        ax.set_xlim(lo / 1.3, hi * 2.5)  # room for the labels right of the slowest points
        ax.set_ylim(-0.03, 1.12)
        ax.set_xlabel("time to first answer token, ms (batch 1, measured together)")
        ax.set_title(f"{axis} = {format_value(v)}" if axis else "", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[0][0].set_ylabel("test accuracy (mean over seeds)")
    fig.suptitle("Accuracy against TTFT\n" + _sweep_subtitle(res), fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "accuracy_vs_ttft.png")


def _variant(cell: dict, axis: str | None, axes: dict[str, str] | None = None) -> str:
    """The axis values a cell's grid part sets, but the x axis's (`loops=2`), for a label:
    direct's cell in a grid with a `loops` axis is just `direct`."""
    own = set(cell["values"]) if axes is None else set_axes(cell, axes)
    vals = [f"{a}={format_value(v)}" for a, v in cell["values"].items() if a != axis and a in own]
    return f" ({', '.join(vals)})" if vals else ""


def _label_levels(pts: list[tuple[float, float]]) -> list[tuple[int, int]]:
    """(index, level) by x: a label one level above its left neighbour's when their points
    are within 20% in x and 0.08 in y, so the labels of close points do not overlap.

    >>> _label_levels([(10.0, 0.0), (30.0, 0.0), (11.0, 0.0), (12.0, 0.5)])
    [(0, 0), (2, 1), (3, 0), (1, 0)]
    """
    out: list[tuple[int, int]] = []
    for i in sorted(range(len(pts)), key=lambda i: pts[i]):
        near = [
            lv
            for j, lv in out
            if pts[i][0] <= pts[j][0] * 1.2 and abs(pts[i][1] - pts[j][1]) < 0.08
        ]
        out.append((i, max(near) + 1 if near else 0))
    return out
