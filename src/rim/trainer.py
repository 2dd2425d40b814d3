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
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from tqdm import tqdm

from rim import fsdp, progress, runs, speed, tracking
from rim.assembly import Setup, assemble, t_max
from rim.batching import StageLengths, make_stream, micro_batches
from rim.checkpoint import (
    Parts,
    TrainState,
    find_latest,
    load_state,
    pending_metrics,
    save_model,
    save_state,
    set_aside_unsaved_branches,
    supersede,
)
from rim.config import Config
from rim.curriculum import Stage, WarmupCosine, warmup_constant
from rim.errors import Preempted, RimError
from rim.evaluation import evaluate
from rim.explain import step_accuracy
from rim.io import os_error, storage_error
from rim.machine import cpu_model
from rim.methods.base import row_options
from rim.pipeline import Jobs, Rows, idle, make_loader, workers_for


def set_dropout(model: torch.nn.Module, p: float | None) -> None:
    if p is None:
        return
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        if hasattr(m, "attention_dropout") and isinstance(m.attention_dropout, float):
            m.attention_dropout = p


class Stop:
    """SIGTERM/SIGINT as a flag: the loop saves and stops after the current step; a second
    signal stops at once. `train()` installs it before the (slow) build, so a job preempted
    while it loads stops cleanly (`Preempted`) once the build is done, before training."""

    def __init__(self):
        self.signal: str | None = None

    def __call__(self, signum, frame) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, self)
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


