"""The training loop: one explicit pass over the method's stage plan.

    rim train --config configs/toy/llama_rim.yaml --out runs/x
    accelerate launch --config_file configs/accelerate/ddp.yaml -m rim train --config ... --out runs/x
    rim train --resume runs/x                                     # after a crash: exact resume
    rim train --config C --out runs/x --resume-if-exists          # a requeued (preempted) job

Each optimizer step consumes one global batch from a seeded example stream (resumable by
its cursor); every process takes its share, split into micro-batches. The loss is divided by
the global batch, so accumulation and process count do not change the gradient. At a stage
switch the optimizer and the LR schedule restart. Validation (never test) picks `best/`.
SIGTERM or SIGINT finishes the current optimizer step, writes a checkpoint and exits with
`EXIT_PREEMPTED`; a second signal stops at once. One process per run folder (rim.runs).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from rim import fsdp, progress, runs
from rim.config import Config, save_config
from rim.curriculum import Stage, stage_progress, warmup_constant
from rim.data import Example, load_split
from rim.errors import Preempted, RimError
from rim.evaluation import evaluate
from rim.io import atomic_dir, os_error, storage_error
from rim.memory import memory_tokens
from rim.methods import Method, method_class
from rim.model import (
    build_model,
    build_tokenizer,
    load_pretrained,
    load_tokenizer,
    max_positions,
    resize_for,
    save_meta,
    wrap_lora,
)


@dataclass
class Setup:
    cfg: Config
    model: torch.nn.Module
    tokenizer: object
    method: Method
    train: list[Example]
    valid: list[Example]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(cfg: Config, log=print) -> Setup:
    """Data, tokenizer, model and method for `cfg` (no training state)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    d = cfg.data
    train = load_split(**vars(d.train))
    valid = load_split(**vars(d.valid))
    cls = method_class(cfg.method)
    new_tokens = cls.new_tokens(cfg)
    if cfg.model.path is None:
        if cfg.model.tokenizer:
            tok = load_tokenizer(cfg.model.tokenizer)
        else:
            texts = [e.question for e in train] + [s for e in train for s in e.steps]
            texts += sorted({e.step_sep for e in train})  # the CoT's own ` + ` is a token too
            texts += [e.answer for e in train] + [cfg.eval.answer_marker]
            tok = build_tokenizer(texts)
        memory_ids = _add_tokens(tok, new_tokens)
        model = build_model(cfg.model, vocab_size=len(tok), max_positions=_positions_needed(cfg))
    else:
        if not Path(cfg.model.path).is_dir():  # before the tokenizer, which defaults to it
            raise RimError(f"model.path: {cfg.model.path}: no such model folder")
        key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
        tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path, key)
        memory_ids = _add_tokens(tok, new_tokens)
        model = load_pretrained(cfg.model)
    resize_for(model, tok)
    if cfg.model.path is not None and not cfg.model.full_finetune:
        model = wrap_lora(model, cfg.model, memory_ids)
    mem = memory_tokens(tok, cfg.memory) if cls.uses_blocks else None
    method = cls(cfg, tok, mem)
    model = method.attach(model)  # method-owned modules (CODI's projection)
    train = _check_lengths(method, model, train, cfg, "data.train")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(
        f"[rim] {cfg.method}: {len(train)} train / {len(valid)} valid examples, "
        f"{n_params / 1e6:.2f}M trainable parameters"
    )
    return Setup(cfg, model, tok, method, train, valid)


def _add_tokens(tok, strings: list[str]) -> list[int]:
    from rim.memory import add_special_tokens

    return add_special_tokens(tok, strings) if strings else []


def _positions_needed(cfg: Config) -> int:
    return cfg.data.max_length or 1024


def _check_lengths(method: Method, model, examples: list[Example], cfg: Config, key: str):
    """Drop (and count) or reject examples whose training sequence exceeds the model's limit."""
    limit = cfg.data.max_length or max_positions(model)
    if limit is None:
        return examples
    stages = method.plan(max(len(examples), 1), _t_max(examples))
    kept = []
    for i, ex in enumerate(examples):
        n = max(method.train_length(ex, s) for s in stages)
        if n <= limit:
            kept.append(ex)
        elif cfg.data.too_long == "error":
            raise RimError(f"{key}: example {i + 1} needs {n} tokens > max_length {limit}")
    if len(kept) < len(examples):
        print(f"[rim] skipped {len(examples) - len(kept)} examples longer than {limit} tokens")
    if not kept:
        raise RimError(f"{key}: no example fits in {limit} tokens")
    return kept


