"""A trained checkpoint ready to answer: `Reasoner.load(dir).generate(["3 + 4"])`.

The user-facing layer over `rim.decoders`: it loads weights, tokenizer and method from a
checkpoint folder (`rim.assembly.from_checkpoint`), checks the questions and decodes them.
"""

from __future__ import annotations

import torch

from rim.assembly import from_checkpoint
from rim.decoders import check_questions, decode
from rim.errors import RimError


def check_device(name: str | torch.device) -> torch.device:
    """`--device` as a device this machine has, else one line naming the flag (torch fails
    late and deep: an AssertionError for CUDA in a CPU build, a RuntimeError for a typo).

    Used by every command that loads a model (`Reasoner.load`, `rim bench`)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RimError(f"--device {name}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu
    if device.type == "meta" or not hasattr(backend, "is_available"):
        raise RimError(f"--device {name}: not supported (cpu, cuda, cuda:N)")
    if not backend.is_available():
        raise RimError(f"--device {name}: {device.type.upper()} is not available on this machine")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise RimError(f"--device {name}: this machine has {count} {device.type} device(s)")
    return device


class Reasoner:
    def __init__(self, model, tokenizer, method, config=None):
        self.model, self.tokenizer, self.method = model, tokenizer, method
        self.config = config  # the checkpoint's recipe (rim.config.Config), when loaded

    @classmethod
    def load(cls, checkpoint: str, device: str = "cpu", verify: bool | None = None) -> Reasoner:
        """`verify`: hash every file against the manifest (None: when the folder is small)."""
        check_device(device)  # before any file is read: one line, not torch's traceback
        return cls(*from_checkpoint(checkpoint, device, verify))

    def generate(
        self,
        questions: list[str],
        blocks: int | None = None,
        decoder: str = "final",
        truncate: bool = False,
    ) -> list[str] | list[list[str]]:
        """Greedy answers; with `decoder="all-blocks"`, K answers (after blocks 1..K) each.

        Questions are checked first (`check_questions`): too long is an error unless
        `truncate`, which drops their oldest tokens."""
        check_questions(self.method, self.model, questions, blocks, truncate)
        out = decode(self.method, self.model, questions, decoder, blocks, truncate=truncate)
        texts = self.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        K = out.rows_per_question
        if K == 1:
            return texts
        return [texts[i * K : (i + 1) * K] for i in range(len(questions))]


def generate(checkpoint: str, questions: list[str], **kwargs) -> list[str] | list[list[str]]:
    """One-call API: load `checkpoint` and answer `questions` (see `Reasoner.generate`)."""
    return Reasoner.load(checkpoint).generate(questions, **kwargs)
