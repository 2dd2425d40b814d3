"""Export a checkpoint for serving: one plain Hugging Face model folder, no rim needed.

    rim export --checkpoint runs/x/best --out exported/x [--lm-eval-data FILE]
    rim export --checkpoint runs/x/best --out exported/x-onnx --format onnx

RiM inference is plain causal attention over `question ++ K memory blocks` (METHOD.md
section 3), so any server that can run the base architecture serves a RiM model: LoRA is
merged into the weights, the tokenizer keeps the three block tokens as special tokens, and
the prompt is the question followed by a fixed text suffix (`prompt_template` in rim.json).

    DIR2/
        config.json, model.safetensors   the merged model (loads with AutoModelForCausalLM)
        tokenizer.json, tokenizer_config.json  with the block tokens and a pad token
        generation_config.json           greedy, eos/pad, the trained answer length
        rim.json                         K, M, block tokens and ids, method, prompt template
        prompt_template.txt              the same template, for shell use
        lm_eval/                         an lm-evaluation-harness task (rim.lm_eval_task)

`--format onnx` writes `model.onnx` (+ `.data`, `export.json`) instead of the safetensors
weights and no lm_eval/: one graph with a KV cache for ONNX Runtime (rim.onnx_export), a copy
of its runner `onnx_runtime.py`, and an `onnx` section in rim.json.

The folder is written to a temporary sibling and renamed: it is complete or absent.
"""

from __future__ import annotations

import json
from pathlib import Path

from rim.errors import RimError

FORMAT = 1
FORMATS = ("hf", "onnx")
# questions whose tokenization checks that the text template reproduces the training prompt
_PROBES = ("3 + 4 - 2", "What is 12 * 7?", "Every wumpus is a yumpus. Is Alex a yumpus?")


def prompt_template(method, tokenizer) -> tuple[str, list[int]]:
    """(`"{question}" + suffix text`, suffix ids): the K blocks appended to the question."""
    probe = _PROBES[0]
    question = list(method.question_ids(probe))
    prompt = method.prompt(probe)
    suffix = prompt[len(question) :]
    if prompt[: len(question)] != question:
        raise RimError(f"method {method.name}: its prompt does not start with the question")
    added = set(tokenizer.added_tokens_decoder)
    if all(i in added for i in suffix):  # special tokens: their literal strings, no spaces
        text = "".join(tokenizer.convert_ids_to_tokens(suffix))
    else:
        text = tokenizer.decode(suffix, clean_up_tokenization_spaces=False)
    template = "{question}" + text.replace("{", "{{").replace("}", "}}")
    return template, suffix


def template_is_exact(method, tokenizer, template: str) -> bool:
    """Does `tokenizer(template.format(question=q))` give exactly the training-time prompt?"""
    for q in _PROBES:
        ids = tokenizer(template.format(question=q), add_special_tokens=True)["input_ids"]
        if list(ids) != method.prompt(q):
            return False
    return True


def _serving_meta(method, tokenizer, cfg, template: str, suffix: list[int], exact: bool) -> dict:
    meta = {
        "format": FORMAT,
        "method": method.name,
        "prompt_template": template,
        "prompt_suffix_ids": suffix,  # append to the question's ids when serving by ids
        "template_tokenizes_exactly": exact,
        "answer_marker": method.marker,
        "max_new_tokens": method.max_new_tokens(),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "attention": "causal",
    }
    if method.uses_blocks:
        m = method.mem
        meta |= {
            "blocks": m.num_blocks,
            "mem_tokens": m.mem_tokens,
            "tokens": {
                "start": cfg.memory.start_token,
                "mem": cfg.memory.mem_token,
                "end": cfg.memory.end_token,
            },
            "token_ids": {"start": m.start_id, "mem": m.mem_id, "end": m.end_id},
        }
    return meta


def _resolve(checkpoint: Path) -> Path:
    from rim.model import not_a_checkpoint

    problem = not_a_checkpoint(checkpoint)
    if problem:
        raise problem
    if not checkpoint.exists():
        raise RimError(f"--checkpoint {checkpoint}: no such folder")
    if not (checkpoint / "rim.json").is_file():
        hint = ""
        if (checkpoint / "best" / "rim.json").is_file():
            hint = f" (a run folder: did you mean {checkpoint / 'best'}?)"
        raise RimError(f"--checkpoint {checkpoint}: not a rim checkpoint (no rim.json){hint}")
    if not (checkpoint / "config.yaml").is_file():
        raise RimError(f"--checkpoint {checkpoint}: no config.yaml beside rim.json")
    return checkpoint


def _load(ckpt: Path, verify: bool | None = None):
    """(model, tokenizer, method, recipe) with LoRA merged; refuses methods without a plain
    prompt (they need sequential forward passes at inference)."""
    from rim.assembly import from_checkpoint
    from rim.model import load_meta

    model, tok, method, cfg = from_checkpoint(ckpt, verify=verify)
    if not method.plain_prompt:
        loops = getattr(method, "loops", 0)  # a looped RiM (memory.loops, ours)
        what = f"method {method.name}" + (f" with memory.loops {loops}" if loops else "")
        raise RimError(
            f"--checkpoint {ckpt}: {what} needs sequential forward passes at "
            "inference; only plain-prompt methods can be exported"
        )
    if load_meta(ckpt).get("adapter"):
        model = model.merge_and_unload()  # LoRA and the new token rows into plain weights
    return model.eval(), tok, method, cfg


