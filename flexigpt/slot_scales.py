"""How far should each replacement slot open? Output-norm scales set in closed form.

After ``apply_plan`` a FlexiGPT slot's output norms start almost shut (gamma 1e-3). This module
sets each norm's gamma (and beta) by per-feature least squares on calibration activations, so
that the slot's normalised sub-layer output matches the pruned block's own sub-layer output
on the same inputs (cached from the original model by ``flexigpt.block_io``). A sub-layer
whose slot output explains little of the pruned one gets a small gamma by itself; a fit that
would still leave the whole slot worse than the identity is shrunk towards it, so a slot never
starts worse than a plain drop of its block (in the block-local sense: on the cached inputs).

R^2 here is measured against a slot that adds nothing (the identity on the residual stream):
``1 - ||pred - target||^2 / ||target||^2``, the target being a sub-layer output or the block's
residual update ``out - in``.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexigpt.adapters import OutputNorm
from flexigpt.arch import arch_of, get_blocks, get_submodule
from flexigpt.block_io import BlockIO, batches, block_r2, iter_block_io, replay
from flexigpt.build_info import build_info

log = logging.getLogger(__name__)

__all__ = ["SUBLAYERS", "closed_form_scales_", "replaced_slots"]

SUBLAYERS = ("attention", "mlp")  # in the order of ArchSpec.out_linears
_SHRINK = (1.0, 0.5, 0.25, 0.125, 0.0)  # factors tried on a fitted slot that ends worse than the identity


def check_int(name: str, value: Any, lo: int) -> int:
    """``value`` if it is an integer >= ``lo``, else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def replaced_slots(model: nn.Module, slots=None) -> list[int]:
    """The replaced slots of a flexigpt build to work on: ``slots`` (checked) or all of them.

    In a flexigpt build slot ``s`` stands at the position of the pruned base block ``s``.

    Raises:
        ValueError: a model that is not a flexigpt build, or a slot that is not replaced.
    """
    plan = build_info(model).plan
    if plan.method != "flexigpt":
        raise ValueError(f"slot fitting needs a flexigpt build (slots replacing pruned blocks), got method {plan.method!r}")
    replaced = list(plan.replaced_slots)
    if slots is None:
        return replaced
    chosen = sorted(set(slots))
    bad = [s for s in chosen if s not in replaced]
    if bad:
        raise ValueError(f"slots {bad} are not replaced slots of this model; valid: {replaced}")
    return chosen


def _out_norms(slot: nn.Module, model: nn.Module) -> dict[str, OutputNorm]:
    norms = {}
    for key, path in zip(SUBLAYERS, arch_of(model).out_linears):
        module = get_submodule(slot, path)
        if not isinstance(module, OutputNorm):
            raise ValueError(f"{path} of a replaced slot is a {type(module).__name__}, not an OutputNorm")
        norms[key] = module
    return norms


def _normalised(norm: OutputNorm, y: torch.Tensor) -> torch.Tensor:
    y = y.float().reshape(-1, norm.dim)
    return F.layer_norm(y, (norm.dim,), eps=norm.norm.eps) if norm.kind == "layernorm" else y


