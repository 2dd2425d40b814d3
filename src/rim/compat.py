"""What differs between the supported torch / transformers releases, decided in one place.

rim runs on transformers 5.17 (the GPU image users are likely to have: torch 2.11,
transformers 5.17) up to the pinned release. Between them transformers renamed the KV cache
argument of every model's `forward`, and the field of its output, from `past_key_values` to
`cache` (5.24). An older model takes an unknown `cache=` silently through its `**kwargs` and runs
without the cache, so the name must be chosen, not tried. It is read off transformers' own
output class (a feature check, not a version string compare).

    out = model(input_ids=ids, use_cache=True, **with_cache(cache))
    cache = cache_of(out)

`rim export --format onnx` needs the folder-writing exporter of transformers 5.23 and later
(`onnx_exporter_saves`); on older releases it stops with one line, the rest of rim runs.
"""

from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

# the name of the KV cache in model calls and in their outputs, in this transformers
CACHE_KW = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def with_cache(cache: Any) -> dict[str, Any]:
    """Keyword arguments passing `cache` to a model call: `model(..., **with_cache(cache))`."""
    return {CACHE_KW: cache}


def cache_of(out: Any) -> Any:
    """The KV cache a model call returned (`out.cache`; `out.past_key_values` before 5.24)."""
    return getattr(out, CACHE_KW)


def onnx_exporter_saves() -> bool:
    """Whether transformers' exporter hands back a model that saves itself as a folder
    (`ExportedModel.save_pretrained`, 5.23 on), which `rim export --format onnx` writes and
    whose graph names `rim.onnx_runtime` reads. 5.17's returns torch's bare `ONNXProgram`,
    with other input and output names: rim refuses the export there (one line)."""
    try:
        from transformers.exporters.base import ExportedModel
    except ImportError:
        return False
    return hasattr(ExportedModel, "save_pretrained")
