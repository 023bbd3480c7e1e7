"""Add and initialise the per-slot parameters: LoRA (through peft) and output normalisation.

A replacement slot runs its donor's weights ``W_d`` plus its own LoRA, initialised from the
truncated SVD of ``W_pruned - W_d`` with the singular values in the output-side factor (peft's
``lora_B = U_r S_r``, ``lora_A = V_r^T``, scaling 1), so at full rank ``W_d + B A == W_pruned``.
Its attention and MLP outputs pass through an output feature normalisation whose scale starts
tiny, so the slot starts as (almost) the identity on the residual stream: on real models blocks
are nearly orthogonal in weight space and plain sharing destroys the model.

peft adds the LoRA: each slot is its own module object, so ``inject_adapter_in_model`` on one
slot gives that slot its own adapters even though the base linears share their weights.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from flexigpt.arch import ArchSpec, get_submodule, set_submodule
from flexigpt.shapes import capped_ranks
from flexigpt.slots import ABSENT

log = logging.getLogger(__name__)

__all__ = [
    "ADAPTER",
    "OutputNorm",
    "attach_slot_adapters",
    "base_linear",
    "inject_lora",
    "lora_config",
    "lora_factor_modules",
    "lora_factors",
    "matrix_ranks",
    "valid_targets",
]

ADAPTER = "default"  # the peft adapter name used everywhere


class OutputNorm(nn.Module):
    """Output feature normalisation of one sub-layer (FlexiGPT), wrapping the sub-layer's last
    linear, whose output is exactly the sub-layer output.

    peft cannot express a normalisation after a linear, hence this small module.

    ``layernorm``: ``y = LayerNorm(inner(x))`` with gamma starting at ``scale`` and beta at 0
    (the paper's form; computed in fp32; nonlinear, so it cannot be folded into the weights).
    ``scale``: ``y = inner(x) * s`` with a per-feature vector ``s`` starting at ``scale``
    (LayerScale-like; linear, so a merged export folds it into the linear exactly).
    """

    def __init__(self, inner: nn.Module, dim: int, kind: str = "layernorm", scale: float = 1e-3, eps: float = 1e-5):
        super().__init__()
        if kind not in ("layernorm", "scale"):
            raise ValueError(f"out_norm must be 'layernorm' or 'scale', got {kind!r}")
        self.inner = inner
        self.kind = kind
        self.dim = dim
        if kind == "layernorm":
            self.norm = nn.LayerNorm(dim, eps=eps, dtype=torch.float32)
            nn.init.constant_(self.norm.weight, scale)
            nn.init.zeros_(self.norm.bias)
        else:
            self.scale = nn.Parameter(torch.full((dim,), float(scale), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)  # (B, T, dim)
        if self.kind == "layernorm":
            return self.norm(y.float()).to(y.dtype)
        return y * self.scale.to(y.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, dim={self.dim}"

    def own_parameters(self) -> list[nn.Parameter]:
        """The norm's own parameters (gamma/beta or the scale), not those of the wrapped linear."""
        return list(self.norm.parameters()) if self.kind == "layernorm" else [self.scale]


def base_linear(module: nn.Module) -> nn.Linear:
    """The plain ``nn.Linear`` under an ``OutputNorm`` and/or a peft LoRA layer."""
    if isinstance(module, OutputNorm):
        module = module.inner
    return getattr(module, "base_layer", module)


def valid_targets(spec: ArchSpec, targets: tuple[str, ...]) -> tuple[str, ...]:
    """``targets`` checked against the architecture's matrix names (empty = all of them)."""
    valid = spec.matrix_names
    bad = [t for t in targets if t not in valid]
    if bad:
        raise ValueError(f"unknown adapter targets {bad} for {spec.family}; valid: {', '.join(valid)}")
    return tuple(targets) or valid


def matrix_ranks(block: nn.Module, spec: ArchSpec, rank: int, targets: tuple[str, ...] = ()) -> dict[str, int]:
    """LoRA rank per targeted matrix of ``block``: ``min(rank, d_in, d_out)`` (``flexigpt.shapes.capped_ranks``).

    Raises:
        ValueError: when ``rank`` exceeds every matrix's size (nothing low-rank about it).
    """
    shapes = {name: tuple(base_linear(get_submodule(block, spec.path_of(name))).weight.shape)
              for name in valid_targets(spec, targets)}
    return capped_ranks(shapes, rank)


@torch.no_grad()
def lora_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``delta`` (d_out, d_in): returns ``(B, A)`` with ``B = U_r S_r`` (d_out, r)
    and ``A = V_r^T`` (r, d_in), so ``B @ A`` is the best rank-r approximation.

    Computed through the eigendecomposition of the smaller Gram matrix in float64, which is
    exact to float32 precision and several times faster on CPU than ``torch.linalg.svd`` (the
    singular vectors of ``D`` are the eigenvectors of ``D^T D`` / ``D D^T``).
    """
    D = delta.detach().to(torch.float64)
    d_out, d_in = D.shape
    rank = min(rank, d_out, d_in)
    if d_in <= d_out:
        evals, vecs = torch.linalg.eigh(D.T @ D)  # ascending
        V = vecs[:, -rank:].flip(-1)  # (d_in, r): top right singular vectors
        B, A = D @ V, V.T  # D V = U_r S_r
    else:
        evals, vecs = torch.linalg.eigh(D @ D.T)
        U = vecs[:, -rank:].flip(-1)  # (d_out, r): top left singular vectors
        S = evals[-rank:].flip(-1).clamp_min(0).sqrt()
        UtD = U.T @ D  # = S_r V_r^T
        keep = S > S.max().clamp_min(1e-300) * 1e-12  # null directions: the product is zero anyway
        A = torch.where(keep[:, None], UtD / S.clamp_min(1e-300)[:, None], torch.zeros_like(UtD))
        B = U * torch.where(keep, S, torch.zeros_like(S))
    return B.float(), A.float()


def lora_config(ranks: dict[str, int], *, standard_init: bool = True) -> Any:
    """The one peft ``LoraConfig`` of this project: per-matrix ranks, no dropout, no bias, and
    ``lora_alpha == r`` for every matrix, so the scaling ``alpha / r`` is 1 and the factors hold
    the correction itself (an SVD-initialised ``B A`` equals the low-rank fit, and a merged
    export adds ``B A`` unscaled). Learning rates were tuned for this scaling."""
    # peft is heavy: loaded when adapters are first attached
    from peft import LoraConfig

    r0 = max(ranks.values())
    return LoraConfig(
        r=r0, lora_alpha=r0, lora_dropout=0.0, target_modules=sorted(ranks),
        rank_pattern={k: v for k, v in ranks.items() if v != r0},
        alpha_pattern={k: v for k, v in ranks.items() if v != r0},
        init_lora_weights=standard_init, bias="none",
    )


def inject_lora(module: nn.Module, ranks: dict[str, int], *, standard_init: bool = True) -> nn.Module:
    """Add LoRA (``lora_config``) to the matrices named in ``ranks`` under ``module``, in place."""
    # peft is heavy: loaded when adapters are first attached
    from peft import inject_adapter_in_model

    inject_adapter_in_model(lora_config(ranks, standard_init=standard_init), module, adapter_name=ADAPTER)
    return module


def lora_factor_modules(module: nn.Module) -> list[nn.Module]:
    """The ``lora_A``/``lora_B`` factor modules of every peft LoRA layer under ``module``."""
    # peft is heavy: loaded when adapters are first attached
    from peft.tuners.lora import LoraLayer

    out: list[nn.Module] = []
    for m in module.modules():
        if isinstance(m, LoraLayer) and ADAPTER in m.lora_A:
            out += [m.lora_A[ADAPTER], m.lora_B[ADAPTER]]
    return out


def attach_slot_adapters(slot: nn.Module, spec: ArchSpec, adapter: Any, *, hidden_size: int,
                         pruned: nn.Module | None = None, config=None) -> dict[str, int]:
    """Give one slot (a structural copy of its donor block) its LoRA and output norms, in place.

    Args:
        slot: the slot's block; its linears share the donor's weight tensors.
        spec: the architecture.
        adapter: rank, targets, init and output-norm settings (``flexigpt.plan.AdapterSpec``).
        hidden_size: the residual width (the output norms' size).
        pruned: the pruned block this slot replaces; with ``adapter.init == "svd"`` its weights
            initialise the LoRA (``B A = SVD_r(W_pruned - W_donor)``). ``None``: standard LoRA
            init (``B = 0``), used for extension copies and for reload skeletons.
        config: the model config (head layout); needed with ``adapter.align``, where the SVD is
            taken of ``W_pruned - W_donor[perm]`` for the donor relabelling that best matches the
            pruned block, and the factors are folded back into the donor's own labelling
            (``flexigpt.align.fold_lora``): the slot computes the function of the aligned donor
            plus adapter while it keeps running the donor's tensors unchanged.

    Returns:
        The rank used for each targeted matrix.
    """
    ranks = matrix_ranks(slot, spec, adapter.rank, adapter.targets)
    svd = pruned is not None and adapter.init in ("svd", "whitened")  # whitened: refined later with calibration data
    alignment, aligned = None, {}
    no_donor = any(getattr(m, ABSENT, False) for m in slot.modules())  # nothing to align: the fit is of W_pruned
    if svd and adapter.align and not no_donor:
        # only aligned builds need the permutation search
        from flexigpt.align import align_donor, aligned_weights

        if config is None:
            raise ValueError("adapter.align needs the model config (its head layout) to align donors")
        alignment = align_donor(pruned, slot, spec, config)  # the slot still holds the donor's plain linears
        aligned = aligned_weights(slot, alignment, spec)
    inject_lora(slot, ranks)
    if svd:
        for name, r in ranks.items():
            layer = get_submodule(slot, spec.path_of(name))
            w_donor = aligned.get(name, layer.base_layer.weight)
            w_pruned = base_linear(get_submodule(pruned, spec.path_of(name))).weight
            B, A = lora_factors(w_pruned.detach().float() - w_donor.detach().float(), r)
            if alignment is not None:
                # only aligned builds need the permutation search
                from flexigpt.align import fold_lora

                A, B = fold_lora(name, A, B, alignment, spec)
            with torch.no_grad():
                layer.lora_B[ADAPTER].weight.copy_(B)
                layer.lora_A[ADAPTER].weight.copy_(A)
    for path in spec.out_linears:
        set_submodule(slot, path, OutputNorm(get_submodule(slot, path), hidden_size, adapter.out_norm, adapter.out_norm_scale))
    return ranks
