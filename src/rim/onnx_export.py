"""`rim export --format onnx`: one ONNX graph with a KV cache, for ONNX Runtime on CPU and edge.

    rim export --checkpoint runs/x/best --out exported/x-onnx --format onnx
    rim generate --runtime onnx --checkpoint exported/x-onnx "3 + 4 - 2"

The graph comes from transformers' own exporter (`transformers.exporters.OnnxExporter`:
torch.export, then torch.onnx with dynamo), which follows the installed transformers: 5.23 or
newer, whose result saves itself as a folder (older ones are refused in one line,
`require_exporter`); optimum-onnx (0.1.0) needs transformers < 4.58 and cannot be installed
beside it.

One graph serves the prompt and every greedy step. It is the exporter's multi-token decode
step (`multi_token_decode=True`): the number of new tokens and the cache length are both
dynamic, so the prefill is the same graph fed an empty cache, and the weights are stored
once. `logits_to_keep=1` is traced in: only the last position's logits are computed, as in
rim's own prefill (greedy needs no more). The batch axis is fixed at 1 and the graph takes no
attention mask: one question at a time, the edge case. `rim.onnx_runtime` runs it.

The exporter is chatty (torch.onnx's progress, torch.export's shape notes, transformers'
"experimental" warnings, ~25 lines on success): all it writes goes to `onnx_export.log` in the
export folder, shown on stderr only if the export fails, or as it comes with `--verbose`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from rim.errors import RimError

ONNX_FILE = "model.onnx"
LOG_FILE = "onnx_export.log"  # what the exporter printed (`--verbose` shows it instead)
_NEEDS = ("onnx", "onnxscript", "onnxruntime")


def require_onnx(flag: str = "--format onnx") -> None:
    """One-line error naming the extra when the ONNX libraries are missing."""
    missing = [m for m in _NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise RimError(f"{flag}: needs {', '.join(missing)} (pip install 'rim[onnx]')")


def require_exporter() -> None:
    """One-line error when transformers' exporter is too old for `--format onnx` (rim.compat)."""
    import transformers

    from rim.compat import onnx_exporter_saves

    if not onnx_exporter_saves():
        raise RimError(
            "--format onnx: needs transformers 5.23 or newer (its exporter's save_pretrained); "
            f"this is {transformers.__version__}: export where a newer one is installed"
        )


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Everything written while it runs goes to `log`: Python's stdout, stderr, warnings and
    logging, and file descriptors 1 and 2 (torch's log handlers hold the real stderr). On an
    error the log is shown on stderr, then the error propagates."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log, "a", buffering=1, encoding="utf-8") as f:  # append: both writers at the end
        saved: list[int] = []
        try:
            with contextlib.suppress(OSError):  # no fd 1 or 2 (embedded): Python streams only
                saved = [os.dup(1), os.dup(2)]
                os.dup2(f.fileno(), 1)
                os.dup2(f.fileno(), 2)
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        except BaseException:
            _restore(saved)
            sys.stderr.write(Path(log).read_text(encoding="utf-8", errors="replace"))
            raise
        finally:
            _restore(saved)


def _restore(saved: list[int]) -> None:
    for fd, old in zip((1, 2), saved):
        os.dup2(old, fd)
        os.close(old)
    saved.clear()


def export_onnx(model, prompt_ids: list[int], folder: Path, verbose: bool = False) -> dict:
    """Write `model.onnx` (+ `.data`, `export.json`, `config.json`) into `folder`, traced on
    one real prompt; returns the `onnx` section of rim.json (the graph's cache inputs).
    The exporter's messages go to `folder/onnx_export.log`, or to the terminal (`verbose`)."""
    import torch
    from transformers.exporters import OnnxConfig, OnnxExporter
    from transformers.exporters.utils import decompose_prefill_decode

    from rim.compat import CACHE_KW

    model.eval()
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    quiet = contextlib.nullcontext() if verbose else output_to(Path(folder) / LOG_FILE)
    with quiet:
        with torch.no_grad():
            stages = decompose_prefill_decode(model, {"input_ids": ids}, multi_token_decode=True)
        step, inputs = stages["decode"]
        inputs["logits_to_keep"] = 1  # a constant in the graph: logits of the last position
        exported = OnnxExporter().export(step, inputs, OnnxConfig(dynamic=True))
        exported.save_pretrained(folder)
    graph_inputs = [v.name for v in exported.program.graph.inputs]
    cache = _cache_inputs(graph_inputs, inputs[CACHE_KW])
    return {
        "model": ONNX_FILE,
        "batch": 1,
        "dtype": str(inputs[CACHE_KW].layers[0].keys.dtype).removeprefix("torch."),
        "cache_inputs": cache,
    }


def _cache_inputs(names: list[str], cache) -> list[list]:
    """[[graph input name, shape of an empty cache]] for the cache inputs of the graph: each
    named `...layers.I.keys|values`, shaped like the traced layer's tensor with its sequence
    axis (2) of length 0, which is what the prompt's pass starts from."""
    out = []
    for name in names:
        if name in ("input_ids", "position_ids"):
            continue
        found = re.search(r"layers\.(\d+)\.(keys|values)$", name)
        if not found:
            raise RimError(f"onnx export: unexpected graph input {name!r} (of {names})")
        shape = getattr(cache.layers[int(found[1])], found[2]).shape
        out.append([name, [*shape[:2], 0, *shape[3:]]])
    if len(out) != 2 * len(cache.layers) or len(names) != len(out) + 2:
        raise RimError(f"onnx export: unexpected graph inputs {names}")
    return out


def tokenizer_json_exact(folder: Path, method, questions) -> bool:
    """Does the bare `tokenizers` library (what `rim.onnx_runtime` uses, no transformers)
    tokenize `questions` exactly as the method does?"""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    return all(tok.encode(q).ids == list(method.question_ids(q)) for q in questions)
