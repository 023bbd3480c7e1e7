"""Method ``flexigpt`` (FlexiGPT): every pruned block's slot runs a kept donor block's weights
plus its own LoRA, output normalisation and pre-norms.

One slot per base block (``len(layer_map) == num_blocks``): slot ``s`` with ``layer_map[s] == s``
keeps its block; slot ``s`` with ``layer_map[s] = d != s`` replaces the pruned block ``s`` by a
structural copy of donor ``d`` (the donor's tensors, its own modules) whose LoRA starts from the
low-rank fit of ``W_s - W_d`` and whose output norms start tiny, so the slot starts near the
identity. Donors must be kept blocks.

A slot may have **no donor** (``layer_map[s] is None``, ``null`` in plan.json, format 4): it
runs only its own rank-r factors of the pruned block (the LoRA; the linears' dense weights are
absent, ``flexigpt.slots.no_donor_copy``) with its own pre-norms and output norms, and recovers
the same way. It is the ablation that answers "does sharing a donor's weights help at all?".

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import dataclasses

from flexigpt.methods.base import BuildContext, Method, nearest_kept

__all__ = ["AdapterSlots", "FlexiGPT", "adapter_estimate", "build_adapter_slot"]


def build_adapter_slot(ctx: BuildContext, plan, *, donor: int | None, norm_source: int, pruned: int | None):
    """A slot that runs ``donor``'s tensors with its own pre-norms (copied from ``norm_source``),
    LoRA (initialised against base block ``pruned``, or standard init when ``None``) and output norms.
    ``donor=None``: no donor; the slot's linears have no dense weights, only its LoRA."""
    # torch-heavy modules: imported when a model is built, so `import flexigpt.plan` stays light
    from flexigpt.adapters import attach_slot_adapters
    from flexigpt.slots import no_donor_copy, own_prenorms, structural_copy

    if donor is None:
        module = no_donor_copy(ctx.base_blocks[norm_source], ctx.spec)  # its own norms, absent linears
    else:
        module = structural_copy(ctx.copies[donor])  # own module objects, donor's tensors
        own_prenorms(module, ctx.base_blocks[norm_source], ctx.spec.norms)
    target = ctx.base_blocks[pruned] if (pruned is not None and ctx.init_adapters) else None
    ctx.ranks = attach_slot_adapters(module, ctx.spec, plan.adapter, hidden_size=ctx.hidden, pruned=target,
                                     config=ctx.base.config)
    return module


def adapter_estimate(plan, shapes, adapter, replaced) -> tuple[int, int, int]:
    """``(stored, run, trainable)`` for a plan whose ``replaced`` slots carry LoRA, output norms and
    own pre-norms, and whose other slots run the stored blocks."""
    R = len(replaced)
    lora = shapes.lora(adapter.rank, adapter.targets)
    out_norm = 2 * (2 * shapes.hidden if adapter.out_norm == "layernorm" else shapes.hidden)  # attention + MLP
    per_slot = lora + out_norm + shapes.prenorms
    trainable_slot = lora + out_norm + (shapes.prenorms if adapter.train_prenorms else 0)
    stored_blocks = len({b for b in plan.layer_map if b is not None})
    # a no-donor slot also owns the block's other non-linear parameters, and runs no dense linear
    own_rest = shapes.block - shapes.linears - shapes.prenorms
    none = sum(1 for b in plan.layer_map if b is None)
    stored = shapes.nonblock + stored_blocks * shapes.block + R * per_slot + none * own_rest
    run = shapes.nonblock + plan.num_slots * shapes.block + R * (lora + out_norm) - none * shapes.linears
    return stored, run, R * trainable_slot


class AdapterSlots(Method):
    """Methods whose replaced slots carry LoRA, output norms and own pre-norms (flexigpt, extend)."""

    has_adapters = True

    def estimate(self, plan, shapes, adapter) -> tuple[int, int, int]:
        return adapter_estimate(plan, shapes, adapter, self.replaced_slots(plan))

    def merge_problem(self, plan) -> str | None:
        if self.replaced_slots(plan) and plan.adapter.out_norm == "layernorm":
            return ("out_norm 'layernorm' cannot be merged into plain weights (LayerNorm is nonlinear); use the "
                    "compact export, or build with out_norm 'scale'")
        return None


