"""How is a plan written and read? ``plan.json``, its format versions, strict parsing.

A plan is written with the lowest format version that expresses it, so a plan that uses no newer
feature is byte-for-byte the file older releases read; every listed version loads.

* 1: flexigpt, drop, extend;
* 2: ``foldgpt`` (the ``sources`` key) and ``adapter.align``;
* 3: ``kept_lora_rank`` (kept-block LoRA is part of the plan) and ``adapter.init: "whitened"``;
* 4: ``null`` in a flexigpt ``layer_map`` (a replaced slot with no donor); methods ``replaceme``
  and ``streamline`` (the ``spans`` key).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from flexigpt.plan.specs import AdapterSpec, ExtendSpec

__all__ = ["FORMAT_VERSION", "MAX_JSON_BYTES", "READABLE_VERSIONS", "PlanJSON"]

FORMAT_VERSION = 4  # the newest plan format this version reads and writes
READABLE_VERSIONS = (1, 2, 3, 4)
MAX_JSON_BYTES = 1_000_000
_KEYS = ("format_version", "base_model", "num_blocks", "method", "layer_map", "adapter", "extend", "notes", "sources",
         "kept_lora_rank", "spans")


def _refuse_constant(c: str):
    raise ValueError(f"{c} is not allowed")


class PlanJSON:
    """JSON methods of the Plan."""

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
        if self.kept_lora_rank is not None:
            out["kept_lora_rank"] = self.kept_lora_rank
        if self.spans is not None:
            out["spans"] = [list(s) for s in self.spans]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, obj: Any):
        """Strict: unknown keys, missing required keys and wrong types raise ValueError."""
        if not isinstance(obj, dict):
            raise ValueError(f"a plan must be a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(_KEYS))
        if unknown:
            raise ValueError(f"unknown plan keys {unknown}; valid: {sorted(_KEYS)}")
        missing = [k for k in ("format_version", "base_model", "num_blocks", "layer_map") if k not in obj]
        if missing:
            raise ValueError(f"plan is missing keys {missing}")
        if not isinstance(obj["layer_map"], list):
            raise ValueError(f"layer_map must be a list of block ids, got {obj['layer_map']!r}")
        sources = obj.get("sources")
        if sources is not None and not isinstance(sources, list):
            raise ValueError(f"sources must be a list of block ids, got {sources!r}")
        spans = obj.get("spans")
        if spans is not None:
            if not isinstance(spans, list) or not all(isinstance(x, list) and len(x) == 2 for x in spans):
                raise ValueError(f"spans must be a list of [start, end) pairs of block ids, got {spans!r:.200}")
            spans = tuple(tuple(x) for x in spans)
        adapter = obj.get("adapter") or {}
        if not isinstance(adapter, dict):
            raise ValueError(f"adapter must be an object, got {adapter!r}")
        names = {f.name for f in dataclasses.fields(AdapterSpec)}
        unknown = sorted(set(adapter) - names)
        if unknown:
            raise ValueError(f"unknown adapter keys {unknown}; valid: {sorted(names)}")
        if "init" not in adapter and obj["format_version"] in (1, 2):
            adapter = {**adapter, "init": "svd"}  # the default when formats 1 and 2 were written
        if "out_norm" not in adapter:
            adapter = {**adapter, "out_norm": "layernorm"}  # the default until whitened + scale won the benchmark
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
        plan = cls(
            base_model=obj["base_model"], num_blocks=obj["num_blocks"], layer_map=tuple(obj["layer_map"]),
            method=obj.get("method", "flexigpt"), adapter=AdapterSpec(**adapter), extend=ext,
            notes=tuple(sorted(notes.items())), format_version=obj["format_version"],
            sources=None if sources is None else tuple(sources), kept_lora_rank=obj.get("kept_lora_rank"),
            spans=spans,
        )
        plan.check_version()
        return plan

    @classmethod
    def from_json(cls, text: str | bytes):
        if not isinstance(text, (str, bytes)):
            raise ValueError(f"plan JSON must be text, got {type(text).__name__}")
        if len(text) > MAX_JSON_BYTES:
            raise ValueError(f"plan JSON is {len(text)} bytes; the limit is {MAX_JSON_BYTES}")
        try:
            obj = json.loads(text, parse_constant=_refuse_constant)
        except (json.JSONDecodeError, ValueError) as err:  # also bytes that are not UTF-8
            raise ValueError(f"plan is not valid JSON ({str(err)[:200]})") from err
        except RecursionError as err:  # "[[[[..." nested deeper than the parser's stack
            raise ValueError("plan is not valid JSON (nested too deeply)") from err
        return cls.from_dict(obj)
