"""Methods by name: `method: rim|direct|cot|pause|coconut|icot|codi` in a recipe picks one.

Each built-in method registers itself in its own module (`@register`); importing this
package imports them. `build(cfg, tokenizer)` is the one way to make a method.
"""

from __future__ import annotations

# ruff: noqa: I001 (registration order is the order `rim demo` and error messages list them)
from rim.methods import direct, cot, pause, rim, coconut, icot, codi  # noqa: F401
from rim.methods.base import Common, Method, Tokens
from rim.methods.registry import METHODS, build, check, method_class, plan, register

__all__ = [
    "METHODS", "Common", "Method", "Tokens", "build", "check", "method_class", "plan",
    "register",
]  # fmt: skip
