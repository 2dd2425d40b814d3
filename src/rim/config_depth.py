"""Typed settings of RiM's depth options (ours, issue 31): `memory.loops`, `memory.loop_input`,
`memory.state_loss`; `rim.config.MemoryConfig` inherits them (its module is at the size limit).

    memory:
      loops: 2              # R passes over the blocks after the prefill (0 = the paper's RiM)
      loop_input: previous  # own | previous: which pass r-1 state feeds a block token
      state_loss: {weight: 0.1, target: last, tokens: 6, stages: [1]}

What they do, and which parts are the paper's: docs/method.md, "Looped memory and the state
loss"; the code: `rim.methods.depth`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rim.errors import ConfigError

STATE_TARGETS = ("bag", "first", "last")
STATE_POOLS = ("mean", "last")
LOOP_INPUTS = ("own", "previous")


@dataclass
class StateLossConfig:
    """An auxiliary loss: block t's hidden state predicts reasoning step t (off at weight 0).

    `target`: `bag` = step t's distinct tokens as one multi-hot target (order-free), `first` /
    `last` = its first / last `tokens` tokens, one head slot each. A step usually ends with its
    result (a running sum, `... = 42`), so `last` with `tokens` = the result's length covers
    it; `first` suits steps that lead with it.
    """

    weight: float = 0.0  # 0 = off: the paper's RiM loss, bit for bit
    layer: int | None = None  # hidden_states index (0 = embeddings, L = last); None = L // 2
    target: str = "last"  # bag | first | last
    tokens: int = 8  # first / last: slots (a shorter step leaves the rest unsupervised)
    pool: str = "mean"  # mean over the block's M + 2 tokens | last: its `</b>` token
    stages: list[int] = field(default_factory=lambda: [1])  # 1 = grounding, 2 = refinement

    def __post_init__(self) -> None:
        w = self.weight
        if not 0.0 <= w <= 100.0:
            raise ConfigError(f"memory.state_loss.weight: must be in [0, 100], got {w!r}")
        if self.layer is not None and self.layer < 0:
            raise ConfigError("memory.state_loss.layer: must be >= 0 (or null: the middle one)")
        if self.target not in STATE_TARGETS:
            raise ConfigError("memory.state_loss.target: must be bag, first or last")
        if self.tokens < 1:
            raise ConfigError("memory.state_loss.tokens: must be >= 1")
        if self.pool not in STATE_POOLS:
            raise ConfigError("memory.state_loss.pool: must be mean or last")
        if not self.stages or not set(self.stages) <= {1, 2}:
            raise ConfigError("memory.state_loss.stages: a non-empty list of 1 and/or 2")


@dataclass
class DepthConfig:
    """The fields `MemoryConfig` inherits: looped memory and the state loss."""

    loops: int = 0  # R: passes over the blocks only after the prefill; 0 = the paper's RiM
    loop_input: str = "own"  # pass r's input of a block token: its own | its predecessor's
    # last-layer state of pass r - 1, through a learned projection initialised to identity
    state_loss: StateLossConfig = field(default_factory=StateLossConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.loops <= 64:
            raise ConfigError(f"memory.loops: must be in 0..64, got {self.loops!r}")
        if self.loop_input not in LOOP_INPUTS:
            raise ConfigError("memory.loop_input: must be own or previous")
