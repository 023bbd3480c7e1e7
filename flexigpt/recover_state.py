"""What does a recovery run leave behind? Trainable tensors and resumable checkpoints, written atomically.

Two files: ``trainable.safetensors`` holds only the tensors recovery trains (by parameter name),
to be loaded into a model built the same way; ``recover-checkpoint.pt`` also holds the optimizer,
scheduler, data position, RNG state and step, so ``recover(..., resume=True)`` ends where an
uninterrupted run ends. Both are written to a temporary name and moved into place with
``os.replace``, so a reader sees the old file or the new one, never half of one.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from flexigpt.atomic import atomic_file

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_NAME", "copy_into", "load_checkpoint", "load_trainable", "save_checkpoint", "save_trainable",
           "trainable_state"]

CHECKPOINT_NAME = "recover-checkpoint.pt"
FORMAT = "flexigpt-recover-checkpoint"
VERSION = 1
_REQUIRED = ("step", "spec", "data", "world_size", "cursor", "trainable", "optimizer", "scheduler", "rng", "elapsed_s")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that ``requires_grad``, by name, detached (shared tensors listed once)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def copy_into(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy ``tensors`` into ``params`` in place after checking names and shapes match exactly."""
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"{what} does not match the model's trainable parameters (missing {missing[:5]}, unexpected {extra[:5]})")
    for name, p in params.items():
        if tuple(p.shape) != tuple(tensors[name].shape):
            raise ValueError(f"{what}: {name} has shape {tuple(tensors[name].shape)}, the model has {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))


def save_trainable(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the trainable tensors to a safetensors file, atomically."""
    # safetensors is heavy: imported on first use
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {n: t.cpu().contiguous().clone() for n, t in trainable_state(model).items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "flexigpt-trainable"})
    return path


def load_trainable(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy tensors saved by ``save_trainable`` into a model with the same trainable set.

    Raises:
        ValueError: unreadable file, or names/shapes that do not match the model's trainable set.
    """
    # safetensors is heavy: imported on first use
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise ValueError(f"trainable file {str(path)!r} is corrupt or unreadable ({type(err).__name__}: {err})") from err
    copy_into(trainable_state(model), tensors, f"trainable file {str(path)!r}")


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Write a recovery checkpoint (``state`` as built by ``recover``) into ``directory``."""
    final = Path(directory) / CHECKPOINT_NAME
    with atomic_file(final) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
    log.info("recovery checkpoint at step %d written to %s", state["step"], final)
    return final


def load_checkpoint(path: Path, spec: dict[str, Any], data: str, world: int, free: tuple[str, ...] = (),
                    added: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a checkpoint and check it belongs to this run.

    Args:
        path: the checkpoint file.
        spec: this run's ``RecoverSpec.to_dict()``; every field except those in ``free`` must match.
        data: this run's window digest.
        world: this run's number of processes.
        free: fields that may differ.
        added: fields newer than some checkpoints, with the value an older checkpoint ran with.

    Raises:
        ValueError: a corrupt file, another format, or other settings/windows/process count.
    """
    where = f"recovery checkpoint {str(path)!r}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{where} is corrupt or unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise ValueError(f"{str(path)!r} is not a FlexiGPT recovery checkpoint (format version {VERSION})")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"{where} is incomplete (missing {missing})")
    saved = state["spec"]
    norm = {**(added or {}), **{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}}
    diff = {k: (norm.get(k), v) for k, v in spec.items() if k not in free and norm.get(k) != v}
    if diff:
        raise ValueError(f"{where} was written with other settings (checkpoint, now): {diff}")
    if state["data"] != data:
        raise ValueError(f"{where} was written for other windows (digest {state['data']}, now {data})")
    if state["world_size"] != world:
        raise ValueError(f"{where} was written by {state['world_size']} processes, resuming with {world}")
    return state
