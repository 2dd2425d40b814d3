"""A correctness probe on the memory blocks, and answer selection among the K blocks.

The paper reads RiM's blocks as working memory: a linear probe on a block's hidden state
predicts whether the answer decoded after that block is correct. `fit` trains scikit-learn's
logistic regression (on standardised states) for every layer on part of the validation
examples (split stratified by whether an example has right and wrong blocks) and keeps the
layer with the best AUROC on the rest (never test); the chosen probe
is refitted on all of them and saved in the checkpoint as plain arrays (`probe.safetensors`)
and JSON (`probe.json`), no pickle.

    rim probe --checkpoint runs/x/best                      # fit on data.valid, save
    rim eval --checkpoint runs/x/best --split test --select final,probe,vote,oracle

Selection: `final` the last block's answer, `probe` the block with the highest probe score,
`vote` the most frequent answer over blocks (ties: the later block), `oracle` any block right.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from rim.data import Example
from rim.decoders import decode, refuse_looped
from rim.errors import RimError
from rim.evaluation import Record, gold_answers, records_of
from rim.io import atomic_file

PROBE_FILE, PROBE_JSON = "probe.safetensors", "probe.json"
SELECTIONS = ("final", "probe", "vote", "oracle")


def block_states(
    method, model, examples: list[Example], batch_size: int = 64, blocks: int | None = None
) -> tuple[np.ndarray, list[Record]]:
    """(N, K, layers + 1, D) hidden states of each block's last token (embeddings first), from
    the all-blocks decoder's one prefill, and every example's `Record` (answer per block)."""
    if not method.uses_blocks:
        raise RimError(f"probe: method {method.name} has no memory blocks")
    refuse_looped(method, "probe")
    model.eval()
    golds = gold_answers(method, examples)
    Lb = method.mem.block_len
    states, records = [], []
    for lo in range(0, len(examples), batch_size):
        questions = [e.question for e in examples[lo : lo + batch_size]]
        out = decode(method, model, questions, "all-blocks", blocks, keep_states=True)
        layers = np.stack([h.numpy() for h in out.memory_states], axis=2)  # (B, K*Lb, L+1, D)
        states.append(layers[:, Lb - 1 :: Lb])  # (B, K, L+1, D): each block's last token
        records += records_of(method, out, golds[lo : lo + len(questions)], lo)
    return np.concatenate(states), records


def correctness(records: list[Record]) -> np.ndarray:
    return np.array([r.correct for r in records], dtype=bool)  # (N, K)


@dataclass
class Probe:
    """`sigmoid(((h - mean) / scale) @ coef + intercept)` on layer `layer`'s block states."""

    layer: int
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    coef: np.ndarray  # (D,)
    intercept: float
    info: dict = field(default_factory=dict)  # selection AUROC per layer, sizes

    def score(self, states: np.ndarray) -> np.ndarray:
        """(N, K) probability that each block's answer is right, from (N, K, L+1, D) states."""
        return self.score_layer(states[:, :, self.layer])

    def score_layer(self, h: np.ndarray) -> np.ndarray:
        """(...) probabilities from (..., D) states of layer `layer` (a block's last token)."""
        x = (h.astype(np.float64) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(x @ self.coef + self.intercept)))

    def save(self, folder: Path) -> None:
        arrays = {"mean": self.mean, "scale": self.scale, "coef": self.coef}
        atomic_file(
            Path(folder) / PROBE_FILE, save({k: v.astype(np.float64) for k, v in arrays.items()})
        )
        meta = {"layer": self.layer, "intercept": self.intercept} | self.info
        atomic_file(Path(folder) / PROBE_JSON, json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: Path) -> Probe:
        folder = Path(folder)
        if not (folder / PROBE_JSON).is_file() or not (folder / PROBE_FILE).is_file():
            raise RimError(f"{folder}: no probe (run: rim probe --checkpoint {folder})")
        meta = json.loads((folder / PROBE_JSON).read_text())
        a = load_file(str(folder / PROBE_FILE))
        info = {k: v for k, v in meta.items() if k not in ("layer", "intercept")}
        return cls(meta["layer"], a["mean"], a["scale"], a["coef"], meta["intercept"], info)


