"""What does a method have to say? The interface every pruning method implements.

A method reads a ``Plan``'s ``layer_map`` in its own way. Everything that differs between methods
lives in its ``Method`` object: validation, the derived slot views, conversions between pruned
sets, the surgery that builds one slot, the parameter estimate, its label for the app and its
CLI options. The plan, surgery, parameter accounting, exports, the CLI and the app ask the
registry (``flexigpt.methods``) and never branch on a method's name.

The defaults describe a method whose slots run their own blocks, in order, with nothing
trainable (a plain drop); subclasses override what differs.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["BuildContext", "Method", "nearest_kept"]


def nearest_kept(block: int, kept) -> int:
    """The donor rule when nothing better is known: the kept block nearest in depth (ties: lower id)."""
    kept = list(kept)
    if not kept:
        raise ValueError(f"block {block} has no kept block to take as donor")
    return min(kept, key=lambda k: (abs(k - block), k))


@dataclass
class BuildContext:
    """What ``Method.build_slot`` may use; filled by ``flexigpt.surgery.apply_plan``.

    Attributes:
        base: the base model (never modified).
        base_blocks: the base's blocks.
        copies: structural copies of the base blocks (new modules, the base's Parameters).
        spec: the architecture (``flexigpt.arch.ArchSpec``).
        hidden: the residual width.
        init_adapters: ``False`` when rebuilding an export skeleton (values are loaded afterwards).
        ranks: the LoRA rank per matrix of the slot adapters; a method fills it.
        extra: method-specific results (kept in ``BuildInfo.extra``).
        scratch: modules a method builds once and reuses across its slots (not kept).
    """

    base: Any
    base_blocks: Any
    copies: list
    spec: Any
    hidden: int
    init_adapters: bool = True
    ranks: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    scratch: dict[Any, Any] = field(default_factory=dict)


class Method:
    """One pruning method. Subclass, set the class attributes, override what differs, and
    ``flexigpt.methods.register`` an instance."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # shown in the app's method menu
    description: ClassVar[str] = ""  # one sentence for the app and ``plan --help``
    format_version: ClassVar[int] = 1  # the lowest plan format that can express this method
    editable: ClassVar[bool] = True  # blocks can be pruned and restored one at a time
    chooses_donors: ClassVar[bool] = False  # the plan editor offers a donor per pruned block
    has_adapters: ClassVar[bool] = False  # replaced slots carry LoRA and output norms (rank matters)
    proposable: ClassVar[bool] = True  # ``plan_from_scores`` can make one from a pruned set
    uses_sources: ClassVar[bool] = False  # the plan's ``sources`` field (slot -> block it stands for)
    allows_no_donor: ClassVar[bool] = False  # a replaced slot may run no donor (``layer_map`` entry ``None``)
    uses_spans: ClassVar[bool] = False  # the plan's ``spans`` field (contiguous runs cut together)

    # ---- validation and views ------------------------------------------------------
    def validate(self, plan) -> None:
        """Raise ``ValueError`` naming the problem when ``plan.layer_map`` (and the method's own
        fields) do not describe a valid plan. The default: increasing kept blocks."""
        lm = plan.layer_map
        if any(b <= a for a, b in zip(lm, lm[1:])):
            raise ValueError(f"a {self.name} layer_map lists the kept blocks in increasing order without duplicates, "
                             f"got {list(lm)}")

    def slot_sources(self, plan) -> tuple[int, ...]:
        """The base block each slot stands for."""
        return plan.layer_map

    def replaced_slots(self, plan) -> tuple[int, ...]:
        """Slots that carry their own adapters and output norms."""
        return ()

    def shared_slots(self, plan) -> tuple[int, ...]:
        """Slots that run another block's weights."""
        return self.replaced_slots(plan)

    def own_norm_slots(self, plan) -> tuple[int, ...]:
        """Slots with their own (trainable, with ``adapter.train_prenorms``) pre-norms."""
        return self.replaced_slots(plan)

    def unstored_blocks(self, plan) -> tuple[int, ...]:
        """Base blocks whose own weights the new model does not store."""
        stored = set(b for b in plan.layer_map if b is not None)
        return tuple(b for b in range(plan.num_blocks) if b not in stored)

    def pruned_blocks(self, plan) -> tuple[int, ...]:
        """The blocks the user chose to prune (what the plan editor shows as pruned)."""
        present = set(self.slot_sources(plan))
        return tuple(b for b in range(plan.num_blocks) if b not in present)

    def short_name(self, plan) -> str:
        """A short readable name of a build of ``plan``: ``flexigpt 30% r8``, ``drop 30%``."""
        pct = round(100 * len(self.pruned_blocks(plan)) / plan.num_blocks)
        return f"{self.name} {pct}%" + (f" r{plan.adapter.rank}" if self.has_adapters else "")

    def required_version(self, plan) -> int:
        return self.format_version

    def donors(self, plan) -> dict[int, int | None]:
        return {s: plan.layer_map[s] for s in self.shared_slots(plan)}

    # ---- edits ---------------------------------------------------------------------
    def from_pruned(self, plan, pruned: set[int], *, donors: dict[int, int | None] | None = None,
                    group_size: int | None = None) -> Any:
        """This method's plan for the same base with ``pruned`` blocks pruned (the rest kept).

        The default: a plain list of the kept blocks."""
        import dataclasses  # stdlib, local to keep the interface section short

        kept = tuple(b for b in range(plan.num_blocks) if b not in pruned)
        return dataclasses.replace(plan, method=self.name, layer_map=kept, sources=None, extend=None, spans=None)

    def drop(self, plan, block: int, donor: int | None) -> Any:
        """Prune ``block``; ``donor`` is used by methods that choose donors."""
        if block in self.pruned_blocks(plan):
            return plan
        donors = dict(self.donors(plan))
        if donor is not None:
            donors[block] = donor
        return self.from_pruned(plan, set(self.pruned_blocks(plan)) | {block}, donors=donors,
                                group_size=plan.group_size)

    def keep(self, plan, block: int) -> Any:
        """Restore ``block``."""
        return self.from_pruned(plan, set(self.pruned_blocks(plan)) - {block}, donors=self.donors(plan),
                                group_size=plan.group_size)

    # ---- surgery and parameters ---------------------------------------------------------
    def build_slot(self, ctx: BuildContext, plan, slot: int) -> Any:
        """The module for ``slot``. The default: the copy of the block it stands for."""
        return ctx.copies[plan.layer_map[slot]]

    def trained_slots(self, plan) -> tuple[int, ...]:
        """Slots whose every parameter recovery trains (a method's own new blocks)."""
        return ()

    def needs_calibration(self, plan, fit_steps: int = 0) -> bool:
        """Whether building ``plan`` reads calibration windows (``calibrate`` then runs)."""
        return False

    def calibrate(self, model, base, plan, calibration, *, fit_steps: int = 0, progress=None) -> dict[str, Any]:
        """Fit the built ``model`` to the original ``base`` on ``calibration`` windows, in place, before
        any end-to-end step (whitened init, local fitting, span maps...); returns what to report.
        ``progress(fraction, message)`` where given."""
        return {}

    def estimate(self, plan, shapes, adapter) -> tuple[int, int, int]:
        """``(stored, run, trainable)`` parameters of the built model, from shapes only
        (``shapes`` is ``flexigpt.shapes.Shapes``)."""
        n = len(set(plan.layer_map))
        return shapes.nonblock + n * shapes.block, shapes.nonblock + plan.num_slots * shapes.block, 0

    def merge_problem(self, plan) -> str | None:
        """Why a merged (plain Hugging Face) export cannot be exact, or ``None`` when it can."""
        return None

    # ---- CLI ---------------------------------------------------------------------------
    def add_cli_options(self, parser: argparse.ArgumentParser) -> None:
        """Add this method's own ``plan`` options (names unique across methods)."""

    def apply_cli_options(self, plan, args: argparse.Namespace) -> Any:
        """``plan`` with this method's own ``plan`` options applied (after the generic edits)."""
        return plan

    def plan_options(self, args: argparse.Namespace) -> dict[str, Any]:
        """Keyword arguments for ``plan_from_scores`` read from this method's CLI options."""
        return {}
