"""Time to first answer token on the CPU: ONNX Runtime (`rim export --format onnx`) against
PyTorch (rim's own prefill, the path `rim generate` takes), for direct answering and RiM.

    python benchmarks/onnx_ttft.py                      # GPT-2 124M shape, ~5 min on 2 busy cores
    python benchmarks/onnx_ttft.py --model tiny --runs 5 --warmup 1   # a smoke run, seconds

The model is the random-init stock GPT-2 shape of `rim bench latency` (`rim.bench.models`,
GPT-2's vocabulary of 50257), in fp32; the ONNX graph is written by the same code as
`rim export --format onnx` (`rim.onnx_export.export_onnx`) and run by the same class as
`rim generate --runtime onnx` (`rim.onnx_runtime.OnnxReasoner`). One prompt each, batch 1:
a 100-token question (direct) and the same question followed by K = 8 blocks of M = 2 memory
tokens (RiM: 32 more prompt tokens). TTFT is the time from the prompt's ids to the first
token's id: the prefill and an argmax, in both runtimes (only the last position's logits are
computed in both). One thread each (torch.set_num_threads(1), ONNX Runtime's
intra_op_num_threads = 1); warm-up rounds first, then rounds in a rotating order
(`rim.bench.stats.rounds`), so background load hits every figure alike; medians.
Prints a Markdown table; `--json FILE` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ort_folder(model, tokenizer, prompt: list[int], folder: Path, threads: int):
    """The ONNX graph of `model` and the smallest rim.json `OnnxReasoner` reads."""
    from rim.onnx_export import export_onnx
    from rim.onnx_runtime import OnnxReasoner

    meta = {"onnx": export_onnx(model, prompt, folder), "prompt_suffix_ids": []}
    meta |= {"eos_token_id": tokenizer.eos_token_id, "max_new_tokens": 1}
    (folder / "rim.json").write_text(json.dumps(meta))
    tokenizer.save_pretrained(folder)
    return OnnxReasoner(folder, threads=threads)


def _timers(bm, ort, prompts: dict[str, list[int]]) -> dict:
    """name -> a function that returns the first token of its prompt."""
    from rim.decoding import prefill  # under torch.no_grad

    pad = bm.tokenizer.pad_token_id or 0

    def torch_first(p: list[int]):
        return lambda: int(prefill(bm.model, [p], pad).logits[0].argmax())

    def ort_first(p: list[int]):
        return lambda: ort.first_token(p)

    out = {}
    for name, p in prompts.items():
        out[f"{name}/torch"], out[f"{name}/onnxruntime"] = torch_first(p), ort_first(p)
    return out


def measure(timers: dict, warmup: int, runs: int) -> tuple[dict[str, list[float]], dict]:
    """(seconds per timed round per name, first token per name)."""
    from rim.bench.stats import rounds

    times: dict[str, list[float]] = {n: [] for n in timers}
    first = {}
    for _, timed, order in rounds(list(timers), warmup, runs):
        for name in order:
            t0 = time.perf_counter()
            first[name] = timers[name]()
            dt = time.perf_counter() - t0
            if timed:
                times[name].append(dt)
    return times, first


def table(res: dict) -> str:
    ms = res["ttft_ms"]
    lines = [
        "| method | prompt tokens | PyTorch TTFT ms | ONNX Runtime TTFT ms | ONNX Runtime / PyTorch |",
        "|---|---|---|---|---|",
    ]
    for m in ("direct", "rim"):
        t, o = ms[f"{m}/torch"], ms[f"{m}/onnxruntime"]
        lines.append(f"| {m} | {res['prompt_tokens'][m]} | {t:.1f} | {o:.1f} | {o / t:.2f} |")
    rt = ms["rim/torch"] / ms["direct/torch"]
    ro = ms["rim/onnxruntime"] / ms["direct/onnxruntime"]
    lines.append(f"\nRiM/direct TTFT: PyTorch {rt:.2f}, ONNX Runtime {ro:.2f}.")
    return "\n".join(lines)


def run(args) -> dict:
    import statistics

    import torch

    from rim.bench.models import load_bench_model, make_method, question_text

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    bm = load_bench_model(args.model, "cpu", "float32")
    question = question_text(bm.tokenizer, args.question_tokens)
    prompts = {
        name: make_method(
            name, bm.tokenizer, blocks=args.blocks, mem_tokens=args.mem_tokens
        ).prompt(question)
        for name in ("direct", "rim")
    }
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ort = _ort_folder(bm.model, bm.tokenizer, prompts["rim"], Path(tmp), args.threads)
        export_s = time.perf_counter() - t0
        times, first = measure(_timers(bm, ort, prompts), args.warmup, args.runs)
    return {
        "model": args.model,
        "params_m": round(bm.params / 1e6, 1),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)],  # before, after
        "versions": _versions(),
        "export_s": round(export_s, 1),
        "runs": args.runs,
        "warmup": args.warmup,
        "prompt_tokens": {k: len(v) for k, v in prompts.items()},
        "ttft_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
        "same_first_token": all(first[f"{m}/torch"] == first[f"{m}/onnxruntime"] for m in prompts),
    }


def _versions() -> dict:
    import onnxruntime
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2", help="a rim.bench model name (default gpt2)")
    p.add_argument("--question-tokens", type=int, default=100)
    p.add_argument("--blocks", type=int, default=8, help="K")
    p.add_argument("--mem-tokens", type=int, default=2, help="M")
    p.add_argument("--runs", type=int, default=20, help="timed rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="threads of each runtime")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "ttft_ms"}))
    print(table(res))


if __name__ == "__main__":
    main()
