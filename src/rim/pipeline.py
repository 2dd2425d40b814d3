"""Rows built ahead of the model: a `torch.utils.data.DataLoader` whose workers lay out the
micro-batches of the steps to come while the model trains on the current one.

    jobs = Jobs(stream, plan, start, split)         # main process: which examples, in order
    loader = make_loader(method, train, jobs, ...)  # workers: segments, packing, masks
    for job, rows in loader:                        # one optimizer step each
        loss = method.rows_loss(model, rows[j], stage, job.progress, B, device)

The main process decides *which* examples a step takes (the seeded stream, `rim.batching`),
so the order stays a pure function of the run's cursor; the workers only build rows
(`Method.rows`: segments, packing, the 4-D mask or the FlexAttention tables), which are a
function of the examples, the stage and the progress, so a step's rows are the same with
or without workers (tested). The loader runs ahead of training, so a checkpoint records
the cursor of the last step *trained* (`StepJob.cursor`), not the sampler's.

A method whose `loss` builds its own rows (Coconut's sequential passes, iCoT's per-token
normalisation, looped RiM) gets its examples back from `Method.rows` and builds them on the
main thread, as before. `train.loader_workers` (None: 2 on an accelerator, 0 on a CPU,
where a worker would take a core from training) sets the workers; pinned memory on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rim.batching import ExampleStream
from rim.curriculum import Stage, stage_progress


@dataclass(frozen=True)
class StepJob:
    """One optimizer step's work: its place in the plan and its micro-batches."""

    stage_index: int
    step_in_stage: int
    progress: float  # stage progress at this step (`rim.curriculum.stage_progress`)
    chunks: list[list[int]]  # this process's micro-batches (example indices)
    cursor: int  # the stream's cursor once this step has taken its batch


class Jobs(Sampler):
    """The steps left in `plan` from `start` = (stage index, step in stage), each taking
    `batch_size` examples from `stream` (advanced here, in the main process) and split into
    micro-batches by `split(indices, stage)`."""

    def __init__(
        self,
        stream: ExampleStream,
        plan: list[Stage],
        start: tuple[int, int],
        batch_size: int,
        split: Callable[[list[int], Stage], list[list[int]]],
    ):
        self.stream, self.plan, self.start = stream, plan, start
        self.batch_size, self.split = batch_size, split

    def __iter__(self) -> Iterator[StepJob]:
        index, step = self.start
        for stage in self.plan[index:]:
            while step < stage.steps:
                idx = self.stream.take(self.batch_size)
                progress = stage_progress(step, stage.steps)
                yield StepJob(index, step, progress, self.split(idx, stage), self.stream.cursor)
                step += 1
            index, step = index + 1, 0

    def __len__(self) -> int:
        index, step = self.start
        return sum(s.steps for s in self.plan[index:]) - step


class Rows(Dataset):
    """`rows[job]`: (job, the rows of each of its micro-batches), built by `method.rows`."""

    def __init__(self, method, examples: list, plan: list[Stage], dtype: torch.dtype, mask):
        self.method, self.examples, self.plan = method, examples, plan
        self.dtype, self.mask = dtype, mask

    def __getitem__(self, job: StepJob):
        stage = self.plan[job.stage_index]
        rows = [
            self.method.rows([self.examples[i] for i in chunk], stage, job.progress, self.dtype,
                             self.mask)
            for chunk in job.chunks
        ]  # fmt: skip
        return job, rows


def idle(rows) -> bool:
    """A micro-batch without examples (a DDP process with no share of a small batch)."""
    return isinstance(rows, list) and not rows


def _one(item):
    """The loader's collate: a job is already one step (no batching of jobs)."""
    return item


def workers_for(setting: int | None, device: torch.device) -> int:
    """`train.loader_workers`; None: 2 on an accelerator, 0 on a CPU (a worker there would
    take a core from the training threads)."""
    if setting is not None:
        return setting
    return 0 if device.type == "cpu" else 2


def make_loader(rows: Rows, jobs: Jobs, workers: int, device: torch.device) -> DataLoader:
    """The DataLoader over `jobs` (in order: a map-style loader keeps the sampler's order)."""
    if workers:  # the fast tokenizers warn (and may deadlock) after a fork otherwise
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        rows,
        sampler=jobs,
        batch_size=None,
        collate_fn=_one,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None,
        persistent_workers=False,
        # a loader draws its workers' base seed when iterated: from its own generator, not
        # torch's global one, which dropout uses (a resumed run restores it exactly)
        generator=torch.Generator().manual_seed(0),
    )
