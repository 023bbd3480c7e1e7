"""How many parameters? Stored, run per token and trainable, measured or estimated from a plan.

* **stored**: distinct tensors the model keeps (shared and tied tensors counted once, by
  ``data_ptr``), adapters and norms included. This is what FlexiGPT saves.
* **run**: parameters applied per token: every slot's weights count, shared or not, plus the
  adapters and norms. A FlexiGPT model stores fewer parameters but runs slightly more.
* **trainable**: the parameters recovery trains.

``estimate_params(plan, config)`` computes the same numbers without building anything (it reads
the shapes of a meta-device skeleton, cached per config), so the app can update it on every
plan edit; the tests check that estimate == measurement.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from flexigpt.arch import arch_of, block_linears, get_blocks, get_submodule
from flexigpt.models import unique_numel
from flexigpt.plan import AdapterSpec, Plan

__all__ = ["ParamCounts", "estimate_params", "matched_lora_rank", "measure_params", "params_table", "rank_caps"]


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one model (see the module docstring)."""

    stored: int
    run: int
    trainable: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def measure_params(model: nn.Module) -> ParamCounts:
    """Count a built (or any supported) model's parameters by inspecting its tensors."""
    blocks = get_blocks(model)
    in_blocks = {id(p) for p in blocks.parameters()}
    outside = [p for p in model.parameters() if id(p) not in in_blocks]
    run = unique_numel(outside) + sum(unique_numel(b.parameters()) for b in blocks)
    return ParamCounts(
        stored=unique_numel(model.parameters()),
        run=run,
        trainable=unique_numel(p for p in model.parameters() if p.requires_grad),
    )


# ---- shapes without weights -------------------------------------------------------------
@dataclass(frozen=True)
class _Shapes:
    family: str
    hidden: int
    num_blocks: int
    nonblock: int  # distinct parameters outside the blocks (embeddings, final norm, head)
    block: int  # parameters of one block
    prenorms: int  # parameters of one block's pre-norms
    matrices: tuple[tuple[str, int, int], ...]  # (name, d_out, d_in)


def _to_config(source: Any):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, nn.Module):
        return source.config
    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict) and "family" in source and "num_blocks" in source:  # models.model_info()
        kw: dict[str, Any] = {
            "hidden_size": source["hidden_size"], "num_hidden_layers": source["num_blocks"],
            "num_attention_heads": source["num_attention_heads"], "vocab_size": source["vocab_size"],
            "tie_word_embeddings": source["tied_embeddings"],
        }
        if source["family"] == "opt":
            kw.update(ffn_dim=source["intermediate_size"], word_embed_proj_dim=source["hidden_size"],
                      max_position_embeddings=source["max_position_embeddings"])
        else:
            kw.update(intermediate_size=source["intermediate_size"], num_key_value_heads=source["num_key_value_heads"],
                      max_position_embeddings=source["max_position_embeddings"])
        return AutoConfig.for_model(source["model_type"], **kw)
    if isinstance(source, dict) and "model_type" in source:  # a config dict
        cfg = dict(source)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    raise ValueError(f"expected a model, a config, a config dict or a model_info dict, got {type(source).__name__}")


@functools.lru_cache(maxsize=16)
def _shapes_cached(model_type: str, config_json: str) -> _Shapes:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **json.loads(config_json))
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = AutoModelForCausalLM.from_config(config)
    spec = arch_of(model)
    blocks = get_blocks(model)
    in_blocks = {id(p) for p in blocks.parameters()}
    seen, nonblock = set(), 0
    for p in model.parameters():  # meta tensors have no data_ptr: de-duplicate by object
        if id(p) not in in_blocks and id(p) not in seen:
            seen.add(id(p))
            nonblock += p.numel()
    b0 = blocks[0]
    return _Shapes(
        family=spec.family, hidden=int(config.hidden_size), num_blocks=len(blocks), nonblock=nonblock,
        block=sum(p.numel() for p in b0.parameters()),
        prenorms=sum(p.numel() for path in spec.norms for p in get_submodule(b0, path).parameters()),
        matrices=tuple((n, *m.weight.shape) for n, m in block_linears(b0, spec).items()),
    )


def _shapes(source: Any) -> _Shapes:
    config = _to_config(source)
    d = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "quantization_config"):
        d.pop(key, None)
    model_type = d.pop("model_type")
    return _shapes_cached(model_type, json.dumps(d, sort_keys=True, default=str))


def rank_caps(source: Any, rank: int, targets: tuple[str, ...] = ()) -> dict[str, int]:
    """The LoRA rank each targeted matrix gets: ``min(rank, d_in, d_out)``."""
    sh = _shapes(source)
    names = [n for n, _, _ in sh.matrices]
    bad = [t for t in targets if t not in names]
    if bad:
        raise ValueError(f"unknown adapter targets {bad}; valid: {', '.join(names)}")
    chosen = [m for m in sh.matrices if not targets or m[0] in targets]
    largest = max(min(o, i) for _, o, i in chosen)
    if rank > largest:
        raise ValueError(f"adapter rank {rank} exceeds the largest matrix rank {largest} of this model; use 1..{largest}")
    return {n: min(rank, o, i) for n, o, i in chosen}


