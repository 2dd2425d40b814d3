"""Markdown tables (medians over repeated runs) from `rim bench ... --json` outputs.

    for i in 1 2 3; do rim bench latency --model gpt2 --threads 1 --json > lat_$i.json; done
    python benchmarks/tables.py lat_*.json          # latency, train (also --data) and any-block

Each figure is the median over the given runs of that run's own median; the per-run ratios
are listed too, so the spread between runs is visible.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _med(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _f(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def latency_table(runs: list[dict]) -> str:
    c = runs[0]["config"]
    names = list(runs[0]["ms"])
    out = [
        f"{c['model']} ({c['arch']}, {c['params_m']}M params, vocab {c['vocab']}), "
        f"{c['device']} {c['dtype']}, batch {c['batch']}, {c['question_tokens']}-token question, "
        f"K={c['blocks']} M={c['mem_tokens']}, {c['cot_tokens']} CoT tokens, {c['thoughts']} "
        f"thoughts, {c['answer_tokens']} answer tokens; {len(runs)} runs x {c['runs']} timed "
        f"rounds, torch threads {runs[0]['machine']['torch_threads']}",
        "",
        "| method | TTFT ms | plain TTFT ms | latency ms | plain latency ms | ours/plain TTFT "
        "| ours/plain latency | forward passes | prompt tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:

        def col(key: str, sub: str | None = None, n: str = n) -> float | None:
            vals = []
            for r in runs:
                v = r.get(key, {}).get(n)
                vals.append(v.get(sub) if isinstance(v, dict) and sub else v)
            return _med(vals)

        k = runs[0]["counts"].get(n, {})
        out.append(
            f"| {n} | {_f(col('ms'))} | {_f(col('plain_ms'))} | {_f(col('latency_ms'))} | "
            f"{_f(col('plain_latency_ms'))} | {_f(col('overhead', 'ttft'), '.3f')} | "
            f"{_f(col('overhead', 'latency'), '.3f')} | {k.get('forward_passes', '-')} | "
            f"{k.get('prompt_tokens', '-')} |"
        )
    out += [
        "",
        "| ratio | TTFT (median) | TTFT per run | TTFT paired, per run | latency (median) "
        "| latency per run |",
        "|---|---|---|---|---|---|",
    ]
    for key in runs[0]["ratios"]:
        t = [r["ratios"][key] for r in runs]
        p = [r["paired_ratios"][key] for r in runs]
        lat = [r["latency_ratios"][key] for r in runs]
        out.append(
            f"| {key} | {_f(_med(t), '.2f')} | {' '.join(_f(x, '.2f') for x in t)} | "
            f"{' '.join(_f(x, '.2f') for x in p)} | {_f(_med(lat), '.2f')} | "
            f"{' '.join(_f(x, '.2f') for x in lat)} |"
        )
    return "\n".join(out)


def train_table(runs: list[dict]) -> str:
    c = runs[0]["config"]
    names = list(runs[0]["examples_per_s"])
    out = [
        f"{c['model']} ({c['params_m']}M params, vocab {c['vocab']}), {c['device']} "
        f"{c['dtype']}, batch {c['batch']}, {c['question_tokens']}-token questions, "
        f"{c['steps_per_example']} steps of ~{c['step_tokens']} tokens ({c['readouts']} "
        f"readouts), Coconut {c['coconut_thoughts']} thoughts; {len(runs)} runs x "
        f"{c['runs']} timed steps, torch threads {runs[0]['machine']['torch_threads']}; "
        f"memory: {c['memory']}",
        "",
        "| variant | step ms | examples/s | peak MB | tokens per batch |",
        "|---|---|---|---|---|",
    ]
    for n in names:
        out.append(
            f"| {n} | {_f(_med([r['ms'][n] for r in runs]))} | "
            f"{_f(_med([r['examples_per_s'][n] for r in runs]))} | "
            f"{_f(_med([r['peak_mb'][n] for r in runs]))} | "
            f"{runs[0]['tokens_per_batch'].get(n, '-')} |"
        )
    out.append("")
    for key in runs[0]["ratios"]:
        vals = [r["ratios"][key] for r in runs]
        out.append(
            f"- {key}: {_f(_med(vals), '.2f')} (runs: {', '.join(_f(v, '.2f') for v in vals)})"
        )
    return "\n".join(out)


def train_data_table(runs: list[dict]) -> str:
    """`rim bench train --data`: per variant the median over runs; ratios per run."""
    c, m = runs[0]["config"], runs[0]["machine"]
    out = [
        f"{c['model']} ({c['params_m']}M params, vocab {c['vocab']}), {c['device']} "
        f"{c['dtype']}, {c['data']}, batch {c['batch']} in micro-batches of {c['micro_batch']}, "
        f"{len(runs)} runs x {c['runs']} timed steps, torch threads {m['torch_threads']}, "
        f"load {', '.join(_f(r['machine'].get('load_avg_1m'), '.2f') for r in runs)}",
        "",
        "| variant | real tokens/s | step ms | examples/s | peak MB | padding |",
        "|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(runs[0]["rows"]):

        def col(key: str, i: int = i) -> float | None:
            return _med([r["rows"][i][key] for r in runs])

        out.append(
            f"| {row['variant']} | {_f(col('real_tokens_per_s'), '.0f')} | "
            f"{_f(col('step_ms'), '.0f')} | {_f(col('examples_per_s'), '.2f')} | "
            f"{_f(col('peak_mb'), '.0f')} | {_f(100 * col('padding'), '.1f')}% |"
        )
    out.append("")
    for key in runs[0]["ratios"]:
        vals = [r["ratios"][key]["ratio"] for r in runs]
        out.append(f"- {key}: {', '.join(_f(v, '.2f') for v in vals)}")
    return "\n".join(out)


def any_block_table(runs: list[dict]) -> str:
    c = runs[0]["config"]
    vals = [r["ratios"]["any/final"] for r in runs]
    return (
        f"{c['model']}, {c['device']}, {c['examples']} questions of "
        f"{c['question_tokens'][0]}-{c['question_tokens'][1]} tokens at batch {c['batch']}, "
        f"K={c['blocks']}, {c['answer_tokens']} answer tokens: final "
        f"{_f(_med([r['ms']['final'] for r in runs]))} ms, any-block "
        f"{_f(_med([r['ms']['any'] for r in runs]))} ms, any/final {_f(_med(vals), '.2f')} "
        f"(runs: {', '.join(_f(v, '.2f') for v in vals)})"
    )


def main(paths: list[str]) -> None:
    groups: dict[str, list[dict]] = {}
    for p in paths:
        r = json.loads(Path(p).read_text())
        kind = "latency" if "latency_ms" in r else "train" if "examples_per_s" in r else "any-block"
        kind = "train-data" if "rows" in r else kind
        key = f"{kind} {r['config']['model']} threads={r['machine']['torch_threads']}"
        groups.setdefault(key, []).append(r)
    table = {"latency": latency_table, "train": train_table, "any-block": any_block_table}
    table["train-data"] = train_data_table
    for key, runs in groups.items():
        print(f"### {key}\n\n{table[key.split()[0]](runs)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
