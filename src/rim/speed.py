"""Training options that trade nothing in the loss for speed or memory, and their refusals.

`train.gradient_checkpointing`: transformers' activation checkpointing (non-reentrant), so
a long packed row's activations are recomputed in the backward instead of kept.
`train.compile`: regional `torch.compile` (PyTorch's recipe for transformers): each decoder
layer compiled in place, so one compilation serves every layer, parameter names and
checkpoints stay as they are, and the LM-head hook of `rim.methods.base.labelled_head` (a new
closure every step) stays outside the compiled code. Decoding (validation) runs eagerly
(`decoding`): its growing KV cache would recompile at every new length.
`train.mixed_precision: fp16`: accelerate's fp16 autocast with its grad scaler (CUDA only:
on a CPU accelerate gives neither, the run would silently be fp32), the scaler's skipped
steps standing in for the non-finite gradient check (`unscale`, `optimizer_step`).
`model.attn_implementation: flex`: the checks `rim.flex` needs before the first step.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from rim import flex
from rim.config import Config
from rim.curriculum import Stage
from rim.errors import ConfigError


def check(cfg: Config, method, plan: list[Stage], device: torch.device) -> None:
    """Refuse, in one line naming the key, the options that cannot run on `device`."""
    t = cfg.train
    if t.mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError(
            "train.mixed_precision: fp16 needs a GPU (on a CPU accelerate has no fp16 autocast "
            "and no grad scaler: the run would be fp32); use bf16 or no"
        )
    if t.gradient_checkpointing and not method.shares_rows:
        raise ConfigError(
            f"train.gradient_checkpointing: {method.name}'s latent passes train through a KV "
            "cache, which transformers drops under gradient checkpointing; set it false"
        )
    if t.compile and t.fsdp:
        raise ConfigError("train.compile: not with train.fsdp (rim.fsdp is not compiled)")
    if cfg.model.attn_implementation != "flex":
        return
    if not method.shares_rows:
        raise ConfigError(
            f"{flex.KEY}: flex: {method.name} trains with sequential latent passes over a KV "
            "cache, not the packed layout that rim.flex masks; use sdpa"
        )
    dropouts = {}
    for stage in plan:  # a stage's dropout also sets the attention modules' dropout
        rim2 = stage.name == "stage2" and stage.dropout == t.stage2_dropout
        dropouts["train.stage2_dropout" if rim2 else "train.dropout"] = stage.dropout
    flex.check_training(device, dropouts)


def prepare(model, cfg: Config, acc):
    """`model` (as accelerate prepared it) with gradient checkpointing and/or compiled."""
    t = cfg.train
    if t.gradient_checkpointing:
        core = acc.unwrap_model(model)
        kwargs = {"use_reentrant": False}
        enable = getattr(core, "activation_checkpointing_enable", None)  # transformers >= 5.2x
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            core.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if t.compile:
        core = acc.unwrap_model(model)
        core = core.get_base_model() if hasattr(core, "get_base_model") else core  # peft
        names = set(getattr(core, "_no_split_modules", None) or ())  # the decoder layer class
        layers = [m for m in core.modules() if type(m).__name__ in names]
        if not layers:
            raise ConfigError(f"train.compile: no decoder layers found in {type(core).__name__}")
        for layer in layers:
            layer.compile()  # in place: same module, same parameter names
    return model


@contextmanager
def decoding(model):
    """Inside, `model` decodes as inference should: sdpa instead of FlexAttention
    (`rim.flex.sdpa_inside`) and compiled layers run eagerly."""
    with flex.sdpa_inside(model), torch.compiler.set_stance("force_eager"):
        yield model


def unscale(acc, optimizer) -> None:
    """fp16: the gradients divided by the loss scale before clipping (accelerate unscales
    only the optimizers it prepared; rim's are plain)."""
    if acc.scaler is not None:
        acc.scaler.unscale_(optimizer)


def optimizer_step(acc, optimizer) -> None:
    """The update: through the grad scaler under fp16 (it skips a step whose gradients are
    not finite and lowers the scale), else plainly."""
    if acc.scaler is None:
        optimizer.step()
        return
    acc.scaler.step(optimizer)
    acc.scaler.update()
