"""How should a built model run when nobody trains it? Inference forms of a model.

Every form is a structural copy (``flexigpt.slots.structural_copy``): new module objects, the
same Parameter objects, so the stored compact form is never touched and tensors that stay as
they are cost no memory.

* ``fast_view(model)``: every linear inside the blocks becomes a ``FastLinear`` holding the very
  same weight. It computes exactly what ``nn.Linear`` computes, with one change of kernel: for 2
  to 4 rows (the verify pass of speculative decoding) it multiplies ``W @ x^T``, which CPU BLAS
  libraries run several times faster than ``x @ W^T`` at so few rows. One row and long prompts
  go through ``F.linear`` unchanged, so plain decoding stays bit-for-bit the model's own.
* ``inference_form(model)``: additionally every replacement slot (and kept-block LoRA) runs one
  dense weight per linear, ``W_donor + B A``, computed once: one matrix product instead of three
  per linear. Costs the memory of the dense weights of the slots (``extra_bytes``); the logits
  match the adapter form within float32 rounding.
* ``inference_form(model, precision="float16" | "int8")``: dense weights stored in half
  precision or as int8 with one scale per output row (weight-only; activations in bfloat16):
  a cheap self-speculative draft. Not for evaluation.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexigpt.adapters import OutputNorm
from flexigpt.arch import arch_of, get_blocks, get_submodule, set_submodule
from flexigpt.slots import structural_copy

log = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "FastLinear", "LowPrecisionLinear", "dense_weight", "extra_bytes", "fast_view",
           "inference_form", "int8_available"]

PRECISIONS = ("float32", "float16", "int8")
SMALL_ROWS = 4  # up to this many rows FastLinear multiplies W @ x^T


class FastLinear(nn.Module):
    """``nn.Linear`` for inference with a faster kernel for 2-4 rows on CPU (see module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if 2 <= rows <= SMALL_ROWS and x.device.type == "cpu" and x.dtype == self.weight.dtype:
            y = torch.mm(self.weight, x.reshape(rows, -1).T).T.contiguous()
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def int8_available() -> bool:
    """Whether this torch has the int8 weight-only matrix product (``torch._weight_int8pack_mm``)."""
    return hasattr(torch, "_weight_int8pack_mm")


class LowPrecisionLinear(nn.Module):
    """A dense weight kept in float16 or int8 (one scale per output row); output in the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, precision: str):
        super().__init__()
        if precision not in ("float16", "int8"):
            raise ValueError(f"precision must be 'float16' or 'int8', got {precision!r}")
        if precision == "int8" and not int8_available():
            raise ValueError("int8 precision needs torch._weight_int8pack_mm (torch >= 2.3)")
        self.precision = precision
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        if precision == "float16":
            self.register_buffer("weight", w.half())
        else:
            scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
            self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.precision == "int8":
            y = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight, self.scale).to(x.dtype)
        elif flat.shape[0] == 1:  # one row: the half-precision product reads half the bytes
            y = F.linear(flat.half(), self.weight).to(x.dtype)
        else:  # CPU half-precision products are slow for many rows: widen the weight instead
            y = F.linear(flat, self.weight.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, precision={self.precision}"


@torch.no_grad()
def dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """The weight and bias a (possibly LoRA-wrapped) linear applies: ``W + scaling * B A``.

    Returns:
        ``(weight, bias, merged)``; ``merged`` is False when the module is a plain linear, whose
        own tensors are returned (not copies).

    Raises:
        ValueError: a module that is neither a linear nor a LoRA-wrapped linear.
    """
    base = getattr(module, "base_layer", module)
    if not isinstance(base, (nn.Linear, FastLinear)):
        raise ValueError(f"cannot make a dense weight of {type(module).__name__}")
    if base is module or not hasattr(module, "lora_A"):
        return base.weight, base.bias, False
    if getattr(module, "use_dora", {}) and any(module.use_dora.values()):
        raise ValueError("DoRA adapters have no dense form here")
    w = base.weight.detach().float().clone()
    if not getattr(module, "disable_adapters", False) and not getattr(module, "merged", False):
        for name in module.active_adapters:
            if name in module.lora_A:
                a, b = module.lora_A[name].weight.float(), module.lora_B[name].weight.float()
                w += module.scaling[name] * (b @ a)
    return w.to(base.weight.dtype), base.bias, True


def _replace_linears(root: nn.Module) -> None:
    for name, child in list(root.named_children()):
        if type(child) is nn.Linear:
            setattr(root, name, FastLinear(child.weight, child.bias))
        else:
            _replace_linears(child)


def fast_view(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose block linears are ``FastLinear`` over the same weights (no memory)."""
    view = structural_copy(model)
    for block in get_blocks(view):
        _replace_linears(block)
    view._flexigpt_inference = {"form": "fast_view", "precision": "float32", "extra_bytes": 0}
    return view.eval()


def inference_form(model: nn.Module, precision: str = "float32") -> nn.Module:
    """A copy of ``model`` for evaluation and chat: one dense weight per block linear.

    Args:
        model: any supported causal LM (a FlexiGPT build, a drop build, an original model).
        precision: ``float32`` (same values up to rounding; plain linears share their tensors),
            ``float16`` or ``int8`` (lossy: a self-speculative draft, not for evaluation).

    Returns:
        The new model (eval mode); ``model`` and its stored form are unchanged.
        ``form._flexigpt_inference`` holds ``{"form", "precision", "extra_bytes"}``.

    Raises:
        ValueError: an unknown precision, or int8 without the kernel.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    spec = arch_of(model)
    form = structural_copy(model)
    for block in get_blocks(form):
        for path in spec.linears:
            module = get_submodule(block, path)
            holder, inner = (module, module.inner) if isinstance(module, OutputNorm) else (None, module)
            weight, bias, _ = dense_weight(inner)
            new = FastLinear(weight, bias) if precision == "float32" else LowPrecisionLinear(weight, bias, precision)
            if holder is not None:
                holder.inner = new
            else:
                set_submodule(block, path, new)
        _replace_linears(block)  # anything else linear (none in LLaMA/OPT blocks) keeps its kernel fast
    form._flexigpt_inference = {"form": "inference", "precision": precision, "extra_bytes": extra_bytes(form, model)}
    return form.eval()


def extra_bytes(form: nn.Module, model: nn.Module) -> int:
    """Bytes of the block-linear tensors of ``form`` that ``model`` does not hold (dense slot
    weights, lower-precision copies)."""
    shared = {t.data_ptr() for t in model.parameters()}
    seen, total = set(), 0
    for block in get_blocks(form):
        for module in block.modules():
            if isinstance(module, (FastLinear, LowPrecisionLinear)):
                for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                    if t is not None and t.data_ptr() not in shared and t.data_ptr() not in seen:
                        seen.add(t.data_ptr())
                        total += t.numel() * t.element_size()
    return total
