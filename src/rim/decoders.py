"""Decoders by name: how a method's prompts become answers (`rim eval|generate --decoder`).

    final       one prefill of the method's prompt, then greedy tokens: the deployed path
    all-blocks  RiM's answer after every block 1..K from one shared prefill and KV cache

A decoder is a function of a `Request` registered with `register`; a new one (e.g. an
early-exit decoder that stops at the first confident block) is one function and one call,
and every entry point (`evaluate`, `Reasoner.generate`, the CLI) offers it by name.
The input checks every entry point shares (empty or too-long questions) live here too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rim.decoding import Decoded, all_blocks_greedy, greedy
from rim.errors import ConfigError, RimError
from rim.model import max_positions

UNKNOWN_WARN = 0.05  # warn when more than this share of question tokens is unknown


@dataclass(frozen=True)
class Request:
    """What a decoder gets: prompts already built (and truncated) by the method."""

    method: object  # a rim.methods.Method
    model: torch.nn.Module
    questions: list[list[int]]  # question ids per row
    prompts: list[list[int]]  # the method's prompt per row (question ids + blocks, ...)
    blocks: int | None  # K override for block methods
    clock: Callable[[], float] | None
    start: float
    keep_states: bool  # return the memory blocks' hidden states (`Decoded.memory_states`)
    options: dict | None = None  # decoder-specific (early-exit: threshold, probe)


@dataclass(frozen=True)
class Decoder:
    name: str
    run: Callable[[Request], Decoded]
    needs_blocks: bool = False  # only for methods with memory blocks
    summary: str = ""
    looped: bool = False  # also for looped memory (`memory.loops` > 0)


DECODERS: dict[str, Decoder] = {}


def register(decoder: Decoder) -> Decoder:
    DECODERS[decoder.name] = decoder
    return decoder


def get(name: str, method=None, key: str = "--decoder") -> Decoder:
    """The decoder called `name`, checked against `method` (one line naming `key` if not)."""
    if name not in DECODERS:
        raise ConfigError(f"{key}: {name!r} is not one of {', '.join(DECODERS)}")
    dec = DECODERS[name]
    if method is not None and dec.needs_blocks and not method.uses_blocks:
        raise RimError(f"{key} {name}: method {method.name} has no memory blocks")
    if method is not None and not dec.looped:
        refuse_looped(method, f"{key} {name}")
    return dec


def refuse_looped(method, what: str) -> None:
    """One line for what reads the blocks one at a time or probes their states: a looped
    model's blocks are what its 1 + R passes left (the final and all-blocks decoders)."""
    loops = getattr(method, "loops", 0)
    if loops:
        raise RimError(
            f"{what}: memory.loops is {loops}: a looped model is read after its last pass "
            "(use the final or all-blocks decoder)"
        )


def default_for(method) -> str:
    """Evaluation's default: every block's answer for block methods, else the final one."""
    return "all-blocks" if method.uses_blocks else "final"


def _final(req: Request) -> Decoded:
    m = req.method
    keep = len(m.mem.blocks(req.blocks)) if req.keep_states and m.uses_blocks else 0
    state = m.prefill(req.model, req.prompts, keep_states=keep)
    return greedy(req.model, state, m.eos_id, m.max_new_tokens(), req.clock, req.start)


def _all_blocks(req: Request) -> Decoded:
    m = req.method
    return all_blocks_greedy(
        req.model, req.questions, m.mem.blocks(req.blocks), m.mem.block_len, m.pad_id,
        m.eos_id, m.max_new_tokens(), req.clock, req.start, req.keep_states,
        first_pass=m.first_pass(req.model),
    )  # fmt: skip


ALL_BLOCKS = "the answer after every block, one prefill"
register(Decoder("final", _final, summary="the answer after all K blocks (deployed)", looped=True))
register(Decoder("all-blocks", _all_blocks, True, ALL_BLOCKS, looped=True))


@torch.no_grad()
def decode(
    method,
    model,
    questions: list[str],
    decoder: str = "final",
    blocks: int | None = None,
    clock: Callable[[], float] | None = None,
    truncate: bool = False,
    keep_states: bool = False,
    options: dict | None = None,
) -> Decoded:
    """Answer `questions` with `method`'s prompt and the decoder called `decoder`.

    `blocks` overrides K (block methods); `truncate` drops a too-long question's oldest
    tokens (see `check_questions`); `keep_states` returns the memory blocks' hidden states;
    `options` go to the decoder (early-exit: `threshold`, `probe`).
    """
    dec = get(decoder, method)
    fitted = [_truncated(method, model, q, blocks, truncate) for q in questions]
    start = clock() if clock is not None else 0.0
    req = Request(
        method, model, [f[0] for f in fitted], [f[1] for f in fitted], blocks, clock, start,
        keep_states, options,
    )  # fmt: skip
    return dec.run(req)


# ---------------------------------------------------------------- input checks


def position_limit(method, model) -> int | None:
    """Positions a prompt plus its answer may use: the model's, or the recipe's max_length."""
    limits = [max_positions(model), method.common.max_length]
    limits = [n for n in limits if isinstance(n, int)]
    return min(limits) if limits else None


def _reserved(method, question_ids: list[int], prompt: list[int]) -> int:
    """Positions after the question: blocks (or latent thoughts) and the answer budget."""
    return len(prompt) - len(question_ids) + method.latent_positions() + method.max_new_tokens()


def check_questions(
    method, model, questions: list[str], blocks: int | None = None, truncate: bool = False,
    where: Callable[[int], str] = lambda i: f"question {i + 1}",
) -> None:  # fmt: skip
    """Refuse what the model cannot answer: empty questions and, unless `truncate`, questions
    longer than the positions left after the blocks and the answer budget. Warns (one line)
    when many question tokens are unknown to the tokenizer (the wrong checkpoint or data)."""
    limit = position_limit(method, model)
    unk, n_unk, n_all = method.tokenizer.unk_token_id, 0, 0
    for i, q in enumerate(questions):
        if not q.strip():
            raise RimError(f"{where(i)}: empty question")
        ids = list(method.question_ids(q))
        reserved = _reserved(method, ids, method.prompt(q, blocks))
        if (
            limit is not None
            and (len(ids) + reserved > limit)
            and (not truncate or limit - reserved < 2)
        ):
            raise RimError(
                f"{where(i)}: {len(ids)} question tokens + {reserved} for blocks and answer "
                f"> {limit} positions of the model (shorten it, or pass --truncate)"
            )
        n_all += len(ids)
        n_unk += ids.count(unk) if unk is not None else 0
    if n_all and n_unk / n_all > UNKNOWN_WARN:
        print(
            f"rim: warning: {n_unk / n_all:.0%} of the question tokens are unknown to the "
            f"checkpoint's tokenizer ({method.tokenizer.unk_token}); is the data for this model?",
            file=sys.stderr,
        )


def _truncated(
    method, model, question: str, blocks: int | None, truncate: bool
) -> tuple[list[int], list[int]]:
    """(question ids, prompt); with `truncate`, the question's oldest tokens dropped so the
    prompt and the answer fit (its first token, bos, kept)."""
    ids = list(method.question_ids(question))
    prompt = method.prompt(question, blocks)
    limit = position_limit(method, model) if truncate else None
    cut = 0 if limit is None else max(len(ids) + _reserved(method, ids, prompt) - limit, 0)
    if cut:
        keep = ids[:1] + ids[1 + cut :]
        prompt, ids = keep + prompt[len(ids) :], keep
    return ids, prompt
