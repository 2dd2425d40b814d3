"""The numbers of `rim inspect` that come from block states and per-block answers.

Everything here reads ONE all-blocks prefill (`collect`): each block's last-token state at
every layer, the answer decoded after every block, and the first token generated after it.
The early-exit curve is simulated from them: stopping after block k yields the answer the
all-blocks decoder gives after k blocks, which is what the `early-exit` decoder returns
(pinned by tests/test_inspect.py); only its time is measured with the real decoder.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from rim.data import Example
from rim.decoders import decode
from rim.errors import RimError
from rim.evaluation import Record, gold_answers, latency, records_of
from rim.probe import correctness

THRESHOLDS = (0.5, 0.7, 0.9, 0.95, 0.99)
TOP_CATEGORIES = 10  # step values coloured in the PCA; the rest are "other"
ANSWER_BLOCK, OTHER = "answer block", "other step values"


@dataclass
class BlockRun:
    """What one all-blocks prefill says about every example (`rim.probe.block_states` plus
    the first generated token, which the early-exit stability rule looks at)."""

    states: np.ndarray  # (N, K, L+1, D) each block's last token, embeddings first
    records: list[Record]  # answers and correctness after each block
    first: np.ndarray  # (N, K) first token generated after block k (EOS included)


def collect(method, model, examples: list[Example], batch_size: int = 64) -> BlockRun:
    """Block states, per-block records and first tokens from the all-blocks decoder."""
    if not method.uses_blocks:
        raise RimError(f"inspect: method {method.name} has no memory blocks")
    model.eval()
    golds = gold_answers(method, examples)
    Lb, K = method.mem.block_len, method.mem.num_blocks
    states, records, first = [], [], []
    for lo in range(0, len(examples), batch_size):
        questions = [e.question for e in examples[lo : lo + batch_size]]
        out = decode(method, model, questions, "all-blocks", keep_states=True)
        layers = np.stack([h.numpy() for h in out.memory_states], axis=2)  # (B, K*Lb, L+1, D)
        states.append(layers[:, Lb - 1 :: Lb])  # (B, K, L+1, D)
        records += records_of(method, out, golds[lo : lo + len(questions)], lo)
        # an empty answer means EOS came first (the tracker drops EOS)
        tokens = [t[0] if t else method.eos_id for t in out.tokens]  # (B*K,)
        first.append(np.array(tokens, dtype=np.int64).reshape(len(questions), K))
    return BlockRun(np.concatenate(states), records, np.concatenate(first))


def per_block_accuracy(records: list[Record]) -> list[float]:
    """Accuracy of the answer decoded after block k, k = 1..K."""
    return correctness(records).mean(axis=0).tolist()


def probe_roc(records: list[Record], scores: np.ndarray) -> dict | None:
    """The probe's ROC over every (example, block) and its AUROC; None with one class only."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = correctness(records).ravel()  # (N*K,)
    if len(set(y.tolist())) < 2:
        return None
    fpr, tpr, _ = roc_curve(y, scores.ravel())
    return {"auroc": float(roc_auc_score(y, scores.ravel())), "fpr": fpr.tolist(),
            "tpr": tpr.tolist(), "positives": int(y.sum()), "negatives": int((~y).sum())}  # fmt: skip


# ---------------------------------------------------------------- early exit (simulated)


def threshold_stops(scores: np.ndarray, threshold: float) -> np.ndarray:
    """(N,) blocks used: the first block whose probe score is >= `threshold`, else K."""
    hit = scores >= threshold  # (N, K)
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, scores.shape[1])


def stable_stops(first: np.ndarray) -> np.ndarray:
    """(N,) blocks used by the probe-free rule: the first block k >= 2 whose first answer
    token equals block k-1's, else K (as `rim.early_exit` decides it)."""
    N, K = first.shape
    same = np.zeros((N, K), dtype=bool)
    same[:, 1:] = first[:, 1:] == first[:, :-1]
    return np.where(same.any(axis=1), same.argmax(axis=1) + 1, K)


def exit_outcome(records: list[Record], used: np.ndarray) -> dict:
    """Accuracy and mean blocks when example i answers after `used[i]` blocks."""
    correct = correctness(records)  # (N, K)
    rows = np.arange(len(records))
    K = correct.shape[1]
    return {"accuracy": float(correct[rows, used - 1].mean()), "mean_blocks": float(used.mean()),
            "block_share": float(used.mean() / K)}  # fmt: skip


def early_exit_curve(run: BlockRun, scores: np.ndarray | None, thresholds) -> dict:
    """Accuracy against mean blocks: fixed budgets k = 1..K, each probe threshold, and the
    answer-stability rule; all from one all-blocks run."""
    acc = per_block_accuracy(run.records)
    out = {
        "budgets": [{"blocks": k, "accuracy": a} for k, a in enumerate(acc, start=1)],
        "stable": exit_outcome(run.records, stable_stops(run.first)),
        "thresholds": [],
    }
    if scores is not None:
        for t in thresholds:
            row = {"threshold": float(t)} | exit_outcome(run.records, threshold_stops(scores, t))
            out["thresholds"].append(row)
    return out


def exit_timings(method, model, examples: list[Example], probe, thresholds) -> dict:
    """Batch-1 median time to first answer token (ms) of the real decoders: `final` with all
    K blocks, `early-exit` at each threshold (with the probe) and without a probe."""
    if not examples:
        return {"final_ttft_ms": None, "stable_ttft_ms": None, "threshold_ttft_ms": {}}
    device = next(model.parameters()).device

    def ttft(decoder: str, options: dict | None = None) -> float:
        return latency(method, model, examples, None, device, False, decoder, options)["ttft_ms"]

    by_t = {}
    if probe is not None:
        by_t = {str(t): ttft("early-exit", {"threshold": t, "probe": probe}) for t in thresholds}
    return {"final_ttft_ms": ttft("final"), "threshold_ttft_ms": by_t,
            "stable_ttft_ms": ttft("early-exit", {"probe": None})}  # fmt: skip


# ---------------------------------------------------------------- PCA of block states


def step_labels(examples: list[Example], K: int, top: int = TOP_CATEGORIES):
    """(N, K) label of each block: the gold step it was grounded on (block k <-> step k,
    k <= T), `ANSWER_BLOCK` for k > T; step values outside the `top` most frequent become
    `OTHER`. Returns (labels, categories in legend order)."""
    counts = Counter(s for e in examples for s in e.steps[:K])
    kept = [v for v, _ in counts.most_common(top)]
    labels = np.empty((len(examples), K), dtype=object)
    for i, e in enumerate(examples):
        for k in range(K):
            if k >= len(e.steps):
                labels[i, k] = ANSWER_BLOCK
            else:
                labels[i, k] = e.steps[k] if e.steps[k] in kept else OTHER
    present = set(labels.ravel().tolist())
    order = sorted(kept, key=_natural) + [OTHER, ANSWER_BLOCK]
    return labels, [c for c in order if c in present]


def _natural(value: str):
    """Numbers in numeric order, then words: legends read 2, 10, 37, apple."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def pca_2d(h: np.ndarray, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """(N, K, 2) coordinates of (N, K, D) states on their first two principal components,
    and the share of variance each explains."""
    from sklearn.decomposition import PCA

    N, K, D = h.shape
    x = h.reshape(N * K, D).astype(np.float64)
    n = min(2, N * K, D)
    pca = PCA(n_components=n, random_state=seed).fit(x)
    xy = np.zeros((N * K, 2))
    xy[:, :n] = pca.transform(x)
    return xy.reshape(N, K, 2), [float(v) for v in pca.explained_variance_ratio_]