class FlexiGPT(AdapterSlots):
    name = "flexigpt"
    label = "FlexiGPT (share a donor + adapter)"
    description = "each pruned block's slot runs a kept donor's weights plus its own low-rank adapter and output norm"
    chooses_donors = True
    allows_no_donor = True

    def required_version(self, plan) -> int:
        return 4 if None in plan.layer_map else self.format_version

    def validate(self, plan) -> None:
        lm, L = plan.layer_map, plan.num_blocks
        if len(lm) != L:
            raise ValueError(f"a flexigpt layer_map has one slot per block ({L}), got {len(lm)} slots: {list(lm)}")
        if all(d != s for s, d in enumerate(lm)):
            raise ValueError(f"cannot prune all {L} blocks: at least one must stay")
        bad = {s: d for s, d in enumerate(lm) if d is not None and d != s and lm[d] != d}
        if bad:
            s, d = next(iter(bad.items()))
            raise ValueError(f"slot {s} uses donor block {d}, but block {d} is itself pruned; donors must be kept blocks")

    def slot_sources(self, plan) -> tuple[int, ...]:
        return tuple(range(plan.num_blocks))

    def replaced_slots(self, plan) -> tuple[int, ...]:
        return tuple(s for s, d in enumerate(plan.layer_map) if d != s)

    def unstored_blocks(self, plan) -> tuple[int, ...]:
        return self.replaced_slots(plan)

    def pruned_blocks(self, plan) -> tuple[int, ...]:
        return self.replaced_slots(plan)

    def from_pruned(self, plan, pruned, *, donors=None, group_size=None):
        donors = dict(donors or {})
        kept = [b for b in range(plan.num_blocks) if b not in pruned]
        if not kept:
            raise ValueError(f"cannot prune all {plan.num_blocks} blocks: at least one must stay as a donor")
        # a donor of None (given explicitly) means no donor
        lm = tuple(b if b not in pruned else donors[b] if b in donors else nearest_kept(b, kept)
                   for b in range(plan.num_blocks))
        return dataclasses.replace(plan, method=self.name, layer_map=lm, sources=None, extend=None, spans=None)

    def drop(self, plan, block, donor):
        users = [s for s, d in enumerate(plan.layer_map) if d == block and s != block]
        if users:
            raise ValueError(f"block {block} is the donor of slots {users}; give them another donor before pruning it")
        kept = [k for k in range(plan.num_blocks) if plan.layer_map[k] == k and k != block]
        if not kept:
            raise ValueError(f"cannot prune block {block}: it is the last kept block")
        lm = list(plan.layer_map)
        lm[block] = nearest_kept(block, kept) if donor is None else donor
        return dataclasses.replace(plan, layer_map=tuple(lm))

    def keep(self, plan, block):
        lm = list(plan.layer_map)
        lm[block] = block
        return dataclasses.replace(plan, layer_map=tuple(lm))

    def needs_calibration(self, plan, fit_steps: int = 0) -> bool:
        return bool(self.replaced_slots(plan)) and (plan.adapter.init == "whitened" or fit_steps > 0)

    def calibrate(self, model, base, plan, calibration, *, fit_steps: int = 0, progress=None) -> dict:
        """Whitened init and closed-form output scales (``adapter.init == "whitened"``), then
        ``fit_steps`` of block-local fitting per slot: each slot trained alone, in depth order, to
        reproduce its pruned block's output in the original model from what reaches it in the
        built model (``flexigpt.slot_fit``)."""
        # the fitting modules hook the original model: loaded only for builds that fit
        from flexigpt.block_io import collect_block_io
        from flexigpt.slot_fit import fit_slots
        from flexigpt.slot_init import whitened_slot_init
        from flexigpt.slot_scales import closed_form_scales_

        out: dict = {}
        if plan.adapter.init == "whitened":
            if progress:
                progress(0.1, "fitting each slot's adapter to its pruned block (whitened low rank)")
            residuals = whitened_slot_init(model, base, calibration)
            out["whitened_residual"] = {str(s): round(sum(r.values()) / len(r), 4) for s, r in residuals.items()}
        cache = collect_block_io(base, calibration, sorted(plan.replaced_slots))
        if plan.adapter.init == "whitened":
            if progress:
                progress(0.4, "setting each slot's output scales in closed form")
            scales = closed_form_scales_(model, base, cache=cache)
            out["scale_r2"] = {str(s): v for s, v in scales.items()}
        if fit_steps > 0:
            def step(slot: int, done: int, total: int) -> None:
                if progress:
                    progress(0.5 + 0.5 * done / max(total, 1), f"fitting slot {slot} alone ({done}/{total} steps)")

            fitted = fit_slots(model, base, calibration, cache=cache, steps=fit_steps, callback=step)
            out["r2"] = {str(f.slot): round(f.r2_after, 4) for f in fitted.slots}
            out["r2_before"] = {str(f.slot): round(f.r2_before, 4) for f in fitted.slots}
            out["fit_steps"] = fit_steps
        return out

    def build_slot(self, ctx: BuildContext, plan, slot: int):
        donor = plan.layer_map[slot]
        if donor == slot:
            return ctx.copies[slot]
        return build_adapter_slot(ctx, plan, donor=donor, norm_source=slot, pruned=slot)
