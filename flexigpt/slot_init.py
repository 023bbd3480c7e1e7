"""How should a replacement slot's LoRA start so the slot reproduces the pruned block on real inputs?

Each targeted linear of a slot computes ``W_donor x + B A x``. The whitened factors of
``W_pruned - W_donor`` (``flexigpt.whiten``), taken with the second moment of the inputs the
pruned block itself receives in the original model, make ``B A`` the rank-r correction that best
reproduces ``W_pruned x`` on the calibration tokens. A slot without a donor runs ``B A x`` alone,
so its factors are those of ``W_pruned`` itself.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from flexigpt.activations import linear_input_moments
from flexigpt.adapters import ADAPTER, OutputNorm, base_linear
from flexigpt.arch import ArchSpec, arch_of, get_blocks, get_submodule
from flexigpt.build_info import build_info
from flexigpt.whiten import DAMP, whitened_fit, whitener

log = logging.getLogger(__name__)


__all__ = ["slot_factors", "slot_fits", "whitened_slot_init"]


def _weight(block: nn.Module, spec: ArchSpec, name: str) -> torch.Tensor:
    return base_linear(get_submodule(block, spec.path_of(name))).weight.detach()


def slot_fits(pruned_block: nn.Module, donor_block: nn.Module | None, moments: Mapping[str, torch.Tensor],
              ranks: Mapping[str, int] | int, spec: ArchSpec, *,
              damp: float = DAMP) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Whitened factors and their relative function-space residual, per matrix.

    Args:
        pruned_block: the original block the slot replaces (its weights are the target).
        donor_block: a block (or slot) whose linears hold the weights the slot runs; ``None``
            when the slot has no donor and the factors alone must reproduce the pruned block.
        moments: ``{matrix name: C}`` of the pruned block's own inputs (``linear_input_moments``).
        ranks: ``{matrix name: r}`` (only those matrices are fitted) or one rank for all.
        spec: the architecture.
        damp: damping of each ``C`` (``flexigpt.whiten.whitener``).

    Returns:
        ``{name: (B, A, relative)}``: float32 ``B`` ``(d_out, r)``, ``A`` ``(r, d_in)`` and
        ``||(W_pruned - W_donor - B A) S||_F / ||W_pruned S||_F``.

    Raises:
        ValueError: an unknown matrix name, a missing moment or a rank out of range.
    """
    plan = dict(ranks) if isinstance(ranks, Mapping) else {n: int(ranks) for n in spec.matrix_names}
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    whiteners: dict[int, torch.Tensor] = {}  # q/k/v (gate/up) share one moment tensor: factor it once
    for name, r in plan.items():
        spec.path_of(name)  # validates the name
        if name not in moments:
            raise ValueError(f"no input moment for {name!r}; have: {', '.join(sorted(moments)) or 'none'}")
        C = moments[name]
        s = whiteners.get(id(C))
        if s is None:
            s = whiteners[id(C)] = whitener(C, damp=damp)
        w_pruned = _weight(pruned_block, spec, name).to(torch.float64)
        delta = w_pruned if donor_block is None else w_pruned - _weight(donor_block, spec, name).to(torch.float64)
        B, A, residual, _ = whitened_fit(delta, s, int(r))
        own = float((w_pruned @ s).pow(2).sum()) ** 0.5
        out[name] = (B.float(), A.float(), residual / own if own > 0 else 0.0)
    return out


