"""Rewire the module tree: build the new model a Plan describes, sharing the base's tensors.

``apply_plan(base, plan)`` returns a *new* model and leaves the base untouched (the app chats
with both). The new model is a structural copy of the base: every module object is new, every
``nn.Parameter`` is the base's own object (``copy.deepcopy`` with a memo mapping each Parameter
to itself), so nothing is duplicated in memory. Then each slot of ``plan.layer_map`` gets a
block:

* a kept slot runs the copy of its own block;
* a replacement slot (``flexigpt``) or a copy slot (``extend``) is a further structural copy of
  its donor block (its own module objects and ``layer_idx``, the donor's weight tensors) with
  its own LoRA, output norms and pre-norms (see ``flexigpt.adapters``). OPT biases are shared
  with the donor (the donor's bias Parameter, not a copy);
* a ``drop`` plan simply leaves the pruned blocks out (ShortGPT);
* a ``foldgpt`` plan builds one slot per kept block: each runs its group's first block's weight
  tensors (hard sharing, stored once) with its *own* copy of its own block's pre-norms, the
  only parameters FoldGPT's "cure" trains (no LoRA, no output norm).

With ``adapter.align`` each replacement slot's SVD initialisation is taken against its donor
relabelled to line up with the pruned block (``flexigpt.align``) and folded back, so the slot
still runs the donor's tensors unchanged.

``flexigpt.arch.set_blocks`` renumbers ``layer_idx`` and ``config.num_hidden_layers`` so the KV
cache and ``generate()`` work. Trainability contract: afterwards exactly the parameters that
recovery should train have ``requires_grad=True`` (slot adapters, output norms and, with
``train_prenorms``, the slots' own pre-norms). Because the slots share the base's Parameter
objects, the base's parameters are frozen too (their values never change).

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
FoldGPT (Liu et al., 2024), https://arxiv.org/abs/2407.00928
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from flexigpt.adapters import OutputNorm, attach_slot_adapters, trainable_parameters
from flexigpt.arch import arch_of, get_blocks, get_submodule, set_blocks, set_submodule
from flexigpt.plan import Plan

log = logging.getLogger(__name__)

__all__ = ["BuildInfo", "apply_plan", "build_info", "set_trainable", "structural_copy", "trainable_parameters"]


@dataclass
class BuildInfo:
    """What ``apply_plan`` built, kept on the model as ``model.flexigpt_build``.

    Attributes:
        plan: the plan.
        base_config: the base model's config as a dict (the export stores it).
        ranks: the LoRA rank of each targeted matrix in replaced slots (after capping).
        kept_lora: ``{"rank", "targets", "ranks"}`` once ``attach_kept_lora`` ran, else ``None``.
    """

    plan: Plan
    base_config: dict[str, Any]
    ranks: dict[str, int] = field(default_factory=dict)
    kept_lora: dict[str, Any] | None = None


def build_info(model: nn.Module) -> BuildInfo:
    """The ``BuildInfo`` of a model made by ``apply_plan``.

    Raises:
        ValueError: when the model was not built by ``apply_plan``.
    """
    info = getattr(model, "flexigpt_build", None)
    if not isinstance(info, BuildInfo):
        raise ValueError(f"{type(model).__name__} was not built by flexigpt.surgery.apply_plan (no build info)")
    return info


def structural_copy(module: nn.Module) -> nn.Module:
    """A new module tree whose Parameters are the very same objects as ``module``'s.

    Buffers (rotary tables and the like) are copied; they are small and not shared state.
    """
    return copy.deepcopy(module, memo={id(p): p for p in module.parameters()})


def _own_prenorms(slot: nn.Module, source: nn.Module, norms: tuple[str, ...]) -> None:
    # A real copy (new tensors): the slot's pre-norms are its own, initialised from `source`.
    for path in norms:
        set_submodule(slot, path, copy.deepcopy(get_submodule(source, path)))


def set_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Apply the trainability contract to a built model; returns the trainable parameters.

    Trainable: the LoRA factors of replaced slots (and of kept blocks after
    ``attach_kept_lora``), the output-norm parameters, and, when ``plan.adapter.train_prenorms``,
    the own pre-norms of replaced slots (of every slot for ``foldgpt``). Everything else is frozen.
    """
    info = build_info(model)
    spec = arch_of(model)
    for p in model.parameters():
        p.requires_grad_(False)
    plan = info.plan
    replaced = set(plan.replaced_slots)
    own_norms = set(range(plan.num_slots)) if plan.method == "foldgpt" else replaced
    for slot, block in enumerate(get_blocks(model)):
        if slot in replaced or info.kept_lora is not None:
            for name, p in block.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    p.requires_grad_(True)
        if slot in replaced:
            for m in block.modules():
                if isinstance(m, OutputNorm):
                    for name, p in m.named_parameters():
                        if not name.startswith("inner."):
                            p.requires_grad_(True)
        if slot in own_norms and plan.adapter.train_prenorms:
            for path in spec.norms:
                for p in get_submodule(block, path).parameters():
                    p.requires_grad_(True)
    return trainable_parameters(model)


