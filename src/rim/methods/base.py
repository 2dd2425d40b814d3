"""The one interface every method implements: a stage plan, a training loss, an inference prompt.

Most methods are *packed* methods: an example becomes a tree of segments (`rim.layout`) and
the loss is one forward pass with the 4-D mask. A method only says which segments to build;
Coconut, whose thoughts need sequential passes, overrides `loss` and `prefill`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from rim.config import Config
from rim.curriculum import Stage, steps_for
from rim.data import Example
from rim.layout import Segment, collate, pack, weighted_loss
from rim.memory import MemoryTokens


class Method:
    name = "base"
    uses_blocks = False  # inference appends K memory blocks to the question
    writes_reasoning = False  # generates reasoning before the answer marker (CoT-like)

    def __init__(self, cfg: Config, tokenizer, mem: MemoryTokens | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.mem = mem
        self.eos_id: int = tokenizer.eos_token_id
        self.pad_id: int = tokenizer.pad_token_id
        self.marker = cfg.eval.answer_marker
        self._question = lru_cache(maxsize=200_000)(self._encode_question)
        self._text = lru_cache(maxsize=200_000)(self._encode_text)

    @classmethod
    def new_tokens(cls, cfg: Config) -> list[str]:
        """Special tokens this method adds to the vocabulary (their rows are trained)."""
        if cls.uses_blocks:
            m = cfg.memory
            return [m.start_token, m.mem_token, m.end_token]
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
        sep = ex.step_sep if self.cfg.data.cot_join == "source" else " "
        return self.reasoning_ids(ex.steps[start:], sep)

    # ---- training ----
    def plan(self, n_train: int, t_max: int) -> list[Stage]:
        """Single-stage default: `train.epochs` or `train.steps`."""
        t = self.cfg.train
        steps = steps_for(t.epochs, t.steps, n_train, t.batch_size)
        return [Stage(self.name, 0, steps, t.lr, t.dropout)]

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
        e = self.cfg.eval
        return e.cot_max_new_tokens if self.writes_reasoning else e.max_new_tokens

    def prefill(self, model, prompts: list[list[int]]):
        from rim.decoding import prefill

        return prefill(model, prompts, self.pad_id)

    def answer_tokens(self, generated: list[int]) -> list[int]:
        """The answer part of `generated`: after the marker for CoT-like methods (none = no answer).

        Split on token ids, not text: a tokenizer may decode the marker differently (`# # # #`).
        """
        if not self.writes_reasoning:
            return generated
        marker = list(self.text_ids(self.marker))
        n = len(marker)
        for i in range(len(generated) - n, -1, -1):  # the last marker wins
            if generated[i : i + n] == marker:
                return generated[i + n :]
        return []

    def first_answer_index(self, generated: list[int]) -> int:
        """Index of the first answer token in `generated` (for time to first answer token)."""
        if not self.writes_reasoning:
            return 0
        marker = list(self.text_ids(self.marker))
        n = len(marker)
        for i in range(len(generated) - n + 1):
            if generated[i : i + n] == marker:
                return min(i + n, len(generated) - 1)
        return max(len(generated) - 1, 0)

    # ---- method-owned modules (CODI's projection): none by default ----
    def attach(self, model, checkpoint: Path | None = None):
        """`model` with this method's own modules registered on it (so the optimizer, DDP and
        resumable checkpoints see them); from `checkpoint`, with their saved weights."""
        return model

    def save_modules(self, model, folder: Path, state_dict: dict | None = None) -> None:
        """Write the weights of the modules `attach` added into a checkpoint `folder`."""

    def meta(self) -> dict:
        """What a checkpoint needs to reproduce inference (written to rim.json)."""
        return {"method": self.name, "answer_marker": self.marker}


def _mask_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def readout(ids: tuple[int, ...], parent: int, weight: float) -> Segment:
    return Segment(tuple(ids), parent=parent, weight=weight, kind="readout")


def block_chain(mem: MemoryTokens, k: int, first_parent: int = 0) -> list[Segment]:
    """k memory blocks, each under the previous one (block 1 under `first_parent`)."""
    return [Segment(tuple(mem.block()), parent=first_parent + i, kind="block") for i in range(k)]