@dataclass
class _Moments:
    """Per-feature sums, in float64, for the least-squares fit of ``delta ~ gamma n + beta``."""

    nn_: torch.Tensor
    n: torch.Tensor
    nd: torch.Tensor
    d: torch.Tensor
    dd: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, dim: int) -> _Moments:
        return cls(*(torch.zeros(dim, dtype=torch.float64) for _ in range(5)))

    def add(self, n: torch.Tensor, delta: torch.Tensor) -> None:
        n, delta = n.double().cpu(), delta.double().reshape(n.shape).cpu()
        self.nn_ += (n * n).sum(0)
        self.n += n.sum(0)
        self.nd += (n * delta).sum(0)
        self.d += delta.sum(0)
        self.dd += (delta * delta).sum(0)
        self.count += n.shape[0]

    def solve(self, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(gamma, beta, r2)``: the per-feature least-squares optimum and the share of
        ``sum(delta^2)`` it explains. A feature whose ``n`` is constant gets gamma 0."""
        tiny = 1e-12
        if with_bias:
            c = max(self.count, 1)
            mn, md = self.n / c, self.d / c
            var_n = self.nn_ / c - mn * mn
            cov = self.nd / c - mn * md
            ok = var_n > tiny * (self.nn_ / c).clamp_min(tiny)
            gamma = torch.where(ok, cov / var_n.clamp_min(tiny), torch.zeros_like(cov))
            beta = md - gamma * mn
        else:
            ok = self.nn_ > tiny
            gamma = torch.where(ok, self.nd / self.nn_.clamp_min(tiny), torch.zeros_like(self.nd))
            beta = torch.zeros_like(gamma)
        sse = (self.dd - 2 * gamma * self.nd - 2 * beta * self.d + gamma * gamma * self.nn_
               + 2 * gamma * beta * self.n + beta * beta * self.count)
        total = float(self.dd.sum())
        r2 = 1.0 - float(sse.clamp_min(0).sum()) / total if total > 0 else 0.0
        return gamma, beta, r2


def _set_norm(norm: OutputNorm, gamma: torch.Tensor, beta: torch.Tensor, t: float) -> None:
    with torch.no_grad():
        if norm.kind == "layernorm":
            norm.norm.weight.copy_(gamma * t)
            norm.norm.bias.copy_(beta * t)
        else:
            norm.scale.copy_(gamma * t)


def _moments(slot: nn.Module, model: nn.Module, io: BlockIO, norms: dict[str, OutputNorm],
             batch_size: int) -> dict[str, _Moments]:
    """Run the slot on the pruned block's inputs; its MLP sees the original's post-attention state."""
    ref = next(slot.parameters())
    moments = {k: _Moments.zeros(n.dim) for k, n in norms.items()}
    seen: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(_module, _args, output):
            seen[key] = output.detach()
        return hook

    def original_attention(_module, _args, output):
        # the attention output is swapped for the pruned block's own, so the residual add
        # gives the MLP the original model's post-attention hidden state of this block
        first = output[0] if isinstance(output, tuple) else output
        replaced = current["attn"].to(first.device, first.dtype).reshape(first.shape)
        return (replaced, *output[1:]) if isinstance(output, tuple) else replaced

    handles = [norms[k].inner.register_forward_hook(keep(k)) for k in norms]
    handles.append(get_submodule(slot, arch_of(model).attention).register_forward_hook(original_attention))
    try:
        with torch.no_grad():
            for sl in batches(io, batch_size):
                current["attn"] = io.attn_out[sl]
                replay(slot, io.inputs[sl].to(ref.device, ref.dtype), io.call_kwargs)
                for key, target in (("attention", io.attn_out[sl]), ("mlp", io.mlp_out[sl])):
                    moments[key].add(_normalised(norms[key], seen[key]), target)
    finally:
        for h in handles:
            h.remove()
    return moments


def closed_form_scales_(model: nn.Module, base: nn.Module, windows: Any = None, *,
                        cache: dict[int, BlockIO] | None = None, slots=None, batch_size: int = 8,
                        max_tokens: int | None = None, guard: bool = True) -> dict[int, dict[str, float]]:
    """Set every replaced slot's output-norm gamma (and beta) by least squares, in place.

    For each sub-layer, with ``n`` the slot's normalised sub-layer output (``LayerNorm`` without
    affine of the wrapped linear's output; that output itself for the ``scale`` kind) and
    ``delta`` the pruned block's own sub-layer output on the same inputs, each feature ``c``
    gets ``gamma_c, beta_c = argmin sum (gamma_c n_c + beta_c - delta_c)^2`` (``scale``:
    ``gamma_c = sum(n_c delta_c) / sum(n_c^2)``, no bias). The attention sees the pruned block's
    cached input through the slot's own pre-norm, the MLP the original model's post-attention
    hidden state of that block through the slot's own pre-norm.

    Args:
        model: a flexigpt build (``apply_plan``); its output norms are overwritten.
        base: the original model the plan was built from (not modified).
        windows: calibration windows (``flexigpt.data.Windows`` or an ``(N, T)`` int64 tensor);
            not needed when ``cache`` is given.
        cache: ``flexigpt.block_io.collect_block_io`` output covering the slots (saves a pass).
        slots: replaced slots to fit (default all).
        batch_size: windows per forward pass.
        max_tokens: calibration tokens to use at most.
        guard: shrink a fit whose whole slot ends worse than the identity towards it (factors
            1, 1/2, 1/4, 1/8, 0 on gamma and beta), so no slot starts worse than a plain drop.

    Returns:
        ``{slot: {"attention": r2, "mlp": r2, "block": r2, "shrink": factor}}``: the share of each
        sub-layer output's ``sum(delta^2)`` its fit explains, the share of the block's residual
        update the fitted slot reproduces (``flexigpt.block_io.block_r2``), and the kept factor.

    Raises:
        ValueError: a model that is not a flexigpt build, bad slots, windows or batch size.
    """
    check_int("batch_size", batch_size, 1)
    if not isinstance(guard, bool):
        raise ValueError(f"guard must be True or False, got {guard!r}")
    chosen = replaced_slots(model, slots)
    blocks = get_blocks(model)
    result: dict[int, dict[str, float]] = {}
    for io in iter_block_io(base, windows, chosen, cache, batch_size=batch_size, max_tokens=max_tokens):
        slot = blocks[io.block]
        norms = _out_norms(slot, model)
        moments = _moments(slot, model, io, norms, batch_size)
        fits = {k: m.solve(norms[k].kind == "layernorm") for k, m in moments.items()}
        row = {k: fits[k][2] for k in SUBLAYERS}
        shrink, r2 = 1.0, -math.inf
        for t in (_SHRINK if guard else (1.0,)):
            for k, (gamma, beta, _) in fits.items():
                _set_norm(norms[k], gamma, beta, t)
            shrink, r2 = t, block_r2(slot, io, batch_size=batch_size)
            if r2 >= 0.0:
                break
        row.update(block=r2, shrink=shrink)
        result[io.block] = row
        log.info("slot %d closed-form scales: R2 attention %.3f, mlp %.3f, block %.3f (shrink %g)",
                 io.block, row["attention"], row["mlp"], r2, shrink)
    return result
