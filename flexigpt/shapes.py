"""How big is each part of a model? Shapes read from a config without weights, and the LoRA rank
each matrix gets (the one home of the rank cap)."""
from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from flexigpt.arch import arch_of, block_linears, get_blocks, get_submodule

log = logging.getLogger(__name__)

__all__ = ["Shapes", "capped_ranks", "model_shapes"]


def capped_ranks(shapes: Mapping[str, tuple[int, int]], rank: int, targets: tuple[str, ...] = ()) -> dict[str, int]:
    """The LoRA rank each targeted matrix gets: ``min(rank, d_out, d_in)`` (GQA k/v are small).

    Args:
        shapes: ``{matrix name: (d_out, d_in)}`` of one block.
        rank: the requested rank.
        targets: matrix names (empty = all).

    Raises:
        ValueError: unknown targets, or ``rank`` above every targeted matrix's size.
    """
    bad = [t for t in targets if t not in shapes]
    if bad:
        raise ValueError(f"unknown adapter targets {bad}; valid: {', '.join(shapes)}")
    chosen = {n: s for n, s in shapes.items() if not targets or n in targets}
    largest = max(min(s) for s in chosen.values())
    if rank > largest:
        raise ValueError(f"adapter rank {rank} exceeds the largest matrix rank {largest} of this model; use 1..{largest}")
    ranks = {n: min(rank, *s) for n, s in chosen.items()}
    capped = {n: r for n, r in ranks.items() if r < rank}
    if capped:
        log.debug("adapter rank %d capped at the matrix size for %s", rank, capped)
    return ranks


@dataclass(frozen=True)
class Shapes:
    """Parameter shapes of a model, enough to count any plan's parameters."""

    family: str
    hidden: int
    num_blocks: int
    nonblock: int  # distinct parameters outside the blocks (embeddings, final norm, head)
    block: int  # parameters of one block
    prenorms: int  # parameters of one block's pre-norms
    matrices: tuple[tuple[str, int, int], ...]  # (name, d_out, d_in)
    linears: int = 0  # parameters of one block's linears (weights and biases)

    @property
    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (o, i) for n, o, i in self.matrices}

    def lora(self, rank: int, targets: tuple[str, ...] = ()) -> int:
        """LoRA parameters of one block's targeted matrices at ``rank`` (capped per matrix)."""
        caps = capped_ranks(self.matrix_shapes, rank, targets)
        return sum(caps[n] * (o + i) for n, o, i in self.matrices if n in caps)


def _to_config(source: Any):
    # transformers is heavy: loaded only when shapes are first needed
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
def _shapes_cached(model_type: str, config_json: str) -> Shapes:
    # transformers is heavy: loaded only when shapes are first needed
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
    return Shapes(
        family=spec.family, hidden=int(config.hidden_size), num_blocks=len(blocks), nonblock=nonblock,
        block=sum(p.numel() for p in b0.parameters()),
        prenorms=sum(p.numel() for path in spec.norms for p in get_submodule(b0, path).parameters()),
        matrices=tuple((n, *m.weight.shape) for n, m in block_linears(b0, spec).items()),
        linears=sum(p.numel() for m in block_linears(b0, spec).values() for p in m.parameters()),
    )


def model_shapes(source: Any) -> Shapes:
    """The ``Shapes`` of a model, its config, a config dict or ``models.model_info()`` (cached per config)."""
    config = _to_config(source)
    d = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "quantization_config"):
        d.pop(key, None)
    model_type = d.pop("model_type")
    return _shapes_cached(model_type, json.dumps(d, sort_keys=True, default=str))
