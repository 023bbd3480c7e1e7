"""How is a slot made from a block? Structural copies that share the base's tensors, own pre-norms,
and no-donor slots whose linears have no stored weights."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from flexigpt.arch import ArchSpec, block_linears, get_submodule, set_submodule

__all__ = ["ABSENT", "AbsentLinear", "is_absent", "no_donor_copy", "own_prenorms", "structural_copy"]

ABSENT = "_flexigpt_absent"  # attribute of a linear whose weight (and bias) is absent: zero, not stored


def structural_copy(module: nn.Module) -> nn.Module:
    """A new module tree whose Parameters are the very same objects as ``module``'s.

    Buffers (rotary tables and the like) are copied; they are small and not shared state.
    """
    return copy.deepcopy(module, memo={id(p): p for p in module.parameters()})


def own_prenorms(slot: nn.Module, source: nn.Module, norms: tuple[str, ...]) -> None:
    """Give ``slot`` its own pre-norms: real copies (new tensors) of ``source``'s."""
    for path in norms:
        set_submodule(slot, path, copy.deepcopy(get_submodule(source, path)))


def is_absent(linear: nn.Module) -> bool:
    """Whether ``linear`` is a no-donor slot's linear (zero weight, not stored, not trained)."""
    return bool(getattr(linear, ABSENT, False))


class AbsentLinear(nn.Linear):
    """A no-donor slot's linear: its weight (and bias) is zero, so its product is skipped.

    Still an ``nn.Linear`` (peft's LoRA wraps only those, and reads the weight's shape, dtype and
    device), but ``forward`` returns zeros of the output's shape without the dense product: a
    no-donor slot then costs only its LoRA, ``r (in + out)`` multiply-adds per token and linear,
    instead of a full block's. Exact: ``x @ 0`` is zero.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def no_donor_copy(block: nn.Module, spec: ArchSpec) -> nn.Module:
    """A no-donor slot's module: ``block``'s structure with its own copies of every parameter except
    the linears' weights and biases, which become zero buffers that are not saved (non-persistent).

    The slot's LoRA (attached afterwards, the rank-r fit of the pruned block itself) is then all a
    linear computes. Zero buffers, not a leaner module, because peft's LoRA wraps only real
    ``nn.Linear`` layers and reads their weight's dtype and device.
    """
    linears = block_linears(block, spec)
    skip = {id(p): p for m in linears.values() for p in m.parameters()}  # not copied: replaced below
    module = copy.deepcopy(block, memo=dict(skip))
    for lin in block_linears(module, spec).values():
        for name in ("weight", "bias"):
            p = getattr(lin, name, None)
            if p is None:
                continue
            delattr(lin, name)
            lin.register_buffer(name, torch.zeros(p.shape, dtype=p.dtype, device=p.device), persistent=False)
        setattr(lin, ABSENT, True)
        if type(lin) is nn.Linear:  # the same object, its product skipped (see AbsentLinear)
            lin.__class__ = AbsentLinear
    return module
