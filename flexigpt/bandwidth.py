"""How fast could decoding be? The memory-bandwidth bound of greedy decoding on this machine.

At batch size 1 every generated token reads every weight the forward pass uses once, so no
decoder can beat ``copy bandwidth / weight bytes per token`` tokens per second (caches, the KV
cache and activations are ignored: the bound is optimistic). ``copy_bandwidth`` measures the
machine's memory bandwidth with large tensor copies (read + write bytes per second, median of a
few repeats), and ``decode_bound`` divides it by the weight bytes a model reads per token: each
distinct parameter of the blocks, the final norm and the LM head once, in its own dtype (the
input embedding contributes one row, unless it is tied to the head).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn

from flexigpt.arch import get_blocks

__all__ = ["copy_bandwidth", "decode_bound", "weight_bytes_per_token"]


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Measured memory bandwidth in bytes/s (read + write) of copying a ``megabytes`` float32 tensor."""
    if isinstance(megabytes, bool) or not isinstance(megabytes, int) or not 8 <= megabytes <= 8192:
        raise ValueError(f"megabytes must be an integer in 8..8192, got {megabytes!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: page in both buffers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads (see the module docstring)."""
    seen: set[int] = set()
    total = 0
    embed = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings().weight if hasattr(model, "get_output_embeddings") and \
        model.get_output_embeddings() is not None else None
    in_blocks = {id(p) for p in get_blocks(model).parameters()}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if embed is not None and p is embed and p is not head and id(p) not in in_blocks:
            total += p.shape[-1] * p.element_size()  # one row per token
        else:
            total += p.numel() * p.element_size()
    return total


def decode_bound(model: nn.Module, bandwidth: float) -> float:
    """The most greedy tokens/s ``model`` can decode at ``bandwidth`` bytes/s (batch 1)."""
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0 bytes/s, got {bandwidth!r}")
    return bandwidth / weight_bytes_per_token(model)