def slot_factors(pruned_block: nn.Module, donor_block: nn.Module | None, moments: Mapping[str, torch.Tensor],
                 ranks: Mapping[str, int] | int, spec: ArchSpec, *,
                 damp: float = DAMP) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{matrix name: (B, A)}``: the whitened LoRA factors of one slot (see ``slot_fits``)."""
    return {n: (b, a) for n, (b, a, _) in slot_fits(pruned_block, donor_block, moments, ranks, spec,
                                                     damp=damp).items()}


def _lora_layer(block: nn.Module, spec: ArchSpec, name: str):
    module = get_submodule(block, spec.path_of(name))
    if isinstance(module, OutputNorm):
        module = module.inner
    lora_a = getattr(module, "lora_A", None)
    return module if lora_a is not None and ADAPTER in lora_a else None


@torch.no_grad()
def whitened_slot_init(built_model: nn.Module, base_model: nn.Module, windows_or_moments: Any, *,
                       rank_by_matrix: Mapping[str, int] | None = None, damp: float = DAMP,
                       batch_size: int = 4, progress: bool = False) -> dict[int, dict[str, float]]:
    """Write the whitened factors into every replaced slot's LoRA, in place.

    Args:
        built_model: a ``flexigpt`` model from ``flexigpt.surgery.apply_plan`` (LoRA attached).
        base_model: the original model the plan was applied to.
        windows_or_moments: calibration windows (``flexigpt.data.Windows`` or an ``(N, T)`` token
            tensor; one hooked pass of ``base_model`` collects the pruned blocks' moments), or
            ``{block: {matrix name: C}}`` from ``linear_input_moments``.
        rank_by_matrix: ``{matrix name: r}`` to use fewer components than a LoRA's rank; the
            remaining components start as standard LoRA does (``B`` columns zero).
        damp: damping of each input moment.
        batch_size, progress: for the moment pass.

    Returns:
        ``{slot: {matrix name: relative function-space residual}}``.

    Raises:
        ValueError: not a flexigpt build of this base, missing moments, or a rank above a LoRA's.
    """
    plan = build_info(built_model).plan
    if plan.method != "flexigpt":
        raise ValueError(f"whitened slot init needs a flexigpt plan, got method {plan.method!r}")
    spec = arch_of(base_model)
    base_blocks = get_blocks(base_model)
    if len(base_blocks) != plan.num_blocks:
        raise ValueError(f"base model has {len(base_blocks)} blocks but the plan is for {plan.num_blocks}")
    slots = list(plan.replaced_slots)
    sources = {s: plan.slot_sources[s] for s in slots}
    if isinstance(windows_or_moments, Mapping):
        moments = windows_or_moments
        missing = sorted(b for b in sources.values() if b not in moments)
        if missing:
            raise ValueError(f"moments are missing pruned blocks {missing}; have {sorted(moments)}")
    else:
        moments = linear_input_moments(base_model, windows_or_moments, batch_size=batch_size,
                                       blocks=sorted(set(sources.values())), progress=progress)
    donors = plan.donors
    blocks = get_blocks(built_model)
    report: dict[int, dict[str, float]] = {}
    for slot in slots:
        block = blocks[slot]
        layers = {n: layer for n in spec.matrix_names if (layer := _lora_layer(block, spec, n)) is not None}
        ranks = {}
        for name, layer in layers.items():
            have = int(layer.lora_A[ADAPTER].weight.shape[0])
            want = int((rank_by_matrix or {}).get(name, have))
            if not 1 <= want <= have:
                raise ValueError(f"rank {want} for {name} is outside 1..{have} (the slot's LoRA rank)")
            ranks[name] = want
        donor = donors.get(slot)
        no_donor = donor is None or (isinstance(donor, int) and donor < 0)
        fits = slot_fits(base_blocks[sources[slot]], None if no_donor else block, moments[sources[slot]], ranks,
                         spec, damp=damp)
        for name, (B, A, rel) in fits.items():
            layer, r = layers[name], ranks[name]
            scaling = float(layer.scaling[ADAPTER]) if hasattr(layer, "scaling") else 1.0
            wb, wa = layer.lora_B[ADAPTER].weight, layer.lora_A[ADAPTER].weight
            wb[:, :r].copy_((B / scaling).to(wb))
            wb[:, r:].zero_()
            wa[:r].copy_(A.to(wa))
        report[slot] = {name: fits[name][2] for name in fits}
        log.info("slot %d (donor %s): whitened residual %s", slot, "none" if no_donor else donor,
                 {n: round(v, 3) for n, v in report[slot].items()})
    return report
