"""Method ``foldgpt`` (FoldGPT): remove the pruned blocks, then split the kept blocks into groups
of consecutive blocks that run their first member's weights, each member with its own pre-norms.

Fewer slots than blocks; ``Plan.sources`` names the base block each slot stands for (increasing)
and ``layer_map`` the block whose weights it runs: the first member of its group. Every slot's
pre-norms are its own and the only parameters FoldGPT's "cure" trains (no LoRA, no output norm).

The group's shared weights (the plan note ``representative``): ``first`` (the default) runs the
first member's own matrices; ``average`` runs the element-wise mean of the members' matrices
(a new tensor per group, computed from the base at build time, so a compact export rebuilds it
bit for bit). bench/quality.py measures both.

Paper: FoldGPT (Liu et al., 2024), https://arxiv.org/abs/2407.00928
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from flexigpt.methods.base import BuildContext, Method
from flexigpt.validate import MAX_BLOCKS, check_int

__all__ = ["FoldGPT", "REPRESENTATIVES", "fold_layout"]

REPRESENTATIVES = ("first", "average")  # what a group's shared weights are; the first is the default


def fold_layout(kept: Sequence[int], group_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(layer_map, sources)`` with ``kept`` split into runs of ``group_size`` consecutive kept
    blocks, every member running the run's first block."""
    kept = tuple(kept)
    size = check_int(group_size, "group size", 1, MAX_BLOCKS)
    lm = tuple(kept[i - i % size] for i in range(len(kept)))
    return lm, kept


class FoldGPT(Method):
    name = "foldgpt"
    label = "FoldGPT (remove, then share in groups)"
    description = "remove the pruned blocks, then let groups of kept blocks share one block's weights with their own norms"
    format_version = 2
    uses_sources = True

    def validate(self, plan) -> None:
        lm, src, L = plan.layer_map, plan.sources, plan.num_blocks
        if not isinstance(src, tuple) or len(src) != len(lm):
            raise ValueError(f"a foldgpt plan needs sources: the base block each of its {len(lm)} slots stands for, "
                             f"got {src!r}")
        for s, b in enumerate(src):
            check_int(b, f"sources[{s}]", 0, L - 1)
        if any(b <= a for a, b in zip(src, src[1:])):
            raise ValueError(f"foldgpt sources list the kept blocks in increasing order without duplicates, got {list(src)}")
        rep = plan.note("representative", "first")
        if rep not in REPRESENTATIVES:
            raise ValueError(f"foldgpt representative {rep!r} is not one of {', '.join(REPRESENTATIVES)}")
        own = {b: d for b, d in zip(src, lm)}
        for s, d in enumerate(lm):
            if own.get(d) != d:
                why = "is removed" if d not in own else f"runs block {own[d]}'s weights"
                raise ValueError(f"slot {s} (block {src[s]}) runs block {d}'s weights, but block {d} {why}; "
                                 "a group's weights must come from a member that runs its own")

    def slot_sources(self, plan) -> tuple[int, ...]:
        return plan.sources

    def shared_slots(self, plan) -> tuple[int, ...]:
        return tuple(s for s, (d, b) in enumerate(zip(plan.layer_map, plan.sources)) if d != b)

    def short_name(self, plan) -> str:
        return f"foldgpt {round(100 * len(plan.removed_blocks) / plan.num_blocks)}% g{plan.group_size}"

    def own_norm_slots(self, plan) -> tuple[int, ...]:
        return tuple(range(plan.num_slots))

    def from_pruned(self, plan, pruned, *, donors=None, group_size=None):
        size = check_int(2 if group_size is None else group_size, "group size", 1, MAX_BLOCKS)
        kept = [b for b in range(plan.num_blocks) if b not in pruned]
        lm, sources = fold_layout(kept, size)
        notes = tuple(sorted((dict(plan.notes) | {"group_size": size}).items()))
        return dataclasses.replace(plan, method=self.name, layer_map=lm, sources=sources, notes=notes, extend=None,
                                   spans=None)

    def build_slot(self, ctx: BuildContext, plan, slot: int):
        # lazy: torch-heavy module, so `import flexigpt.plan` stays light
        from flexigpt.slots import own_prenorms, structural_copy

        block, source = plan.layer_map[slot], plan.sources[slot]
        shared = ctx.copies[block]
        if plan.note("representative", "first") == "average":  # built once per group, at its first slot
            key = ("foldgpt average", block)
            if key not in ctx.scratch:
                members = [b for b, d in zip(plan.sources, plan.layer_map) if d == block]
                ctx.scratch[key] = shared if len(members) == 1 else \
                    _averaged(shared, [ctx.base_blocks[b] for b in members], ctx.spec.linears)
            shared = ctx.scratch[key]
        # the group's first member runs the shared block, the others a further copy (the same
        # Parameters); every member gets its own pre-norms, copied from the block it stands for (trainable)
        module = shared if source == block else structural_copy(shared)
        own_prenorms(module, ctx.base_blocks[source], ctx.spec.norms)
        return module

    def estimate(self, plan, shapes, adapter) -> tuple[int, int, int]:
        S, D = plan.num_slots, len(set(plan.layer_map))
        stored = shapes.nonblock + D * (shapes.block - shapes.prenorms) + S * shapes.prenorms
        run = shapes.nonblock + S * shapes.block
        return stored, run, S * shapes.prenorms if adapter.train_prenorms else 0

    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--group-size", type=int, default=None,
                            help="foldgpt: kept blocks per group sharing one block's weights (default 2)")
        parser.add_argument("--representative", choices=REPRESENTATIVES, default=None,
                            help="foldgpt: the weights a group shares: the first member's (default) or the members' "
                                 "element-wise average")
        parser.add_argument("--gates-steps", type=int, default=0,
                            help="foldgpt: train FoldGPT block gates for N steps on the analysis's calibration data and "
                                 "remove the lowest-gated blocks (default 0: the lowest Block Influence from --analysis)")

    def plan_options(self, args: argparse.Namespace) -> dict[str, Any]:
        size = getattr(args, "group_size", None)
        return {"group_size": 2 if size is None else size}


def _averaged(first, members, linears) -> Any:
    """A copy of block ``first`` whose linear matrices (and biases) are new, frozen Parameters: the
    element-wise mean of ``members``' (the base blocks of one group)."""
    # torch-heavy: imported at build time, so `import flexigpt.plan` stays light
    import torch
    import torch.nn as nn
    from flexigpt.arch import get_submodule
    from flexigpt.slots import structural_copy

    block = structural_copy(first)
    with torch.no_grad():
        for path in linears:
            linear = get_submodule(block, path)
            sources = [get_submodule(m, path) for m in members]
            linear.weight = nn.Parameter(torch.stack([s.weight for s in sources]).mean(0), requires_grad=False)
            if linear.bias is not None:
                linear.bias = nn.Parameter(torch.stack([s.bias for s in sources]).mean(0), requires_grad=False)
    return block
