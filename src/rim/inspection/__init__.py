"""`rim inspect`: one report on what a RiM checkpoint's memory blocks hold.

    rim inspect --checkpoint RUN/best --split test --out RUN/inspect

writes `report.md` (tables, figures embedded by relative path), the figures (PNG) and
`report.json` (every number): accuracy per block; the correctness probe (the checkpoint's,
else one fitted on the recipe's data.valid and saved, as `rim probe` does), its ROC and the
answer selections; the early-exit curve (simulated from one all-blocks run, with the real
decoder's batch-1 time to first answer token); a PCA of the block states coloured by the
step each block was grounded on; the answer position's attention to the question and to each
block; and a logit lens of every block at every layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rim.data import Example
from rim.errors import RimError
from rim.inspection import figures
from rim.inspection.analyses import (
    THRESHOLDS,
    collect,
    early_exit_curve,
    exit_timings,
    pca_2d,
    per_block_accuracy,
    probe_roc,
    step_labels,
)
from rim.inspection.internals import attention_mass, lens_summary, lens_top1
from rim.inspection.markdown import render
from rim.io import atomic_file, ensure_dir
from rim.probe import PROBE_JSON, SELECTIONS, Probe, block_states, correctness, fit
from rim.probe import selection_report as selections

__all__ = [
    "THRESHOLDS",
    "checkpoint_probe",
    "inspect_checkpoint",
    "parse_thresholds",
    "run_inspect",
]


def parse_thresholds(text: str) -> list[float]:
    """`0.5,0.9` -> [0.5, 0.9]: probe scores in (0, 1], one line naming the bad one."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            t = float(part)
        except ValueError:
            raise RimError(f"--thresholds: {part!r} is not a number") from None
        if not 0.0 < t <= 1.0:
            raise RimError(f"--thresholds: {part} is not a probe score in (0, 1]")
        out.append(t)
    if not out:
        raise RimError("--thresholds: give at least one, e.g. 0.5,0.9")
    return sorted(set(out))


def checkpoint_probe(
    folder: Path, method, model, load_valid: Callable[[], list[Example]], batch_size: int,
    same_data: bool,
) -> tuple[Probe | None, dict]:  # fmt: skip
    """The checkpoint's probe; without one, a probe fitted on `load_valid()` (the recipe's
    data.valid, never test) and saved in the checkpoint as `rim probe` would. A fit that
    cannot be made (one class only) leaves no probe and says why."""
    folder = Path(folder)
    if (folder / PROBE_JSON).is_file():
        probe = Probe.load(folder)
        note = f"the checkpoint's probe ({PROBE_JSON}, fitted on {probe.info.get('examples')} examples)"
        if same_data:
            note += "; if it was fitted on data.valid (rim probe's default), on the same data as inspected here"
        return probe, {"source": "checkpoint", "layer": probe.layer, "note": note}
    valid = load_valid()
    states, records = block_states(method, model, valid, batch_size)
    try:
        probe = fit(states, correctness(records))
    except RimError as err:
        return None, {"source": None, "layer": None, "note": f"no probe: {err}"}
    probe.save(folder)
    note = f"fitted on data.valid ({len(valid)} examples) and saved in the checkpoint"
    if same_data:
        note += "; the SAME data as inspected here, so its AUROC and selections are optimistic"
    return probe, {"source": "fitted", "layer": probe.layer, "note": note}


def run_inspect(reasoner, checkpoint: Path, examples: list[Example], out: Path, source: str,
        same_data: bool, **options) -> dict:  # fmt: skip
    """`rim inspect`: the probe (`checkpoint_probe`), then `inspect_checkpoint`."""
    m, cfg = reasoner.method, reasoner.config
    _require_blocks(m)

    def load_valid() -> list[Example]:
        from rim.sources import load_split

        if cfg is None or cfg.data.valid is None:
            raise RimError("inspect: the checkpoint's recipe has no data.valid to fit a probe on")
        return load_split(cfg.data.valid, "data.valid")

    bs = options.get("batch_size", 64)
    probe, info = checkpoint_probe(checkpoint, m, reasoner.model, load_valid, bs, same_data)
    where = f"{_short(checkpoint)}, {source} ({len(examples)} examples)"
    return inspect_checkpoint(m, reasoner.model, examples, out, probe, info, where, **options)


def _require_blocks(method) -> None:
    if not method.uses_blocks:
        raise RimError(f"inspect: method {method.name} has no memory blocks to inspect")


def _short(path: Path) -> str:
    """The last two parts of a checkpoint path (`seed0/best`): enough to tell runs apart."""
    return "/".join(Path(path).parts[-2:])