def _fit_layer(x: np.ndarray, y: np.ndarray, seed: int):
    """A standardised logistic regression on (n, D) states `x` and 0/1 labels `y`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)
    ).fit(x, y)


def fit(states: np.ndarray, correct: np.ndarray, seed: int = 0, select_share: float = 0.3) -> Probe:
    """The best layer by AUROC on a held-out share of the examples, refitted on all of them."""
    from sklearn.metrics import roc_auc_score

    N, K, L, D = states.shape
    if correct.all() or not correct.any():
        raise RimError(
            f"probe: every block answer is {'right' if correct.all() else 'wrong'} on these "
            f"{N} examples; a correctness probe needs both (use more or harder data)"
        )
    sel, fit_ = _selection_split(correct, seed, select_share)
    aurocs = []
    for layer in range(L):
        y_fit, y_sel = correct[fit_].ravel(), correct[sel].ravel()
        if len(set(y_fit)) < 2 or len(set(y_sel)) < 2:
            aurocs.append(float("nan"))
            continue
        model = _fit_layer(states[fit_, :, layer].reshape(-1, D), y_fit, seed)
        p = model.predict_proba(states[sel, :, layer].reshape(-1, D))[:, 1]
        aurocs.append(float(roc_auc_score(y_sel, p)))
    if all(np.isnan(aurocs)):
        wrong = int((~correct.all(axis=1)).sum())
        raise RimError(
            f"probe: {wrong} of {N} examples have a wrong block answer; choosing a layer on a "
            "held-out share needs two or more with a wrong and two with a right block answer "
            "(use more or harder data)"
        )
    best = int(np.nanargmax(aurocs))
    pipe = _fit_layer(states[:, :, best].reshape(-1, D), correct.ravel(), seed)
    scaler, lr = pipe.steps[0][1], pipe.steps[1][1]
    info = {"selection_auroc": aurocs, "examples": N, "blocks": K, "select_share": select_share}
    return Probe(best, scaler.mean_, scaler.scale_, lr.coef_[0].astype(np.float64),
                 float(lr.intercept_[0]), info)  # fmt: skip


def _selection_split(correct: np.ndarray, seed: int, share: float) -> tuple[np.ndarray, np.ndarray]:
    """(selection, fit) example indices, stratified by whether an example has a right and a
    wrong block, so a rare kind (a few wrong examples of a strong model) lands in both parts.

    Where that leaves a part with one class (say one all-wrong and one mixed example, each a
    stratum of one), the two kinds with a wrong block are pooled into one stratum: two such
    examples then go one to each part. Examples are never split (their K blocks stay together).
    """
    has_wrong, has_right = ~correct.all(axis=1), correct.any(axis=1)  # (N,) each
    sel, fit_ = _stratified(2 * has_wrong + has_right, seed, share)  # strata 0..3
    if not (_both(correct[sel]) and _both(correct[fit_])):
        sel, fit_ = _stratified(has_wrong.astype(int), seed, share)
    return sel, fit_


def _stratified(strata: np.ndarray, seed: int, share: float) -> tuple[np.ndarray, np.ndarray]:
    """About `share` of each stratum (at least one, never all, of a stratum of two or more)."""
    rng = np.random.default_rng(seed)
    sel: list[int] = []
    for g in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == g))
        n = int(round(share * len(idx)))
        if len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)
        sel += idx[:n].tolist()
    chosen = np.zeros(len(strata), dtype=bool)
    chosen[sel] = True
    return np.flatnonzero(chosen), np.flatnonzero(~chosen)


def _both(correct: np.ndarray) -> bool:
    return bool(correct.any() and not correct.all())


def choose(records: list[Record], how: str, scores: np.ndarray | None = None) -> list[bool]:
    """Whether the answer chosen by `how` (one of SELECTIONS) is right, per example."""
    if how == "final":
        return [r.correct[-1] for r in records]
    if how == "oracle":
        return [any(r.correct) for r in records]
    if how == "vote":
        out = []
        for r in records:
            counts = Counter(r.answers)
            top = max(range(len(r.answers)), key=lambda k: (counts[r.answers[k]], k))
            out.append(r.correct[top])
        return out
    if how == "probe":
        if scores is None:
            raise RimError("--select probe: no probe (run: rim probe --checkpoint DIR)")
        return [r.correct[int(np.argmax(s))] for r, s in zip(records, scores)]
    raise RimError(f"--select: {how!r} is not one of {', '.join(SELECTIONS)}")


def selection_report(records: list[Record], hows: list[str], scores: np.ndarray | None) -> dict:
    """Accuracy of every selection in `hows`, and the probe's AUROC when it has scores."""
    from sklearn.metrics import roc_auc_score

    n = max(len(records), 1)
    out = {"selection": {h: sum(choose(records, h, scores)) / n for h in hows}}
    if scores is not None:
        y = correctness(records).ravel()
        out["probe_auroc"] = float(roc_auc_score(y, scores.ravel())) if len(set(y)) > 1 else None
    return out
