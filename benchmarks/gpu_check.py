"""The GPU check behind `benchmarks/gpu_check.sh`, in one process (imports and CUDA start once).

    python benchmarks/gpu_check.py --out runs/gpu_check            # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --models tiny --runs 2 --train-steps 6  # dry run
    python benchmarks/gpu_check.py --summarize runs/gpu_check      # the table from saved JSON

1. `rim bench latency` for each model shape (bf16, batch 1, 100-token question, 26 CoT
   tokens, 6 thoughts, 20 runs): TTFT of direct, RiM, Coconut, CoT, the plain-loop reference.
2. `rim bench train` (packed vs naive stage-1 RiM vs Coconut) on a GPT-2-sized model.
3. A 50-step RiM training run (`rim.trainer.train`, toy chain recipe, small model).
Each result is written to OUT/*.json as soon as it exists; a short table is printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

TARGETS = {"rim/direct": ("<=", 1.05), "coconut/rim": (">=", 4.0), "cot/rim": (">=", 15.0)}
OVERHEAD_MAX = 1.10  # our decode path vs the plain transformers loop


def _ok(value, op: str, bound: float) -> str:
    if value is None:
        return "-"
    return "ok" if (value <= bound if op == "<=" else value >= bound) else "MISS"


def _f(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def summarize(out: Path) -> str:
    """The short table: latency per model shape, train bench, training run."""
    lines = [
        "| model | direct ms | RiM ms | Coconut ms | CoT ms | RiM/direct | Coconut/RiM "
        "| CoT/RiM | worst ours/plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in sorted(out.glob("latency_*.json")):
        r = json.loads(f.read_text())
        ms, ra = r["ms"], r["ratios"]
        worst = max(
            (max(o["ttft"] or 0, o["latency"] or 0) for o in r["overhead"].values()), default=None
        )
        cells = [f"{_f(ra[k], '.2f')} {_ok(ra[k], *TARGETS[k])}" for k in TARGETS]
        lines.append(
            f"| {r['config']['model']} | {_f(ms['direct'])} | {_f(ms['rim'])} | "
            f"{_f(ms['coconut'])} | {_f(ms['cot'])} | "
            + " | ".join(cells)
            + f" | {_f(worst, '.2f')} {_ok(worst, '<=', OVERHEAD_MAX)} |"
        )
    if lines[2:]:
        r = json.loads(sorted(out.glob("latency_*.json"))[0].read_text())
        m = r["machine"]
        c = r["config"]
        lines.append(
            f"(TTFT medians of {c['runs']} runs, {c['dtype']}, batch {c['batch']}, "
            f"{m.get('gpu', m['cpu'])})"
        )
    tb = out / "train_bench.json"
    if tb.is_file():
        r = json.loads(tb.read_text())
        e, p = r["examples_per_s"], r["peak_mb"]
        lines += ["", "| train bench | examples/s | peak MB |", "|---|---|---|"]
        lines += [f"| {n} | {_f(e[n])} | {_f(p[n])} |" for n in e]
        pn = r["ratios"]["packed/naive"]
        lines.append(
            f"packed/naive {_f(pn, '.2f')} {_ok(pn, '>=', 3.0)}, packed/coconut "
            f"{_f(r['ratios']['packed/coconut'], '.2f')} ({r['config']['model']}, "
            f"batch {r['config']['batch']})"
        )
    tr = out / "train_run.json"
    if tr.is_file():
        r = json.loads(tr.read_text())
        lines += [
            "",
            f"RiM training run: {r['steps']} steps in {_f(r['train_s'])} s "
            f"({_f(r['examples_per_s'])} examples/s), best valid accuracy "
            f"{_f(r['best_valid_accuracy'], '.3f')}, device {r['device']}",
        ]
    return "\n".join(lines)


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_run(out: Path, steps: int, device: str) -> dict:
    """A short RiM training run of the toy chain recipe (small Llama-style model)."""
    from rim.config import load_config
    from rim.trainer import train

    recipe = Path(__file__).resolve().parents[1] / "configs" / "toy" / "chain_llama_rim.yaml"
    s1 = max(1, steps * 3 // 5)
    cfg = load_config(
        recipe,
        [
            f"curriculum.stage1_steps={s1}",
            f"curriculum.stage2_steps={max(1, steps - s1)}",
            "train.threads=null",
            "eval.val_limit=128",
        ],
    )
    if device == "cpu":
        cfg.train.threads = 1
    t0 = time.perf_counter()
    res = train(cfg, out / "train_run")
    wall = time.perf_counter() - t0
    return res | {
        "steps": steps,
        "wall_s": wall,
        "device": device,
        "examples_per_s": steps * cfg.train.batch_size / max(res["train_s"], 1e-9),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--models", default="gpt2,llama-1b,llama-3b")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--train-model", default="gpt2", help="model of the train bench")
    p.add_argument("--train-runs", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=50, help="steps of the RiM training run")
    p.add_argument("--summarize", metavar="DIR", help="only print the table of DIR")
    a = p.parse_args(argv)
    if a.summarize:
        print(summarize(Path(a.summarize)))
        return

    from rim.bench import latency_bench, train_bench

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    for m in [s for s in a.models.split(",") if s]:
        log(f"== latency {m} ({time.perf_counter() - t0:.0f} s)")
        res = latency_bench(
            m,
            a.device,
            a.dtype,
            batch=1,
            question_tokens=100,
            cot_tokens=26,
            thoughts=6,
            runs=a.runs,
            warmup=3,
        )
        (out / f"latency_{m}.json").write_text(json.dumps(res, indent=2))
        _free()
    if a.train_runs > 0:
        log(f"== train bench {a.train_model} ({time.perf_counter() - t0:.0f} s)")
        res = train_bench(a.train_model, a.device, a.dtype, runs=a.train_runs, warmup=2)
        (out / "train_bench.json").write_text(json.dumps(res, indent=2))
        _free()
    if a.train_steps > 0:
        log(f"== RiM training run, {a.train_steps} steps ({time.perf_counter() - t0:.0f} s)")
        res = train_run(out, a.train_steps, a.device)
        (out / "train_run.json").write_text(json.dumps(res, indent=2))
    log(f"== done in {time.perf_counter() - t0:.0f} s")
    print(summarize(out))


if __name__ == "__main__":
    main()
