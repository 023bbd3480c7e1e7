"""Method ``streamline`` (LLM-Streamline): each span of blocks is replaced by ONE block, a copy of
the span's first block (its own tensors), trained locally to map the span's input to its output on
calibration activations of the original model; end-to-end recovery may follow, and trains it whole.

``layer_map`` keeps each span's first block id at the span's position (the slot that stands for
the span); the blocks after it are removed. ``calibrate`` trains each span's block with MSE for
``fit_steps`` steps (``DEFAULT_STEPS`` when 0: local training is the method).

Paper: LLM-Streamline (Chen et al., ICLR 2025), https://arxiv.org/abs/2403.19135
"""
from __future__ import annotations

import copy

from flexigpt.methods.base import BuildContext
from flexigpt.methods.span_cut import SpanMethod
from flexigpt.spans import span_blocks

__all__ = ["DEFAULT_STEPS", "Streamline"]

DEFAULT_STEPS = 200  # local training steps per span when the build asks for none


class Streamline(SpanMethod):
    name = "streamline"
    label = "LLM-Streamline (span -> one trained block)"
    description = ("cut contiguous spans; each is replaced by one block (a copy of its first block) trained to map "
                   "the span's input to its output")

    def layout(self, num_blocks: int, spans) -> tuple[int, ...]:
        removed = {b for s, e in spans for b in range(s + 1, e)}
        return tuple(b for b in range(num_blocks) if b not in removed)

    def span_slots(self, plan) -> tuple[int, ...]:
        """The slot that stands for each span (its own trained block)."""
        return tuple(plan.layer_map.index(s) for s, _ in plan.spans or ())

    def trained_slots(self, plan) -> tuple[int, ...]:
        return self.span_slots(plan)

    def unstored_blocks(self, plan) -> tuple[int, ...]:
        return span_blocks(plan.spans or ())

    def build_slot(self, ctx: BuildContext, plan, slot: int):
        block = plan.layer_map[slot]
        if slot not in self.span_slots(plan):
            return ctx.copies[block]
        return copy.deepcopy(ctx.base_blocks[block])  # its own tensors: training never touches the base

    def estimate(self, plan, shapes, adapter) -> tuple[int, int, int]:
        stored, run, _ = super().estimate(plan, shapes, adapter)
        return stored, run, len(plan.spans or ()) * shapes.block

    def calibrate(self, model, base, plan, calibration, *, fit_steps: int = 0, progress=None) -> dict:
        """Train each span's block on the original model's span input -> output (MSE), then copy it in."""
        # torch-heavy training: loaded only for builds that fit
        import torch
        from flexigpt.adapters import base_linear
        from flexigpt.arch import get_blocks, get_submodule
        from flexigpt.streamline import streamline

        def tick(fraction: float, message: str) -> None:
            if progress:
                progress(fraction, message)

        steps = fit_steps or DEFAULT_STEPS
        result = streamline(base, plan.spans, calibration, steps=steps, progress=tick)
        ours, theirs = get_blocks(model), get_blocks(result.model)
        with torch.no_grad():
            for slot in self.span_slots(plan):
                for name, p in theirs[slot].named_parameters():
                    path, _, attr = name.rpartition(".")
                    getattr(base_linear(get_submodule(ours[slot], path)), attr).copy_(p)
        return {"fit_steps": steps,
                "spans": [{"span": list(f.span), "r2_start": round(f.r2_start, 4), "r2": round(f.r2, 4),
                           "r2_drop": round(f.r2_drop, 4), "seconds": round(f.seconds, 1)} for f in result.fits]}
