"""What are we building? The Plan: which block each slot of the new model runs, and how.

A *block* is a decoder layer of the base model, a *slot* a position in the new model's stack,
and a slot's *donor* the base block whose weight tensors it runs. ``Plan.layer_map`` lists the
block every slot runs; each method (``flexigpt.methods``) reads it in its own way and validates
it. The Plan is frozen, hashable and small (no tensors), so the app can keep it in a
``gr.State``; every edit returns a new Plan (``flexigpt.plan.edits``) and all validation happens
in ``Plan.__post_init__``. JSON I/O and format versions: ``flexigpt.plan.jsonio``.

Three block sets, never to be confused:

* ``pruned_blocks``: the blocks the user chose to prune (what the plan editor shows);
* ``unstored_blocks``: blocks whose own weights the new model does not store;
* ``removed_blocks``: blocks no slot stands for (the depth the new model loses).

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from flexigpt.methods import get_method, method_names
from flexigpt.methods.base import Method
from flexigpt.plan.edits import PlanEdits
from flexigpt.plan.jsonio import READABLE_VERSIONS, PlanJSON
from flexigpt.plan.specs import AdapterSpec, ExtendSpec, NoteValue
from flexigpt.validate import MAX_BLOCKS, MAX_RANK, check_int

__all__ = ["Plan"]


@dataclass(frozen=True)
class Plan(PlanEdits, PlanJSON):
    """What to build from a base model. Hashable, JSON-serialisable, device-free.

    Attributes:
        base_model: the model reference (``default``, a folder, a hub id).
        num_blocks: depth of the base model.
        layer_map: the block every slot runs (see the method's module); ``None`` for a
            flexigpt slot with no donor (plan format 4).
        method: a registered method name (``flexigpt.methods.method_names()``).
        adapter: the per-slot adapter and output-norm settings.
        extend: the layout of an ``extend`` plan (``None`` for other methods).
        notes: provenance, as sorted ``(key, value)`` pairs (ratio, analysis settings...).
        format_version: the format the plan was read as (not part of equality); ``to_json``
            writes ``required_version``, the lowest format that expresses the plan.
        sources: ``foldgpt`` only: the base block each slot stands for; ``None`` otherwise.
        kept_lora_rank: LoRA rank on the slots that run their own block unchanged (the kept
            blocks), trained with recovery; ``None`` = none. A drop plan recovered with kept LoRA
            is the ShortGPT + LoRA baseline. Plan format 3.
        spans: ``replaceme`` and ``streamline`` only: the contiguous ``(start, end)`` runs of
            0-based block ids (end exclusive) each replaced as one; ``None`` otherwise. Format 4.
    """

    base_model: str
    num_blocks: int
    layer_map: tuple[int | None, ...]
    method: str = "flexigpt"
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    extend: ExtendSpec | None = None
    notes: tuple[tuple[str, NoteValue], ...] = ()
    format_version: int = field(default=READABLE_VERSIONS[-1], compare=False)
    sources: tuple[int, ...] | None = None
    kept_lora_rank: int | None = None
    spans: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.base_model, str) or not self.base_model.strip() or len(self.base_model) > 1000:
            raise ValueError(f"base_model must be a non-empty model reference, got {self.base_model!r}")
        L = check_int(self.num_blocks, "num_blocks", 1, MAX_BLOCKS)
        if isinstance(self.format_version, bool) or self.format_version not in READABLE_VERSIONS:
            raise ValueError(f"unknown plan format_version {self.format_version!r}; this version reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        method = get_method(self.method)
        if not isinstance(self.adapter, AdapterSpec):
            raise ValueError(f"adapter must be an AdapterSpec, got {type(self.adapter).__name__}")
        if not isinstance(self.layer_map, tuple):
            raise ValueError(f"layer_map must be a tuple of block ids, got {self.layer_map!r}")
        if not self.layer_map:
            raise ValueError("layer_map is empty: the model would have no blocks")
        for s, b in enumerate(self.layer_map):
            if b is None:
                if not method.allows_no_donor:
                    users = [m for m in method_names() if get_method(m).allows_no_donor]
                    raise ValueError(f"layer_map[{s}] is null (a slot with no donor), which only "
                                     f"{' or '.join(map(repr, users))} plans allow; got method {self.method!r}")
                continue
            check_int(b, f"layer_map[{s}]", 0, L - 1)
        method.validate(self)
        if self.sources is not None and not method.uses_sources:
            users = [m for m in method_names() if get_method(m).uses_sources]
            raise ValueError(f"sources are only valid with method {' or '.join(map(repr, users))}, "
                             f"got {self.sources!r} with {self.method!r}")
        if self.spans is not None and not method.uses_spans:
            users = [m for m in method_names() if get_method(m).uses_spans]
            raise ValueError(f"spans are only valid with method {' or '.join(map(repr, users))}, "
                             f"got {self.spans!r} with {self.method!r}")
        if self.kept_lora_rank is not None:
            check_int(self.kept_lora_rank, "kept_lora_rank", 1, MAX_RANK)
        if self.extend is not None and (not isinstance(self.extend, ExtendSpec) or self.method != "extend"):
            raise ValueError(f"extend settings are only valid with method 'extend', got {self.extend!r} with {self.method!r}")
        if not isinstance(self.notes, tuple) or not all(
            isinstance(kv, tuple) and len(kv) == 2 and isinstance(kv[0], str) for kv in self.notes
        ):
            raise ValueError(f"notes must be a tuple of (key, value) pairs, got {self.notes!r}")
        for k, v in self.notes:
            if v is not None and not isinstance(v, (str, int, float, bool)):
                raise ValueError(f"note {k!r} must be a string, number, bool or null, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"note {k!r} must be finite, got {v!r}")

    # ---- derived views (each answered by the plan's method) ---------------------------
    @property
    def method_spec(self) -> Method:
        """The registered ``Method`` object of this plan."""
        return get_method(self.method)

    @property
    def num_slots(self) -> int:
        return len(self.layer_map)

    @property
    def required_version(self) -> int:
        """The lowest plan format that expresses this plan."""
        kept = 3 if self.kept_lora_rank is not None else 1
        # adapter settings matter (and need their format) only where the method builds adapters
        adapter = self.adapter.required_version if self.method_spec.has_adapters else 1
        return max(self.method_spec.required_version(self), adapter, kept)

    def check_version(self) -> None:
        """Raise when the format the plan was read as cannot express it (a file that declares an
        older version than the features it uses). Edits made in code always write the version
        they need, so only ``from_dict`` calls this."""
        if self.format_version < self.required_version:
            raise ValueError(f"this plan uses {self._newest_feature()}, which needs plan format_version "
                             f"{self.required_version}; got {self.format_version!r}")

    def _newest_feature(self) -> str:
        if None in self.layer_map and self.required_version == 4:
            return "a slot with no donor (null in layer_map)"
        if self.spans is not None and self.required_version == 4:
            return f"method {self.method} (spans)"
        if self.kept_lora_rank is not None and self.required_version == 3:
            return "kept_lora_rank"
        if self.adapter.required_version == self.required_version:
            return "adapter.align" if self.adapter.align else f"adapter.init {self.adapter.init!r}"
        return f"method {self.method}"

    @property
    def slot_sources(self) -> tuple[int, ...]:
        """The base block each slot stands for."""
        return self.method_spec.slot_sources(self)

    @property
    def replaced_slots(self) -> tuple[int, ...]:
        """Slots that carry their own adapters and output norms (replacements or copies)."""
        return self.method_spec.replaced_slots(self)

    @property
    def shared_slots(self) -> tuple[int, ...]:
        """Slots that run another block's weights (replacements, copies, foldgpt group members)."""
        return self.method_spec.shared_slots(self)

    @property
    def own_norm_slots(self) -> tuple[int, ...]:
        """Slots with their own pre-norms (trained with ``adapter.train_prenorms``)."""
        return self.method_spec.own_norm_slots(self)

    @property
    def pruned_blocks(self) -> tuple[int, ...]:
        """The blocks the user chose to prune."""
        return self.method_spec.pruned_blocks(self)

    @property
    def unstored_blocks(self) -> tuple[int, ...]:
        """Base blocks whose own weights are not in the new model."""
        return self.method_spec.unstored_blocks(self)

    @property
    def removed_blocks(self) -> tuple[int, ...]:
        """Base blocks no slot stands for: the depth the new model loses."""
        present = set(self.slot_sources)
        return tuple(b for b in range(self.num_blocks) if b not in present)

    @property
    def kept_blocks(self) -> tuple[int, ...]:
        """Base blocks whose weights the new model stores."""
        unstored = set(self.unstored_blocks)
        return tuple(b for b in range(self.num_blocks) if b not in unstored)

    @property
    def kept_slots(self) -> tuple[int, ...]:
        """Slots that run their own stored block with no adapter of their own (kept-LoRA targets)."""
        replaced = set(self.replaced_slots)
        return tuple(s for s in range(self.num_slots) if s not in replaced)

    @property
    def donors(self) -> dict[int, int]:
        """``{slot: donor block}`` for every slot that runs another block's weights
        (for flexigpt: ``{pruned: donor}``)."""
        return self.method_spec.donors(self)

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """Slots that run the same stored weights, one tuple per stored block, by first slot."""
        by_block: dict[int, list[int]] = {}
        for s, b in enumerate(self.layer_map):
            if b is not None:  # a no-donor slot runs no stored block
                by_block.setdefault(b, []).append(s)
        return tuple(sorted((tuple(v) for v in by_block.values()), key=lambda g: g[0]))

    @property
    def group_size(self) -> int | None:
        """A foldgpt plan's group size (from its notes, else its largest group); ``None`` otherwise."""
        if self.method != "foldgpt":
            return None
        noted = self.note("group_size")
        valid = isinstance(noted, int) and not isinstance(noted, bool) and 1 <= noted <= MAX_BLOCKS
        return noted if valid else max(map(len, self.groups))

    def note(self, key: str, default: NoteValue = None) -> NoteValue:
        return dict(self.notes).get(key, default)
