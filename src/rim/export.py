"""Export a checkpoint for serving: one plain Hugging Face model folder, no rim needed.

    rim export --checkpoint runs/x/best --out exported/x

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

The folder is written to a temporary sibling and renamed: it is complete or absent.
"""

from __future__ import annotations

from pathlib import Path

from rim.errors import RimError

FORMAT = 1
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


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Merge LoRA (if any) and write a plain HF model folder with tokenizer and rim.json."""
    import json

    from transformers import GenerationConfig

    from rim.assembly import from_checkpoint
    from rim.io import atomic_dir
    from rim.model import load_meta

    ckpt, out = _resolve(Path(checkpoint)), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RimError(f"--out {out}: already exists and is not empty")
    model, tok, method, cfg = from_checkpoint(ckpt)
    meta = load_meta(ckpt)
    if not method.plain_prompt:
        raise RimError(
            f"--checkpoint {ckpt}: method {method.name} needs sequential forward passes at "
            "inference; only plain-prompt methods can be exported"
        )
    if meta.get("adapter"):
        model = model.merge_and_unload()  # LoRA and the new token rows into plain weights
    template, suffix = prompt_template(method, tok)
    exact = template_is_exact(method, tok, template)
    gen = GenerationConfig(
        do_sample=False,
        max_new_tokens=method.max_new_tokens(),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    serving = _serving_meta(method, tok, cfg, template, suffix, exact)
    serving["source_checkpoint"] = str(ckpt)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        gen.save_pretrained(tmp)
        (tmp / "rim.json").write_text(json.dumps(serving, indent=2))
        (tmp / "prompt_template.txt").write_text(template + "\n")

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir(out, write)
    if not exact:
        print(
            "[rim] warning: the text template does not tokenize exactly like training; "
            "serve by token ids (rim.json prompt_suffix_ids)"
        )
    print(f"[rim] exported {method.name} to {out}; prompt: {template}")
    return out