def apply_plan(base: nn.Module, plan: Plan, *, init_adapters: bool = True) -> nn.Module:
    """Build the model ``plan`` describes from ``base``; the base is not modified.

    Args:
        base: a supported ``*ForCausalLM`` whose depth is ``plan.num_blocks``.
        plan: the plan.
        init_adapters: ``False`` skips the SVD initialisation (standard LoRA init instead);
            used when rebuilding a skeleton whose adapter values are loaded afterwards, since
            the pruned blocks' weights are not stored in an export.

    Returns:
        The new model (eval mode), with ``model.flexigpt_build`` describing it.

    Raises:
        ValueError: a depth mismatch, unknown adapter targets, or a rank above every matrix size.
    """
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a flexigpt.plan.Plan, got {type(plan).__name__}")
    spec = arch_of(base)
    base_blocks = get_blocks(base)
    if len(base_blocks) != plan.num_blocks:
        raise ValueError(f"plan is for a base with {plan.num_blocks} blocks, but the model has {len(base_blocks)}")
    base_config = base.config.to_dict()
    model = structural_copy(base)
    copies = list(get_blocks(model))  # structural copies of the base blocks, same Parameters
    hidden = int(model.config.hidden_size)
    replaced = set(plan.replaced_slots)
    ranks: dict[str, int] = {}
    slots: list[nn.Module] = []
    sources = plan.slot_sources
    for slot, block in enumerate(plan.layer_map):
        if plan.method == "foldgpt":
            # the group's first member runs the copy of its block, the others a further copy; every
            # member gets its own pre-norms, copied from the block it stands for (trainable)
            source = sources[slot]
            module = copies[block] if source == block else structural_copy(copies[block])
            _own_prenorms(module, base_blocks[source], spec.norms)
        elif slot not in replaced:
            module = copies[block]
            source = block
        else:
            module = structural_copy(copies[block])  # own module objects, donor's tensors
            if plan.method == "flexigpt":
                norm_source, pruned, source = base_blocks[slot], base_blocks[slot], slot
            else:  # extend: the copy starts from its source block's norms; standard LoRA init
                norm_source, pruned, source = base_blocks[block], None, block
            _own_prenorms(module, norm_source, spec.norms)
            ranks = attach_slot_adapters(module, spec, plan.adapter, hidden_size=hidden,
                                         pruned=pruned if init_adapters else None, config=base.config)
        module._flexigpt_source = source  # set_blocks re-slices per-layer config lists with it
        slots.append(module)
    set_blocks(model, slots)
    model.flexigpt_build = BuildInfo(plan=plan, base_config=base_config, ranks=ranks)
    set_trainable(model)
    log.info("built %s plan: %d slots, %d sharing another block's weights, %d blocks not stored", plan.method,
             plan.num_slots, len(plan.shared_slots), len(plan.dropped_blocks))
    return model.eval()
