"""Which parameters does recovery train? The trainability contract of a built model, and
kept-block LoRA (the ShortGPT + LoRA baseline's adapters).

Trainable parameters are found by module type (peft LoRA layers, ``OutputNorm``, the pre-norm
modules the architecture names), never by fragments of parameter names.
"""
from __future__ import annotations

import torch.nn as nn

from flexigpt.adapters import OutputNorm, inject_lora, lora_factor_modules, matrix_ranks, valid_targets
from flexigpt.arch import arch_of, get_blocks, get_submodule
from flexigpt.build_info import build_info

__all__ = ["attach_kept_lora", "set_trainable", "trainable_parameters"]


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter recovery should train (``requires_grad``)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def set_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Apply the trainability contract to a built model; returns the trainable parameters.

    Trainable: the LoRA factors of replaced slots (and of kept slots once kept-block LoRA is
    attached), the output-norm parameters, and, when ``plan.adapter.train_prenorms``, the own
    pre-norms of the slots the method gives their own (every slot for ``foldgpt``), and every
    parameter of a method's own new blocks (``Method.trained_slots``: streamline's span blocks).
    Everything else is frozen.
    """
    info = build_info(model)
    spec = arch_of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    plan = info.plan
    replaced = set(plan.replaced_slots)
    own_norms = set(plan.own_norm_slots)
    trained = set(plan.method_spec.trained_slots(plan))
    for slot, block in enumerate(get_blocks(model)):
        if slot in replaced or info.kept_lora is not None:
            for factor in lora_factor_modules(block):
                factor.requires_grad_(True)
        if slot in replaced:
            for m in block.modules():
                if isinstance(m, OutputNorm):
                    for p in m.own_parameters():
                        p.requires_grad_(True)
        if slot in trained:  # a method's own new block (e.g. streamline): all of it
            block.requires_grad_(True)
        if slot in own_norms and plan.adapter.train_prenorms:
            for path in spec.norms:
                get_submodule(block, path).requires_grad_(True)
    return trainable_parameters(model)


def attach_kept_lora(model: nn.Module, rank: int, targets: tuple[str, ...] | list[str] = ()) -> nn.Module:
    """LoRA (standard init, ``B = 0``) on every kept slot of a built model, in place.

    With a ``drop`` build this is the ShortGPT + LoRA baseline. Only the new LoRA factors (and
    the parameters ``apply_plan`` already made trainable) are trainable afterwards. The base
    model is unaffected: the kept blocks are structural copies whose linears peft wraps.
    """
    info = build_info(model)
    if info.kept_lora is not None:
        raise ValueError(f"this model already has kept-block LoRA (rank {info.kept_lora['rank']})")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"kept-block LoRA rank must be a positive integer, got {rank!r}")
    spec = arch_of(model)
    targets = valid_targets(spec, tuple(targets))
    blocks = get_blocks(model)
    ranks: dict[str, int] = {}
    for slot in info.plan.kept_slots:
        ranks = matrix_ranks(blocks[slot], spec, rank, targets)
        inject_lora(blocks[slot], ranks)
    info.kept_lora = {"rank": rank, "targets": list(targets), "ranks": ranks}
    set_trainable(model)
    return model