def _t_max(examples: list[Example]) -> int:
    return max((len(e.steps) for e in examples), default=0)


class ExampleStream:
    """Seeded, resumable order: epoch e is permutation(seed + e); `cursor` counts examples."""

    def __init__(self, n: int, seed: int, cursor: int = 0):
        self.n, self.seed, self.cursor = n, seed, cursor
        self._epoch, self._perm = -1, None

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, i = divmod(self.cursor, self.n)
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm, self._epoch = torch.randperm(self.n, generator=g).tolist(), epoch
            out.append(self._perm[i])
            self.cursor += 1
        return out


def set_dropout(model: torch.nn.Module, p: float | None) -> None:
    if p is None:
        return
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        if hasattr(m, "attention_dropout") and isinstance(m.attention_dropout, float):
            m.attention_dropout = p


def save_model(
    setup: Setup, model, path: Path, state_dict: dict | None = None, run: dict | None = None
) -> None:
    """A loadable checkpoint: weights (or adapter), tokenizer, config.yaml and rim.json.

    `state_dict`: the gathered full weights when the model is sharded (FSDP). `run`: the run
    id, branch and step that wrote it (so a resumed branch knows which `best/` is its own).
    """

    def write(tmp: Path) -> None:
        extra = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
        # the adapter's trainable-token rows hold the new embeddings; the rest is the base's
        setup.method.save_modules(model, tmp, state_dict)  # before: HF prunes state_dict
        model.save_pretrained(tmp, state_dict=state_dict, **extra)
        setup.tokenizer.save_pretrained(tmp)
        save_config(setup.cfg, tmp / "config.yaml")
        adapter = setup.cfg.model.path is not None and not setup.cfg.model.full_finetune
        meta = setup.method.meta() | {"adapter": adapter, "base_model": setup.cfg.model.path}
        save_meta(tmp, meta | {"format": 1} | ({"run": run} if run else {}))

    atomic_dir(path, write)


