"""Command line: rim train | eval | probe | inspect | generate | demo | sweep | bench | export.

    rim train --config configs/toy/llama_rim.yaml --out runs/x [--set train.lr=1e-3 ...]
    rim eval --checkpoint runs/x/best --data ../shared/data/prosqa/prosqa_valid.json
    rim generate --checkpoint runs/x/best --decoder all-blocks "3 + 4 + 2"

Bad input (data, config keys, paths) prints one line `rim: error: ...` and exits with 2;
an OS error while writing (full disk) exits with 74; a training run stopped by SIGTERM or
SIGINT saves a checkpoint and exits with 75 (see rim.errors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rim.errors import EXIT_INTERRUPTED, Preempted, RimError
from rim.io import check_writable


def _train(args: argparse.Namespace) -> None:
    from rim.assembly import load_recipe
    from rim.runs import is_main_rank
    from rim.scoring import check_testable, score_run
    from rim.trainer import train

    if not args.config and not args.resume:
        raise RimError(
            "train: needs --config RECIPE (e.g. configs/toy/pick_llama_rim.yaml) or --resume RUN;"
            " see rim train --help"
        )
    if args.overwrite and (args.resume or args.resume_if_exists):
        raise RimError("--overwrite: starts afresh; it cannot be combined with a resume")
    resume = args.resume
    if args.resume_if_exists:
        if args.resume or not args.out or not args.config:
            raise RimError("--resume-if-exists: needs --config C and --out RUN (not --resume)")
        if any(Path(args.out, "checkpoints").glob("step-*")):
            resume = args.out
        elif _finished_as_asked(args):
            if args.test:  # a job stopped while its test files were scored
                score_run(Path(args.out))
            return
        else:  # a requeued job that never checkpointed: start afresh
            args.overwrite = True
    if args.allow_change and not resume:
        raise RimError("--allow-change: only with --resume (a fresh run takes any recipe)")
    changes = None
    if resume:
        from rim.checkpoint import resolve, warn

        ckpt = resolve(resume, report=warn if is_main_rank() else lambda line: None)
        out = args.out or _run_folder(resume)
        cfg, changes = _resume_config(args, ckpt, Path(out), resume)
    else:
        ckpt = None
        cfg = load_recipe(args.config, args.set)
        out = args.out or f"runs/{cfg.method}"
    if args.test:  # refused now, not after the training
        check_testable(cfg)
    result = train(cfg, out, resume=ckpt, overwrite=args.overwrite, changes=changes)
    if is_main_rank():  # one result line from a multi-process launch
        print(json.dumps(result))
        if args.test:  # then best/ on the test files, in this process (rim.scoring)
            score_run(Path(out))


def _finished_as_asked(args) -> bool:
    """--resume-if-exists on a finished run with no checkpoint left: nothing to resume.
    True (exit 0) when the recipe is the run's; another recipe is refused: retraining would
    delete its `final/`, `best/` and metrics (that takes --overwrite)."""
    from rim.assembly import load_recipe
    from rim.runs import config_changes, finished

    out = Path(args.out)
    if not finished(out):
        return False
    asked = load_recipe(args.config, args.set).to_dict()
    changes = config_changes(load_recipe(out / "config.yaml").to_dict(), asked)
    if changes:
        key, (was, now) = next(iter(changes.items()))
        raise RimError(
            f"--resume-if-exists: {out} is a finished run of another recipe ({key}: {was!r} -> "
            f"{now!r}) with no checkpoint to resume; retrain it with --overwrite"
        )
    print(f"rim: nothing to resume: {out} is finished (its final/ and best/ are kept)")
    return True


def _resume_config(args, ckpt: Path, out: Path, where: str):
    """The recipe to continue with, and its deliberate changes from the checkpoint's.

    The checkpoint's own recipe, unless `--config`, `--set` or an edit of `RUN/config.yaml`
    asks for another; then every differing key must be named by `--allow-change`.
    """
    from rim.assembly import load_recipe
    from rim.runs import check_changes, config_changes, edited_config

    saved = load_recipe(ckpt / "config.yaml")
    source = args.config or edited_config(out) or ckpt / "config.yaml"
    cfg = load_recipe(source, args.set)
    changes = config_changes(saved.to_dict(), cfg.to_dict())
    check_changes(changes, args.allow_change, where)
    return cfg, changes


def _run_folder(resume: str) -> str:
    """`--resume runs/x/checkpoints/step-N` continues in `runs/x`, like `--resume runs/x`."""
    p = Path(resume)
    return str(p.parent.parent) if p.parent.name == "checkpoints" else resume


def _load_eval_data(args, cfg):
    from rim.sources import load_split, read_path

    if args.data:
        return read_path(args.data, args.format, limit=args.limit, key="--data")
    split = getattr(cfg.data, args.split, None)
    if split is None:
        raise RimError(f"--split {args.split}: the checkpoint's recipe has no data.{args.split}")
    examples = load_split(split, f"data.{args.split}")
    return examples[: args.limit] if args.limit else examples


def _eval(args: argparse.Namespace) -> None:
    from rim.decoders import check_questions, default_for
    from rim.evaluation import evaluate
    from rim.reasoner import Reasoner
    from rim.report import format_table
    from rim.scoring import write_record

    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval.json"
    check_writable(out, is_file=True)  # before the evaluation, not after it
    r = Reasoner.load(args.checkpoint, args.device, args.verify)
    examples = _load_eval_data(args, r.config)
    source = args.data or f"data.{args.split}"
    where = lambda i: f"{source}: example {i + 1}"  # noqa: E731
    check_questions(
        r.method, r.model, [e.question for e in examples], args.blocks, args.truncate, where
    )
    decoder = args.decoder or default_for(r.method)
    options = _decoder_options(args, decoder)
    res = evaluate(
        r.method, r.model, examples, args.batch_size, args.blocks, decoder,
        args.timing_examples, truncate=args.truncate, options=options,
    )  # fmt: skip
    print(format_table({r.method.name: res}, EVAL_FIELDS))
    if "mean_blocks" in res:
        print(
            f"mean blocks {res['mean_blocks']:.2f}, prompt tokens {res['mean_prompt_tokens']:.1f}"
        )
    res |= r.method.memory_report(r.model, examples, args.batch_size)  # RiM's state head
    for key in ("per_block_accuracy", "state_accuracy_per_block", "state_token_accuracy_per_block"):
        if key in res:
            print(f"{key.replace('_', ' ')}: " + " ".join(f"{a:.3f}" for a in res[key]))
    if args.select:
        res |= _selection(args, r, examples)
    if args.explain:
        res |= _explained(args, r, examples)
    write_record(res, out, str(args.checkpoint), args.data or args.split, decoder)
    print(f"wrote {out}")


def _decoder_options(args, decoder: str) -> dict | None:
    """early-exit: `--threshold` and the checkpoint's probe (without one: answer stability)."""
    if decoder != "early-exit":
        return None
    from rim.probe import PROBE_JSON, Probe

    ckpt = Path(args.checkpoint)
    probe = Probe.load(ckpt) if (ckpt / PROBE_JSON).is_file() else None
    if args.threshold is not None and probe is None:
        raise RimError(f"--threshold: {ckpt} has no probe (run: rim probe --checkpoint {ckpt})")
    return {"threshold": 0.9 if args.threshold is None else args.threshold, "probe": probe}


