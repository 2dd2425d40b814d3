"""`report.md` of `rim inspect`: every section from report.json's numbers, figures embedded
by relative path so the folder can be moved or committed whole."""

from __future__ import annotations

from rim.report import fmt, table


def render(rep: dict) -> str:
    """The whole report: a header, then one section per analysis."""
    parts = [_header(rep), _per_block(rep), _probe(rep), _early_exit(rep), _pca(rep),
             _attention(rep), _logit_lens(rep)]  # fmt: skip
    return "\n\n".join(parts) + "\n"


def _figure(rep: dict, key: str, alt: str, why: str = "nothing to plot") -> str:
    name = rep["figures"].get(key)
    return f"![{alt}]({name})" if name else f"(no {alt} figure: {why})"


def _header(rep: dict) -> str:
    return (
        f"# rim inspect: {rep['where']}\n\n"
        f"Method `{rep['method']}` ({rep['model']}, {rep['layers']} layers, hidden size "
        f"{rep['hidden']}); {rep['n']} examples; K = {rep['blocks']} memory blocks of "
        f"{rep['block_len']} tokens. Every number is in `report.json` beside this file."
    )


def _per_block(rep: dict) -> str:
    acc = rep["per_block_accuracy"]
    rows = [[str(k), fmt(a, ".3f")] for k, a in enumerate(acc, start=1)]
    return (
        "## 1. Accuracy per block\n\n"
        "The answer decoded after block k (k = 1..K, all from one prefill): how much each "
        "block adds. The final block's answer is what the deployed model gives.\n\n"
        + _figure(rep, "per_block", "accuracy per block")
        + "\n\n"
        + table(["block k", "accuracy"], rows)
        + f"\n\nFinal block: {acc[-1]:.3f}; any block right (oracle): "
        f"{rep['any_block_accuracy']:.3f}."
    )


def _probe(rep: dict) -> str:
    p = rep["probe"]
    sel = rep["selection"]
    head = "## 2. The correctness probe\n\n"
    if p["source"] is None:
        head += f"No probe: {p['note']}. Sections using it are left out.\n\n"
    else:
        auroc = fmt(rep["probe_auroc"], ".3f")
        head += (
            f"Probe on layer {p['layer']} (0 = embeddings): {p['note']}. It predicts from a "
            f"block's state whether the answer decoded after that block is right. AUROC on "
            f"this data: {auroc}.\n\n"
            + _figure(
                rep, "roc", "probe ROC", "every block answer here is right, or every one wrong"
            )
            + "\n\n"
        )
    rows = [[fmt(sel[h], ".3f") for h in sel]]
    return (
        head + "Selection: which block's answer to give. `final` the last block, `probe` the "
        "block the probe scores highest, `vote` the most frequent answer (ties: the later "
        "block), `oracle` right if any block is.\n\n" + table(list(sel), rows)
    )


def _early_exit(rep: dict) -> str:
    c, t = rep["early_exit"], rep["timing"]
    K = rep["blocks"]
    ms = t["threshold_ttft_ms"]
    rows = [["final (all K blocks)", "-", fmt(rep["final_accuracy"], ".3f"), f"{K:g}", "100%",
             fmt(t["final_ttft_ms"], ".1f")]]  # fmt: skip
    for p in c["thresholds"]:
        rows.append(["early exit, probe", f"{p['threshold']:g}", fmt(p["accuracy"], ".3f"),
                     f"{p['mean_blocks']:.2f}", f"{p['block_share']:.0%}",
                     fmt(ms.get(str(p["threshold"])), ".1f")])  # fmt: skip
    s = c["stable"]
    rows.append(["early exit, 2 blocks agree", "-", fmt(s["accuracy"], ".3f"),
                 f"{s['mean_blocks']:.2f}", f"{s['block_share']:.0%}",
                 fmt(t["stable_ttft_ms"], ".1f")])  # fmt: skip
    header = ["decoder", "threshold", "accuracy", "mean blocks", "block tokens used", "TTFT ms"]
    return (
        "## 3. Early exit: accuracy against memory used\n\n"
        "Stop adding blocks at the first block whose probe score is at least t (else K), or, "
        "without the probe, once the first answer token is the same after two blocks in a row; "
        "against always using k blocks. Accuracy and blocks are computed from the all-blocks "
        "answers (the answer after k blocks is what the early-exit decoder gives when it stops "
        f"at k); TTFT is measured with the real decoders, batch 1, median of "
        f"{t['examples']} questions.\n\n"
        + _figure(rep, "early_exit", "early-exit curve")
        + "\n\n"
        + table(header, rows)
    )


def _pca(rep: dict) -> str:
    p = rep["pca"]
    ev = ", ".join(f"{v:.0%}" for v in p["explained"])
    return (
        "## 4. Block states: PCA\n\n"
        f"Each block's last-token state at layer {p['layer']} ({p['why']}), projected on its "
        f"first two principal components (variance explained: {ev}). First figure: coloured by "
        "the gold step the block was grounded on in stage 1 (block k <-> step k; blocks past an "
        "example's last step are answer blocks, grey); the most frequent step values are "
        "named, the rest grouped. Second figure: the same points by block index k.\n\n"
        + _figure(rep, "pca_steps", "PCA by gold step")
        + "\n\n"
        + _figure(rep, "pca_blocks", "PCA by block")
    )


def _attention(rep: dict) -> str:
    a = rep["attention"]
    rows = [[str(i)] + [f"{v:.3f}" for v in row] for i, row in enumerate(a["mass"], start=1)]
    return (
        "## 5. Attention from the answer position\n\n"
        "Attention of the position that emits the first answer token (block K's last token) "
        "to the question and to each block, per layer, averaged over heads and examples; "
        "each row sums to 1. The question column includes its first token, where many "
        "models park attention.\n\n"
        + _figure(rep, "attention", "attention mass")
        + "\n\n"
        + table(["layer"] + a["columns"], rows)
    )


def _logit_lens(rep: dict) -> str:
    lens, L = rep["logit_lens"], rep["layers"]
    header = ["block"] + [("emb" if layer == 0 else f"L{layer}") for layer in range(L + 1)]
    header.append("step k's first token (last layer)")
    rows = []
    for k, (tops, g) in enumerate(zip(lens["top"], lens["grounding"]), start=1):
        cells = [f"{_token(t['token'])} {t['share']:.0%}" for t in tops]
        ground = "-" if g is None else f"{g['share'][-1]:.0%} of {g['examples']}"
        rows.append([str(k)] + cells + [ground])
    return (
        "## 6. Logit lens\n\n"
        "Each block's last-token state at every layer through the model's final norm and LM "
        "head: the most frequent top-1 token over the examples and its share (emb = the "
        "embedding layer, where every block's last token is the same end token; the last "
        "layer is the model's own next-token prediction). Last column: "
        "the share of the examples with a step k whose top-1 token at block k is the first "
        "token of gold step k, what stage 1's grounding trained it to emit ('-': no example "
        "has that many steps).\n\n" + table(header, rows)
    )


def _token(text: str) -> str:
    """A token readable in a table cell: quoted (spaces show), pipes and backticks escaped."""
    shown = repr(text).replace("|", "\\|").replace("`", "'")
    return f"`{shown}`"
