"""The figures of `rim inspect`, in the look of `rim.plots`: (6, 4) inches at 120 dpi, so
each reads at about 600 px wide in a README; every axis labelled, every series in a legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rim.inspection.analyses import ANSWER_BLOCK, OTHER

SIZE, DPI = (6.4, 4.2), 120
TITLE = 10  # title font size: two lines (what, and which checkpoint and data)
# tab10 without its grey (grey is for answer blocks and other values), then black
STEP_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                "#bcbd22", "#17becf", "#000000"]  # fmt: skip


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def _block_axis(ax, K: int, label: str) -> None:
    ax.set_xticks(range(1, K + 1))
    ax.set_xlim(0.5, K + 0.5)
    ax.set_xlabel(label)


def per_block(acc: list[float], oracle: float, path: Path, where: str) -> Path:
    """Accuracy of the answer decoded after block k, with the final block as a reference."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    K = len(acc)
    ax.plot(range(1, K + 1), acc, "o-", color="C0", label="answer after block k")
    ax.axhline(acc[-1], color="C1", ls="--", label=f"final block (k = {K}): {acc[-1]:.3f}")
    ax.axhline(oracle, color="gray", ls=":", label=f"any block right (oracle): {oracle:.3f}")
    _block_axis(ax, K, "memory blocks before the answer, k")
    ax.set_ylim(-0.03, 1.05)
    ax.set_ylabel("accuracy (fraction of examples)")
    ax.set_title(f"Accuracy of the answer decoded after block k\n{where}", fontsize=TITLE)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9, framealpha=0.85)
    return _save(fig, path)


def roc(res: dict, layer: int, path: Path, where: str) -> Path:
    """The probe's ROC curve over every (example, block), against chance."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    ax.plot(res["fpr"], res["tpr"], color="C0", lw=2,
            label=f"probe, layer {layer} (AUROC {res['auroc']:.3f})")  # fmt: skip
    ax.plot([0, 1], [0, 1], color="gray", ls=":", label="chance (AUROC 0.5)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate (wrong block answers scored as right)")
    ax.set_ylabel("true positive rate (right answers found)")
    n = f"{res['positives']} right / {res['negatives']} wrong block answers"
    ax.set_title(f"Correctness probe: ROC ({n})\n{where}", fontsize=TITLE)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=9, framealpha=0.85)
    return _save(fig, path)


def early_exit(curve: dict, path: Path, where: str) -> Path:
    """Accuracy against mean blocks used: fixed budgets, probe thresholds, stability rule."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    ks = [b["blocks"] for b in curve["budgets"]]
    ax.plot(ks, [b["accuracy"] for b in curve["budgets"]], "o-", color="C0",
            label="fixed budget: always k blocks")  # fmt: skip
    pts = curve["thresholds"]
    if pts:
        xs, ys = [p["mean_blocks"] for p in pts], [p["accuracy"] for p in pts]
        ax.plot(xs, ys, "--", color="C1", lw=1, label="early exit: probe score >= t")
        shades = plt.get_cmap("Oranges")(np.linspace(0.45, 0.95, len(pts)))
        for i, p in enumerate(pts):  # larger first: thresholds on one spot stay visible
            ax.plot([p["mean_blocks"]], [p["accuracy"]], "s", ms=11 - 6 * i / max(len(pts) - 1, 1),
                    color=shades[i], mec="black", mew=0.5, ls="none",
                    label=f"  t = {p['threshold']:g}: {p['mean_blocks']:.2f} blocks")  # fmt: skip
    s = curve["stable"]
    ax.plot([s["mean_blocks"]], [s["accuracy"]], "D", ms=8, color="C2",
            label="early exit: first answer token same for 2 blocks")  # fmt: skip
    _block_axis(ax, len(ks), "blocks used before the answer (mean over examples)")
    ax.set_ylim(-0.03, 1.05)
    ax.set_ylabel("accuracy (fraction of examples)")
    ax.set_title(f"Early exit: accuracy against memory used\n{where}", fontsize=TITLE)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8.5, framealpha=0.85)
    return _save(fig, path)


