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

The Plan is frozen, hashable and small (no tensors), so the app can keep it in a ``gr.State``;
every edit returns a new Plan and all validation happens in ``Plan.__post_init__``.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["FORMAT_VERSION", "AdapterSpec", "ExtendSpec", "Plan", "extend_plan", "plan_from_analysis", "plan_from_scores"]

FORMAT_VERSION = 1
METHODS = ("flexigpt", "drop", "extend")
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
        train_prenorms: whether recovery trains the slot's own pre-norms.
    """

    rank: int = 8
    targets: tuple[str, ...] = ()
    init: Literal["svd", "zeros"] = "svd"
    out_norm: Literal["layernorm", "scale"] = "layernorm"
    out_norm_scale: float = 1e-3
    train_prenorms: bool = True

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
        method: ``flexigpt``, ``drop`` or ``extend``.
        adapter: the per-slot adapter and output-norm settings.
        extend: the layout of an ``extend`` plan (``None`` for other methods).
        notes: provenance, as sorted ``(key, value)`` pairs (ratio, analysis settings...).
        format_version: the plan file format.
    """

    base_model: str
    num_blocks: int
    layer_map: tuple[int, ...]
    method: Literal["flexigpt", "drop", "extend"] = "flexigpt"
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    extend: ExtendSpec | None = None
    notes: tuple[tuple[str, NoteValue], ...] = ()
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.base_model, str) or not self.base_model.strip() or len(self.base_model) > 1000:
            raise ValueError(f"base_model must be a non-empty model reference, got {self.base_model!r}")
        L = _int(self.num_blocks, "num_blocks", 1, MAX_BLOCKS)
        if isinstance(self.format_version, bool) or self.format_version != FORMAT_VERSION:
            raise ValueError(f"unknown plan format_version {self.format_version!r}; this version reads {FORMAT_VERSION}")
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
        else:  # extend
            firsts = [b for s, b in enumerate(lm) if b not in lm[:s]]
            if firsts != list(range(L)):
                raise ValueError(
                    f"an extend layer_map must contain every block 0..{L - 1} with first occurrences in order, got {list(lm)}"
                )
            if len(lm) > 4 * L:
                raise ValueError(f"an extend layer_map may have at most {4 * L} slots, got {len(lm)}")
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

    # ---- derived views --------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return len(self.layer_map)

    @property
    def replaced_slots(self) -> tuple[int, ...]:
        """Slots that carry their own adapters and output norms (replacements or copies)."""
        if self.method == "flexigpt":
            return tuple(s for s, d in enumerate(self.layer_map) if d != s)
        if self.method == "extend":
            return tuple(s for s, b in enumerate(self.layer_map) if b in self.layer_map[:s])
        return ()

    @property
    def dropped_blocks(self) -> tuple[int, ...]:
        """Base blocks whose own weights are not in the new model."""
        if self.method == "flexigpt":
            return self.replaced_slots
        if self.method == "drop":
            return tuple(b for b in range(self.num_blocks) if b not in self.layer_map)
        return ()

    @property
    def kept_blocks(self) -> tuple[int, ...]:
        """Base blocks whose weights the new model stores."""
        dropped = set(self.dropped_blocks)
        return tuple(b for b in range(self.num_blocks) if b not in dropped)

    @property
    def donors(self) -> dict[int, int]:
        """``{slot: donor block}`` for every replaced slot (for flexigpt: ``{pruned: donor}``)."""
        return {s: self.layer_map[s] for s in self.replaced_slots}

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
        """Prune ``block``; for flexigpt its slot runs ``donor`` (default: the nearest kept block)."""
        b = self._check_block(block)
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
        """Restore ``block`` to its own slot."""
        b = self._check_block(block)
        if self.method == "drop":
            return dataclasses.replace(self, layer_map=tuple(sorted(set(self.layer_map) | {b})))
        if self.method != "flexigpt":
            raise ValueError(f"keep() edits flexigpt or drop plans, not {self.method!r}")
        lm = list(self.layer_map)
        lm[b] = b
        return dataclasses.replace(self, layer_map=tuple(lm))

    def with_donor(self, block: int, donor: int) -> Plan:
        """Make pruned ``block``'s slot run ``donor`` (a kept block)."""
        b = self._check_block(block)
        if self.method != "flexigpt":
            raise ValueError(f"donors exist only in flexigpt plans, this plan's method is {self.method!r}")
        if donor == b:
            raise ValueError(f"block {b} cannot be its own donor; use keep({b}) to restore it")
        lm = list(self.layer_map)
        lm[b] = _int(donor, "donor", 0, self.num_blocks - 1)
        return dataclasses.replace(self, layer_map=tuple(lm))

    def with_method(self, method: str, donors: Mapping[int, int] | None = None) -> Plan:
        """Switch between ``flexigpt`` and ``drop`` for the same pruned set.

        Going to ``flexigpt``, pruned blocks take ``donors[block]`` or the nearest kept block.
        Use ``extend_plan`` to make an ``extend`` plan.
        """
        if method == self.method:
            return self
        if method not in ("flexigpt", "drop") or self.method == "extend":
            raise ValueError(f"with_method converts between 'flexigpt' and 'drop', got {self.method!r} -> {method!r}")
        if method == "drop":
            return dataclasses.replace(self, method="drop", layer_map=self.kept_blocks)
        kept = set(self.layer_map)
        donors = dict(donors or {})
        lm = []
        for b in range(self.num_blocks):
            if b in kept:
                lm.append(b)
            else:
                lm.append(donors.get(b, min(kept, key=lambda k: (abs(k - b), k))))
        return dataclasses.replace(self, method="flexigpt", layer_map=tuple(lm))

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
        return {
            "format_version": self.format_version,
            "base_model": self.base_model,
            "num_blocks": self.num_blocks,
            "method": self.method,
            "layer_map": list(self.layer_map),
            "adapter": {**dataclasses.asdict(self.adapter), "targets": list(self.adapter.targets)},
            "extend": None if self.extend is None else {"mode": self.extend.mode},
            "notes": dict(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, obj: Any) -> Plan:
        """Strict: unknown keys, missing required keys and wrong types raise ValueError."""
        if not isinstance(obj, dict):
            raise ValueError(f"a plan must be a JSON object, got {type(obj).__name__}")
        allowed = {"format_version", "base_model", "num_blocks", "method", "layer_map", "adapter", "extend", "notes"}
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise ValueError(f"unknown plan keys {unknown}; valid: {sorted(allowed)}")
        missing = [k for k in ("format_version", "base_model", "num_blocks", "layer_map") if k not in obj]
        if missing:
            raise ValueError(f"plan is missing keys {missing}")
        if not isinstance(obj["layer_map"], list):
            raise ValueError(f"layer_map must be a list of block ids, got {obj['layer_map']!r}")
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
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        if not isinstance(text, (str, bytes)):
            raise ValueError(f"plan JSON must be text, got {type(text).__name__}")
        if len(text) > MAX_JSON_BYTES:
            raise ValueError(f"plan JSON is {len(text)} bytes; the limit is {MAX_JSON_BYTES}")
        try:
            obj = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not allowed")))
        except (json.JSONDecodeError, ValueError) as err:
            raise ValueError(f"plan is not valid JSON ({err})") from err
        return cls.from_dict(obj)


# ---- constructors -------------------------------------------------------------------
def _nearest_kept(block: int, kept: Sequence[int]) -> int:
    return min(kept, key=lambda k: (abs(k - block), k))


def plan_from_scores(
    base_model: str,
    block_influence: Sequence[float],
    ratio: float,
    *,
    share_error: Sequence[Sequence[float | None]] | None = None,
    method: str = "flexigpt",
    adapter: AdapterSpec | None = None,
    protect: Iterable[int] = (),
    extend_mode: str = "block",
    notes: Mapping[str, NoteValue] | None = None,
) -> Plan:
    """Prune (or, for ``extend``, copy) the ``round(ratio * L)`` lowest-BI blocks.

    Args:
        base_model: model reference stored in the plan.
        block_influence: ``(L,)`` Block Influence scores (low = removable).
        ratio: fraction of blocks in ``[0, 0.9]``.
        share_error: ``(L, L)`` share error (rows pruned, columns donor; ``None`` = not computed);
            donors are its row minima over kept blocks (``flexigpt.sharing.choose_donors``).
            Without it, or for rows with no value, each pruned block takes the nearest kept block.
        method: ``flexigpt``, ``drop`` or ``extend``.
        adapter: adapter settings (default ``AdapterSpec()``).
        protect: block ids never chosen (e.g. ``(0, L - 1)``).
        extend_mode: layout for ``extend`` (``block`` or ``sequential``).
        notes: extra provenance stored in the plan.
    """
    scores = list(block_influence)
    L = len(scores)
    if L == 0:
        raise ValueError("block_influence is empty")
    for i, v in enumerate(scores):
        _float(v, f"block_influence[{i}]", -1e6, 1e6)
    _float(ratio, "ratio", 0.0, MAX_RATIO)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    protected = {_int(b, "protected block", 0, L - 1) for b in protect}
    n = int(round(ratio * L))
    candidates = sorted((b for b in range(L) if b not in protected), key=lambda b: (scores[b], b))
    if n > len(candidates) or (method != "extend" and n >= L):
        raise ValueError(f"ratio {ratio} selects {n} of {L} blocks but only {len(candidates)} are unprotected")
    chosen = sorted(candidates[:n])
    meta = {"ratio": float(ratio), "selection": "lowest block influence", **(notes or {})}
    adapter = adapter or AdapterSpec()
    if method == "extend":
        return extend_plan(base_model, L, chosen, extend_mode, adapter=adapter, notes=meta)
    kept = [b for b in range(L) if b not in chosen]
    if method == "drop":
        return Plan(base_model, L, tuple(kept), "drop", adapter, notes=tuple(sorted(meta.items())))
    donors: dict[int, int] = {}
    if share_error is not None and chosen:
        from flexigpt.sharing import choose_donors  # lazy: sharing imports torch

        if len(share_error) != L or any(len(row) != L for row in share_error):
            raise ValueError(f"share_error must be an {L} x {L} matrix, got {len(share_error)} rows")
        matrix = [[float("nan") if v is None else float(v) for v in row] for row in share_error]
        donors = choose_donors(matrix, chosen)
        # choose_donors falls back to the nearest block for rows without values: same rule as here.
    lm = tuple(donors.get(b, _nearest_kept(b, kept)) if b in chosen else b for b in range(L))
    return Plan(base_model, L, lm, "flexigpt", adapter, notes=tuple(sorted(meta.items())))


def plan_from_analysis(analysis: Mapping[str, Any], ratio: float, *, method: str = "flexigpt",
                       adapter: AdapterSpec | None = None, protect: Iterable[int] = (), extend_mode: str = "block",
                       metric: str | None = None, rank: int | None = None) -> Plan:
    """A plan from an ``analysis.json`` dict (see the schema in the docs).

    Uses ``block_influence`` for the selection and the share-error matrix named by
    ``donor_suggestion`` (its ``metric`` and ``rank``; override with ``metric``/``rank``).
    """
    if not isinstance(analysis, Mapping):
        raise ValueError(f"analysis must be a JSON object, got {type(analysis).__name__}")
    if analysis.get("format_version") != 1:
        raise ValueError(f"unknown analysis format_version {analysis.get('format_version')!r}; expected 1")
    for key in ("model", "num_blocks", "block_influence"):
        if key not in analysis:
            raise ValueError(f"analysis is missing {key!r}")
    L = _int(analysis["num_blocks"], "analysis num_blocks", 1, MAX_BLOCKS)
    bi = analysis["block_influence"]
    if not isinstance(bi, list) or len(bi) != L:
        raise ValueError(f"analysis block_influence must list {L} values, got {bi!r:.200}")
    suggestion = analysis.get("donor_suggestion") or {}
    se = analysis.get("share_error") or {}
    metric = metric or suggestion.get("metric") or "relative"
    if metric not in ("relative", "absolute", "paper"):
        raise ValueError(f"share-error metric must be 'relative', 'absolute' or 'paper', got {metric!r}")
    rank = rank if rank is not None else suggestion.get("rank")
    matrix = None
    if se and rank is not None:
        matrix = (se.get(metric) or {}).get(str(rank))
    notes = {"analysis_model": analysis["model"], "analysis_fingerprint": analysis.get("fingerprint"),
             "analysis_data": analysis.get("data"), "analysis_samples": analysis.get("samples"),
             "analysis_seq_len": analysis.get("seq_len"),
             "donor_metric": metric if matrix is not None else "nearest kept block",
             "donor_rank": rank if matrix is not None else None}
    return plan_from_scores(str(analysis["model"]), bi, ratio, share_error=matrix, method=method, adapter=adapter,
                            protect=protect, extend_mode=extend_mode, notes=notes)


def extend_plan(base_model: str, num_blocks: int, blocks: Iterable[int], mode: str = "block", *,
                adapter: AdapterSpec | None = None, notes: Mapping[str, NoteValue] | None = None) -> Plan:
    """An ``extend`` plan.

    ``block`` mode puts a copy right after each chosen block (..., k, k', k+1, ...);
    ``sequential`` mode needs a contiguous span a..b and repeats it once after itself
    (..., a..b, a'..b', b+1, ...).
    """
    L = _int(num_blocks, "num_blocks", 1, MAX_BLOCKS)
    chosen = [_int(b, "extend block", 0, L - 1) for b in blocks]
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"extend blocks contain duplicates: {chosen}")
    chosen = sorted(chosen)
    spec = ExtendSpec(mode)  # validates mode
    if mode == "block":
        lm = [x for b in range(L) for x in ((b, b) if b in chosen else (b,))]
    else:
        if chosen and chosen != list(range(chosen[0], chosen[-1] + 1)):
            raise ValueError(f"sequential mode repeats a contiguous span of blocks, got {chosen}")
        end = chosen[-1] + 1 if chosen else L
        lm = list(range(end)) + chosen + list(range(end, L))
    meta = {"extend_blocks": ",".join(map(str, chosen)), **(notes or {})}
    return Plan(base_model, L, tuple(lm), "extend", adapter or AdapterSpec(), extend=spec, notes=tuple(sorted(meta.items())))
