"""GPU check of the training path (issue 29): FlexAttention, the speed options, a GSM8K run.

    PYTHONPATH=src python benchmarks/gpu_train_check.py --out "$OUT"       # a CUDA machine
    PYTHONPATH=src python benchmarks/gpu_train_check.py --plan-only --device cpu  # what it runs
    PYTHONPATH=src python benchmarks/gpu_train_check.py --summarize "$OUT"

Written for a machine with torch and transformers but nothing installable and no network:
no pip, no download (models are random-init from a config, tokenizers built from the data).
Run from the repository root; the GSM8K-Aug files are looked up in --data-dir, then
../shared/data/gsm8k_aug and shared/data/gsm8k_aug. Phases (`--phases`), each writing
OUT/<phase>.json as soon as it ends (an error too, with its last lines):

1. options: a few RiM stage-1 optimizer steps on GSM8K rows (small Llama shape) for each
   training option against the fp32 sdpa reference: flex, gradient checkpointing, compile,
   fp16 (grad scaler), bf16. Losses side by side, the largest relative gap, pass/fail.
2. bench: one RiM training step (forward + backward, bf16 autocast) on GSM8K rows with a
   Llama-shaped model (--bench-model), sdpa with the dense mask against FlexAttention with a
   BlockMask, one example per row and packed rows: step ms, real tokens/s, peak MB, the loss
   gap.
3. gpt2: the GPT-2 GSM8K RiM recipe (configs/gsm8k/gpt2_rim.yaml) for --steps optimizer steps
   with a random-init GPT-2-small-shaped model: losses, examples/s, valid accuracy.
4. cli_bench: `rim bench train --json` as this checkout's CLI has it (with flex too when it
   takes an attention flag).

A dry run on a CPU (flex and fp16 are refused there, as they should be):
    PYTHONPATH=src python benchmarks/gpu_train_check.py --device cpu --dtype float32 \
      --options-model tiny --option-steps 2 --options flex,gradient_checkpointing,fp16 \
      --steps 4 --val-limit 4 --gpt2-set model.size=tiny --bench-model tiny --bench-batch 2 \
      --bench-steps 2 --pack-tokens 600 --precision no --out runs/gtc
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "yaml", "tqdm")
DATA_FILES = ("train_no_aug.txt", "valid.txt", "test.txt")
# option -> (recipe overrides, largest relative loss gap to the fp32 sdpa reference)
OPTIONS = {
    "flex": (["model.attn_implementation=flex"], 2e-3),
    "gradient_checkpointing": (["train.gradient_checkpointing=true"], 1e-3),
    "compile": (["train.compile=true"], 2e-3),
    "fp16": (["train.mixed_precision=fp16"], 3e-2),
    "bf16": (["train.mixed_precision=bf16"], 3e-2),
    "flex+compile+bf16": (
        ["model.attn_implementation=flex", "train.compile=true", "train.mixed_precision=bf16"],
        3e-2,
    ),
}


def fail(msg: str) -> None:
    print(f"gpu_train_check: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def log(msg: str) -> None:
    print(f"[gpu_train_check] {msg}", file=sys.stderr, flush=True)


def preflight(device: str, data_dir: str | None) -> tuple[dict, Path]:
    """Versions, imports, CUDA and data, or one clear line and exit 2."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"missing Python packages: {', '.join(missing)} (nothing can be installed here)")
    try:
        import rim  # noqa: F401
    except ImportError as err:
        fail(f"cannot import rim ({err}); run from the repo root with PYTHONPATH=src")
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__}
    env["accelerate"] = importlib.import_module("accelerate").__version__
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            fail("torch sees no CUDA device (pass --device cpu for a dry run)")
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        fail(f"torch {torch.__version__} has no FlexAttention (torch >= 2.5 needed)")
    candidates = [ROOT.parent / "shared/data/gsm8k_aug", ROOT / "shared/data/gsm8k_aug"]
    candidates = [Path(data_dir)] if data_dir else candidates
    for folder in candidates:
        if all((folder / f).is_file() for f in DATA_FILES):
            return env, folder.resolve()
    fail(f"no GSM8K-Aug files ({', '.join(DATA_FILES)}) in {', '.join(map(str, candidates))}")