def pca_steps(xy: np.ndarray, labels: np.ndarray, cats: list[str], info: dict, path: Path) -> Path:
    """Block states on 2 principal components, coloured by the gold step each block was
    grounded on (block k <-> step k); blocks past the last step in grey."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    points, flat = xy.reshape(-1, 2), labels.ravel()
    keep = _sample(len(flat))
    values = [c for c in cats if c not in (OTHER, ANSWER_BLOCK)]
    colours = {c: STEP_COLOURS[i % len(STEP_COLOURS)] for i, c in enumerate(values)}
    colours |= {OTHER: "#d9d9d9", ANSWER_BLOCK: "#737373"}  # light and dark grey
    for c in [OTHER, ANSWER_BLOCK] + values:  # common ones last: drawn on top
        sel = keep[flat[keep] == c]
        if len(sel) and c in cats:
            marker = "x" if c == ANSWER_BLOCK else "o"
            ax.scatter(*points[sel].T, s=12, color=colours[c], alpha=0.75, marker=marker,
                       linewidths=0 if marker == "o" else 1, label=_category(c))  # fmt: skip
    handles, names = ax.get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda i: cats.index(_uncategory(names[i])))
    ax.legend([handles[i] for i in order], [names[i] for i in order], title="gold step of\nthe block",
              fontsize=7.5, title_fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5),
              markerscale=1.5, frameon=False)  # fmt: skip
    _pca_axes(ax, info)
    return _save(fig, path)


def _category(c: str) -> str:
    return c if c in (OTHER, ANSWER_BLOCK) else f"step = {c}"


def _uncategory(name: str) -> str:
    return name[len("step = ") :] if name.startswith("step = ") else name


def pca_blocks(xy: np.ndarray, info: dict, path: Path) -> Path:
    """The same projection coloured by block index k: is a block's place the main axis?"""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    N, K, _ = xy.shape
    keep = _sample(N * K)
    k_of = np.tile(np.arange(1, K + 1), N)  # (N*K,) block of each point
    cmap = plt.get_cmap("viridis", K)
    sc = ax.scatter(*xy.reshape(-1, 2)[keep].T, c=k_of[keep], cmap=cmap, s=10, alpha=0.75,
                    vmin=0.5, vmax=K + 0.5, linewidths=0)  # fmt: skip
    bar = fig.colorbar(sc, ax=ax, ticks=range(1, K + 1))
    bar.set_label("block k")
    _pca_axes(ax, info)
    return _save(fig, path)


def _sample(n: int, most: int = 4000, seed: int = 0) -> np.ndarray:
    """Indices of at most `most` points (seeded): a readable scatter of a large split."""
    if n <= most:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, most, replace=False))


def _pca_axes(ax, info: dict) -> None:
    ev = info["explained"] + [0.0] * (2 - len(info["explained"]))
    ax.set_xlabel(f"principal component 1 ({ev[0]:.0%} of variance)")
    ax.set_ylabel(f"principal component 2 ({ev[1]:.0%} of variance)")
    ax.set_title(f"Block states at layer {info['layer']} ({info['why']}), 2-D PCA\n"
                 f"{info['where']}", fontsize=TITLE)  # fmt: skip
    ax.grid(True, alpha=0.3)


def attention(mass: np.ndarray, path: Path, where: str) -> Path:
    """Heatmap (layers x [question, block 1..K]) of the answer position's attention."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=SIZE)
    L, C = mass.shape
    im = ax.imshow(mass, aspect="auto", cmap="Blues", vmin=0, vmax=max(float(mass.max()), 1e-9),
                   origin="lower")  # fmt: skip
    ax.set_xticks(range(C))
    ax.set_xticklabels(["question"] + [f"b{k}" for k in range(1, C)], fontsize=8)
    ax.set_yticks(range(L))
    ax.set_yticklabels([str(i + 1) for i in range(L)], fontsize=8)
    if L * C <= 160:  # numbers only where they fit
        for (i, j), v in np.ndenumerate(mass):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v > 0.6 * mass.max() else "black")  # fmt: skip
    bar = fig.colorbar(im, ax=ax)
    bar.set_label("share of attention (heads and examples averaged)")
    ax.set_xlabel("attended part of the prompt (b k = memory block k)")
    ax.set_ylabel("layer (1 = the first transformer layer)")
    ax.set_title(f"Attention from the first-answer-token position (each row sums to 1)\n{where}",
                 fontsize=TITLE)  # fmt: skip
    return _save(fig, path)