def inspect_checkpoint(
    method, model, examples: list[Example], out: Path, probe: Probe | None = None,
    probe_info: dict | None = None, where: str = "", thresholds=THRESHOLDS,
    timing_examples: int = 16, batch_size: int = 64,
) -> dict:  # fmt: skip
    """Every analysis of `examples`, the figures, `report.md` and `report.json` in `out`;
    returns report.json's content."""
    _require_blocks(method)
    if not examples:
        raise RimError("inspect: no examples")
    out = ensure_dir(Path(out))  # a file or a read-only folder: one line, before the work
    br = collect(method, model, examples, batch_size)
    scores = probe.score(br.states) if probe is not None else None  # (N, K)
    rep = _header(method, model, br, where, probe_info)
    rep |= _probe_numbers(br, scores, probe, thresholds)
    rep["timing"] = exit_timings(method, model, examples[:timing_examples], probe, thresholds)
    rep["timing"]["examples"] = min(timing_examples, len(examples))
    arrays = _state_numbers(rep, method, model, examples, br, probe)
    rep["figures"] = _figures(rep, arrays, out, where)
    atomic_file(out / "report.json", json.dumps(rep, indent=2))
    atomic_file(out / "report.md", render(rep))
    return rep


def _header(method, model, br, where: str, probe_info: dict | None) -> dict:
    N, K, L1, D = br.states.shape
    acc = per_block_accuracy(br.records)
    return {
        "where": where, "method": method.name, "n": N, "blocks": K,
        "block_len": method.mem.block_len, "layers": L1 - 1, "hidden": D,
        "model": type(model).__name__, "per_block_accuracy": acc, "final_accuracy": acc[-1],
        "any_block_accuracy": float(correctness(br.records).any(axis=1).mean()),
        "probe": probe_info or {"source": None, "layer": None, "note": "no probe given"},
    }  # fmt: skip


def _probe_numbers(br, scores, probe, thresholds) -> dict:
    hows = [h for h in SELECTIONS if h != "probe" or scores is not None]
    sel = selections(br.records, hows, scores)
    roc = probe_roc(br.records, scores) if scores is not None else None
    curve = early_exit_curve(br, scores, thresholds)
    return {"selection": sel["selection"], "roc": roc, "early_exit": curve,
            "probe_auroc": None if roc is None else roc["auroc"]}  # fmt: skip


def _state_numbers(rep: dict, method, model, examples, br, probe) -> dict:
    """PCA, attention and logit lens into `rep`; the arrays the figures need."""
    N, K = br.states.shape[:2]
    layer = probe.layer if probe is not None else rep["layers"]
    why = "the probe's layer" if probe is not None else "the last layer; no probe"
    xy, explained = pca_2d(br.states[:, :, layer])  # (N, K, 2)
    labels, cats = step_labels(examples, K)
    counts = {c: int((labels == c).sum()) for c in cats}
    rep["pca"] = {"layer": layer, "why": why, "explained": explained, "categories": counts}
    mass = attention_mass(method, model, examples)  # (layers, 1 + K)
    rep["attention"] = {"columns": ["question"] + [f"block {k}" for k in range(1, K + 1)],
                        "mass": mass.tolist()}  # fmt: skip
    rep["logit_lens"] = lens_summary(lens_top1(model, br.states), examples, method)
    return {"xy": xy, "labels": labels, "cats": cats, "mass": mass}


def _figures(rep: dict, a: dict, out: Path, where: str) -> dict:
    """Every figure into `out`; their file names (None where there is nothing to plot)."""
    files = {
        "per_block": figures.per_block(rep["per_block_accuracy"], rep["any_block_accuracy"],
                                       out / "per_block.png", where),
        "roc": figures.roc(rep["roc"], rep["probe"]["layer"], out / "roc.png", where)
        if rep["roc"] else None,
        "early_exit": figures.early_exit(rep["early_exit"], out / "early_exit.png", where),
        "pca_steps": figures.pca_steps(a["xy"], a["labels"], a["cats"], rep["pca"] | {"where": where},
                                       out / "pca_steps.png"),
        "pca_blocks": figures.pca_blocks(a["xy"], rep["pca"] | {"where": where},
                                         out / "pca_blocks.png"),
        "attention": figures.attention(np.asarray(a["mass"]), out / "attention.png", where),
    }  # fmt: skip
    for key, path in files.items():  # no stale figure of an earlier report in `out`
        if path is None:
            (out / f"{key}.png").unlink(missing_ok=True)
    return {k: (p.name if p is not None else None) for k, p in files.items()}