class Trainer:
    def __init__(
        self, setup: Setup, out: str | Path, accelerator: Accelerator | None = None,
        stop: Stop | None = None,
    ):  # fmt: skip
        self.s = setup
        self.cfg = setup.cfg
        self.out = Path(out)
        tracked = tracking.accelerator_options(self.cfg.train.report_to, self.out)
        self.acc = accelerator or make_accelerator(self.cfg.train.mixed_precision, tracked)
        if fsdp.requested(self.cfg.train.fsdp) and self.acc.num_processes > 1:
            self.model = fsdp.shard(setup.model, self.acc.device)
        else:
            self.model = self.acc.prepare_model(setup.model)
        self.plan = setup.method.plan(len(setup.train), t_max(setup.train))
        speed.check(self.cfg, setup.method, self.plan, self.acc.device)  # fp16, flex, compile
        self.model = speed.prepare(self.model, self.cfg, self.acc)
        # group_by_length: batches of similar lengths at each stage (rim.batching)
        t = self.cfg.train
        grouped = StageLengths(setup.method, setup.train, self.plan, t.batch_size)
        self.lengths = grouped if t.group_by_length else None
        self.stream = make_stream(len(setup.train), self.cfg.train, self.lengths)
        self.state = TrainState()
        self._jobs: Iterator | None = None  # the loader's steps (rim.pipeline), made at the first
        self._clock = (time.perf_counter(), 0.0)  # (start, seconds before it): _train_s
        self.optimizer = self.scheduler = None
        self.main = self.acc.is_main_process
        self.stop = stop or Stop()  # SIGTERM / SIGINT, from `train()`'s start when it made us
        # FSDP shards the weights: forward passes and weight gathering need every process
        self.sharded = fsdp.is_sharded(self.model)
        n = self.acc.num_processes
        if self.sharded and self.cfg.train.batch_size % n:  # every process: the same passes
            raise RimError(f"train.batch_size: must be a multiple of the {n} FSDP processes")

    # ---- state ----
    def new_optimizer(self, stage: Stage) -> None:
        """A fresh AdamW and LR schedule for `stage` (every stage starts with one)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=self.cfg.train.weight_decay)
        frac = self.cfg.train.warmup if stage.warmup is None else stage.warmup
        warm = int(frac * stage.steps)
        if self.cfg.train.lr_schedule == "cosine":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warm, stage.steps))
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_constant(warm))
        # plain optimizer: gradient sync is DDP's, accumulation is ours (see `step`)
        self.optimizer, self.scheduler = opt, sched
        set_dropout(self.model, stage.dropout)

    def log(self, record: dict) -> None:
        """One metrics.jsonl record; its numbers also go to the trackers (rim.tracking)."""
        if self.main:
            st = self.state
            file = self.out / "metrics.jsonl"
            if st.resumed_from is not None and not st.superseded:  # until the branch's
                file = pending_metrics(self.out, st.branch)  # first checkpoint: aside
            try:
                with open(file, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                raise storage_error(file, err) from None
        values = tracking.scalars(record)
        if self.acc.trackers and values:  # accelerate logs on the main process only
            self.acc.log(values, step=record.get("step", self.state.global_step))

    def _save_model(self, name: str) -> None:
        """`final/` or `best/` (a collective call under FSDP: every process gathers).

        rim.json records the run id, branch and step, so a resumed branch knows which
        `best/` is its own."""
        full = fsdp.full_state_dict(self.model) if self.sharded else None
        if self.main:
            st, cfg, method = self.state, self.cfg, self.s.method
            run = {"id": st.run_id, "branch": st.branch, "step": st.global_step}
            adapter = cfg.model.path is not None and not cfg.model.full_finetune
            meta = method.meta(self.plan) | {"adapter": adapter, "base_model": cfg.model.path}
            model = self.acc.unwrap_model(self.model)
            meta |= {"format": 1, "run": run}
            save_model(self.out / name, model, self.s.tokenizer, cfg, meta, method, full)

    # ---- one optimizer step ----
    def _split(self, idx: list[int], stage: Stage) -> list[list[int]]:
        """This process's share of a global batch, in micro-batches (longest first when
        grouped): decided in the main process, so the order is the cursor's function."""
        t = self.cfg.train
        mine = idx[self.acc.process_index :: self.acc.num_processes]
        micro = t.micro_batch_size or t.batch_size
        return micro_batches(mine, micro, self.lengths and self.lengths.at(stage))

    def _loader(self) -> Iterator:
        """The steps left, their rows built ahead by `rim.pipeline` (workers or inline)."""
        st, t = self.state, self.cfg.train
        stream = make_stream(len(self.s.train), t, self.lengths)
        stream.cursor = self.stream.cursor
        jobs = Jobs(stream, self.plan, (st.stage_index, st.step_in_stage), t.batch_size,
                    self._split)  # fmt: skip
        model = self.acc.unwrap_model(self.model)
        rows = Rows(self.s.method, self.s.train, self.plan, *row_options(model))
        workers = workers_for(t.loader_workers, self.acc.device)
        return iter(make_loader(rows, jobs, workers, self.acc.device))

    def step(self, stage: Stage) -> float:
        t = self.cfg.train
        if self._jobs is None:
            self._jobs = self._loader()
        job, rows = next(self._jobs)
        st = self.state
        assert (job.stage_index, job.step_in_stage) == (st.stage_index, st.step_in_stage), job
        self.stream.cursor = job.cursor  # what a checkpoint records: the steps trained
        self.model.train()
        total = torch.zeros((), device=self.acc.device)  # summed where the loss is: no sync
        for j, chunk in enumerate(rows):
            sync = j == len(rows) - 1
            ctx = self.acc.no_sync(self.model) if not sync else _null()
            with ctx, self.acc.autocast():
                if not idle(chunk):
                    loss = self.s.method.rows_loss(
                        self.model, chunk, stage, job.progress, t.batch_size, self.acc.device
                    )
                else:  # an idle process still joins the gradient all-reduce
                    loss = sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
                self.acc.backward(loss * self.acc.num_processes)
            total += loss.detach().float()
        if self.acc.num_processes > 1:
            total = self.acc.reduce(total, "sum")
        # the norm is also the overflow check (a finite loss can still give inf gradients)
        speed.unscale(self.acc, self.optimizer)  # fp16: clip the true gradients
        norm = self.acc.clip_grad_norm_(self.model.parameters(), t.grad_clip or math.inf)
        norm = fsdp.replicated(norm) if norm is not None else 0.0
        norm = torch.as_tensor(norm, dtype=torch.float32, device=total.device)
        total, norm = torch.stack([total, norm]).tolist()  # the one host sync of a step
        scaled = self.acc.scaler is not None  # fp16: the scaler skips inf gradients
        if not (math.isfinite(total) and (math.isfinite(norm) or scaled)):  # before the update:
            good = find_latest(self.out)  # the weights and checkpoints stay good
            raise RimError(
                f"train: non-finite loss or gradient (loss {total}, gradient norm {norm}) "
                f"at step {self.state.global_step + 1} ({stage.name} step "
                f"{self.state.step_in_stage + 1});"
                " stopped, last good checkpoint: "
                + (str(good) if good else "none written yet (set train.save_every)")
            )
        speed.optimizer_step(self.acc, self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.step_in_stage += 1
        st.global_step += 1
        return total

    # ---- the loop ----
    def fit(self) -> dict:
        """Train every stage left, with the trackers started for this branch and stopped
        (their files closed, W&B synced) however it ends."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.main:
            recipe = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
            runs.write_run(self.out, self.state.run_id, recipe, self.state.branch)
        if self.acc.log_with:
            st = self.state
            tracking.local_stores(self.cfg.train.report_to, self.out)
            self.acc.init_trackers(
                self.cfg.train.tracking_project,
                config=tracking.hyperparameters(self.cfg.to_dict()),
                init_kwargs=tracking.init_kwargs(self.out, st.run_id, st.resumed_from),
            )
        try:
            return self._fit()
        finally:
            self._jobs = None  # its workers stop now (they share the run folder's lock)
            if self.acc.log_with:  # every process: it also ends the process group, and
                self.acc.end_training()  # nothing collective follows a fit

    def _fit(self) -> dict:
        st = self.state
        self._clock = (time.perf_counter(), st.train_s)  # a resumed run adds to its seconds
        with self.stop.installed():
            while st.stage_index < len(self.plan):
                stage = self.plan[st.stage_index]
                if self.optimizer is None:
                    self.new_optimizer(stage)
                    if st.step_in_stage:  # a finished stage extended on resume
                        self._rebase(stage, st.step_in_stage)
                self._run_stage(stage)
                st.stage_index += 1
                st.step_in_stage = 0
                self.optimizer = None
                self.save_resumable()
                self._stop_if_asked(saved=True)
        train_s = self._train_s()
        if self.main and st.resumed_from is not None and not st.superseded:
            supersede(self.out, st.resumed_from, st.branch)  # resumed at the very end
            st.superseded = True
        self._save_model("final")
        if not (self.out / "best").exists():
            self._save_model("best")
        done = {"train_s": train_s, "best_valid_accuracy": st.best}
        self.log({"event": "done"} | done | {"cpu": cpu_model()})  # sums differ between CPUs
        return done

    # ---- preemption ----
    def _stop_if_asked(self, saved: bool) -> None:
        """Stop (all processes at the same step) once a signal came: checkpoint, then raise."""
        flag = float(self.stop.signal is not None)
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(torch.tensor(flag, device=self.acc.device), "sum").item()
        if not flag:
            return
        if not saved:
            self.save_resumable()
        raise Preempted(
            f"stopped by {self.stop.signal or 'a signal'} at step {self.state.global_step}; "
            f"resume with: rim train --resume {self.out}"
        )

    def _run_stage(self, stage: Stage) -> None:
        t, st = self.cfg.train, self.state
        bar = tqdm(
            total=stage.steps,
            initial=st.step_in_stage,
            desc=f"{self.cfg.method}:{stage.name}",
            disable=not self.main or not progress.live(),
            dynamic_ncols=True,
        )
        logged = self.main and progress.enabled() and not progress.live()
        status = progress.Status()
        tick, seen = time.perf_counter(), 0
        while st.step_in_stage < stage.steps:
            loss = self.step(stage)  # one step on: st.step_in_stage, st.global_step
            seen += t.batch_size
            rate = seen / max(time.perf_counter() - tick, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate:.0f}")
            if logged and status.due():  # in a log: a line every 30 s, not a redrawn bar
                print(
                    f"[rim] {self.cfg.method}:{stage.name} step {st.step_in_stage}/{stage.steps}: "
                    f"loss {loss:.4f}, {rate:.0f} examples/s",
                    flush=True,
                )
            last = st.step_in_stage == stage.steps
            if st.global_step % t.log_every == 0 or last:
                self._log_step(stage, loss, rate)
            ends = last and (stage.validate_at_end or stage.index == len(self.plan) - 1)
            if (t.eval_every and st.global_step % t.eval_every == 0) or ends:
                self.validate(stage)
            saved = bool(t.save_every and st.global_step % t.save_every == 0 and not last)
            if saved:
                self.save_resumable()
            if not last:  # at a stage end fit() saves first
                self._stop_if_asked(saved)
        bar.close()

    def _log_step(self, stage: Stage, loss: float, rate: float) -> None:
        st = self.state
        lr = self.scheduler.get_last_lr()[0]
        record = {"stage": stage.name, "step": st.global_step, "stage_step": st.step_in_stage}
        self.log(record | {"loss": loss, "lr": lr, "examples_per_s": rate})

    def validate(self, stage: Stage) -> float:
        """Greedy accuracy on the valid split (at most `eval.val_limit`), logged; in the last
        stage it may write `best/`. In a grounding stage, how well each block spells its step
        too: its curve over the stage shows whether step t was held before its weight faded."""
        st = self.state
        if not self.main and not self.sharded:
            self.acc.wait_for_everyone()
            return st.best
        e = self.cfg.eval
        valid = self.s.valid[: e.val_limit] if e.val_limit else self.s.valid
        # sharded: every process decodes the same examples (identical steps) through FSDP
        model = self.model if self.sharded else self.acc.unwrap_model(self.model)
        with speed.decoding(model):  # sdpa, not FlexAttention; compiled layers run eagerly
            res = evaluate(
                self.s.method, model, valid, e.batch_size, decoder="final", timing_examples=0,
                progress=False,
            )  # fmt: skip
            rep = self.s.method.memory_report(model, valid, e.batch_size)  # its own heads
            if self.s.method.grounds_steps(stage):  # is step t in block t? (grounding, over time)
                rep |= step_accuracy(self.s.method, model, valid, e.batch_size, cue=None)
            extra = {f"valid_{k}": v for k, v in rep.items()}
        if self.sharded:
            fsdp.reshard(self.model)
        acc = res["accuracy"]
        record = {"stage": stage.name, "step": st.global_step, "valid_accuracy": acc}
        self.log(record | {"valid_token_accuracy": res["token_accuracy"]} | extra)
        # only the last stage trains what inference runs (RiM stage 2, Coconut's final number of
        # thoughts, iCoT's full removal), so only it may provide best/; ties go to the later one.
        # A stage split in several (one optimizer each) marks its parts with `selects_best`.
        final = stage.selects_best
        if final is None:
            final = stage.index == len(self.plan) - 1
        if final and acc >= st.best:
            st.best = acc
            self._save_model("best")
        self.acc.wait_for_everyone()
        return acc

    # ---- resumable checkpoints (rim.checkpoint) ----
    def _parts(self) -> Parts:
        return Parts(
            self.acc, self.model, self.optimizer, self.scheduler, self.sharded, self.s.tokenizer
        )

    def _train_s(self) -> float:
        """Seconds of training in this run: this process's, plus its checkpoint's (the work
        a crash lost after the last checkpoint is not counted, its redoing is)."""
        start, before = self._clock
        return before + time.perf_counter() - start

    def save_resumable(self) -> None:
        self.state.cursor = self.stream.cursor
        self.state.train_s = self._train_s()
        save_state(self.out, self.state, self._parts(), self.cfg)

    def resume(self, folder: Path, changes: dict | None = None) -> Path:
        """Continue from a checkpoint (or a run folder's newest intact one): weights, RNG,
        state, data cursor and, mid-stage, the optimizer and LR schedule. `changes`
        (`--allow-change`) apply from the resume step: the LR, weight decay and schedule are
        rebased, a stage made longer goes on (a finished one too)."""
        got = load_state(folder, self.out, self._parts())
        st = self.state = got.state
        runs.check_lineage(self.out, got.checkpoint, st.run_id, st.branch_of_checkpoint)
        self.stream.cursor = st.cursor
        reopened = self._extend_stages(got.checkpoint) if changes else False
        if got.optimizer is not None and st.stage_index < len(self.plan) and not reopened:
            stage = self.plan[st.stage_index]
            self.new_optimizer(stage)
            self.optimizer.load_state_dict(fsdp.like_params(got.optimizer, self.optimizer))
            self.scheduler.load_state_dict(got.scheduler)
            if changes:
                self._rebase(stage, self.scheduler.last_epoch)
        return got.checkpoint

    def _rebase(self, stage: Stage, at: int) -> None:
        """The optimizer groups and LR schedule at step `at` of `stage` as this recipe says
        (a loaded state carries the old recipe's LR and weight decay)."""
        sched, groups = self.scheduler, self.optimizer.param_groups
        sched.last_epoch = at
        sched.base_lrs = [stage.lr for _ in groups]
        lrs = [stage.lr * lam(at) for lam in sched.lr_lambdas]
        for g, lr in zip(groups, lrs):
            g["initial_lr"], g["lr"], g["weight_decay"] = stage.lr, lr, self.cfg.train.weight_decay
        sched._last_lr = lrs

    def _extend_stages(self, ckpt: Path) -> bool:
        """Map the checkpoint's position onto this recipe's (changed) stage lengths; True if
        the stage the checkpoint had just finished is longer now and goes on."""
        from rim.assembly import load_recipe
        from rim.methods import plan

        old = plan(load_recipe(ckpt / "config.yaml"), len(self.s.train), t_max(self.s.train))
        st, new = self.state, self.plan
        i = st.stage_index
        reopen = 0 < i <= len(new) and st.step_in_stage == 0 and new[i - 1].steps > old[i - 1].steps
        for j in range(min(i, len(old), len(new))):
            if new[j].steps != old[j].steps and not (reopen and j == i - 1):
                raise RimError(
                    f"--allow-change: stage {old[j].name} is over ({old[j].steps} steps); "
                    f"its length cannot change to {new[j].steps} now"
                )
        if reopen:
            st.stage_index, st.step_in_stage = i - 1, old[i - 1].steps
        elif i < len(new) and st.step_in_stage > new[i].steps:
            raise RimError(
                f"--allow-change: stage {new[i].name} already ran {st.step_in_stage} steps, "
                f"more than the {new[i].steps} asked"
            )
        return reopen


def _clean(out: Path, fresh: bool) -> None:
    """What a killed process left in `out`: temporaries removed (an interrupted `best/`
    swap put back), an unsaved branch's records set aside (or removed for a fresh run)."""
    left = runs.clean_temporaries(out)
    if fresh:
        for pending in out.glob(".metrics-branch-*.jsonl"):
            pending.unlink()
    else:
        left += [str(p.relative_to(out)) for p in set_aside_unsaved_branches(out)]
    if left:
        print(f"[rim] {out}: cleaned up after a killed run: {', '.join(left)}")


def make_accelerator(mixed_precision: str = "no", options: dict | None = None) -> Accelerator:
    """The Accelerator for `rim train`, launched plainly, by `accelerate launch` or `torchrun`.

    accelerate treats a launch on a machine without GPUs as single-process unless told `cpu`;
    then each process would train alone and all of them would write the run folder. So a
    multi-process launch without a GPU runs DDP on CPU over gloo (no NCCL needed).
    bf16 is autocast with fp32 master weights; the model is never cast for training.
    `options`: more Accelerator arguments (the trackers of rim.tracking).
    FSDP (configs/accelerate/fsdp.yaml) is rim's own (rim.fsdp), so accelerate is kept out
    of it: its FSDP2 wants one model and one optimizer prepared together, rim builds an
    optimizer per stage, and on a CPU accelerate silently runs DDP instead.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    asked = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        cpu = world > 1 and not gpu
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu, **(options or {}))
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
    tracking.check_installed(cfg.train.report_to)  # before the (slow) build
    with Stop().installed() as stop:
        return _build_and_fit(cfg, out, resume, overwrite, changes, stop)


def _build_and_fit(cfg: Config, out: Path, resume, overwrite: bool, changes, stop: Stop) -> dict:
    rank0 = runs.is_main_rank()
    setup = assemble(cfg, log=print if rank0 else lambda *a: None)
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
        if rank0:
            _clean(out, fresh=resume is None)
        trainer = Trainer(setup, out, stop=stop)
        if resume is not None:
            ckpt = trainer.resume(Path(resume), changes)
            if changes:
                step = trainer.state.global_step
                trainer.log(
                    {"event": "resume", "step": step, "from": str(ckpt), "changed": changes}
                )
        if stop.signal:  # came while the run was being built: nothing to save yet
            raise Preempted(
                f"stopped by {stop.signal} before training began (nothing to save); "
                "run the same command again"
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