def _selection(args, r, examples) -> dict:
    """`--select`: the accuracy of each way to pick one of the K block answers (rim.probe)."""
    from rim.probe import SELECTIONS, Probe, block_states, selection_report

    hows = [h.strip() for h in args.select.split(",") if h.strip()]
    bad = [h for h in hows if h not in SELECTIONS]
    if bad or not hows:
        raise RimError(
            f"--select: {bad[0] if bad else args.select!r} is not one of {', '.join(SELECTIONS)}"
        )
    probe = Probe.load(Path(args.checkpoint)) if "probe" in hows else None
    states, records = block_states(r.method, r.model, examples, args.batch_size, args.blocks)
    rep = selection_report(records, hows, probe.score(states) if probe else None)
    print("selection: " + ", ".join(f"{h} {a:.3f}" for h, a in rep["selection"].items()))
    if rep.get("probe_auroc") is not None:
        print(f"probe AUROC {rep['probe_auroc']:.3f} (layer {probe.layer})")
    return rep


def _explained(args, r, examples) -> dict:
    """`--explain`: how well each block spells the step it was grounded on (rim.explain)."""
    from rim.explain import step_accuracy

    rep = step_accuracy(r.method, r.model, examples, args.batch_size, args.blocks)
    per = " ".join(f"{a:.3f}" for a in rep["step_accuracy_per_block"])
    quiet = rep["quiet_after_steps"]
    print(f"step accuracy {rep['step_accuracy']:.3f}; per block: {per}", end="")
    print("" if quiet is None else f"; quiet after the last step {quiet:.3f}")
    return rep


