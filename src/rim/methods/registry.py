"""The one registry of methods, and the one way to make one: `build(cfg, tokenizer)`.

A method module registers its class with `@register`; `rim.methods` imports the built-in
ones. Config checks, the CLI, the demo, `rim bench` and export all read `METHODS`.
"""

from __future__ import annotations

from rim.config import Config
from rim.curriculum import Stage
from rim.errors import ConfigError
from rim.memory import add_special_tokens
from rim.methods.base import Common, Method, Tokens

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available as `method: <cls.name>` in recipes."""
    if not cls.name or cls.name == Method.name:
        raise ValueError(f"{cls.__qualname__}: a registered method needs its own `name`")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str, key: str = "method") -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"{key}: {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def check(cfg: Config) -> Config:
    """`cfg` if its `method` is registered (a ConfigError naming the key if not)."""
    method_class(cfg.method)
    return cfg


def build(cfg: Config, tokenizer, *, eos_id: int | None = None) -> Method:
    """The method `cfg.method`, with its special tokens registered in `tokenizer` (idempotent).

    `eos_id` overrides the tokenizer's EOS (benchmarks pass an id no token has, so decoding
    runs its whole token budget).
    """
    cls = method_class(cfg.method)
    settings = cls.settings_from(cfg)
    strings = cls.new_tokens(settings)
    new = tuple(add_special_tokens(tokenizer, strings)) if strings else ()
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    tokens = Tokens(eos, tokenizer.pad_token_id, new)
    return cls(Common.from_config(cfg), settings, tokens, tokenizer)


def plan(cfg: Config, n_train: int, t_max: int = 0) -> list[Stage]:
    """`cfg`'s stage plan for `n_train` examples without a tokenizer (for planning ahead,
    e.g. the demo's progress display): the method's own `plan()`, on placeholder token ids."""
    cls = method_class(cfg.method)
    settings = cls.settings_from(cfg)
    tokens = Tokens(0, 0, tuple(range(len(cls.new_tokens(settings)))))
    return cls(Common.from_config(cfg), settings, tokens, None).plan(n_train, t_max)
