"""rim.compat: the KV cache reaches the model and comes back under this transformers' name.

A model of a release that does not know the name rim passes takes it silently through
`**kwargs` and runs without the cache: the continuation below would then see no prompt.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache

from rim.compat import CACHE_KW, cache_of, with_cache

from .conftest import make_setup


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_cache_keyword_is_the_models_own(arch):
    *_, model, _ = make_setup("direct", arch, "sdpa")
    assert CACHE_KW in inspect.signature(type(model).forward).parameters


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@torch.no_grad()
def test_cached_step_equals_the_full_pass(arch):
    """Prompt with a cache, then one token through `with_cache`: the same logits as one pass
    over prompt + token, and the returned cache holds both."""
    *_, model, _ = make_setup("direct", arch, "sdpa")
    ids = torch.tensor([[3, 5, 7, 9, 4, 6]])  # (1, 6)
    full = model(input_ids=ids, use_cache=False).logits[:, -1]  # (1, V)
    out = model(input_ids=ids[:, :-1], use_cache=True, **with_cache(DynamicCache()))
    cache = cache_of(out)
    assert cache.get_seq_length() == 5
    step = model(input_ids=ids[:, -1:], use_cache=True, **with_cache(cache))
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-5, atol=1e-5)
    assert cache_of(step).get_seq_length() == 6


def test_onnx_export_on_an_old_exporter_is_one_line(tmp_path, capsys, monkeypatch):
    """transformers 5.17's exporter returns a bare ONNXProgram: refused before the checkpoint
    is loaded, in one line naming the release it needs."""
    for module in ("onnxruntime", "onnx", "onnxscript"):  # the extra rim[onnx]
        pytest.importorskip(module)
    import rim.compat

    from .test_errors import fails

    monkeypatch.setattr(rim.compat, "onnx_exporter_saves", lambda: False)
    line = fails(capsys, "export", "--checkpoint", str(tmp_path / "run" / "final"),
                 "--out", str(tmp_path / "onnx"), "--format", "onnx")  # fmt: skip
    assert "--format onnx: needs transformers 5.23 or newer" in line
    assert not (tmp_path / "onnx").exists()
