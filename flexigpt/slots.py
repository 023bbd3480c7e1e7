"""How is a slot made from a block? Structural copies that share the base's tensors, and own pre-norms."""
from __future__ import annotations

import copy

import torch.nn as nn

from flexigpt.arch import get_submodule, set_submodule

__all__ = ["own_prenorms", "structural_copy"]


def structural_copy(module: nn.Module) -> nn.Module:
    """A new module tree whose Parameters are the very same objects as ``module``'s.

    Buffers (rotary tables and the like) are copied; they are small and not shared state.
    """
    return copy.deepcopy(module, memo={id(p): p for p in module.parameters()})


def own_prenorms(slot: nn.Module, source: nn.Module, norms: tuple[str, ...]) -> None:
    """Give ``slot`` its own pre-norms: real copies (new tensors) of ``source``'s."""
    for path in norms:
        set_submodule(slot, path, copy.deepcopy(get_submodule(source, path)))
