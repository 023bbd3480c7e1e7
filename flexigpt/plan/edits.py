"""How is a plan edited? Every edit returns a new Plan; the plan's method decides what it means.

``PlanEdits`` is a mixin of ``flexigpt.plan.core.Plan``; it never imports the Plan class (it
builds new plans with ``dataclasses.replace``), so the edit rules and the schema stay apart.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flexigpt.methods import get_method
from flexigpt.plan.specs import NoteValue
from flexigpt.validate import MAX_BLOCKS, check_int

__all__ = ["PlanEdits"]


class PlanEdits:
    """Edit methods of the Plan (each returns a new Plan, validated on construction)."""

    @classmethod
    def identity(cls, base_model: str, num_blocks: int, **kwargs: Any):
        """The plan that rebuilds the base model unchanged."""
        L = check_int(num_blocks, "num_blocks", 1, MAX_BLOCKS)
        return cls(base_model=base_model, num_blocks=num_blocks, layer_map=tuple(range(L)), **kwargs)

    def _check_block(self, block: Any) -> int:
        return check_int(block, "block", 0, self.num_blocks - 1)

    def drop(self, block: int, donor: int | None = None):
        """Prune ``block``; methods with donors give its slot ``donor`` (default: the nearest kept block)."""
        b = self._check_block(block)
        if donor is not None:
            donor = check_int(donor, "donor", 0, self.num_blocks - 1)
        return self.method_spec.drop(self, b, donor)

    def keep(self, block: int):
        """Restore ``block`` to its own slot."""
        return self.method_spec.keep(self, self._check_block(block))

    def with_donor(self, block: int, donor: int | None):
        """Make pruned ``block``'s slot run ``donor`` (a kept block), or no donor (``None``: the slot
        runs only its own low-rank factors of the block; flexigpt plans, format 4)."""
        b = self._check_block(block)
        if not self.method_spec.chooses_donors:
            raise ValueError(f"donors are chosen by hand only in flexigpt plans, this plan's method is {self.method!r}")
        if donor == b:
            raise ValueError(f"block {b} cannot be its own donor; use keep({b}) to restore it")
        if donor is None and not self.method_spec.allows_no_donor:
            raise ValueError(f"a {self.method!r} slot cannot go without a donor")
        lm = list(self.layer_map)
        lm[b] = None if donor is None else check_int(donor, "donor", 0, self.num_blocks - 1)
        return dataclasses.replace(self, layer_map=tuple(lm))

    def with_method(self, method: str, donors: Mapping[int, int] | None = None, *, group_size: int | None = None):
        """The same pruned set under another method.

        Pruned blocks take ``donors[block]`` or the nearest kept block where the target method
        chooses donors; ``group_size`` groups the kept blocks where it groups (default: the
        plan's own, else 2). Use ``extend_plan`` to make an ``extend`` plan.
        """
        if method == self.method and group_size in (None, self.group_size):
            return self
        target = get_method(method)
        if not self.method_spec.editable and method != self.method:
            raise ValueError(f"with_method converts between pruning methods, got {self.method!r} -> {method!r}")
        own = self.donors if self.method_spec.chooses_donors else {}  # foldgpt's donors are keyed by slot
        merged = {**own, **dict(donors or {})} if target.chooses_donors else {}
        size = group_size if group_size is not None else self.group_size
        return target.from_pruned(self, set(self.pruned_blocks), donors=merged, group_size=size)

    def with_group_size(self, group_size: int):
        """Regroup a foldgpt plan's kept blocks."""
        if self.method != "foldgpt":
            raise ValueError(f"group size applies to foldgpt plans, this plan's method is {self.method!r}")
        return self.with_method("foldgpt", group_size=group_size)

    def with_rank(self, rank: int):
        return self.with_adapter(rank=rank)

    def with_adapter(self, **changes: Any):
        """A new plan whose AdapterSpec has ``changes`` (e.g. ``out_norm="scale"``)."""
        if "targets" in changes and isinstance(changes["targets"], list):
            changes["targets"] = tuple(changes["targets"])
        return dataclasses.replace(self, adapter=dataclasses.replace(self.adapter, **changes))

    def with_kept_lora(self, rank: int | None):
        """A new plan with kept-block LoRA of ``rank`` (``None``: none)."""
        return dataclasses.replace(self, kept_lora_rank=rank)

    def with_notes(self, **notes: NoteValue):
        merged = dict(self.notes) | notes
        return dataclasses.replace(self, notes=tuple(sorted(merged.items())))