def _probe(args: argparse.Namespace) -> None:
    from rim.probe import block_states, correctness, fit
    from rim.reasoner import Reasoner

    if args.split == "test" and not args.data:
        raise RimError("--split test: the probe and its layer are chosen on this data; use valid")
    check_writable(Path(args.checkpoint))  # probe.json goes there
    r = Reasoner.load(args.checkpoint, args.device, args.verify)
    examples = _load_eval_data(args, r.config)
    states, records = block_states(r.method, r.model, examples, args.batch_size)
    probe = fit(states, correctness(records), seed=args.seed)
    probe.save(Path(args.checkpoint))
    auroc = probe.info["selection_auroc"][probe.layer]
    print(
        f"probe: layer {probe.layer} of {states.shape[2] - 1} (held-out AUROC {auroc:.3f}, "
        f"{len(examples)} examples of {args.data or 'data.' + args.split}); "
        f"wrote {Path(args.checkpoint) / 'probe.json'}"
    )


def _inspect(args: argparse.Namespace) -> None:
    from rim.decoders import check_questions
    from rim.inspection import parse_thresholds, run_inspect
    from rim.reasoner import Reasoner

    thresholds = parse_thresholds(args.thresholds)
    check_writable(Path(args.out))  # before the analyses, not after them
    r = Reasoner.load(args.checkpoint, args.device, args.verify)
    examples = _load_eval_data(args, r.config)
    source = args.data or f"data.{args.split}"
    where = lambda i: f"{source}: example {i + 1}"  # noqa: E731
    check_questions(r.method, r.model, [e.question for e in examples], where=where)
    rep = run_inspect(
        r, Path(args.checkpoint), examples, Path(args.out), source,
        same_data=args.split == "valid" and not args.data, thresholds=thresholds,
        timing_examples=args.timing_examples, batch_size=args.batch_size,
    )  # fmt: skip
    print(f"inspect: {rep['n']} examples of {source}, K = {rep['blocks']}: final-block accuracy "
          f"{rep['final_accuracy']:.3f}, any block {rep['any_block_accuracy']:.3f}")  # fmt: skip
    print(f"probe: {rep['probe']['note']}" + (
        f" (AUROC {rep['probe_auroc']:.3f})" if rep["probe_auroc"] is not None else ""))  # fmt: skip
    print(f"wrote {Path(args.out) / 'report.md'}")


# flags that count something, and their least value: below it, one error line instead of a
# traceback deep in decoding (`--batch-size 0`) or a silent slice (`--limit -3`)
COUNTS = {"blocks": 1, "batch_size": 1, "limit": 1, "timing_examples": 0, "threads": 1}


def _check_counts(args: argparse.Namespace) -> None:
    for name, low in COUNTS.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            what = "K " if name == "blocks" else ""
            raise RimError(f"--{name.replace('_', '-')}: {what}must be >= {low}, got {value}")


EVAL_FIELDS = [
    ("accuracy", "final acc", ".3f"),
    ("any_block_accuracy", "any-block acc", ".3f"),
    ("forward_passes", "passes", ".2f"),
    ("generated_tokens", "gen tokens", ".2f"),
    ("ttft_ms", "TTFT ms", ".2f"),
    ("latency_ms", "latency ms", ".2f"),
]


