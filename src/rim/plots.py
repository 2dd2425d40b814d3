"""Plots of demo results: accuracy against time to first answer token, accuracy per block."""

from __future__ import annotations

from pathlib import Path


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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- entry point