def _data(folder: Path, train_limit: int | None) -> list[str]:
    sets = [
        f"data.train.path={folder / 'train_no_aug.txt'}",
        f"data.valid.path={folder / 'valid.txt'}",
        f"data.test.path={folder / 'test.txt'}",
    ]
    return sets + ([f"data.train.limit={train_limit}"] if train_limit else [])


def plans(a, data: Path) -> dict[str, tuple[str, list[str]]]:
    """Every recipe the check trains: name -> (recipe file, overrides)."""
    llama = str(ROOT / "configs/gsm8k/llama1b_rim.yaml")
    small = [
        "model.path=null", "model.tokenizer=null", f"model.size={a.options_model}",
        "train.mixed_precision=no", "train.stage2_dropout=null", "train.batch_size=16",
        "train.micro_batch_size=8", "train.lr=1e-3", "train.warmup=0.0",
        "curriculum.stage1_epochs=null", f"curriculum.stage1_steps={a.option_steps}",
        "curriculum.stage2_epochs=null", "curriculum.stage2_steps=1", "eval.val_limit=8",
    ] + _data(data, 512)  # fmt: skip
    out = {"options/reference": (llama, small)}
    for name, (sets, _) in OPTIONS.items():
        out[f"options/{name}"] = (llama, small + sets)
    s1 = max(1, a.steps * 2 // 3)
    out["gpt2"] = (
        str(ROOT / "configs/gsm8k/gpt2_rim.yaml"),
        [
            "model.path=null", "model.tokenizer=null", "model.arch=gpt2", "model.size=gpt2",
            "curriculum.stage1_epochs=null", f"curriculum.stage1_steps={s1}",
            "curriculum.stage2_epochs=null", f"curriculum.stage2_steps={max(1, a.steps - s1)}",
            "train.eval_every=0", "train.save_every=0", "train.log_every=10",
            f"eval.val_limit={a.val_limit}", f"train.mixed_precision={a.precision}",
        ]
        + _data(data, None)
        + list(a.gpt2_set),
    )  # fmt: skip
    out["bench"] = (
        llama,
        ["model.path=null", "model.tokenizer=null", f"model.size={a.bench_model}",
         "train.stage2_dropout=null"] + _data(data, 4 * a.bench_batch * (a.bench_steps + 4)),
    )  # fmt: skip
    return out


def _recipe(path: str, sets: list[str]):
    from rim.assembly import load_recipe

    return load_recipe(path, sets)


def _fresh_accelerate() -> None:
    """accelerate keeps one precision per process; every option here sets its own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _steps(path: str, sets: list[str], out: Path) -> list[float]:
    """`train.steps` of stage 1 through the real trainer (speed checks and options on)."""
    import torch

    from rim.assembly import assemble
    from rim.trainer import Trainer

    _fresh_accelerate()
    setup = assemble(_recipe(path, sets), log=lambda *_: None)
    trainer = Trainer(setup, out)
    stage = trainer.plan[0]
    trainer.new_optimizer(stage)
    losses = [trainer.step(stage) for _ in range(stage.steps)]
    del trainer, setup
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return losses


def phase_options(a, recipes: dict, out: Path) -> dict:
    path, sets = recipes["options/reference"]
    ref = _steps(path, sets, out / "opt_reference")
    res = {"reference (sdpa, fp32)": {"losses": ref}}
    for name, (_, tol) in OPTIONS.items():
        if name not in a.options.split(","):
            continue
        t0 = time.perf_counter()
        try:
            got = _steps(*recipes[f"options/{name}"], out / f"opt_{name}")
        except Exception as err:  # noqa: BLE001 - the check goes on, the error is the result
            res[name] = {"error": _err(err)}
            log(f"option {name}: {res[name]['error'].strip().splitlines()[-1]}")
            continue
        gap = max(abs(g - r) / abs(r) for g, r in zip(got, ref))
        res[name] = {"losses": got, "max_rel_gap": gap, "tolerance": tol, "ok": gap <= tol}
        res[name]["seconds"] = time.perf_counter() - t0
        log(f"option {name}: max relative loss gap {gap:.2e} (tolerance {tol:.0e})")
    return res


def phase_gpt2(a, recipes: dict, out: Path) -> dict:
    import torch

    from rim.trainer import train

    _fresh_accelerate()
    cfg = _recipe(*recipes["gpt2"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = train(cfg, out / "gpt2_rim", overwrite=True)
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "gpt2_rim/metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    steps = losses[-1][0] if losses else 0
    return res | {
        "steps": steps,
        "wall_s": wall,
        "examples_per_s": steps * cfg.train.batch_size / max(res["train_s"], 1e-9),
        "losses": losses,
        "valid": [r for r in recs if "valid_accuracy" in r],
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def _time_steps(setup, stage, batches, device, dtype) -> dict:
    """Forward + backward of `method.loss` over `batches`: the first 3 untimed."""
    import torch

    from rim.layout import pack

    method, model = setup.method, setup.model
    cuda = device.type == "cuda"

    def one(exs):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = method.loss(model, exs, stage, 0.0, len(exs), device)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach().float()

    for exs in batches[:3]:
        one(exs)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses, tokens = [], [], 0
    for exs in batches[3:]:
        t0 = time.perf_counter()
        losses.append(one(exs))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens += sum(len(pack(method.segments(e, stage, 0.0), method.eos_id)) for e in exs)
    times.sort()
    return {
        "step_ms": 1000 * times[len(times) // 2],
        "real_tokens_per_s": tokens / sum(times),
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "losses": [float(x) for x in losses],
    }


def phase_bench(a, recipes: dict, out: Path) -> dict:
    """sdpa (dense mask) against flex (BlockMask) on the same weights and batches."""
    import dataclasses

    import torch

    from rim import flex
    from rim.assembly import assemble, t_max

    _fresh_accelerate()
    setup = assemble(_recipe(*recipes["bench"]), log=lambda *_: None)
    device = torch.device(a.device)
    setup.model.to(device).train()
    dtype = getattr(torch, a.dtype)
    stage = setup.method.plan(len(setup.train), t_max(setup.train))[0]  # stage 1
    n, B = a.bench_steps + 3, a.bench_batch
    batches = [setup.train[i * B : (i + 1) * B] for i in range(n)]
    rows = {}
    for pack_tokens in (None, a.pack_tokens):
        if pack_tokens and not hasattr(setup.method.common, "pack_tokens"):
            continue  # this checkout has no row packing
        if pack_tokens:
            common = dataclasses.replace(setup.method.common, pack_tokens=pack_tokens)
            setup.method.common = common
        for attn in ("sdpa", flex.HF_NAME):
            if attn == flex.HF_NAME and device.type == "cpu":
                continue  # no FlexAttention backward on a CPU
            setup.model.set_attn_implementation(attn)
            key = f"{attn}/{'packed' if pack_tokens else 'one-per-row'}"
            try:
                rows[key] = _time_steps(setup, stage, batches, device, dtype)
            except Exception as err:  # noqa: BLE001
                rows[key] = {"error": _err(err)}
            log(f"bench {key}: {rows[key]}")
    for mode in ("one-per-row", "packed"):
        s, f = rows.get(f"sdpa/{mode}", {}), rows.get(f"{flex.HF_NAME}/{mode}", {})
        if "losses" in s and "losses" in f:
            gap = max(abs(x - y) / abs(x) for x, y in zip(s["losses"], f["losses"]))
            rows[f"flex/sdpa {mode}"] = {
                "speedup": s["step_ms"] / f["step_ms"],
                "max_rel_loss_gap": gap,
            }
    return {"model": a.bench_model, "batch": B, "dtype": a.dtype, "rows": rows}


def phase_cli_bench(a, recipes: dict, out: Path) -> dict:
    """`rim bench train --json` as this checkout's CLI has it."""
    env_py = [sys.executable, "-m", "rim", "bench", "train"]
    help_text = subprocess.run(env_py + ["--help"], capture_output=True, text=True).stdout
    base = env_py + ["--device", a.device, "--dtype", a.dtype, "--model", a.bench_model]
    base += ["--runs", "5", "--json"]
    if "--data" in help_text:
        base += ["--data", str(a.data_path / "test.txt")]
    flags = ("--attn-implementation", "--attention", "--attn")
    flag = next((f for f in flags if f in help_text), None)
    runs = {"sdpa": base + ([flag, "sdpa"] if flag else [])}
    if flag:
        runs["flex"] = base + [flag, "flex"]
    res = {}
    for name, cmd in runs.items():
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.cli_timeout)
        try:
            res[name] = json.loads(p.stdout) if p.returncode == 0 else {"error": p.stderr[-2000:]}
        except json.JSONDecodeError:
            res[name] = {"error": "not JSON: " + p.stdout[-500:]}
    if not flag:
        res["note"] = "this `rim bench train` takes no attention flag: flex is in bench.json"
    return res