def _lm_eval(out: Path, cfg, data: str | None, fmt: str, limit: int | None):
    """(task name, examples) for the lm-eval task folder, or None when the recipe's own split
    cannot be read here (its files are elsewhere): the model is exported all the same."""
    from rim.lm_eval_task import task_examples, task_name

    try:
        examples, source = task_examples(cfg, data, fmt, limit)
    except RimError as err:
        if data:
            raise
        print(f"[rim] warning: no lm-eval task ({err}); pass --lm-eval-data FILE")
        return None
    return task_name(out), examples, source


def _check_format(format: str, lm_eval_data: str | None) -> None:
    if format not in FORMATS:
        raise RimError(f"--format {format}: not one of {', '.join(FORMATS)}")
    if format == "onnx":
        from rim.onnx_export import require_exporter, require_onnx

        require_onnx()
        require_exporter()
        if lm_eval_data:
            raise RimError("--lm-eval-data: lm-eval runs the hf format (--format hf)")


def export(
    checkpoint: str | Path,
    out: str | Path,
    format: str = "hf",
    lm_eval_data: str | None = None,
    lm_eval_format: str = "auto",
    lm_eval_limit: int | None = None,
    verbose: bool = False,
    verify: bool | None = None,
) -> Path:
    """Write a serving folder: `hf` (plain HF model + an lm-eval task folder) or `onnx` (one
    ONNX graph with a KV cache, rim.onnx_runtime runs it); tokenizer and rim.json in both.
    `verbose`: the ONNX exporter's messages on the terminal, not in `onnx_export.log`."""
    from rim.io import atomic_dir

    _check_format(format, lm_eval_data)
    ckpt, out = _resolve(Path(checkpoint)), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RimError(f"--out {out}: already exists and is not empty")
    model, tok, method, cfg = _load(ckpt, verify)
    template, suffix = prompt_template(method, tok)
    exact = template_is_exact(method, tok, template)
    serving = _serving_meta(method, tok, cfg, template, suffix, exact)
    serving["source_checkpoint"] = str(ckpt)
    task = (
        _lm_eval(out, cfg, lm_eval_data, lm_eval_format, lm_eval_limit) if format == "hf" else None
    )

    def write(tmp: Path) -> None:
        if format == "onnx":
            _write_onnx(tmp, model, method, serving, verbose)
        else:
            model.save_pretrained(tmp)  # before ours: it writes a generation_config.json too
        _write_tokenizer(tmp, tok, method)
        if format == "onnx":
            _check_tokenizer_json(tmp, method, serving)
        if task:
            from rim.lm_eval_task import write_task

            write_task(tmp / "lm_eval", task[0], method, template, task[1])
        (tmp / "rim.json").write_text(json.dumps(serving, indent=2))
        (tmp / "prompt_template.txt").write_text(template + "\n")

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir(out, write)
    if not exact:
        print(
            "[rim] warning: the text template does not tokenize exactly like training; "
            "serve by token ids (rim.json prompt_suffix_ids)"
        )
    print(f"[rim] exported {method.name} ({format}) to {out}; prompt: {template}")
    _print_next(out, format, task)
    return out


def _write_tokenizer(tmp: Path, tok, method) -> None:
    """The tokenizer (block tokens special) and the greedy generation config."""
    from transformers import GenerationConfig

    gen = GenerationConfig(
        do_sample=False,
        max_new_tokens=method.max_new_tokens(),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    tok.save_pretrained(tmp)
    gen.save_pretrained(tmp)


def _write_onnx(tmp: Path, model, method, serving: dict, verbose: bool = False) -> None:
    """The ONNX graph, traced on a real RiM prompt, and a copy of the runner (rim.onnx_runtime)."""
    import shutil

    from rim.onnx_export import export_onnx

    serving["onnx"] = export_onnx(model, method.prompt(_PROBES[1]), tmp, verbose)
    shutil.copyfile(Path(__file__).with_name("onnx_runtime.py"), tmp / "onnx_runtime.py")


def _check_tokenizer_json(tmp: Path, method, serving: dict) -> None:
    """The ONNX runner tokenizes with the bare `tokenizers` library: record (and warn) if it
    differs from training's tokenization."""
    from rim.onnx_export import tokenizer_json_exact

    serving["onnx"]["tokenizer_json_exact"] = exact = tokenizer_json_exact(tmp, method, _PROBES)
    if not exact:
        print("[rim] warning: tokenizer.json alone does not tokenize questions like training")


def _print_next(out: Path, format: str, task) -> None:
    """The command that uses the export, so a user can copy it."""
    if format == "onnx":
        from rim.onnx_export import LOG_FILE

        log = f"exporter messages in {out / LOG_FILE}; " if (out / LOG_FILE).is_file() else ""
        print(f'[rim] {log}answer with: rim generate --runtime onnx --checkpoint {out} "QUESTION"')
    elif task:
        name, examples, source = task
        print(
            f"[rim] lm-eval task {name} ({len(examples)} examples of {source}): lm_eval --model hf "
            f"--model_args pretrained={out} --include_path {out / 'lm_eval'} --tasks {name}"
        )
