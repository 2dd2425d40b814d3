"""The one job runner of `rim demo` and `rim sweep`: train, then test-evaluate, in parallel.

One job = one recipe (a method's file plus `--set` overrides) and one seed, one process:
`python -m rim train --test` trains (checkpoint `best/` chosen on the valid split), then
scores `best/` on the test split and on each file of the recipe's `data.extra_tests`
(rim.scoring; a process of its own per file cost a Python and torch start each).
`run_jobs` runs `workers` jobs at a time, one thread each driving its own process (one
core per process on a CPU; on a GPU they run one after another on it, `pick_device`).
Ctrl-C stops every running job and starts no other.

Resumable (`Runner(resume=True)`): a job whose folder holds a finished training of the same
resolved recipe and its test evaluation is kept as it is; any other job goes through `rim
train --resume-if-exists`, which continues from its last checkpoint (and refuses a changed
recipe, so a finished run is never silently replaced).

A job's cell is its method plus the grid values that make its recipe (`Job.values`, empty
in the demo); its name, `rim/s0` or `rim/pairs=8/s0`, is the one progress lines print.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from rim import progress, scoring
from rim.errors import RimError
from rim.progress import Status


def format_value(v: object) -> str:
    """A grid value as folders, names and tables show it (`0.001`, `16`, `relative`).

    >>> format_value(1.0e-3), format_value(16), format_value(True), format_value("none")
    ('0.001', '16', 'true', 'none')
    """
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def cell_label(values: dict) -> str:
    """`pairs=8,lr=0.001`: a cell's grid values in one path-safe word ('' for no values)."""
    safe = lambda s: "".join(c if c.isalnum() or c in "._-" else "-" for c in s)  # noqa: E731
    return ",".join(f"{safe(k)}={safe(format_value(v))}" for k, v in values.items())


@dataclass
class Job:
    """One (method, grid values, seed): its recipe, run folder, and what became of it."""

    method: str
    seed: int
    recipe: Path
    out: Path
    sets: list[str]
    total_steps: int
    state: str = "queued"  # queued | train | eval | done | failed
    started: float = 0.0
    result: dict = field(default_factory=dict)
    error: str | None = None
    values: dict = field(default_factory=dict)  # the cell's grid values (the sweep's axes)
    kept: bool = False  # resumed as finished: nothing ran
    reused: bool = False  # `out` is another sweep's finished run of the same recipe (`reuse`)

    @property
    def cell(self) -> str:
        """The method and its grid values: `rim` (the demo) or `rim/pairs=8`."""
        label = cell_label(self.values)
        return f"{self.method}/{label}" if label else self.method

    @property
    def name(self) -> str:
        return f"{self.cell}/s{self.seed}"

    @property
    def train_sets(self) -> list[str]:
        """The overrides of its `rim train`: the job's own (`{seed}` in a value: this job's
        seed, e.g. the path of the same seed's run), then its seed and one thread."""
        own = [s.replace("{seed}", str(self.seed)) for s in self.sets]
        return [*own, f"train.seed={self.seed}", "train.threads=1"]


def total_steps(cfg) -> int:
    """Optimizer steps of a run (for the progress display and budgets): the method's plan."""
    from rim.methods import plan

    return sum(s.steps for s in plan(cfg, cfg.data.train.size))


