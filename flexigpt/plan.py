"""What are we building? The Plan: which block each slot of the new model runs, and how.

A *block* is a decoder layer of the base model, a *slot* a position in the new model's stack,
and a slot's *donor* the base block whose weight tensors it runs. ``Plan.layer_map`` lists the
donor of every slot. Three methods read it differently:

* ``flexigpt``: one slot per base block (``len(layer_map) == num_blocks``). Slot ``s`` with
  ``layer_map[s] == s`` keeps its block; slot ``s`` with ``layer_map[s] = d != s`` replaces the
  pruned block ``s`` by a block that shares block ``d``'s weights and carries its own LoRA,
  output normalisation and pre-norms (FlexiGPT). Donors must be kept blocks.
* ``drop``: ShortGPT. ``layer_map`` is the increasing list of kept blocks; the rest are removed.
* ``extend``: a longer map; the first occurrence of every block is the original block and each
  later occurrence is a copy that shares its weights (with its own adapters and norms).
* ``foldgpt``: FoldGPT. Fewer slots than blocks; ``Plan.sources`` names the base block each slot
  stands for (increasing) and ``layer_map`` the block whose weights it runs: the first member
  of its group. Every slot has its own trainable pre-norms; there is no LoRA and no output norm.

File format: version 2 added ``foldgpt`` (the ``sources`` key) and ``adapter.align``. A plan is
written with the lowest version that expresses it, so a plan using neither is byte-for-byte the
version-1 file older releases read; both versions load.

The Plan is frozen, hashable and small (no tensors), so the app can keep it in a ``gr.State``;
every edit returns a new Plan and all validation happens in ``Plan.__post_init__``.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
FoldGPT (Liu et al., 2024), https://arxiv.org/abs/2407.00928
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["FORMAT_VERSION", "AdapterSpec", "ExtendSpec", "Plan", "extend_plan", "foldgpt_plan", "fold_layout",
           "plan_from_analysis", "plan_from_scores"]

FORMAT_VERSION = 2  # the newest plan format this version reads and writes
READABLE_VERSIONS = (1, 2)
METHODS = ("flexigpt", "drop", "extend", "foldgpt")
MAX_BLOCKS = 4096  # far above any real model; guards against absurd input
MAX_RANK = 65536
MAX_JSON_BYTES = 1_000_000
MAX_RATIO = 0.9


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    # bool is an int subclass; a plan never means True for a block id.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{what} must be in [{lo}, {hi}], got {value!r}")
    return value


def _float(value: Any, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{what} must be in [{lo}, {hi}], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class AdapterSpec:
    """The per-slot parameters of replacement (and extension) slots.

    Attributes:
        rank: LoRA rank; each matrix's rank is capped at ``min(d_in, d_out)`` at build time.
        targets: short matrix names (``q_proj``...); empty = every linear of the architecture.
        init: ``svd`` (FlexiGPT: truncated SVD of ``W_pruned - W_donor``, singular values on the
            output side) or ``zeros`` (standard LoRA: output-side factor zero). Extension copies
            always use ``zeros`` (there is no pruned weight to approximate).
        out_norm: ``layernorm`` (the paper's output feature normalisation: a LayerNorm on the
            attention and MLP outputs with a tiny gamma) or ``scale`` (a learnable per-feature
            scale vector; linear, so a merged export can fold it into the out linears).
        out_norm_scale: the starting gamma / scale; small, so a slot starts near the identity.
        train_prenorms: whether recovery trains the slot's own pre-norms (for ``foldgpt``: every
            slot's pre-norms, the only parameters it trains).
        align: relabel each donor's neurons and heads to line up with the pruned block before
            the SVD (``flexigpt.align``); the adapter is folded back, so the slot still runs
            the donor's tensors unchanged. Needs ``init="svd"``. Plan format 2.
    """

    rank: int = 8
    targets: tuple[str, ...] = ()
    init: Literal["svd", "zeros"] = "svd"
    out_norm: Literal["layernorm", "scale"] = "layernorm"
    out_norm_scale: float = 1e-3
    train_prenorms: bool = True
    align: bool = False

    def __post_init__(self) -> None:
        _int(self.rank, "adapter rank", 1, MAX_RANK)
        if not isinstance(self.targets, tuple) or not all(isinstance(t, str) and t.isidentifier() for t in self.targets):
            raise ValueError(f"adapter targets must be a tuple of matrix names like ('q_proj', 'v_proj'), got {self.targets!r}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"adapter targets contain duplicates: {self.targets!r}")
        if self.init not in ("svd", "zeros"):
            raise ValueError(f"adapter init must be 'svd' or 'zeros', got {self.init!r}")
        if self.out_norm not in ("layernorm", "scale"):
            raise ValueError(f"out_norm must be 'layernorm' or 'scale', got {self.out_norm!r}")
        _float(self.out_norm_scale, "out_norm_scale", 0.0, 10.0)
        if not isinstance(self.train_prenorms, bool):
            raise ValueError(f"train_prenorms must be true or false, got {self.train_prenorms!r}")
        if not isinstance(self.align, bool):
            raise ValueError(f"align must be true or false, got {self.align!r}")
        if self.align and self.init != "svd":
            raise ValueError(f"align=True only changes the SVD initialisation; it needs init 'svd', got {self.init!r}")


@dataclass(frozen=True)
class ExtendSpec:
    """How an ``extend`` plan was laid out: ``block`` (each chosen block followed by its copy)
    or ``sequential`` (a contiguous span repeated once, after itself)."""

    mode: Literal["block", "sequential"] = "block"

    def __post_init__(self) -> None:
        if self.mode not in ("block", "sequential"):
            raise ValueError(f"extend mode must be 'block' or 'sequential', got {self.mode!r}")


NoteValue = str | int | float | bool | None


@dataclass(frozen=True)
class Plan:
    """What to build from a base model. Hashable, JSON-serialisable, device-free.

    Attributes:
        base_model: the model reference (``default``, a folder, a hub id).
        num_blocks: depth of the base model.
        layer_map: the donor block of every slot (see the module docstring).
        method: ``flexigpt``, ``drop``, ``extend`` or ``foldgpt``.
        adapter: the per-slot adapter and output-norm settings.
        extend: the layout of an ``extend`` plan (``None`` for other methods).
        notes: provenance, as sorted ``(key, value)`` pairs (ratio, analysis settings...).
        format_version: the format the plan was read as (not part of equality); ``to_json``
            writes ``required_version``, the lowest format that expresses the plan.
        sources: ``foldgpt`` only: the base block each slot stands for (its pre-norms come
            from it), increasing; ``None`` for the other methods.
    """

    base_model: str
    num_blocks: int
    layer_map: tuple[int, ...]
    method: Literal["flexigpt", "drop", "extend", "foldgpt"] = "flexigpt"
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    extend: ExtendSpec | None = None
    notes: tuple[tuple[str, NoteValue], ...] = ()
    format_version: int = field(default=FORMAT_VERSION, compare=False)
    sources: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.base_model, str) or not self.base_model.strip() or len(self.base_model) > 1000:
            raise ValueError(f"base_model must be a non-empty model reference, got {self.base_model!r}")
        L = _int(self.num_blocks, "num_blocks", 1, MAX_BLOCKS)
        if isinstance(self.format_version, bool) or self.format_version not in READABLE_VERSIONS:
            raise ValueError(f"unknown plan format_version {self.format_version!r}; this version reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if not isinstance(self.adapter, AdapterSpec):
            raise ValueError(f"adapter must be an AdapterSpec, got {type(self.adapter).__name__}")
        if not isinstance(self.layer_map, tuple):
            raise ValueError(f"layer_map must be a tuple of block ids, got {self.layer_map!r}")
        if not self.layer_map:
            raise ValueError("layer_map is empty: the model would have no blocks")
        for s, b in enumerate(self.layer_map):
            _int(b, f"layer_map[{s}]", 0, L - 1)
        lm = self.layer_map
        if self.method == "flexigpt":
            if len(lm) != L:
                raise ValueError(f"a flexigpt layer_map has one slot per block ({L}), got {len(lm)} slots: {list(lm)}")
            bad = {s: d for s, d in enumerate(lm) if d != s and lm[d] != d}
            if bad:
                s, d = next(iter(bad.items()))
                raise ValueError(f"slot {s} uses donor block {d}, but block {d} is itself pruned; donors must be kept blocks")
        elif self.method == "drop":
            if any(b <= a for a, b in zip(lm, lm[1:])):
                raise ValueError(f"a drop layer_map lists the kept blocks in increasing order without duplicates, got {list(lm)}")
        elif self.method == "foldgpt":
            self._check_fold()
        else:  # extend
            firsts = [b for s, b in enumerate(lm) if b not in lm[:s]]
            if firsts != list(range(L)):
                raise ValueError(
                    f"an extend layer_map must contain every block 0..{L - 1} with first occurrences in order, got {list(lm)}"
                )
            if len(lm) > 4 * L:
                raise ValueError(f"an extend layer_map may have at most {4 * L} slots, got {len(lm)}")
        if self.sources is not None and self.method != "foldgpt":
            raise ValueError(f"sources are only valid with method 'foldgpt', got {self.sources!r} with {self.method!r}")
        if self.format_version < self.required_version:
            raise ValueError(f"this plan uses {'method foldgpt' if self.method == 'foldgpt' else 'adapter.align'}, "
                             f"which needs plan format_version {self.required_version}; got {self.format_version!r}")
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

    def _check_fold(self) -> None:
        lm, src, L = self.layer_map, self.sources, self.num_blocks
        if not isinstance(src, tuple) or len(src) != len(lm):
            raise ValueError(f"a foldgpt plan needs sources: the base block each of its {len(lm)} slots stands for, "
                             f"got {src!r}")
        for s, b in enumerate(src):
            _int(b, f"sources[{s}]", 0, L - 1)
        if any(b <= a for a, b in zip(src, src[1:])):
            raise ValueError(f"foldgpt sources list the kept blocks in increasing order without duplicates, got {list(src)}")
        own = {b: d for b, d in zip(src, lm)}
        for s, d in enumerate(lm):
            if own.get(d) != d:
                why = "is removed" if d not in own else f"runs block {own[d]}'s weights"
                raise ValueError(f"slot {s} (block {src[s]}) runs block {d}'s weights, but block {d} {why}; "
                                 "a group's weights must come from a member that runs its own")

    # ---- derived views --------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return len(self.layer_map)

    @property
    def required_version(self) -> int:
        """The lowest plan format that expresses this plan (2 for foldgpt or aligned donors)."""
        return 2 if self.method == "foldgpt" or self.adapter.align else 1

    @property
    def slot_sources(self) -> tuple[int, ...]:
        """The base block each slot stands for (FlexiGPT: its own block; drop/extend: the block it runs)."""
        if self.method == "foldgpt":
            return self.sources
        return tuple(range(self.num_blocks)) if self.method == "flexigpt" else self.layer_map

    @property
    def replaced_slots(self) -> tuple[int, ...]:
        """Slots that carry their own adapters and output norms (replacements or copies)."""
        if self.method == "flexigpt":
            return tuple(s for s, d in enumerate(self.layer_map) if d != s)
        if self.method == "extend":
            return tuple(s for s, b in enumerate(self.layer_map) if b in self.layer_map[:s])
        return ()

    @property
    def shared_slots(self) -> tuple[int, ...]:
        """Slots that run another block's weights (replacements, copies, foldgpt group members)."""
        if self.method == "foldgpt":
            return tuple(s for s, (d, b) in enumerate(zip(self.layer_map, self.sources)) if d != b)
        return self.replaced_slots

    @property
    def dropped_blocks(self) -> tuple[int, ...]:
        """Base blocks whose own weights are not in the new model."""
        if self.method == "flexigpt":
            return self.replaced_slots
        if self.method in ("drop", "foldgpt"):
            stored = set(self.layer_map)
            return tuple(b for b in range(self.num_blocks) if b not in stored)
        return ()

    @property
    def removed_blocks(self) -> tuple[int, ...]:
        """Base blocks no slot stands for: the depth the new model loses (drop and foldgpt)."""
        present = set(self.slot_sources)
        return tuple(b for b in range(self.num_blocks) if b not in present)

    @property
    def kept_blocks(self) -> tuple[int, ...]:
        """Base blocks whose weights the new model stores."""
        dropped = set(self.dropped_blocks)
        return tuple(b for b in range(self.num_blocks) if b not in dropped)

    @property
    def donors(self) -> dict[int, int]:
        """``{slot: donor block}`` for every slot that runs another block's weights
        (for flexigpt: ``{pruned: donor}``)."""
        return {s: self.layer_map[s] for s in self.shared_slots}

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """Slots that run the same stored weights, one tuple per stored block, by first slot."""
        by_block: dict[int, list[int]] = {}
        for s, b in enumerate(self.layer_map):
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

    # ---- edits (each returns a new Plan) --------------------------------------------
    @classmethod
    def identity(cls, base_model: str, num_blocks: int, **kwargs: Any) -> Plan:
        """The plan that rebuilds the base model unchanged."""
        return cls(base_model=base_model, num_blocks=num_blocks, layer_map=tuple(range(_int(num_blocks, "num_blocks", 1, MAX_BLOCKS))), **kwargs)

    def _check_block(self, block: Any) -> int:
        return _int(block, "block", 0, self.num_blocks - 1)

    def drop(self, block: int, donor: int | None = None) -> Plan:
        """Prune ``block``; for flexigpt its slot runs ``donor`` (default: the nearest kept block).
        A foldgpt plan removes it and regroups the remaining blocks."""
        b = self._check_block(block)
        if self.method == "foldgpt":
            return self.with_method("drop").drop(b).with_method("foldgpt", group_size=self.group_size)
        if self.method == "drop":
            if b not in self.layer_map:
                return self
            return dataclasses.replace(self, layer_map=tuple(x for x in self.layer_map if x != b))
        if self.method != "flexigpt":
            raise ValueError(f"cannot drop block {b} from an {self.method!r} plan; use method 'flexigpt' or 'drop'")
        users = [s for s, d in enumerate(self.layer_map) if d == b and s != b]
        if users:
            raise ValueError(f"block {b} is the donor of slots {users}; give them another donor before pruning it")
        lm = list(self.layer_map)
        lm[b] = b  # so the nearest-kept search below does not see a stale donor
        kept = [k for k in range(self.num_blocks) if lm[k] == k and k != b]
        if not kept:
            raise ValueError(f"cannot prune block {b}: it is the last kept block")
        if donor is None:
            donor = min(kept, key=lambda k: (abs(k - b), k))
        lm[b] = _int(donor, "donor", 0, self.num_blocks - 1)
        return dataclasses.replace(self, layer_map=tuple(lm))

    def keep(self, block: int) -> Plan:
        """Restore ``block`` to its own slot (a foldgpt plan regroups with it)."""
        b = self._check_block(block)
        if self.method == "foldgpt":
            return self.with_method("drop").keep(b).with_method("foldgpt", group_size=self.group_size)
        if self.method == "drop":
            return dataclasses.replace(self, layer_map=tuple(sorted(set(self.layer_map) | {b})))
        if self.method != "flexigpt":
            raise ValueError(f"keep() edits flexigpt, drop or foldgpt plans, not {self.method!r}")
        lm = list(self.layer_map)
        lm[b] = b
        return dataclasses.replace(self, layer_map=tuple(lm))

    def with_donor(self, block: int, donor: int) -> Plan:
        """Make pruned ``block``'s slot run ``donor`` (a kept block)."""
        b = self._check_block(block)
        if self.method != "flexigpt":
            raise ValueError(f"donors are chosen by hand only in flexigpt plans, this plan's method is {self.method!r}")
        if donor == b:
            raise ValueError(f"block {b} cannot be its own donor; use keep({b}) to restore it")
        lm = list(self.layer_map)
        lm[b] = _int(donor, "donor", 0, self.num_blocks - 1)
        return dataclasses.replace(self, layer_map=tuple(lm))

    def with_method(self, method: str, donors: Mapping[int, int] | None = None, *, group_size: int | None = None) -> Plan:
        """Switch between ``flexigpt``, ``drop`` and ``foldgpt`` for the same pruned set.

        Going to ``flexigpt``, pruned blocks take ``donors[block]`` or the nearest kept block.
        Going to ``foldgpt``, the kept blocks are grouped by ``group_size`` (default: the plan's
        own, else 2). Use ``extend_plan`` to make an ``extend`` plan.
        """
        if method == self.method and (method != "foldgpt" or group_size in (None, self.group_size)):
            return self
        if method not in ("flexigpt", "drop", "foldgpt") or self.method == "extend":
            raise ValueError(f"with_method converts between 'flexigpt', 'drop' and 'foldgpt', "
                             f"got {self.method!r} -> {method!r}")
        if self.method == "foldgpt":  # the same removed set as a drop plan, then on from there
            size = self.group_size
            plain = dataclasses.replace(self, method="drop", layer_map=self.sources, sources=None)
            return plain.with_method(method, donors, group_size=group_size or size)
        if method == "drop":
            return dataclasses.replace(self, method="drop", layer_map=self.kept_blocks)
        if method == "foldgpt":
            size = _int(2 if group_size is None else group_size, "group size", 1, MAX_BLOCKS)
            lm, sources = fold_layout(self.kept_blocks, size)
            return dataclasses.replace(self, method="foldgpt", layer_map=lm, sources=sources,
                                       notes=tuple(sorted((dict(self.notes) | {"group_size": size}).items())))
        kept = set(self.layer_map)
        donors = dict(donors or {})
        lm = []
        for b in range(self.num_blocks):
            if b in kept:
                lm.append(b)
            else:
                lm.append(donors.get(b, min(kept, key=lambda k: (abs(k - b), k))))
        return dataclasses.replace(self, method="flexigpt", layer_map=tuple(lm))

    def with_group_size(self, group_size: int) -> Plan:
        """Regroup a foldgpt plan's kept blocks."""
        if self.method != "foldgpt":
            raise ValueError(f"group size applies to foldgpt plans, this plan's method is {self.method!r}")
        return self.with_method("foldgpt", group_size=group_size)

    def with_rank(self, rank: int) -> Plan:
        return self.with_adapter(rank=rank)

    def with_adapter(self, **changes: Any) -> Plan:
        """A new plan whose AdapterSpec has ``changes`` (e.g. ``out_norm="scale"``)."""
        if "targets" in changes and isinstance(changes["targets"], list):
            changes["targets"] = tuple(changes["targets"])
        return dataclasses.replace(self, adapter=dataclasses.replace(self.adapter, **changes))

    def with_notes(self, **notes: NoteValue) -> Plan:
        merged = dict(self.notes) | notes
        return dataclasses.replace(self, notes=tuple(sorted(merged.items())))

    # ---- JSON -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The plan.json object, in the lowest format version that expresses the plan."""
        adapter = {**dataclasses.asdict(self.adapter), "targets": list(self.adapter.targets)}
        if not self.adapter.align:
            del adapter["align"]  # format 1 has no such key
        out = {
            "format_version": self.required_version,
            "base_model": self.base_model,
            "num_blocks": self.num_blocks,
            "method": self.method,
            "layer_map": list(self.layer_map),
            "adapter": adapter,
            "extend": None if self.extend is None else {"mode": self.extend.mode},
            "notes": dict(self.notes),
        }
        if self.sources is not None:
            out["sources"] = list(self.sources)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, obj: Any) -> Plan:
        """Strict: unknown keys, missing required keys and wrong types raise ValueError."""
        if not isinstance(obj, dict):
            raise ValueError(f"a plan must be a JSON object, got {type(obj).__name__}")
        allowed = {"format_version", "base_model", "num_blocks", "method", "layer_map", "adapter", "extend", "notes",
                   "sources"}
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise ValueError(f"unknown plan keys {unknown}; valid: {sorted(allowed)}")
        missing = [k for k in ("format_version", "base_model", "num_blocks", "layer_map") if k not in obj]
        if missing:
            raise ValueError(f"plan is missing keys {missing}")
        if not isinstance(obj["layer_map"], list):
            raise ValueError(f"layer_map must be a list of block ids, got {obj['layer_map']!r}")
        sources = obj.get("sources")
        if sources is not None and not isinstance(sources, list):
            raise ValueError(f"sources must be a list of block ids, got {sources!r}")
        adapter = obj.get("adapter") or {}
        if not isinstance(adapter, dict):
            raise ValueError(f"adapter must be an object, got {adapter!r}")
        names = {f.name for f in dataclasses.fields(AdapterSpec)}
        unknown = sorted(set(adapter) - names)
        if unknown:
            raise ValueError(f"unknown adapter keys {unknown}; valid: {sorted(names)}")
        if "targets" in adapter:
            if not isinstance(adapter["targets"], list):
                raise ValueError(f"adapter targets must be a list of matrix names, got {adapter['targets']!r}")
            adapter = {**adapter, "targets": tuple(adapter["targets"])}
        ext = obj.get("extend")
        if ext is not None:
            if not isinstance(ext, dict) or set(ext) - {"mode"}:
                raise ValueError(f"extend must be an object like {{'mode': 'block'}}, got {ext!r}")
            ext = ExtendSpec(**ext)
        notes = obj.get("notes") or {}
        if not isinstance(notes, dict):
            raise ValueError(f"notes must be an object, got {notes!r}")
        return cls(
            base_model=obj["base_model"], num_blocks=obj["num_blocks"], layer_map=tuple(obj["layer_map"]),
            method=obj.get("method", "flexigpt"), adapter=AdapterSpec(**adapter), extend=ext,
            notes=tuple(sorted(notes.items())), format_version=obj["format_version"],
            sources=None if sources is None else tuple(sources),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        if not isinstance(text, (str, bytes)):
            raise ValueError(f"plan JSON must be text, got {type(text).__name__}")
        if len(text) > MAX_JSON_BYTES:
            raise ValueError(f"plan JSON is {len(text)} bytes; the limit is {MAX_JSON_BYTES}")
        try:
            obj = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not allowed")))
        except (json.JSONDecodeError, ValueError) as err:  # also bytes that are not UTF-8
            raise ValueError(f"plan is not valid JSON ({str(err)[:200]})") from err
        except RecursionError as err:  # "[[[[..." nested deeper than the parser's stack
            raise ValueError("plan is not valid JSON (nested too deeply)") from err
        return cls.from_dict(obj)


def fold_layout(kept: Sequence[int], group_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """FoldGPT grouping: ``(layer_map, sources)`` with ``kept`` split into runs of ``group_size``
    consecutive kept blocks, every member running the run's first block."""
    kept = tuple(kept)
    size = _int(group_size, "group size", 1, MAX_BLOCKS)
    lm = tuple(kept[i - i % size] for i in range(len(kept)))
    return lm, kept


_PROPOSALS = ("extend_plan", "foldgpt_plan", "plan_from_analysis", "plan_from_scores")


def __getattr__(name: str) -> Any:
    # The constructors live in flexigpt.proposals (they read scores; this module is the format).
    if name in _PROPOSALS:
        from flexigpt import proposals

        return getattr(proposals, name)
    raise AttributeError(f"module 'flexigpt.plan' has no attribute {name!r}")
