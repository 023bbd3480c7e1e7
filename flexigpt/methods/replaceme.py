"""Method ``replaceme`` (ReplaceMe): each span of blocks is cut, and one least-squares linear map,
fitted on calibration activations of the original model, is folded into the MLP output projection
of the block before the span. Training-free; stores exactly what a plain drop of the span stores.

Surgery: the slot of the block before each span gets its own down projection tensor (a copy;
the base is never changed); ``calibrate`` fits the maps in float64 one span after another, each
on the already-cut model (``flexigpt.replaceme``), and writes the folded projections. A span may
not start at block 0: there is no block before it (see ``flexigpt.replaceme`` for why folding
into the tied embedding is not done instead).

Paper: ReplaceMe (Shopkhoev et al., NeurIPS 2025), https://arxiv.org/abs/2505.02819
"""
from __future__ import annotations

from flexigpt.methods.base import BuildContext
from flexigpt.methods.span_cut import SpanMethod

__all__ = ["RIDGE_SCALE", "ReplaceMe"]

# The map is fitted with a ridge toward the identity (the plain drop) of this many times the mean
# diagonal of M^T M. Plain least squares (0) fits the calibration states well (a fifth of the
# drop's error) but amplifies the embedded model's rare massive-activation channels: on held-out
# text it was 10x worse than the plain drop (1720 vs 176); at 2.5-7.5 it is 80-83, less than half
# the drop's (bench/RESULTS.md).
RIDGE_SCALE = 3.0


class ReplaceMe(SpanMethod):
    name = "replaceme"
    label = "ReplaceMe (span -> linear map, no training)"
    description = ("cut contiguous spans; a least-squares linear map fitted on calibration text is folded into the "
                   "block before each span (no training, no extra parameters)")
    allow_first = False

    def fold_slots(self, plan) -> tuple[int, ...]:
        """Slots whose down projection carries a span's map (the block before each span)."""
        return tuple(plan.layer_map.index(s - 1) for s, _ in plan.spans or ())

    def build_slot(self, ctx: BuildContext, plan, slot: int):
        module = ctx.copies[plan.layer_map[slot]]
        if slot in self.fold_slots(plan):
            # torch: imported when a model is built, so `import flexigpt.plan` stays light
            import torch.nn as nn
            from flexigpt.arch import get_submodule
            from flexigpt.slots import structural_copy

            module = structural_copy(module)
            down = get_submodule(module, ctx.spec.out_linears[1])
            down.weight = nn.Parameter(down.weight.detach().clone(), requires_grad=False)
            if down.bias is not None:
                down.bias = nn.Parameter(down.bias.detach().clone(), requires_grad=False)
        return module

    def calibrate(self, model, base, plan, calibration, *, fit_steps: int = 0, progress=None) -> dict:
        """Fit every span's map on the original model (float64 least squares, spans in order, each on
        the model with the earlier spans cut) and fold it into the built model's own projections."""
        # torch-heavy fitting: loaded only for builds that fit
        import torch
        from flexigpt.adapters import base_linear
        from flexigpt.arch import arch_of, get_blocks, get_submodule
        from flexigpt.replaceme import replaceme

        def tick(fraction: float, message: str) -> None:
            if progress:
                progress(fraction, message)

        fitted = replaceme(base, plan.spans, calibration, ridge_scale=RIDGE_SCALE, progress=tick)
        ours, theirs = get_blocks(model), get_blocks(fitted)
        out_path = arch_of(base).out_linears[1]
        with torch.no_grad():
            for slot in self.fold_slots(plan):
                dst = base_linear(get_submodule(ours[slot], out_path))
                src = get_submodule(theirs[slot], out_path)
                dst.weight.copy_(src.weight)
                if dst.bias is not None:
                    dst.bias.copy_(src.bias)
        return {"spans": [{"span": list(f.span), "error_vs_drop": round(float(f.error_vs_drop), 4),
                           "tokens": int(f.tokens)} for f in fitted.replaceme_fits]}
