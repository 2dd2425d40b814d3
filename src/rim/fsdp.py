"""FSDP2 (`torch.distributed.fsdp.fully_shard`), applied by rim itself on CPUs and GPUs.

Asked for by `train.fsdp: true` or by a launch with configs/accelerate/fsdp.yaml (which sets
ACCELERATE_USE_FSDP). Not through accelerate (1.15): on a machine without GPUs its state
turns FSDP into plain DDP (MULTI_CPU) silently, even with an explicit FSDP plugin, and its
FSDP2 refuses `prepare_model` alone (it wants the model and its one optimizer together; rim
builds an optimizer per stage). Sharded like accelerate's TRANSFORMER_BASED_WRAP: one unit
per decoder layer, then the whole model (embeddings, final norm, head). Parameters become
DTensors (each process holds a slice); a forward pass all-gathers one unit at a time,
backward reduce-scatters the gradients (averaged over processes, as DDP). gloo or NCCL.
"""

from __future__ import annotations

import os

import torch


def requested(train_fsdp: bool) -> bool:
    """Does the recipe (`train.fsdp`) or the launch (accelerate's fsdp.yaml) ask for FSDP?"""
    return train_fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def _layer_classes(model: torch.nn.Module) -> set[str]:
    """The decoder-layer class names HF marks unsplittable (`_no_split_modules`)."""
    for m in model.modules():  # under PEFT the HF model sits a level or two down
        names = getattr(m, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`fully_shard` every decoder layer, then the model, over all processes (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    model.to(device)
    layers = _layer_classes(model)
    for m in list(model.modules()):
        if type(m).__name__ in layers:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Back to the shards after forward passes without backward (validation).

    FSDP2 keeps the root unit gathered after a forward pass (backward would gather it again);
    while gathered, `parameters()` yields the full tensors, so an optimizer built then (at a
    stage switch) or a checkpoint written then would hold the wrong tensors.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gathered full weights on the CPU of process 0 (empty elsewhere); collective.

    Tied weights (Llama's head = embeddings) appear once, as in an unsharded save.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in full.items() if k in names}


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's slice of a DTensor (FSDP2 parameter or gradient norm); else `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


def replicated(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value on every process (e.g. the gradient norm); else `t`."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like_params(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state dict read from a file (plain tensors) made to match `optimizer`'s
    parameters: under FSDP2 those are DTensors, and AdamW cannot mix the two."""
    from torch.distributed.tensor import DTensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, entries in state["state"].items():
        p = params[int(idx)] if int(idx) < len(params) else None
        if not isinstance(p, DTensor):
            continue
        for name, value in entries.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.dim():
                entries[name] = DTensor.from_local(
                    value.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                    stride=p.stride(),
                )  # fmt: skip
    return state