def _generate(args: argparse.Namespace) -> None:
    if args.runtime == "onnx":
        return _generate_onnx(args)
    if args.runtime != "torch":
        raise RimError(f"--runtime {args.runtime}: not one of torch, onnx")
    from rim.decoders import get
    from rim.reasoner import Reasoner

    r = Reasoner.load(args.checkpoint, args.device, args.verify)
    get(args.decoder, r.method)
    if args.explain:
        from rim.explain import check_explainable

        check_explainable(r.method)
    answers = r.generate(args.questions, args.blocks, args.decoder, args.truncate)
    if args.explain:
        return _print_explained(r, args, answers)
    for q, a in zip(args.questions, answers):
        if isinstance(a, list):
            print(q)
            for k, text in enumerate(a, start=1):
                print(f"  block {k}: {text}")
        else:
            print(a)


def _generate_onnx(args: argparse.Namespace) -> None:
    """`--runtime onnx`: greedy answers after all K blocks from an ONNX export, on the CPU."""
    from rim.onnx_export import require_onnx
    from rim.onnx_runtime import OnnxReasoner

    require_onnx("--runtime onnx")
    unsupported = {
        "--blocks": args.blocks is not None,
        "--decoder": args.decoder != "final",
        "--explain": args.explain,
        "--truncate": args.truncate,
        "--device": args.device != "cpu",
    }
    for flag, used in unsupported.items():
        if used:
            raise RimError(f"{flag}: not with --runtime onnx (final answer, CPU; use torch)")
    for answer in OnnxReasoner(args.checkpoint, args.threads).generate(args.questions):
        print(answer)


def _print_explained(r, args, answers) -> None:
    """The answer (as the chosen decoder gives it), then the step each block spells."""
    from rim.explain import explain

    steps = explain(r.method, r.model, args.questions, args.blocks)
    for q, a, said in zip(args.questions, answers, steps):
        print(f"{q}\n  answer: {a[-1] if isinstance(a, list) else a}")
        for k, text in enumerate(said, start=1):
            print(f"  block {k}: {text or '(quiet)'}")


def _demo(args: argparse.Namespace) -> None:
    from rim.demo import run_demo

    run_demo(args)


def _sweep(args: argparse.Namespace) -> None:
    from rim.sweep import run_sweep

    run_sweep(args)


def _bench(args: argparse.Namespace) -> None:
    from rim.bench import run_bench

    run_bench(args)


def _export(args: argparse.Namespace) -> None:
    from rim.export import export

    export(
        args.checkpoint, args.out, args.format, args.lm_eval_data, args.lm_eval_format,
        args.lm_eval_limit, verbose=args.verbose, verify=args.verify,
    )  # fmt: skip


def _repeatable(p: argparse.ArgumentParser, flag: str, metavar: str, help: str) -> None:
    p.add_argument(flag, action="append", default=[], metavar=metavar, help=help)


def _flag(p: argparse.ArgumentParser, flag: str, help: str) -> None:
    p.add_argument(flag, action="store_true", help=help)


TRUNCATE = "drop the oldest tokens of a question too long for the model (default: an error)"
DECODER = "final | all-blocks | early-exit (rim.decoders; default: all-blocks for block methods)"


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a recipe")
    t.add_argument("--config", help="YAML recipe (configs/...)")
    _repeatable(
        t, "--set", "KEY=VALUE", "override a recipe key, e.g. --set train.lr=1e-3 (repeatable)"
    )
    t.add_argument("--out", help="run folder (default runs/<method>)")
    t.add_argument("--resume", help="continue from a run folder or checkpoint")
    for flag, text in [
        ("--resume-if-exists", "continue --out RUN if it has a checkpoint, else start it "
         "(for requeued jobs)"),
        ("--test", "then score best/ on data.test and each data.extra_tests file, into "
         "RUN/test_eval.json and RUN/test_eval.<file stem>.json (rim.scoring)"),
        ("--overwrite", "start afresh in an existing run folder (its old outputs removed first)"),
    ]:  # fmt: skip
        _flag(t, flag, text)
    _repeatable(t, "--allow-change", "KEY",
                "with --resume: allow this recipe key (or section) to differ (repeatable)")  # fmt: skip
    t.set_defaults(fn=_train)


