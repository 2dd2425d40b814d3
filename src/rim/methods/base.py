"""The one interface every method implements: a stage plan, a training loss, an inference prompt.

Most methods are *packed* methods: an example becomes a tree of segments (`rim.layout`) and
the loss is one forward pass with the 4-D mask. A method only says which segments to build;
Coconut, whose thoughts need sequential passes, overrides `loss` and `prefill`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import torch

from rim.config import Config
from rim.curriculum import Stage, steps_for
from rim.data import Example
from rim.decoding import Prefill, prefill
from rim.layout import Segment, collate, pack, weighted_loss
from rim.memory import MemoryTokens


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

    @classmethod
    def from_config(cls, cfg: Config) -> Common:
        t, e = cfg.train, cfg.eval
        return cls(
            e.answer_marker, e.max_new_tokens, e.cot_max_new_tokens, cfg.data.cot_join,
            cfg.data.max_length, t.epochs, t.steps, t.batch_size, t.lr, t.dropout, t.seed,
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

    def __init__(self, common: Common, settings: Any, tokens: Tokens, tokenizer):
        self.common, self.settings, self.tokens = common, settings, tokens
        self.tokenizer = tokenizer
        self.eos_id: int = tokens.eos
        self.pad_id: int = tokens.pad
        self.marker = common.answer_marker
        self.mem: MemoryTokens | None = None  # set by block methods
        self._question = lru_cache(maxsize=200_000)(self._encode_question)
        self._text = lru_cache(maxsize=200_000)(self._encode_text)

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

    def question_ids(self, question: str) -> tuple[int, ...]:
        return self._question(question)

    def text_ids(self, text: str) -> tuple[int, ...]:
        return self._text(text)

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
        sep = ex.step_sep if self.common.cot_join == "source" else " "
        return self.reasoning_ids(ex.steps[start:], sep)

    # ---- training ----
    def plan(self, n_train: int, t_max: int) -> list[Stage]:
        """Single-stage default: `train.epochs` or `train.steps`."""
        c = self.common
        steps = steps_for(c.epochs, c.steps, n_train, c.batch_size)
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
        packed = [pack(self.segments(ex, stage, progress), self.eos_id) for ex in examples]
        batch = collate(packed, self.pad_id, dtype=_mask_dtype(model)).to(device)
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits
        return weighted_loss(logits, batch, num_examples)

    def train_length(self, ex: Example, stage: Stage) -> int:
        """Tokens of the training sequence (for max-length checks)."""
        return len(pack(self.segments(ex, stage, 0.0), self.eos_id))

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


def _mask_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def readout(ids: tuple[int, ...], parent: int, weight: float) -> Segment:
    return Segment(tuple(ids), parent=parent, weight=weight, kind="readout")


def block_chain(mem: MemoryTokens, k: int, first_parent: int = 0) -> list[Segment]:
    """k memory blocks, each under the previous one (block 1 under `first_parent`)."""
    return [Segment(tuple(mem.block()), parent=first_parent + i, kind="block") for i in range(k)]