def pick_device(workers: int, tag: str) -> tuple[str, int]:
    """(device, parallel jobs): a GPU runs the jobs one after another, a CPU `workers`."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and workers != 1:
        print(f"[{tag}] GPU found: jobs run one after another on {device}")
        workers = 1
    return device, workers


# --------------------------------------------------------------------------- one job


class Runner:
    """Runs jobs in `workers` threads, each driving its own subprocesses; Ctrl-C stops them."""

    def __init__(self, device: str, resume: bool = False):
        self.resume = resume
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopped = False
        self.env = os.environ | {"RIM_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
        if device == "cpu":
            self.env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def _call(self, cmd: list[str], log: Path) -> int:
        with open(log, "a") as f:
            shown = ["python", *cmd[1:]] if cmd[0] == sys.executable else cmd  # no machine's path
            f.write(f"$ {shlex.join(shown)}\n")
            f.flush()
            with self.lock:
                if self.stopped:
                    return -1
                p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env)
                self.procs.add(p)
            try:
                return p.wait()
            finally:
                with self.lock:
                    self.procs.discard(p)

    def run(self, job: Job) -> Job:
        try:
            return self._run(job)
        except Exception as err:  # one broken run must not stop the others
            job.state, job.error = "failed", f"{type(err).__name__}: {err}"
            return job

    def _run(self, job: Job) -> Job:
        py = [sys.executable, "-m", "rim"]
        job.started = time.perf_counter()
        if self.resume and keep_if_finished(job):  # its recipe is the one asked for
            return job
        if not self.resume:
            shutil.rmtree(job.out, ignore_errors=True)  # a rerun never appends to old metrics
        job.out.mkdir(parents=True, exist_ok=True)
        log = job.out / "train.log"
        job.state = "train"  # shown as "eval" once its metrics say done (`_phase`)
        cmd = py + ["train", "--config", str(job.recipe), "--out", str(job.out), "--test"]
        cmd += ["--resume-if-exists"] if self.resume else []  # from its last checkpoint
        if self._call(cmd + [a for s in job.train_sets for a in ("--set", s)], log):
            what = "test evaluation failed" if _trained(job) else "training failed"
            return self._fail(job, what, log)
        return collect(job)

    def _fail(self, job: Job, what: str, log: Path) -> Job:
        lines = log.read_text(errors="replace").strip().splitlines()
        tail = [x for x in lines if not x.startswith("$ ")][-8:]  # not the long command
        job.state, job.error = "failed", f"{what} (see {log})\n    " + "\n    ".join(tail)
        return job

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            for p in self.procs:
                p.terminate()


def collect(job: Job) -> Job:
    """A finished job's result from its folder: its test evaluation and the `done` record."""
    res = json.loads((job.out / scoring.TEST_EVAL).read_text())
    records = res.pop("records", None)  # per-example records stay in test_eval.json
    if records and "per_position_accuracy" not in res:  # an evaluation from before it
        from rim.evaluation import Record, position_accuracy  # torch: only when needed

        positions = position_accuracy([Record(**r) for r in records])
        res |= {"per_position_accuracy": positions} if positions is not None else {}
    metrics = [json.loads(x) for x in (job.out / "metrics.jsonl").read_text().splitlines()]
    done = [r for r in metrics if r.get("event") == "done"][-1]
    files = [(name, Path(path).stem) for name, path in eval_files(job).items() if path]
    extra = {stem: json.loads((job.out / name).read_text()) for name, stem in files}
    if extra:  # data.extra_tests: accuracy on each
        res["extra_tests"] = {k: r["accuracy"] for k, r in extra.items()}
    job.result = res | {
        "train_s": done["train_s"],
        "best_valid_accuracy": done["best_valid_accuracy"],
        "best_valid_token_accuracy": best_tokens(metrics, done["best_valid_accuracy"]),
        "cpu": done.get("cpu"),  # absent from runs trained before it was logged
        "job_s": time.perf_counter() - job.started if job.started else None,
    }
    job.state = "done"
    return job


def best_tokens(records: list[dict], best: float) -> float | None:
    """Valid token accuracy of the validation that wrote best/: the last one at the best
    exact accuracy (the trainer lets a tie replace best/). It breaks ties between candidates
    that all stay at 0 exact (rim.sweep.select_best), on validation still."""
    at = [r for r in records if r.get("valid_accuracy") == best and "valid_token_accuracy" in r]
    return at[-1]["valid_token_accuracy"] if at else None


def keep_if_finished(job: Job) -> bool:
    """Keep a finished job as it is (`kept`, its result collected); False if it is not."""
    if not finished(job):
        return False
    job.kept = True
    collect(job)
    return True


