"""Putting a run together: recipe, data, tokenizer, method, model (and LoRA), in that order.

    cfg = load_recipe("configs/toy/llama_rim.yaml", ["train.lr=1e-3"])
    setup = assemble(cfg)                      # for training (rim.trainer.Trainer)
    model, tok, method, cfg = from_checkpoint("runs/x/best")   # for inference
    from_checkpoint("runs/x/checkpoints/step-00000500")          # any saved step, too

The method is built first (`rim.methods.build` registers its special tokens), so that the
model is created or resized for the final vocabulary and LoRA knows the new token rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rim import methods
from rim.checkpoint import STATE_FILE, load_weights, read_state
from rim.config import Config, load_config
from rim.data import Example
from rim.errors import ConfigError, RimError
from rim.manifest import verify_folder
from rim.methods import Method
from rim.model import (
    build_model,
    build_tokenizer,
    load_checkpoint,
    load_pretrained,
    load_tokenizer,
    max_positions,
    resize_for,
    wrap_lora,
)
from rim.sources import load_split


@dataclass
class Setup:
    cfg: Config
    model: torch.nn.Module
    tokenizer: object
    method: Method
    train: list[Example]
    valid: list[Example]


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """`rim.config.load_config`, then the method name checked against the registry."""
    cfg = load_config(path, overrides)
    try:
        return methods.check(cfg)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _tokenizer(cfg: Config, train: list[Example]):
    """The recipe's tokenizer; for a model built from a config without one, a word-level
    tokenizer of the training data."""
    if cfg.model.path is not None:
        if not Path(cfg.model.path).is_dir():  # before the tokenizer, which defaults to it
            raise RimError(f"model.path: {cfg.model.path}: no such model folder")
        key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
        return load_tokenizer(cfg.model.tokenizer or cfg.model.path, key)
    if cfg.model.tokenizer:
        return load_tokenizer(cfg.model.tokenizer)
    texts = [e.question for e in train] + [s for e in train for s in e.steps]
    texts += sorted({e.step_sep for e in train})  # the CoT's own ` + ` is a token too
    texts += [e.answer for e in train] + [cfg.eval.answer_marker]
    return build_tokenizer(texts)


def build(cfg: Config, tok, method: Method) -> torch.nn.Module:
    """The recipe's model before training: built from its config (or `model.path`), resized
    for the method's tokens, LoRA-wrapped unless `full_finetune`, the method's modules on."""
    if cfg.model.path is None:
        max_pos = cfg.data.max_length or 1024
        model = build_model(cfg.model, vocab_size=len(tok), max_positions=max_pos)
    else:
        model = load_pretrained(cfg.model)
    resize_for(model, tok)
    if cfg.model.path is not None and not cfg.model.full_finetune:
        model = wrap_lora(model, cfg.model, list(method.tokens.new))
    return method.attach(model)  # method-owned modules (CODI's projection)


def assemble(cfg: Config, log=print) -> Setup:
    """Data, tokenizer, method and model for `cfg` (no training state)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    d = cfg.data
    train = load_split(d.train, "data.train")
    valid = load_split(d.valid, "data.valid")
    tok = _tokenizer(cfg, train)
    method = methods.build(cfg, tok)  # registers the method's tokens
    model = build(cfg, tok, method)
    method.pretokenize(train + valid)  # every string once, in batch calls (rim.tokenized)
    train = check_lengths(method, model, train, cfg, "data.train")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(
        f"[rim] {cfg.method}: {len(train)} train / {len(valid)} valid examples, "
        f"{n_params / 1e6:.2f}M trainable parameters"
    )
    return Setup(cfg, model, tok, method, train, valid)


def t_max(examples: list[Example]) -> int:
    """The most reasoning steps of any example (RiM's grounding schedule needs it)."""
    return max((len(e.steps) for e in examples), default=0)


def check_lengths(method: Method, model, examples: list[Example], cfg: Config, key: str):
    """Drop (and count) or reject examples whose training sequence exceeds the model's limit.

    Every example at every stage of the plan, at once: `Method.train_lengths` counts tokens
    per segment, so GSM8K-Aug's 385k examples take seconds, not a layout each."""
    limit = cfg.data.max_length or max_positions(model)
    if limit is None:
        return examples
    stages = method.plan(max(len(examples), 1), t_max(examples))
    need = method.train_lengths(examples, stages).max(axis=0, initial=0)  # (N,)
    over = np.flatnonzero(need > limit)
    if over.size and cfg.data.too_long == "error":
        i = int(over[0])
        raise RimError(f"{key}: example {i + 1} needs {need[i]} tokens > max_length {limit}")
    kept = [examples[i] for i in np.flatnonzero(need <= limit)] if over.size else examples
    if len(kept) < len(examples):
        print(f"[rim] skipped {len(examples) - len(kept)} examples longer than {limit} tokens")
    if not kept:
        raise RimError(f"{key}: no example fits in {limit} tokens")
    return kept


def from_checkpoint(checkpoint: str | Path, device: str = "cpu", verify: bool | None = None):
    """(model, tokenizer, method, recipe) of a saved checkpoint, the method's own modules
    attached to the model; `verify`: see `rim.model.load_checkpoint`. A resumable one
    (`RUN/checkpoints/step-N`) too: `from_training_checkpoint`."""
    if (Path(checkpoint) / STATE_FILE).is_file():
        return from_training_checkpoint(Path(checkpoint), device, verify)
    model, tok, meta = load_checkpoint(checkpoint, device, verify)
    cfg = load_config(Path(checkpoint) / "config.yaml")
    cfg.method = meta.get("method", cfg.method)
    method = methods.build(cfg, tok)
    return method.attach(model, Path(checkpoint)), tok, method, cfg


def from_training_checkpoint(folder: Path, device: str = "cpu", verify: bool | None = None):
    """A resumable checkpoint read for inference: the recipe's model (`build`) with the
    checkpoint's trainable weights, its tokenizer and recipe. So `rim eval` reads any step
    of a run (the end of grounding, say), not only `best/` and `final/`."""
    verify_folder(folder, verify)
    if read_state(folder).get("sharded"):
        raise RimError(
            f"--checkpoint {folder}: a sharded (FSDP) training checkpoint; resume it "
            "(rim train --resume) or load the run's best/ or final/"
        )
    if not (folder / "tokenizer_config.json").is_file():
        raise RimError(
            f"--checkpoint {folder}: a training checkpoint without its tokenizer (written "
            "before rim saved one there); load the run's best/ or final/"
        )
    cfg = load_recipe(folder / "config.yaml")
    tok = load_tokenizer(folder)
    method = methods.build(cfg, tok)
    model = build(cfg, tok, method)
    load_weights(model, folder / "weights.safetensors", "--checkpoint")
    return model.to(device).eval(), tok, method, cfg
