"""Memory blocks (METHOD.md section 2): K fixed blocks `[<b>, <m> x M, </b>]` of three new tokens.

The blocks are never generated: they are appended to the question and processed in the same
forward pass. Only the three new embedding rows are learned among the embeddings of a
pretrained model (see `rim.model`); blocks differ only by position.
"""

from __future__ import annotations

from dataclasses import dataclass

from rim.config import MemoryConfig


@dataclass(frozen=True)
class MemoryTokens:
    """Token ids of one block layout; `blocks(k)` is what is appended to a question."""

    start_id: int
    mem_id: int
    end_id: int
    mem_tokens: int  # M
    num_blocks: int  # K at inference

    @property
    def block_len(self) -> int:
        return self.mem_tokens + 2

    def block(self) -> list[int]:
        """One block: `[<b>, <m> x M, </b>]`.

        >>> MemoryTokens(7, 8, 9, mem_tokens=2, num_blocks=3).block()
        [7, 8, 8, 9]
        """
        return [self.start_id] + [self.mem_id] * self.mem_tokens + [self.end_id]

    def blocks(self, k: int | None = None) -> list[int]:
        """k blocks in a row (default K)."""
        k = self.num_blocks if k is None else k
        return self.block() * k

    @property
    def ids(self) -> list[int]:
        return [self.start_id, self.mem_id, self.end_id]


def token_strings(cfg: MemoryConfig) -> list[str]:
    return [cfg.start_token, cfg.mem_token, cfg.end_token]


def add_special_tokens(tokenizer, strings: list[str]) -> list[int]:
    """Register `strings` as additional special tokens (idempotent) and return their ids."""
    missing = [s for s in strings if s not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    return [tokenizer.convert_tokens_to_ids(s) for s in strings]


def memory_tokens(tokenizer, cfg: MemoryConfig) -> MemoryTokens:
    """The block token ids for `cfg` in `tokenizer` (adding the tokens if needed)."""
    start, mem, end = add_special_tokens(tokenizer, token_strings(cfg))
    return MemoryTokens(start, mem, end, cfg.mem_tokens, cfg.blocks)
