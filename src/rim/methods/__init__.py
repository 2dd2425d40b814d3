"""Methods by name: `method: rim|direct|cot|pause|coconut|icot|codi` in a recipe picks one."""

from __future__ import annotations

from rim.methods.base import Method
from rim.methods.coconut import Coconut
from rim.methods.codi import CODI
from rim.methods.cot import CoT
from rim.methods.direct import Direct
from rim.methods.icot import ICoT
from rim.methods.pause import Pause
from rim.methods.rim import RiM

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Direct, CoT, Pause, RiM, Coconut, ICoT, CODI)
}


def method_class(name: str) -> type[Method]:
    from rim.errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"method: {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "method_class"]