def _verify_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify", action="store_true", default=None,
                   help="hash every file against the checkpoint's manifest (default: sizes, "
                   "and hashes when the folder is under 256 MB)")  # fmt: skip


def _checkpoint_data(p: argparse.ArgumentParser, split_help: str) -> None:
    """The checkpoint, the data it reads and how (shared by `eval` and `probe`)."""
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (e.g. RUN/best)")
    p.add_argument("--data", help="data file (any supported format)")
    p.add_argument(
        "--format",
        default="auto",
        help="auto | json | jsonl | icot | gsm8k | gsmhard | datasets (--data)",
    )
    p.add_argument("--split", default="valid", help=split_help)
    p.add_argument("--limit", type=int, help="use the first N examples only")
    p.add_argument("--batch-size", type=int, default=64, help="questions decoded together")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    _verify_flag(p)


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a checkpoint")
    _checkpoint_data(e, "recipe split when --data is not given")
    e.add_argument("--blocks", type=int, help="memory blocks to use (default K)")
    e.add_argument("--decoder", help=DECODER + "; early-exit: blocks one at a time")
    e.add_argument(
        "--threshold", type=float, help="early-exit: stop at this probe score (default 0.9)"
    )
    e.add_argument(
        "--timing-examples",
        type=int,
        default=16,
        help="batch-1 runs timed for TTFT and latency (0: no timing)",
    )
    e.add_argument("--out", help="JSON result (default CHECKPOINT/eval.json)")
    e.add_argument(
        "--select",
        help="final,probe,vote,oracle: accuracy of each way to pick a block's answer (rim.probe)",
    )
    _flag(e, "--explain", "also the step accuracy of each block (explain mode, rim.explain)")
    _flag(e, "--truncate", TRUNCATE)
    e.set_defaults(fn=_eval)


def _probe_parser(sub) -> None:
    q = sub.add_parser("probe", help="fit the correctness probe on the memory blocks (rim.probe)")
    _checkpoint_data(q, "recipe split (never test: the probe is selected on it)")
    q.add_argument("--seed", type=int, default=0, help="seed of the fit / selection split")
    q.set_defaults(fn=_probe)


def _inspect_parser(sub) -> None:
    i = sub.add_parser("inspect", help="one report on the memory blocks (rim.inspection)")
    _checkpoint_data(i, "recipe split when --data is not given (default valid)")
    i.add_argument("--out", required=True, help="report folder: report.md, report.json, PNGs")
    i.add_argument(
        "--thresholds",
        default="0.5,0.7,0.9,0.95,0.99",
        help="early-exit probe thresholds to simulate and time (comma-separated)",
    )
    i.add_argument(
        "--timing-examples",
        type=int,
        default=16,
        help="batch-1 runs timed per decoder for TTFT (0: no timing)",
    )
    i.set_defaults(fn=_inspect)


def _generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="answer questions")
    g.add_argument("--checkpoint", required=True, help="a checkpoint folder (e.g. RUN/best)")
    g.add_argument("questions", nargs="+", help="one or more questions (quote each)")
    g.add_argument("--blocks", type=int, help="memory blocks to use (default K)")
    g.add_argument("--decoder", default="final", help=DECODER.split(" (")[0] + " (default final)")
    _flag(g, "--explain", "also print the step each block holds (explain-mode checkpoints)")
    _flag(g, "--truncate", TRUNCATE)
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    _verify_flag(g)
    g.add_argument(
        "--runtime",
        default="torch",
        help="torch (a checkpoint, default) | onnx (a folder of rim export --format onnx)",
    )
    g.add_argument("--threads", type=int, help="--runtime onnx: intra-op threads (default: all)")
    g.set_defaults(fn=_generate)


