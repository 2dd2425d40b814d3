"""What every benchmark starts from: a model, its tokenizer, methods and questions.

`make_method` and `run_decode` are the only places the benchmarks build a method or decode,
so a change of either API is a change of one function here.
"""

from __future__ import annotations

import itertools
import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from rim.config import Config, MemoryConfig, ModelConfig
from rim.errors import RimError
from rim.memory import add_special_tokens

# named sizes with the real vocabulary of their family (GPT-2 50257, Llama-3.2 128256)
FAMILY: dict[str, tuple[str, int]] = {
    "gpt2": ("gpt2", 50257),
    "llama-1b": ("llama", 128256),
    "llama-3b": ("llama", 128256),
}
NEVER = -1  # an EOS id no generated token can equal: generation runs to max_new_tokens
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
WORDS = ["".join(p) for p in itertools.product(string.ascii_lowercase, repeat=2)]


@dataclass
class BenchModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    arch: str
    device: torch.device
    dtype: torch.dtype

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def config(self, params_digits: int) -> dict:
        """The model part of a result's `config` (params in millions, `params_digits` places)."""
        return {
            "model": self.name,
            "arch": self.arch,
            "params_m": round(self.params / 1e6, params_digits),
            "vocab": self.model.get_input_embeddings().weight.shape[0],
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
        }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise RimError(f"--dtype {name}: not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _device(name: str | torch.device) -> torch.device:
    from rim.reasoner import check_device  # the one check every command shares

    return check_device(name)


def _special_strings() -> list[str]:
    """Memory-block and Coconut tokens (every method's new tokens), default spellings."""
    from rim.methods import METHODS

    cfg = Config()
    out: list[str] = []
    for cls in METHODS.values():
        out += [s for s in cls.new_tokens(cls.settings_from(cfg)) if s not in out]
    return out


def load_bench_model(
    name: str,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    max_positions: int = 1024,
    seed: int = 0,
    tokenizer=None,
) -> BenchModel:
    """A random-init model of a named size (`rim.model.SIZES`) or local weights (a folder).

    Named sizes `gpt2`, `llama-1b`, `llama-3b` get their family's real vocabulary size (the LM
    head matters for latency); the small synthetic sizes (`tiny`, `small`, `base`) are
    Llama-style with a word-level vocabulary: of `WORDS`, or `tokenizer` (one built from a
    data file: `rim bench train --data`). The tokenizer holds every method's special tokens.
    """
    dev, dt = _device(device), parse_dtype(dtype)
    if Path(name).is_dir():
        model, tok, arch = _load_local(name)
    else:
        model, tok, arch = _build_named(name, dev, max_positions, seed, tokenizer)
    model.to(device=dev, dtype=dt).eval()
    return BenchModel(model, tok, name, arch, dev, dt)


def _load_local(path: str) -> tuple[torch.nn.Module, object, str]:
    from rim.model import load_pretrained, load_tokenizer, resize_for

    tok = load_tokenizer(path)
    add_special_tokens(tok, _special_strings())
    model = load_pretrained(ModelConfig(path=path))
    resize_for(model, tok)
    return model, tok, model.config.model_type


def _build_named(
    name: str, dev: torch.device, max_positions: int, seed: int, tok=None
) -> tuple[torch.nn.Module, object, str]:
    from rim.model import SIZES, build_model, build_tokenizer

    if name not in SIZES:
        raise RimError(f"--model {name}: not a model folder nor one of {', '.join(SIZES)}")
    arch, vocab = FAMILY.get(name, ("llama", 0))
    if tok is None:
        tok = build_tokenizer(WORDS + [Config().eval.answer_marker], _special_strings())
    torch.manual_seed(seed)
    with dev:  # initialise on the device: a 3B model initialises in seconds on a GPU
        model = build_model(ModelConfig(arch=arch, size=name), max(vocab, len(tok)), max_positions)
    return model, tok, arch


def coconut_split(thoughts: int) -> tuple[int, int]:
    """(thoughts_per_step c, max_stage) with c * max_stage == thoughts (c = 2 when it can)."""
    if thoughts < 0:
        raise RimError(f"--thoughts {thoughts}: must be >= 0")
    return (2, thoughts // 2) if thoughts % 2 == 0 else (1, thoughts)


def bench_config(
    name: str, blocks: int, mem_tokens: int, answer_tokens: int, cot_tokens: int, thoughts: int,
    loops: int = 0,
) -> Config:  # fmt: skip
    """Method `name`'s Config: answer tokens for every method, plus `cot_tokens` of reasoning
    for CoT; Coconut thinks `thoughts` continuous thoughts; RiM loops `loops` times."""
    cfg = Config(method=name)
    loops = loops if name == "rim" else 0
    cfg.memory = MemoryConfig(blocks=blocks, mem_tokens=mem_tokens, loops=loops)
    cfg.eval.max_new_tokens = answer_tokens
    cfg.eval.cot_max_new_tokens = answer_tokens + (cot_tokens if name == "cot" else 0)
    cfg.coconut.thoughts_per_step, cfg.coconut.max_stage = coconut_split(thoughts)
    return cfg


def make_method(
    name: str,
    tokenizer,
    *,
    blocks: int = 8,
    mem_tokens: int = 2,
    answer_tokens: int = 3,
    cot_tokens: int = 0,
    thoughts: int = 6,
    never_stop: bool = True,
    loops: int = 0,
):
    """The registered method `name` configured for a benchmark, or None if it is not registered.

    Every benchmark builds its methods here. With `never_stop` the EOS id is one no token can
    have, so a random model generates exactly the configured number of tokens. `loops`: RiM's
    `memory.loops` (its modules still to be attached: `method.attach(model)`).
    """
    from rim.methods import METHODS, build

    if name not in METHODS:
        return None
    cfg = bench_config(name, blocks, mem_tokens, answer_tokens, cot_tokens, thoughts, loops)
    return build(cfg, tokenizer, eos_id=NEVER if never_stop else None)


def run_decode(method, model, questions: list[str], *, clock=None):
    """Greedy answers of `method` to `questions` (`rim.decoders.decode`, the path `rim eval`
    takes); every benchmark decodes through here."""
    from rim.decoders import decode

    return decode(method, model, questions, "final", clock=clock)


def question_text(tokenizer, n_tokens: int, seed: int = 0) -> str:
    """A question of random words that tokenises (with special tokens) to `n_tokens` tokens."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(4 * n_tokens + 8)]

    def length(k: int) -> int:
        return len(tokenizer(" ".join(words[:k]), add_special_tokens=True)["input_ids"])

    k = max(n_tokens, 1)
    for _ in range(50):  # token count grows with the word count: walk to the target
        diff = n_tokens - length(k)
        if diff == 0:
            break
        k = min(max(k + (diff if abs(diff) > 1 else (1 if diff > 0 else -1)), 1), len(words))
    return " ".join(words[:k])
