"""The one interface every method implements: a stage plan, a training loss, an inference prompt.

Most methods are *packed* methods: an example becomes a tree of segments (`rim.layout`) and
the loss is one forward pass with the 4-D mask. A method only says which segments to build;
Coconut, whose thoughts need sequential passes, overrides `loss` and `prefill`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel

from rim import flex
from rim.batching import pack_rows
from rim.config import Config
from rim.curriculum import TRAIN_KEYS, Stage, steps_for
from rim.data import Example
from rim.decoding import Prefill, prefill
from rim.errors import ConfigError, RimError
from rim.layout import IGNORE, Batch, Segment, collate, concat, pack, weighted_nll
from rim.memory import MemoryTokens
from rim.tokenized import TokenTable


@dataclass(frozen=True)
class Common:
    """What every method reads of a recipe: the answer format, budgets and the training budget.

    A method gets this, its own section (`Method.settings_from`) and its `Tokens`, never
    the whole `Config`, so what a method depends on is written down in one place.
    """

    answer_marker: str = "####"
    max_new_tokens: int = 32  # eval.max_new_tokens: answer tokens
    cot_max_new_tokens: int = 256  # eval.cot_max_new_tokens: CoT-like methods
    cot_join: str = "source"  # data.cot_join
    max_length: int | None = None  # data.max_length
    epochs: float | None = None  # train.epochs / train.steps: single-stage budget
    steps: int | None = None
    batch_size: int = 128  # train.batch_size (global)
    lr: float = 1e-4
    dropout: float | None = None
    seed: int = 0
    pack_tokens: int | None = None  # train.pack_tokens: several examples per row

    @classmethod
    def from_config(cls, cfg: Config) -> Common:
        t, e = cfg.train, cfg.eval
        return cls(
            e.answer_marker, e.max_new_tokens, e.cot_max_new_tokens, cfg.data.cot_join,
            cfg.data.max_length, t.epochs, t.steps, t.batch_size, t.lr, t.dropout, t.seed,
            t.pack_tokens,
        )  # fmt: skip


@dataclass(frozen=True)
class Tokens:
    """The token spec: EOS, padding, and the ids of `new_tokens` in their order."""

    eos: int
    pad: int
    new: tuple[int, ...] = ()


class Method:
    """One training recipe and inference prompt. Subclasses register with
    `rim.methods.registry.register` and are made by `rim.methods.build(cfg, tokenizer)`."""

    name: ClassVar[str] = "base"
    uses_blocks: ClassVar[bool] = False  # inference appends K memory blocks to the question
    writes_reasoning: ClassVar[bool] = False  # writes reasoning before the answer marker
    section: ClassVar[str | None] = None  # the recipe section with this method's settings
    # inference is one causal prefill of `prompt()` then greedy tokens, so a stock
    # `generate()` serves it (`rim export`); False for latent thoughts (Coconut, CODI)
    plain_prompt: ClassVar[bool] = True
    # training rows may hold several examples (`train.pack_tokens`); False for methods whose
    # loss is not one pass over `segments` (Coconut's and CODI's sequential latent passes)
    shares_rows: ClassVar[bool] = True

    def __init__(self, common: Common, settings: Any, tokens: Tokens, tokenizer):
        if common.pack_tokens is not None and not self.shares_rows:
            raise ConfigError(
                f"train.pack_tokens: {self.name} trains with sequential latent passes, one "
                "example per row; set it null"
            )
        self.common, self.settings, self.tokens = common, settings, tokens
        self.tokenizer = tokenizer
        self.eos_id: int = tokens.eos
        self.pad_id: int = tokens.pad
        self.marker = common.answer_marker
        self.mem: MemoryTokens | None = None  # set by block methods
        self._question = lru_cache(maxsize=200_000)(self._encode_question)
        self._text = lru_cache(maxsize=200_000)(self._encode_text)
        # every string of the run's splits, encoded once (`pretokenize`); the caches above
        # serve only what it did not foresee (inference prompts)
        self._questions = TokenTable(self._encode_questions)
        self._texts = TokenTable(self._encode_texts)

    @classmethod
    def settings_from(cls, cfg: Config) -> Any:
        """This method's typed settings: its recipe section (`section`), or None."""
        return getattr(cfg, cls.section) if cls.section else None

    @classmethod
    def new_tokens(cls, settings: Any) -> list[str]:
        """Special tokens this method adds to the vocabulary (their rows are trained)."""
        return []

    # ---- tokenisation (segments are tokenised separately, then concatenated) ----
    def _encode_question(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _encode_text(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(" " + text, add_special_tokens=False)["input_ids"])

    def _encode_questions(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=True)["input_ids"]

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer([" " + t for t in texts], add_special_tokens=False)["input_ids"]

    def question_ids(self, question: str) -> tuple[int, ...]:
        ids = self._questions.get(question)
        return self._question(question) if ids is None else ids

    def text_ids(self, text: str) -> tuple[int, ...]:
        ids = self._texts.get(text)
        return self._text(text) if ids is None else ids

    def pretokenize(self, examples: Iterable[Example]) -> None:
        """Encode every question and text `examples` train and evaluate with, once, in
        batch calls of the tokenizer (`rim.tokenized`); the same ids as one call each."""
        examples = list(examples)
        self._questions.fill(ex.question for ex in examples)
        self._texts.fill([self.marker] + [t for ex in examples for t in self.texts(ex)])

    def texts(self, ex: Example) -> Iterator[str]:
        """The strings `ex`'s segments pass to `text_ids`: each step, the answer target,
        and for CoT-like methods the chain (`pretokenize` encodes them ahead)."""
        yield from ex.steps
        yield f"{self.marker} {ex.answer}" if self.writes_reasoning else ex.answer
        if self.writes_reasoning and ex.steps:
            yield self._cot_text(ex.steps, ex.step_sep)

    def _cot_text(self, steps: tuple[str, ...], step_sep: str) -> str:
        return (step_sep if self.common.cot_join == "source" else " ").join(steps)

    def answer_ids(self, answer: str) -> tuple[int, ...]:
        """The answer target; CoT-like methods put the marker first so it can be found."""
        if self.writes_reasoning:
            return self.text_ids(f"{self.marker} {answer}")
        return self.text_ids(answer)

    def reasoning_ids(self, steps: tuple[str, ...], sep: str = " ") -> tuple[int, ...]:
        return self.text_ids(sep.join(steps)) if steps else ()

    def cot_ids(self, ex: Example, start: int = 0) -> tuple[int, ...]:
        """Steps `start..` of `ex` as CoT tokens, joined as the source writes them.

        `data.cot_join: space` joins with spaces instead (the iCoT multiplication then loses
        its ` + ` tokens, which moves every iCoT removal cut point).
        """
        steps = ex.steps[start:]
        return self.text_ids(self._cot_text(steps, ex.step_sep)) if steps else ()

    # ---- training ----
    def plan(self, n_train: int, t_max: int) -> list[Stage]:
        """Single-stage default: `train.epochs` or `train.steps`."""
        c = self.common
        steps = steps_for(c.epochs, c.steps, n_train, c.batch_size, TRAIN_KEYS)
        return [Stage(self.name, 0, steps, c.lr, c.dropout)]

    def segments(self, ex: Example, stage: Stage, progress: float) -> list[Segment]:
        raise NotImplementedError

    def loss(
        self,
        model,
        examples: list[Example],
        stage: Stage,
        progress: float,
        num_examples: int,
        device: torch.device,
    ) -> torch.Tensor:
        """Weighted readout NLL of `examples`, normalised by the global `num_examples`."""
        batch = self.batch(examples, stage, progress, *row_options(model))
        return self.rows_loss(model, batch, stage, progress, num_examples, device)

    # ---- the training pipeline's two halves (rim.pipeline) ----
    def builds_rows(self, stage: Stage) -> bool:
        """Whether `loss` is `batch_loss` over `batch` at `stage`, so that a DataLoader
        worker can build the rows; a method whose `loss` builds its own says False."""
        return getattr(self.loss, "__func__", None) is Method.loss  # not overridden

    def rows(
        self, examples: list[Example], stage: Stage, progress: float, dtype, mask
    ) -> Batch | list[Example]:
        """The CPU half of `loss` (run in a DataLoader worker): the micro-batch's `Batch`,
        or its examples back when `loss` builds its own rows (`builds_rows`)."""
        if not examples or not self.builds_rows(stage):
            return examples
        return self.batch(examples, stage, progress, dtype, mask)

    def rows_loss(
        self, model, rows: Batch | list[Example], stage: Stage, progress: float,
        num_examples: int, device: torch.device,
    ) -> torch.Tensor:  # fmt: skip
        """`loss` of a micro-batch whose rows `rows` built: equal to `loss` of its examples."""
        if isinstance(rows, Batch):
            return batch_loss(model, rows.to(device, non_blocking=True), num_examples)
        return self.loss(model, rows, stage, progress, num_examples, device)

    def batch(
        self, examples: list[Example], stage: Stage, progress: float, dtype=torch.float32,
        mask=None,
    ) -> Batch:  # fmt: skip
        """The rows of one forward pass: an example each, or with `train.pack_tokens`
        several (`rim.batching.pack_rows`, first-fit decreasing; `rim.layout.concat`).
        `mask`: as `rim.layout.collate`'s (`rim.flex.Tables.of` for FlexAttention)."""
        packed = [pack(self.segments(ex, stage, progress), self.eos_id) for ex in examples]
        budget = self.common.pack_tokens
        if budget is not None:
            rows = pack_rows([len(p) for p in packed], budget)
            packed = [concat([packed[i] for i in row]) for row in rows]
        return collate(packed, self.pad_id, dtype=dtype, mask=mask)

    def train_length(self, ex: Example, stage: Stage) -> int:
        """Tokens of the training sequence (for max-length checks)."""
        return len(pack(self.segments(ex, stage, 0.0), self.eos_id))

    def train_lengths(self, examples: list[Example], stages: list[Stage]) -> np.ndarray:
        """(stages, examples) int64 array: `train_length` of every example at every stage.

        The start-up length check needs all of them; the shipped methods override this to
        sum per-segment token counts (`rim.tokenized.counts`) instead of laying out each
        sequence, tested against `pack`. This default loops, for any other method."""
        out = [[self.train_length(ex, s) for ex in examples] for s in stages]
        return np.array(out, dtype=np.int64).reshape(len(stages), len(examples))

    def grounds_steps(self, stage: Stage) -> bool:
        """Whether `stage` trains a step readout straight after each block (RiM's grounding):
        the trainer then logs how well each block spells its step at each validation."""
        return False

    def memory_report(self, model, examples: list[Example], batch_size: int) -> dict:
        """What the method's own heads read from its memory (RiM's state head), for the
        trainer's validations and `rim eval`; none by default."""
        return {}

    # ---- inference ----
    def prompt(self, question: str, blocks: int | None = None) -> list[int]:
        return list(self.question_ids(question))

    def max_new_tokens(self) -> int:
        c = self.common
        return c.cot_max_new_tokens if self.writes_reasoning else c.max_new_tokens

    def latent_positions(self) -> int:
        """Positions a prefill adds after the prompt (latent thoughts), for length checks."""
        return 0

    def prefill(self, model, prompts: list[list[int]], keep_states: int = 0) -> Prefill:
        """The state greedy decoding starts from; `keep_states`: see `rim.decoding.prefill`."""
        return prefill(model, prompts, self.pad_id, keep_states)

    def first_pass(self, model):
        """How the all-blocks decoder's prefill runs (`rim.decoding.FirstPass`); None: one
        forward over question and blocks."""
        return None

    def answer_tokens(self, generated: list[int]) -> list[int]:
        """The answer part of `generated`: after the marker for CoT-like methods (none = no answer)."""
        start = self.answer_start(generated)
        return [] if start is None else generated[start:]

    def first_answer_index(self, generated: list[int]) -> int:
        """Index of the first answer token in `generated` (for time to first answer token):
        where `answer_tokens` starts, the last token when the answer is empty or missing."""
        start = self.answer_start(generated)
        last = max(len(generated) - 1, 0)
        return last if start is None else min(start, last)

    def answer_start(self, generated: list[int]) -> int | None:
        """Where the answer starts in `generated`: 0, or after the LAST marker for CoT-like
        methods (None without one). The one marker rule for accuracy and for latency.

        Split on token ids, not text: a tokenizer may decode the marker differently (`# # # #`).
        """
        if not self.writes_reasoning:
            return 0
        marker = list(self.text_ids(self.marker))
        n = len(marker)
        for i in range(len(generated) - n, -1, -1):  # the last marker wins
            if generated[i : i + n] == marker:
                return i + n
        return None

    # ---- method-owned modules (CODI's projection): none by default ----
    def attach(self, model, checkpoint: Path | None = None):
        """`model` with this method's own modules registered on it (so the optimizer, DDP and
        resumable checkpoints see them); from `checkpoint`, with their saved weights."""
        return model

    def save_modules(self, model, folder: Path, state_dict: dict | None = None) -> None:
        """Write the weights of the modules `attach` added into a checkpoint `folder`."""

    def meta(self, plan: list[Stage] | None = None) -> dict:
        """What a checkpoint needs to reproduce inference (written to rim.json); `plan`: the
        stages it was trained with."""
        return {"method": self.name, "answer_marker": self.marker}


def row_options(model) -> tuple[torch.dtype, Any]:
    """(mask dtype, mask builder) of `model`'s rows: its weights' dtype; `rim.flex.Tables.of`
    under FlexAttention (no dense mask), else None (the 4-D additive mask)."""
    return next(model.parameters()).dtype, flex.Tables.of if flex.enabled(model) else None


def labelled_forward(model, batch: Batch, num_examples: int, **extra):
    """(model output, `weighted_nll` of its labels): one forward pass over `batch`, the LM
    head only where labels are (`out.logits` is (N, V) for the N labelled positions)."""
    where = batch.labels != IGNORE  # (B, L)
    with labelled_head(model, where):
        out = model(
            input_ids=batch.input_ids,
            attention_mask=flex.attention_mask(batch.attention_mask),
            position_ids=batch.position_ids,
            use_cache=False,
            **extra,
        )
    return out, weighted_nll(out.logits, batch.labels[where], batch.weights[where], num_examples)


def batch_loss(model, batch: Batch, num_examples: int) -> torch.Tensor:
    """`weighted_nll` of one forward pass over `batch`, the LM head only where labels are."""
    return labelled_forward(model, batch, num_examples)[1]


def attach_module(
    model, name: str, module: torch.nn.Module, checkpoint: Path | None, file: str, missing: str
) -> torch.nn.Module:
    """Register a method's own `module` on `model` as `name` (so the optimizer, DDP and
    resumable checkpoints see it), on the model's device and dtype; from `checkpoint/file`
    when given (`missing`: the one-line error without it)."""
    ref = next(model.parameters())
    module.to(ref.device, ref.dtype)
    if checkpoint is not None:
        path = Path(checkpoint) / file
        if not path.is_file():
            raise RimError(f"{checkpoint}: {missing} without {file}")
        from safetensors.torch import load_file

        module.load_state_dict(load_file(path, device=str(ref.device)))
    module.train(model.training)
    model.add_module(name, module)
    if isinstance(getattr(model, "_keys_to_ignore_on_save", None), set):
        # save_pretrained leaves it out: from_pretrained could not place it anyway
        model._keys_to_ignore_on_save |= {f"{name}.{k}" for k in module.state_dict()}
    return module


@contextmanager
def labelled_head(model, where: torch.Tensor) -> Iterator[None]:
    """Inside, `model`'s LM head runs only at the positions `where` (B, L) is True: its
    logits come back flat, (N, V), in `where`'s row-major order.

    Only readouts carry labels, so the full (B, L, V) logits (and their fp32 copy) are mostly
    waste. A pre-hook on the output embedding gathers the head's input, so the forward still
    runs through `model` (DDP syncs, FSDP gathers, PEFT's LoRA or trainable-token head and the
    model's own logit post-processing all apply), on any transformers version
    (`logits_to_keep` takes a boolean mask only in recent ones). Unwrapped by accelerate.
    """
    head = extract_model_from_parallel(model).get_output_embeddings()

    def gather(module, args):
        return (args[0][where], *args[1:])  # (B, L, D) -> (N, D)

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def readout(ids: tuple[int, ...], parent: int, weight: float) -> Segment:
    return Segment(tuple(ids), parent=parent, weight=weight, kind="readout")


def block_chain(mem: MemoryTokens, k: int, first_parent: int = 0) -> list[Segment]:
    """k memory blocks, each under the previous one (block 1 under `first_parent`)."""
    return [Segment(tuple(mem.block()), parent=first_parent + i, kind="block") for i in range(k)]
