"""rim: Reasoning in Memory. Latent reasoning in K memory blocks, answered in one forward pass."""

from rim import early_exit as _early_exit  # noqa: F401, I001 (registers the early-exit decoder)
from rim.config import Config, load_config
from rim.data import Example, read_examples
from rim.data import generate as generate_data
from rim.errors import ConfigError, DataError, RimError
from rim.reasoner import Reasoner, generate

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "Example",
    "Reasoner",
    "RimError",
    "generate",
    "generate_data",
    "load_config",
    "read_examples",
]