def _lora(sh: _Shapes, rank: int, targets: tuple[str, ...]) -> int:
    caps = rank_caps_from_shapes(sh, rank, targets)
    return sum(caps[n] * (o + i) for n, o, i in sh.matrices if n in caps)


def rank_caps_from_shapes(sh: _Shapes, rank: int, targets: tuple[str, ...]) -> dict[str, int]:
    chosen = [m for m in sh.matrices if not targets or m[0] in targets]
    return {n: min(rank, o, i) for n, o, i in chosen}


def _slot_extras(sh: _Shapes, adapter: AdapterSpec) -> tuple[int, int, int]:
    """(lora, out-norm, own pre-norm) parameters of one replaced slot."""
    out_norm = 2 * (2 * sh.hidden if adapter.out_norm == "layernorm" else sh.hidden)  # attention + MLP
    return _lora(sh, adapter.rank, adapter.targets), out_norm, sh.prenorms


def estimate_params(plan: Plan, source: Any, *, kept_lora_rank: int | None = None,
                    kept_lora_targets: tuple[str, ...] = ()) -> ParamCounts:
    """The counts ``measure_params(apply_plan(base, plan))`` would give, without building.

    Args:
        plan: the plan.
        source: the base model, its config, a config dict or ``models.model_info()``.
        kept_lora_rank: add ``attach_kept_lora(rank)`` on the kept blocks (ShortGPT + LoRA).
        kept_lora_targets: its targets (empty = every linear).
    """
    sh = _shapes(source)
    if sh.num_blocks != plan.num_blocks:
        raise ValueError(f"plan is for {plan.num_blocks} blocks, but the model config has {sh.num_blocks}")
    if plan.method == "foldgpt":
        # every slot: its group's shared weights (stored once per group) and its own pre-norms
        S, D = plan.num_slots, len(plan.kept_blocks)
        stored = sh.nonblock + D * (sh.block - sh.prenorms) + S * sh.prenorms
        run = sh.nonblock + S * sh.block
        trainable = S * sh.prenorms if plan.adapter.train_prenorms else 0
        R = 0
    else:
        rank_caps(source, plan.adapter.rank, plan.adapter.targets)  # validates rank and targets
        R = len(plan.replaced_slots)
        lora, out_norm, prenorm = _slot_extras(sh, plan.adapter)
        trainable_slot = lora + out_norm + (prenorm if plan.adapter.train_prenorms else 0)
        stored = sh.nonblock + len(plan.kept_blocks) * sh.block + R * (lora + out_norm + prenorm)
        run = sh.nonblock + plan.num_slots * sh.block + R * (lora + out_norm)
        trainable = R * trainable_slot
    if kept_lora_rank is not None:
        rank_caps(source, kept_lora_rank, kept_lora_targets)
        extra = (plan.num_slots - R) * _lora(sh, kept_lora_rank, kept_lora_targets)
        stored, run, trainable = stored + extra, run + extra, trainable + extra
    return ParamCounts(stored=stored, run=run, trainable=trainable)


def matched_lora_rank(plan: Plan, source: Any, targets: tuple[str, ...] = ()) -> int:
    """The kept-block LoRA rank whose trainable count best matches ``plan`` built as FlexiGPT.

    This sets the ShortGPT + LoRA baseline at the same trainable budget. Ties go to the
    smaller rank; at least 1.
    """
    sh = _shapes(source)
    flexi = plan if plan.method == "flexigpt" else plan.with_method("flexigpt")
    budget = estimate_params(flexi, source).trainable
    kept = len(flexi.kept_blocks)
    largest = max(min(o, i) for n, o, i in sh.matrices if not targets or n in targets)
    best = min(range(1, largest + 1), key=lambda r: (abs(kept * _lora(sh, r, targets) - budget), r))
    return best


def params_table(plan: Plan, source: Any, *, extend_blocks: int | None = None) -> list[dict[str, Any]]:
    """Rows comparing original / drop / flexigpt (foldgpt or extend, for those plans) for the plan's
    pruned set, each with stored, run and trainable parameters and the stored fraction."""
    sh = _shapes(source)
    original = sh.nonblock + sh.num_blocks * sh.block
    rows: list[tuple[str, Plan]] = [("original", Plan.identity(plan.base_model, plan.num_blocks, method="drop"))]
    if plan.method in ("flexigpt", "drop"):
        rows.append(("drop", plan.with_method("drop")))
        rows.append(("flexigpt", plan.with_method("flexigpt")))
    elif plan.method == "foldgpt":
        rows.append(("drop", plan.with_method("drop")))
        rows.append(("foldgpt", plan))
    else:
        rows.append(("extend", plan))
    out = []
    for name, p in rows:
        c = estimate_params(p, source)
        out.append({"model": name, "slots": p.num_slots, "stored": c.stored, "run": c.run, "trainable": c.trainable,
                    "stored_fraction": round(c.stored / original, 4)})
    return out