def finished(job: Job, recipe: dict | None = None) -> bool:
    """A job folder with its test evaluations and a finished training of the job's recipe.
    `recipe`: the job's resolved recipe (`wanted`), when a caller checks many folders."""
    try:
        lines = (job.out / "metrics.jsonl").read_text().splitlines()
        if not any(json.loads(x).get("event") == "done" for x in lines):
            return False
        recipe = recipe if recipe is not None else wanted(job)
        if not all((job.out / t).is_file() for t in eval_files(job, recipe)):
            return False
        from rim.assembly import load_recipe

        return load_recipe(job.out / "config.yaml").to_dict() == recipe
    except (OSError, ValueError, RimError):
        return False


def wanted(job: Job) -> dict:
    """The job's recipe resolved (overrides and train sets applied), as a saved run's
    config.yaml reads back: what a finished folder must hold to count as this job."""
    from rim.assembly import load_recipe

    return load_recipe(job.recipe, job.train_sets).to_dict()


def eval_files(job: Job, recipe: dict | None = None) -> dict[str, str | None]:
    """Its test evaluation files and what each scores (rim.scoring.eval_files); `recipe`:
    `wanted(job)` when the caller has it."""
    recipe = recipe if recipe is not None else wanted(job)
    return scoring.eval_files(recipe["data"].get("extra_tests") or [])


def finished_elsewhere(job: Job, sweeps: tuple[Path, ...], recipe: dict) -> Path | None:
    """A run folder of another sweep (its --out) holding a finished run of the job's recipe
    (`recipe`: `wanted(job)`, resolved once by the caller) and seed, or None: where two
    grids share a point, its runs are trained once."""
    for sweep in sweeps:
        for run in sorted((sweep / "runs" / job.method).glob(f"**/seed{job.seed}")):
            if run.resolve() != job.out.resolve() and finished(replace(job, out=run), recipe):
                return run
    return None


# --------------------------------------------------------------------------- many jobs


def _last_step(job: Job) -> int:
    try:
        lines = (job.out / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1]).get("step", 0) if lines else 0
    except (OSError, ValueError):  # not written yet, or a line half written
        return 0


def _trained(job: Job) -> bool:
    """Its metrics end with the `done` event: training finished, the test evaluation runs."""
    try:
        lines = (job.out / "metrics.jsonl").read_text().splitlines()
        return bool(lines) and json.loads(lines[-1]).get("event") == "done"
    except (OSError, ValueError):  # not written yet, or a line half written
        return False


def _phase(job: Job) -> str:
    """What a job is doing, as shown: its state, `eval` once its process has trained (one
    process trains and tests, `rim train --test`; only the job's thread sets `state`)."""
    return "eval" if job.state == "train" and _trained(job) else job.state


def _status(jobs: list[Job]) -> str:
    now = time.perf_counter()
    parts = []
    for j in jobs:
        phase = _phase(j)
        if phase == "train":
            parts.append(f"{j.name} train {_last_step(j)}/{j.total_steps} {now - j.started:.0f}s")
        elif phase == "eval":
            parts.append(f"{j.name} test eval")
    return "running: " + (", ".join(parts) or "-")


def _finished_line(j: Job, tag: str) -> str:
    if j.state == "done":
        acc, secs = j.result["accuracy"], j.result["train_s"]
        kept = f" (kept from {j.out})" if j.reused else " (finished before, kept)" if j.kept else ""
        return f"[{tag}] {j.name}: test accuracy {acc:.3f}, trained {secs:.0f}s{kept}"
    return f"[{tag}] {j.name}: {j.error}"


_EVENTS = {"train": "training", "eval": "test evaluation"}