class Trainer:
    def __init__(self, setup: Setup, out: str | Path, accelerator: Accelerator | None = None):
        self.s = setup
        self.cfg = setup.cfg
        self.out = Path(out)
        self.acc = accelerator or make_accelerator(self.cfg.train.mixed_precision)
        if fsdp.requested(self.cfg.train.fsdp) and self.acc.num_processes > 1:
            self.model = fsdp.shard(setup.model, self.acc.device)
        else:
            self.model = self.acc.prepare_model(setup.model)
        self.plan = setup.method.plan(len(setup.train), _t_max(setup.train))
        self.stream = ExampleStream(len(setup.train), self.cfg.train.seed)
        self.stage_index, self.step_in_stage, self.global_step = 0, 0, 0
        self.best = -1.0
        self.optimizer = self.scheduler = None
        self.main = self.acc.is_main_process
        self.run_id, self.branch = runs.new_run_id(), runs.new_run_id()
        self.resumed_from: int | None = None  # step of the checkpoint this branch resumed
        self.superseded = False  # the abandoned branch's later outputs moved aside
        self.stop_signal: str | None = None
        # FSDP shards the weights: forward passes and weight gathering need every process
        self.sharded = fsdp.is_sharded(self.model)
        n = self.acc.num_processes
        if self.sharded and self.cfg.train.batch_size % n:  # every process: the same passes
            raise RimError(f"train.batch_size: must be a multiple of the {n} FSDP processes")

    # ---- state ----
    def _new_optimizer(self, stage: Stage) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=self.cfg.train.weight_decay)
        frac = self.cfg.train.warmup if stage.warmup is None else stage.warmup
        warm = int(frac * stage.steps)
        if self.cfg.train.lr_schedule == "cosine":
            sched = get_cosine_schedule_with_warmup(opt, warm, stage.steps)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_constant(warm))
        # plain optimizer: gradient sync is DDP's, accumulation is ours (see `step`)
        self.optimizer, self.scheduler = opt, sched
        set_dropout(self.model, stage.dropout)

    def log(self, record: dict) -> None:
        if self.main:
            file = self.out / "metrics.jsonl"
            try:
                with open(file, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                raise storage_error(file, err) from None

    def _run_info(self) -> dict:
        return {"id": self.run_id, "branch": self.branch, "step": self.global_step}

    def _save_model(self, name: str) -> None:
        """`final/` or `best/` (a collective call under FSDP: every process gathers)."""
        full = fsdp.full_state_dict(self.model) if self.sharded else None
        if self.main:
            model = self.acc.unwrap_model(self.model)
            save_model(self.s, model, self.out / name, full, self._run_info())

    # ---- one optimizer step ----
    def step(self, stage: Stage) -> float:
        t = self.cfg.train
        idx = self.stream.take(t.batch_size)
        mine = idx[self.acc.process_index :: self.acc.num_processes]
        micro = t.micro_batch_size or t.batch_size
        chunks = [mine[i : i + micro] for i in range(0, len(mine), micro)] or [[]]
        progress = stage_progress(self.step_in_stage, stage.steps)
        self.model.train()
        total = 0.0
        for j, chunk in enumerate(chunks):
            examples = [self.s.train[i] for i in chunk]
            sync = j == len(chunks) - 1
            ctx = self.acc.no_sync(self.model) if not sync else _null()
            with ctx, self.acc.autocast():
                if examples:
                    loss = self.s.method.loss(
                        self.model, examples, stage, progress, t.batch_size, self.acc.device
                    )
                else:  # an idle process still joins the gradient all-reduce
                    loss = sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
                self.acc.backward(loss * self.acc.num_processes)
            total += loss.detach().float().item()
        if self.acc.num_processes > 1:
            total = self.acc.reduce(torch.tensor(total, device=self.acc.device), "sum").item()
        # the norm is also the overflow check (a finite loss can still give inf gradients)
        norm = self.acc.clip_grad_norm_(self.model.parameters(), t.grad_clip or math.inf)
        norm = float(fsdp.replicated(norm)) if norm is not None else 0.0
        if not (math.isfinite(total) and math.isfinite(norm)):  # before the update: the
            from rim.checkpoint import find_latest  # weights and checkpoints stay good

            good = find_latest(self.out)
            raise RimError(
                f"train: non-finite loss or gradient (loss {total}, gradient norm {norm}) "
                f"at step {self.global_step + 1} ({stage.name} step {self.step_in_stage + 1});"
                " stopped, last good checkpoint: "
                + (str(good) if good else "none written yet (set train.save_every)")
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    # ---- the loop ----
    def fit(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.main:
            runs.write_run(
                self.out, self.run_id, yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
            )
        t0 = time.perf_counter()
        with self._signals():
            while self.stage_index < len(self.plan):
                stage = self.plan[self.stage_index]
                if self.optimizer is None:
                    self._new_optimizer(stage)
                self._run_stage(stage)
                self.stage_index += 1
                self.step_in_stage = 0
                self.optimizer = None
                self.save_resumable()
                self._stop_if_asked(saved=True)
        train_s = time.perf_counter() - t0
        self._save_model("final")
        if not (self.out / "best").exists():
            self._save_model("best")
        self.log({"event": "done", "train_s": train_s, "best_valid_accuracy": self.best})
        return {"train_s": train_s, "best_valid_accuracy": self.best}

    # ---- preemption ----
    @contextlib.contextmanager
    def _signals(self):
        """SIGTERM/SIGINT set `stop_signal`; the loop saves and stops after the current step."""
        old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name

    def _stop_if_asked(self, saved: bool) -> None:
        """Stop (all processes at the same step) once a signal came: checkpoint, then raise."""
        flag = float(self.stop_signal is not None)
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(torch.tensor(flag, device=self.acc.device), "sum").item()
        if not flag:
            return
        if not saved:
            self.save_resumable()
        raise Preempted(
            f"stopped by {self.stop_signal or 'a signal'} at step {self.global_step}; "
            f"resume with: rim train --resume {self.out}"
        )

    def _run_stage(self, stage: Stage) -> None:
        t = self.cfg.train
        bar = tqdm(
            total=stage.steps,
            initial=self.step_in_stage,
            desc=f"{self.cfg.method}:{stage.name}",
            disable=not self.main or not progress.live(),
            dynamic_ncols=True,
        )
        logged = self.main and progress.enabled() and not progress.live()
        status = progress.Status()
        tick, seen = time.perf_counter(), 0
        while self.step_in_stage < stage.steps:
            loss = self.step(stage)
            self.step_in_stage += 1
            self.global_step += 1
            seen += t.batch_size
            rate = seen / max(time.perf_counter() - tick, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate:.0f}")
            if logged and status.due():  # in a log: a line every 30 s, not a redrawn bar
                print(
                    f"[rim] {bar.desc} step {self.step_in_stage}/{stage.steps}: "
                    f"loss {loss:.4f}, {rate:.0f} examples/s",
                    flush=True,
                )
            if self.global_step % t.log_every == 0 or self.step_in_stage == stage.steps:
                self.log(
                    {
                        "stage": stage.name,
                        "step": self.global_step,
                        "stage_step": self.step_in_stage,
                        "loss": loss,
                        "lr": self.scheduler.get_last_lr()[0],
                        "examples_per_s": rate,
                    }
                )
            last = self.step_in_stage == stage.steps
            if (t.eval_every and self.global_step % t.eval_every == 0) or last:
                self.validate(stage)
            saved = bool(t.save_every and self.global_step % t.save_every == 0 and not last)
            if saved:
                self.save_resumable()
            if not last:  # at a stage end fit() saves first
                self._stop_if_asked(saved)
        bar.close()

    def validate(self, stage: Stage) -> float:
        if not self.main and not self.sharded:
            self.acc.wait_for_everyone()
            return self.best
        e = self.cfg.eval
        valid = self.s.valid[: e.val_limit] if e.val_limit else self.s.valid
        model = self.acc.unwrap_model(self.model)
        # sharded: every process decodes the same examples (identical steps) through FSDP
        res = evaluate(
            self.s.method,
            self.model if self.sharded else model,
            valid,
            e.batch_size,
            all_blocks=False,
            timing_examples=0,
            progress=False,
        )
        if self.sharded:
            fsdp.reshard(self.model)
        acc = res["accuracy"]
        self.log(
            {
                "stage": stage.name,
                "step": self.global_step,
                "valid_accuracy": acc,
                "valid_token_accuracy": res["token_accuracy"],
            }
        )
        # only the last stage trains what inference runs (RiM stage 2, Coconut's final number of
        # thoughts, iCoT's full removal), so only it may provide best/; ties go to the later one.
        # A stage split in several (one optimizer each) marks its parts with `selects_best`.
        final = stage.options.get("selects_best", stage.index == len(self.plan) - 1)
        if final and acc >= self.best:
            self.best = acc
            self._save_model("best")
        self.acc.wait_for_everyone()
        return acc

    # ---- resumable checkpoints (see rim.checkpoint for loading) ----
    def save_resumable(self) -> None:
        from rim.checkpoint import save_state

        save_state(self)


def make_accelerator(mixed_precision: str = "no") -> Accelerator:
    """The Accelerator for `rim train`, launched plainly, by `accelerate launch` or `torchrun`.

    accelerate treats a launch on a machine without GPUs as single-process unless told `cpu`;
    then each process would train alone and all of them would write the run folder. So a
    multi-process launch without a GPU runs DDP on CPU over gloo (no NCCL needed).
    bf16 is autocast with fp32 master weights; the model is never cast for training.
    FSDP (configs/accelerate/fsdp.yaml) is rim's own (rim.fsdp), so accelerate is kept out
    of it: its FSDP2 wants one model and one optimizer prepared together, rim builds an
    optimizer per stage, and on a CPU accelerate silently runs DDP instead.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    asked = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=world > 1 and not gpu)
    finally:
        if asked is not None:
            os.environ["ACCELERATE_USE_FSDP"] = asked


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def train(
    cfg: Config,
    out: str | Path,
    resume: str | Path | None = None,
    overwrite: bool = False,
    changes: dict | None = None,
) -> dict:
    """Build, optionally resume, and fit. Returns timing and the best validation accuracy.

    `out` is locked for the whole run; without `resume` it must hold no run (`overwrite`
    removes the old one's outputs first). `changes`: recipe keys deliberately changed on
    resume (`--allow-change`), logged to metrics.jsonl.
    """
    out = Path(out)
    rank0 = runs.is_main_rank()  # launched processes: one log line, one lock
    if rank0:  # refuse at once, before the (slow) build; again under the lock below
        runs.check_unlocked(out)
    if resume is None and not overwrite:
        runs.refuse_existing(out)
    setup = build(cfg, log=print if rank0 else lambda *a: None)
    if rank0:
        try:
            runs.lock(out)
        except OSError as err:
            raise storage_error(out, err) from None
    try:
        if rank0 and resume is None and overwrite:
            runs.clear(out)
        elif rank0 and resume is None:  # again under the lock: a run may have ended since
            runs.refuse_existing(out)
        trainer = Trainer(setup, out)
        if resume is not None:
            from rim.checkpoint import load_state

            ckpt = load_state(trainer, Path(resume))
            if changes:
                step = trainer.global_step
                trainer.log(
                    {"event": "resume", "step": step, "from": str(ckpt), "changed": changes}
                )
        return trainer.fit()
    except OSError as err:  # a write outside the atomic helpers (metrics, run folder)
        raise storage_error(Path(err.filename or out), err) from None
    except RuntimeError as err:
        if os_error(err) is None:
            raise
        raise storage_error(out, os_error(err)) from None
    finally:
        if rank0:
            runs.unlock(out)
