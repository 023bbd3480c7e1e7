"""Rewire the module tree: build the new model a Plan describes, sharing the base's tensors.

``apply_plan(base, plan)`` returns a *new* model and leaves the base untouched (the app chats
with both). The new model is a structural copy of the base: every module object is new, every
``nn.Parameter`` is the base's own object (``flexigpt.slots.structural_copy``), so nothing is
duplicated in memory. Then the plan's method (``flexigpt.methods``) builds each slot: a kept
slot runs the copy of its own block; a replacement or copy slot is a further structural copy of
its donor with its own adapters, output norms and pre-norms; FoldGPT members get their own
pre-norms; a drop plan leaves the pruned blocks out.

``flexigpt.arch.set_blocks`` renumbers ``layer_idx`` and ``config.num_hidden_layers`` so the KV
cache and ``generate()`` work. Trainability contract (``flexigpt.trainable.set_trainable``):
afterwards exactly the parameters recovery should train have ``requires_grad=True``. Because the
slots share the base's Parameter objects, the base's parameters are frozen too (their values
never change). A plan with ``kept_lora_rank`` gets kept-block LoRA as well.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import logging

import torch.nn as nn

from flexigpt.arch import arch_of, get_blocks, set_blocks
from flexigpt.build_info import BuildInfo, build_info
from flexigpt.methods import BuildContext
from flexigpt.plan import Plan
from flexigpt.slots import structural_copy
from flexigpt.trainable import attach_kept_lora, set_trainable, trainable_parameters

log = logging.getLogger(__name__)

__all__ = ["BuildInfo", "apply_plan", "build_info", "set_trainable", "structural_copy", "trainable_parameters"]


def apply_plan(base: nn.Module, plan: Plan, *, init_adapters: bool = True) -> nn.Module:
    """Build the model ``plan`` describes from ``base``; the base is not modified.

    Args:
        base: a supported ``*ForCausalLM`` whose depth is ``plan.num_blocks``.
        plan: the plan.
        init_adapters: ``False`` skips the low-rank initialisation (standard LoRA init instead);
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
    ctx = BuildContext(base=base, base_blocks=base_blocks, copies=list(get_blocks(model)), spec=spec,
                       hidden=int(model.config.hidden_size), init_adapters=init_adapters)
    method = plan.method_spec
    sources = plan.slot_sources
    slots: list[nn.Module] = []
    for slot in range(plan.num_slots):
        module = method.build_slot(ctx, plan, slot)
        module._flexigpt_source = sources[slot]  # set_blocks re-slices per-layer config lists with it
        slots.append(module)
    set_blocks(model, slots)
    model.flexigpt_build = BuildInfo(plan=plan, base_config=base_config, ranks=ctx.ranks, extra=ctx.extra)
    set_trainable(model)
    if plan.kept_lora_rank is not None:
        attach_kept_lora(model, plan.kept_lora_rank)
    log.info("built %s plan: %d slots, %d sharing another block's weights, %d blocks not stored", plan.method,
             plan.num_slots, len(plan.shared_slots), len(plan.unstored_blocks))
    return model.eval()