def run_jobs(
    jobs: list[Job], workers: int, runner: Runner, status: Status | None = None,
    tag: str = "demo", more: Callable[[], list[Job]] | None = None,
    key: Callable[[Job], tuple] | None = None,
) -> None:  # fmt: skip
    """Run `jobs` in a thread pool: a live bar on a terminal, plain event lines in a log.

    Jobs start in the order given. `more`, asked after every job that ends, returns jobs
    that this one made possible (a search's chosen value's other seeds, rim.sweep); they
    join the queue, which `key` then keeps sorted (stable), so they need not wait for the
    whole queue.

    In a log: one line when a job starts training, starts its test evaluation and ends,
    and a status line at most every `progress.STATUS_EVERY` s (`status`). `tag` names the
    command in every line (`[demo]`, `[sweep]`).

    SIGTERM (`kill`, a scheduler's preemption) stops the jobs as Ctrl-C does: each training
    process gets SIGTERM too and saves a checkpoint, none is left running on its own.
    """
    queue = _Queue(list(jobs), more, key)
    with _stop_requests() as asked:
        _run_jobs(queue, workers, runner, status or Status(), tag, asked)


@dataclass
class _Queue:
    """The jobs of a `run_jobs` call: all of them (`shown`), those not started (`waiting`)."""

    shown: list[Job]
    more: Callable[[], list[Job]] | None
    key: Callable[[Job], tuple] | None
    waiting: list[Job] = field(init=False)

    def __post_init__(self) -> None:
        self.waiting = list(self.shown)

    def grow(self) -> int:
        """Add the jobs `more` returns; how many."""
        new = self.more() if self.more else []
        self.shown += new
        self.waiting += new
        if self.key:
            self.waiting.sort(key=self.key)
        return len(new)


@contextlib.contextmanager
def _stop_requests() -> Iterator[threading.Event]:
    """SIGTERM and Ctrl-C (SIGINT) set the yielded event while jobs run; the polling loop
    then stops the jobs. Not an exception raised from the handler: one that lands inside
    `concurrent.futures.wait`'s lock handling became "RuntimeError: release unlocked lock"
    and a traceback. (A background job's SIGINT is ignored by its shell: `kill` stops it.)"""
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return
    before = {s: signal.signal(s, lambda *_: asked.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield asked
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _run_jobs(
    queue: _Queue, workers: int, runner: Runner, status: Status, tag: str,
    asked: threading.Event,
) -> None:  # fmt: skip
    bar_on, log_on = progress.live(), progress.enabled() and not progress.live()
    bar = tqdm(total=len(queue.shown), desc=tag, unit="job", disable=not bar_on, dynamic_ncols=True)
    seen: dict[str, str] = {}
    pool, running, ended = ThreadPoolExecutor(max_workers=workers), set(), 0
    try:
        while queue.waiting or running:
            while queue.waiting and len(running) < workers:  # the next in line
                running.add(pool.submit(runner.run, queue.waiting.pop(0)))
            finished_, running = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            if asked.is_set():  # SIGTERM or Ctrl-C (_stop_requests)
                raise KeyboardInterrupt
            for j in queue.shown:  # state changes seen since the last poll
                phase = _phase(j)
                if log_on and phase in _EVENTS and seen.get(j.name) != phase:
                    print(f"[{tag}] {j.name}: {_EVENTS[phase]}", flush=True)
                seen[j.name] = phase
            for fut in finished_:
                (tqdm.write if bar_on else print)(_finished_line(fut.result(), tag))
                bar.update(1)
            ended += len(finished_)
            if finished_ and queue.grow():
                bar.total = len(queue.shown)
            if bar_on:
                bar.set_postfix_str(_status(queue.shown), refresh=True)
            elif log_on and (running or queue.waiting) and status.due():
                line = f"[{tag}] {ended}/{len(queue.shown)} jobs done; {_status(queue.shown)}"
                print(line, flush=True)
    except BaseException as err:
        pool.shutdown(wait=False, cancel_futures=True)
        runner.stop()  # running jobs are terminated; waiting ones never start
        bar.close()
        if isinstance(err, KeyboardInterrupt):
            print(f"[{tag}] interrupted: running jobs stopped, no results written", file=sys.stderr)
            raise SystemExit(130) from None
        raise
    bar.close()
    pool.shutdown()
