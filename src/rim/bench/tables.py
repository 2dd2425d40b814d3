"""The Markdown `rim bench` prints without `--json`, read from the JSON result itself, so a
saved `--json` output renders the same table."""

from __future__ import annotations

from rim.report import fmt, table


def _pairs(d: dict, spec: str = ".2f") -> str:
    """`key value, key value, ...`"""
    return ", ".join(f"{k} {fmt(v, spec)}" for k, v in d.items())


def _notes(res: dict) -> list[str]:
    return [f"note: {n}" for n in res["notes"]]


def format_latency(res: dict) -> str:
    c = res["config"]
    title = (
        f"latency: {c['model']} ({c['arch']}, {c['params_m']}M params, vocab {c['vocab']}), "
        f"{c['device']} {c['dtype']}, batch {c['batch']}, question {c['question_tokens']} tokens, "
        f"K={c['blocks']} M={c['mem_tokens']}, CoT {c['cot_tokens']} tokens, "
        f"{c['thoughts']} thoughts, {c['answer_tokens']} answer tokens; "
        f"median of {c['runs']} runs"
    )
    header = ["method", "TTFT ms", "plain TTFT ms", "latency ms", "plain latency ms"]
    header += ["passes", "prompt"]
    plain = res.get("plain_ms", {})
    plain_lat = res.get("plain_latency_ms", {})
    rows = []
    for n, v in res["ms"].items():
        k = res["counts"].get(n, {})
        rows.append(
            [n, fmt(v), fmt(plain.get(n)), fmt(res["latency_ms"][n]), fmt(plain_lat.get(n))]
            + [str(k.get("forward_passes", "-")), str(k.get("prompt_tokens", "-"))]
        )
    lines = [title, "", table(header, rows), ""]
    lines.append("TTFT ratios: " + _pairs(res["ratios"]))
    lines.append("TTFT ratios, paired per round: " + _pairs(res["paired_ratios"]))
    lines.append("latency ratios: " + _pairs(res["latency_ratios"]))
    if "overhead" in res:
        lines.append(
            "ours / plain loop (TTFT, latency): "
            + ", ".join(
                f"{n} {fmt(o['ttft'], '.2f')} {fmt(o['latency'], '.2f')}"
                for n, o in res["overhead"].items()
            )
        )
    return "\n".join(lines + _notes(res))


def format_train(res: dict) -> str:
    c = res["config"]
    title = (
        f"train: {c['model']} ({c['params_m']}M params, vocab {c['vocab']}), {c['device']} "
        f"{c['dtype']}, batch {c['batch']}, question {c['question_tokens']} tokens, "
        f"{c['steps_per_example']} steps of ~{c['step_tokens']} tokens; median of {c['runs']} steps"
    )
    header = ["variant", "step ms", "examples/s", "peak MB", "tokens/batch"]
    rows = [
        [n, fmt(res["ms"][n]), fmt(res["examples_per_s"][n]), fmt(res["peak_mb"][n])]
        + [str(res["tokens_per_batch"].get(n, "-"))]
        for n in res["ms"]
    ]
    lines = [title, "", table(header, rows), "", "ratios: " + _pairs(res["ratios"])]
    lines.append(f"memory: {c['memory']}")
    return "\n".join(lines + _notes(res))


def format_any_block(res: dict) -> str:
    c = res["config"]
    return (
        f"any-block: {c['model']} {c['device']}, {c['examples']} questions at batch "
        f"{c['batch']}, K={c['blocks']}: final {fmt(res['ms']['final'])} ms, any "
        f"{fmt(res['ms']['any'])} ms, any/final {fmt(res['ratios']['any/final'], '.2f')}"
        + "".join(f"\n{n}" for n in _notes(res))
    )


def format_train_data(res: dict) -> str:
    """`rim bench train --data`: one row per variant, then the acceptance ratios."""
    c, m = res["config"], res["machine"]
    title = (
        f"train on {c['data']}: {c['model']} ({c['params_m']}M params, vocab {c['vocab']}), "
        f"{c['device']} {c['dtype']}, {m.get('torch_threads')} threads, load "
        f"{m.get('load_avg_1m', '-')}; batch {c['batch']} in micro-batches of "
        f"{c['micro_batch']}, {c['pool_examples']} examples, median of {c['runs']} steps"
    )
    header = ["variant", "real tokens/s", "step ms", "examples/s", "peak MB", "padding"]
    rows = [
        [r["variant"], fmt(r["real_tokens_per_s"], ".0f"), fmt(r["step_ms"], ".0f")]
        + [fmt(r["examples_per_s"]), fmt(r["peak_mb"], ".0f"), fmt(r["padding"], ".1%")]
        for r in res["rows"]
    ]
    lines = [title, "", table(header, rows), ""]
    for name, r in res["ratios"].items():
        met = {True: " ok", False: " MISS"}.get(r.get("met"), "")
        lines.append(f"{name}: {fmt(r['ratio'], '.2f')}{met}")
    lines += [f"{r['variant']}: {r['setting']}" for r in res["rows"]]
    lines.append(f"memory: {c['memory']}")
    return "\n".join(lines + _notes(res))