def _err(err: BaseException) -> str:
    return "".join(traceback.format_exception(err)[-6:])[-3000:]


# in this order by default: the correctness checks first, the long run last
PHASES = {"options": phase_options, "bench": phase_bench, "gpt2": phase_gpt2}
PHASES["cli_bench"] = phase_cli_bench


def summarize(out: Path) -> str:
    lines = []
    for name in PHASES:
        f = out / f"{name}.json"
        if not f.is_file():
            lines.append(f"{name}: not run")
            continue
        r = json.loads(f.read_text())
        if "error" in r:
            lines.append(f"{name}: ERROR {r['error'].strip().splitlines()[-1]}")
        elif name == "options":
            for k, v in r.items():
                if not isinstance(v, dict) or "losses" in v and "ok" not in v:
                    continue  # the reference, the seconds
                cell = v.get("error", "").strip().splitlines()[-1:] or [
                    f"max relative loss gap {v['max_rel_gap']:.1e} (tolerance "
                    f"{v['tolerance']:.0e}) {'ok' if v['ok'] else 'MISS'}"
                ]
                lines.append(f"options {k}: {cell[0]}")
        elif name == "gpt2":
            lines.append(
                f"gpt2 recipe: {r['steps']} steps, {r['examples_per_s']:.0f} examples/s, "
                f"loss {r['losses'][0][1]:.3f} -> {r['losses'][-1][1]:.3f}, best valid "
                f"{r['best_valid_accuracy']:.3f}, peak {r['peak_mb']} MB"
            )
        elif name == "bench":
            for k, v in r["rows"].items():
                v = {x: y for x, y in v.items() if x != "losses"}
                lines.append(f"bench {r['model']} {k}: " + json.dumps(v)[:200])
        else:
            lines.append(f"{name}: " + json.dumps(r)[:300])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu_train_check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", help="bench autocast dtype")
    p.add_argument("--data-dir", help="folder with the GSM8K-Aug files")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--options-model", default="small", help="model size of the options phase")
    p.add_argument("--option-steps", type=int, default=4)
    p.add_argument("--options", default=",".join(OPTIONS), help="options phase: which ones")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of the GPT-2 run")
    p.add_argument("--precision", default="bf16", help="GPT-2 run: no | bf16 | fp16")
    p.add_argument("--val-limit", type=int, default=64)
    p.add_argument("--gpt2-set", action="append", default=[], help="more GPT-2 overrides")
    p.add_argument("--bench-model", default="llama-1b")
    p.add_argument("--bench-batch", type=int, default=16)
    p.add_argument("--bench-steps", type=int, default=8)
    p.add_argument("--pack-tokens", type=int, default=2048, help="bench: packed rows' budget")
    p.add_argument("--cli-timeout", type=int, default=240)
    p.add_argument("--plan-only", action="store_true", help="check and print the plan, run nothing")
    p.add_argument("--summarize", metavar="DIR")
    a = p.parse_args(argv)
    if a.summarize:
        print(summarize(Path(a.summarize)))
        return 0
    unknown = [x for x in a.phases.split(",") if x not in PHASES]
    if unknown:
        fail(f"--phases: unknown {', '.join(unknown)} (known: {', '.join(PHASES)})")
    env, data = preflight(a.device, a.data_dir)
    a.data_path = data
    recipes = plans(a, data)
    for name, (path, sets) in recipes.items():  # every recipe validates before any training
        try:
            _recipe(path, sets)
        except Exception as err:  # noqa: BLE001
            fail(f"{name}: {err}")
    if a.plan_only:
        print(json.dumps({"env": env, "data": str(data), "recipes": recipes}, indent=2))
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "env.json").write_text(json.dumps(env | {"argv": sys.argv}, indent=2))
    status = 0
    for name in a.phases.split(","):
        log(f"== {name}")
        t0 = time.perf_counter()
        try:
            res = PHASES[name](a, recipes, out)
        except Exception as err:  # noqa: BLE001
            res, status = {"error": _err(err)}, 1
            log(res["error"])
        res["seconds"] = time.perf_counter() - t0
        (out / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))
    print(summarize(out))
    return status


if __name__ == "__main__":
    sys.exit(main())