def _demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="train every method on the toy task, one table")
    d.add_argument("--out", default="runs/demo", help="results folder (default runs/demo)")
    d.add_argument("--seeds", type=int, default=1, help="training seeds per method")
    _flag(d, "--quick", "a < 5 minute smoke version")
    _flag(
        d,
        "--resume",
        "continue a stopped demo in --out: finished jobs of the same recipe are kept, unfinished ones resume from their last checkpoint",
    )
    d.add_argument("--methods", help="comma-separated (default: every registered method)")
    d.add_argument("--workers", type=int, default=2, help="parallel training processes")
    d.set_defaults(fn=_demo)


def _sweep_parser(sub) -> None:
    s = sub.add_parser("sweep", help="a grid: methods x seeds x recipe values, one table, plots")
    s.add_argument("--config", required=True, help="grid file (configs/sweeps/..., rim.grid)")
    s.add_argument("--out", required=True, help="results folder (rerun it to resume)")
    _repeatable(
        s, "--set", "KEY=VALUE", "override a recipe key in every run, before the grid's values"
    )
    s.add_argument("--workers", type=int, default=2, help="parallel training processes")
    _flag(s, "--dry-run", "print the cells and their budgets; run nothing")
    _flag(s, "--report-only", "write the tables and plots of the finished runs; run nothing")
    what = "time TTFT of every cell's best/ together on N test questions (rim.timing)"
    s.add_argument("--timing", type=int, default=0, metavar="N", help=what)
    what = "train only the cells or runs whose name matches (fnmatch: 'rim/*', 'rim/*/s0')"
    _repeatable(s, "--only", "PATTERN", what)
    s.set_defaults(fn=_sweep)


def _bench_parser(sub) -> None:
    """One sub-parser per kind: its --help says what it measures, lists its own options only."""
    from rim.bench.run import DEFAULTS, MODES, option_help

    b = sub.add_parser("bench", help="latency, training-throughput and any-block benchmarks")
    kinds = b.add_subparsers(dest="kind", required=True, metavar="KIND", help="what to measure")
    for kind, defaults in DEFAULTS.items():
        k = kinds.add_parser(kind, help=MODES[kind][0], description=MODES[kind][1])
        for name, value in defaults.items():  # None: the kind's default (`run_bench`)
            flag, text = "--" + name.replace("_", "-"), option_help(kind, name)
            k.add_argument(flag, type=type(value), default=None, help=text)
        k.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
        k.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
        k.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
        _flag(k, "--json", "print the result as JSON")
        k.set_defaults(fn=_bench)


def _export_parser(sub) -> None:
    x = sub.add_parser("export", help="merge LoRA and write a plain HF (or ONNX) model folder")
    x.add_argument("--checkpoint", required=True, help="a checkpoint folder (e.g. RUN/best)")
    x.add_argument("--out", required=True, help="the folder to write (a plain HF model)")
    x.add_argument(
        "--format",
        default="hf",
        help="hf (default: safetensors + an lm-eval task) | onnx (ONNX Runtime, KV cache)",
    )
    x.add_argument(
        "--lm-eval-data",
        help="examples of the lm-eval task (any format rim reads; default: the recipe's test "
        "split, else valid)",
    )
    x.add_argument(
        "--lm-eval-format", default="auto", help="format of --lm-eval-data (as rim eval --format)"
    )
    x.add_argument(
        "--lm-eval-limit", type=int, help="at most N examples in the lm-eval task (default 1000)"
    )
    _flag(x, "--verbose", "--format onnx: print the exporter's messages (else OUT/onnx_export.log)")
    _verify_flag(x)
    x.set_defaults(fn=_export)


def parser() -> argparse.ArgumentParser:
    from rim import __version__

    p = argparse.ArgumentParser(prog="rim", description="Reasoning in Memory")
    p.add_argument("--version", action="version", version=f"rim {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _eval_parser, _probe_parser, _generate_parser, _demo_parser):
        add(sub)
    _sweep_parser(sub)
    _bench_parser(sub)
    _export_parser(sub)
    _inspect_parser(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from rim.progress import live

    if not live():  # Hugging Face's bars too ("Writing model shards"): no redraws in a log
        from transformers.utils import logging

        logging.disable_progress_bar()
    try:
        _check_counts(args)
        args.fn(args)
    except Preempted as err:
        print(f"rim: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except RimError as err:
        print(f"rim: error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("rim: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
