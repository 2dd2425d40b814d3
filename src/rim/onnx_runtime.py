"""Answer with ONNX Runtime on CPU: greedy decoding with the KV cache of an ONNX export.

    rim export --checkpoint runs/x/best --out exported/x-onnx --format onnx
    rim generate --runtime onnx --checkpoint exported/x-onnx "3 + 4 - 2"
    python -m rim.onnx_runtime exported/x-onnx "3 + 4 - 2" [--threads N]

The prompt is rim's own: the question's token ids followed by the K memory blocks
(`prompt_suffix_ids` of rim.json), one prefill over it, then one token per step until EOS or
`max_new_tokens`, taking the argmax each time, exactly as `rim generate` does.

The code needs onnxruntime, numpy and tokenizers, not torch or transformers. `rim export
--format onnx` ships a copy of this file in the export, so a device with only those three
packages (no rim) answers with `python EXPORT/onnx_runtime.py EXPORT "question"`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

try:
    from rim.errors import RimError
except ImportError:  # the copy inside an export, run where rim is not installed

    class RimError(Exception):
        exit_code = 2


_DTYPES = {"float32": "float32", "float16": "float16"}


def _session(path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:  # ONNX Runtime sizes its pool from every core of the machine otherwise
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "rim.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise RimError(f"--checkpoint {folder}: not a rim export (no readable rim.json)") from None
    if "onnx" not in meta:
        raise RimError(
            f"--checkpoint {folder}: no ONNX model (export one with: rim export --checkpoint "
            f"CKPT --out DIR --format onnx)"
        )
    if meta["onnx"].get("dtype") not in _DTYPES:
        raise RimError(f"{folder}: ONNX Runtime on CPU needs float32 or float16 weights")
    return meta


def _inside(folder: Path, name: object) -> Path:
    """`folder/name` for a file named in rim.json, refused unless it lies inside `folder`
    (no absolute path, no `..`, no symlink out): an export from someone else must not point
    the runtime at a file elsewhere. (rim.manifest.member, repeated: this file runs alone.)"""
    ok = isinstance(name, str) and name and not Path(name).is_absolute()
    ok = ok and ".." not in Path(name).parts
    if ok:
        path = folder / name
        ok = path.resolve().is_relative_to(folder.resolve()) and path.is_file()
    if not ok:
        raise RimError(
            f"{folder / 'rim.json'}: onnx.model {name!r} is not a file inside {folder} "
            "(only files inside the export folder are read)"
        )
    return path


class OnnxReasoner:
    """An ONNX export ready to answer: `OnnxReasoner(folder).generate(["3 + 4"])`."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        import numpy as np
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise RimError(f"--checkpoint {folder}: no such folder")
        self.meta = meta = _read_meta(self.folder)
        self.session = _session(_inside(self.folder, meta["onnx"].get("model")), threads)
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        dtype = np.dtype(_DTYPES[meta["onnx"]["dtype"]])
        self.empty = {n: np.zeros(shape, dtype) for n, shape in meta["onnx"]["cache_inputs"]}
        outs = [o.name for o in self.session.get_outputs()]
        self.cache_of = {o: "input." + o.removeprefix("output.") for o in outs[1:]}
        if set(self.cache_of.values()) != set(self.empty):
            raise RimError(f"{folder}: the ONNX graph's cache outputs do not match rim.json")
        self.suffix = list(meta["prompt_suffix_ids"])
        self.eos, self.max_new = meta["eos_token_id"], meta["max_new_tokens"]
        config = json.loads((self.folder / "config.json").read_text())
        self.positions = config.get("max_position_embeddings") or config.get("n_positions")

    def prompt(self, question: str) -> list[int]:
        """rim's prompt: the question's ids (BOS as the tokenizer adds it) + the K blocks."""
        if not question.strip():
            raise RimError("empty question")
        ids = self.tokenizer.encode(question).ids + self.suffix
        if self.positions and len(ids) + self.max_new > self.positions:
            raise RimError(
                f"question of {len(ids) - len(self.suffix)} tokens + {len(self.suffix)} for "
                f"blocks + {self.max_new} answer > {self.positions} positions of the model"
            )
        return ids

    def step(self, ids: list[int], start: int, cache: dict) -> tuple[int, dict]:
        """One forward pass over `ids` at positions `start...`: (argmax token, new cache)."""
        import numpy as np

        feeds = {
            "input_ids": np.array([ids], dtype=np.int64),
            "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None],
            **cache,
        }
        logits, *past = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()[1:]]
        return int(logits[0, -1].argmax()), {self.cache_of[n]: t for n, t in zip(names, past)}

    def first_token(self, ids: list[int]) -> int:
        """The prefill alone: the first answer token (what time to first token measures)."""
        return self.step(ids, 0, self.empty)[0]

    def tokens(self, ids: list[int]) -> list[int]:
        """Greedy new tokens after the prompt `ids`, EOS excluded."""
        token, cache = self.step(ids, 0, self.empty)
        out, pos = [], len(ids)
        while token != self.eos and len(out) < self.max_new:
            out.append(token)
            if len(out) == self.max_new:
                break
            token, cache = self.step([token], pos, cache)
            pos += 1
        return out

    def generate(self, questions: list[str]) -> list[str]:
        """Greedy answers, one question at a time (the graph's batch is 1)."""
        answers = []
        for q in questions:
            new = self.tokens(self.prompt(q))
            answers.append(self.tokenizer.decode(new, skip_special_tokens=True).strip())
        return answers


def main(argv: list[str] | None = None) -> None:
    """`python -m rim.onnx_runtime EXPORT QUESTION... [--threads N]`: one answer per line."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m rim.onnx_runtime", description=__doc__.split("\n")[0]
    )
    p.add_argument("export", help="a folder written by rim export --format onnx")
    p.add_argument("questions", nargs="+", help="one or more questions (quote each)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all)")
    args = p.parse_args(argv)
    try:
        for answer in OnnxReasoner(args.export, args.threads).generate(args.questions):
            print(answer)
    except RimError as err:
        print(f"rim: error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
