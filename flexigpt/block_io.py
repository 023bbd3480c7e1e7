"""What does a block see and produce on real text? Cached inputs and outputs of chosen base blocks.

Hooked forward passes of the *original* model over calibration windows
(``flexigpt.residual_states``) record, for each
chosen block, the hidden state entering it, the hidden state leaving it, and its two
sub-layer outputs before their residual adds (the outputs of the attention and the MLP output
linears, ``ArchSpec.out_linears``). It also records the keyword arguments the model passes to
that block (attention mask, rotary position embeddings, position ids...) from a one-window
pass, so any block, or a replacement slot standing at that position, can later be run on the
cached inputs alone with ``replay``.

Tensors are stored on the CPU (float32 by default) as ``(N, T, hidden)``; ``max_tokens`` caps
``N * T``. The pass stops right after the deepest chosen block, so caching early blocks costs
only the early part of a forward pass.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from flexigpt.arch import arch_of, get_blocks, get_submodule
from flexigpt.residual_states import block_states

log = logging.getLogger(__name__)

__all__ = ["BlockIO", "batches", "block_r2", "calibration_ids", "collect_block_io", "iter_block_io", "replay"]

_DROP_KWARGS = ("past_key_values", "past_key_value", "layer_past")
DEFAULT_CACHE_MB = 1024  # cached activations alive at once in iter_block_io


@dataclass
class BlockIO:
    """Inputs and outputs of one base block on the calibration windows.

    Attributes:
        block: the block id in the base model.
        inputs: ``(N, T, d)`` hidden state entering the block.
        outputs: ``(N, T, d)`` hidden state leaving the block.
        attn_out: ``(N, T, d)`` the attention sub-layer output (before the residual add).
        mlp_out: ``(N, T, d)`` the MLP sub-layer output (before the residual add).
        call_kwargs: the keyword arguments the model passed to the block for one window
            (batch dimension 1, on the CPU); ``replay`` broadcasts them to any batch.
    """

    block: int
    inputs: torch.Tensor
    outputs: torch.Tensor
    attn_out: torch.Tensor
    mlp_out: torch.Tensor
    call_kwargs: dict[str, Any]

    @property
    def num_windows(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.inputs, self.outputs, self.attn_out, self.mlp_out))


def calibration_ids(windows: Any, max_tokens: int | None = None) -> torch.Tensor:
    """The ``(N, T)`` int64 token ids of ``windows`` (``flexigpt.data.Windows`` or a tensor),
    keeping the first ``max(1, max_tokens // T)`` windows when ``max_tokens`` is given.

    Raises:
        ValueError: windows that are not a non-empty ``(N, T >= 1)`` integer tensor, or a bad cap.
    """
    ids = getattr(windows, "input_ids", windows)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"calibration windows must be flexigpt.data.Windows or a non-empty (N, T) int64 tensor, got {shape}")
    if ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"calibration windows must hold integer token ids, got dtype {ids.dtype}")
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer (or None for no cap), got {max_tokens!r}")
        ids = ids[: max(1, max_tokens // ids.shape[1])]
    return ids.long()


def _to(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor in a (nested) tuple/list/dict, leaving other values alone."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, fn) for k, v in obj.items()}
    return obj


def collect_block_io(base: nn.Module, windows: Any, blocks: Sequence[int], *, batch_size: int = 8,
                     max_tokens: int | None = None, dtype: torch.dtype = torch.float32) -> dict[int, BlockIO]:
    """Run the original model over ``windows`` and cache each chosen block's inputs and outputs.

    Args:
        base: the original ``*ForCausalLM`` (not modified; hooks are removed afterwards).
        windows: ``flexigpt.data.Windows`` or an ``(N, T)`` int64 tensor.
        blocks: block ids of ``base`` to cache.
        batch_size: windows per forward pass.
        max_tokens: cache at most this many tokens per block (whole windows, at least one).
        dtype: storage dtype of the cached tensors (on the CPU).

    Returns:
        ``{block: BlockIO}``.

    Raises:
        ValueError: bad windows, block ids outside the model, or a bad batch size / cap.
    """
    spec = arch_of(base)
    layers = get_blocks(base)
    blocks = sorted(set(blocks))
    bad = [b for b in blocks if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < len(layers)]
    if not blocks or bad:
        raise ValueError(f"blocks must be block ids in [0, {len(layers) - 1}], got {bad or blocks!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    ids = calibration_ids(windows, max_tokens)
    n, t = ids.shape
    d = int(base.config.hidden_size)
    keys = ("inputs", "outputs", "attn_out", "mlp_out")
    store = {b: {k: torch.empty(n, t, d, dtype=dtype) for k in keys} for b in blocks}
    subs = {f"{b}.{k}": get_submodule(layers[b], path) for b in blocks for k, path in zip(keys[2:], spec.out_linears)}
    for start in range(0, n, batch_size):
        batch = ids[start:start + batch_size]
        m = int(batch.shape[0])
        states = block_states(base, batch, inputs=blocks, outputs=blocks, modules=subs)
        for b in blocks:
            got = {"inputs": states.inputs[b], "outputs": states.outputs[b],
                   **{k: states.modules[f"{b}.{k}"] for k in keys[2:]}}
            for k in keys:  # OPT runs its MLP on (B*T, d): reshape to windows
                store[b][k][start:start + m] = got[k].detach().reshape(m, t, d).to("cpu", dtype)
    one = block_states(base, ids[:1], inputs=blocks)  # arguments for one window broadcast to any batch
    out = {}
    for b in blocks:
        kwargs = {k: v for k, v in one.kwargs[b].items() if k not in _DROP_KWARGS}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        out[b] = BlockIO(block=b, call_kwargs=_to(kwargs, lambda x: x.detach().to("cpu", copy=True)), **store[b])
    log.info("cached inputs/outputs of %d blocks on %d x %d tokens (%.0f MB)", len(blocks), n, t,
             sum(io.nbytes for io in out.values()) / 2**20)
    return out


def replay(block: nn.Module, hidden: torch.Tensor, call_kwargs: dict[str, Any]) -> torch.Tensor:
    """Run one block (or a slot standing at that position) on ``hidden`` ``(B, T, d)``.

    ``call_kwargs`` are a ``BlockIO``'s recorded arguments for one window; tensors with a
    leading batch dimension of 1 are expanded to ``B`` (views, no copies), so the same
    recording serves every batch of windows of that length.
    """
    device, b = hidden.device, hidden.shape[0]

    def adapt(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        if t.is_floating_point() and t.dtype != hidden.dtype and t.ndim >= 2:
            t = t.to(hidden.dtype)  # rotary tables follow the activations' dtype
        return t.expand(b, *t.shape[1:]) if t.ndim >= 2 and t.shape[0] == 1 and b > 1 else t

    out = block(hidden, **_to(call_kwargs, adapt))
    return out[0] if isinstance(out, (tuple, list)) else out


def iter_block_io(base: nn.Module, windows: Any, blocks: Sequence[int], cache: dict[int, BlockIO] | None = None, *,
                  batch_size: int = 8, max_tokens: int | None = None,
                  cache_mb: int = DEFAULT_CACHE_MB) -> Iterator[BlockIO]:
    """Each chosen block's ``BlockIO`` in order: from ``cache`` when given, else collected a group
    of blocks per pass of the base, each group's tensors at most about ``cache_mb`` MB.

    Raises:
        ValueError: a block missing from ``cache``, or neither windows nor a cache.
    """
    blocks = list(blocks)
    if isinstance(cache_mb, bool) or not isinstance(cache_mb, int) or cache_mb < 1:
        raise ValueError(f"cache_mb must be a positive integer (MB), got {cache_mb!r}")
    if cache is not None:
        missing = [b for b in blocks if b not in cache]
        if missing:
            raise ValueError(f"the block cache has no entry for blocks {missing}; it holds {sorted(cache)}")
        yield from (cache[b] for b in blocks)
        return
    if windows is None:
        raise ValueError("pass calibration windows or a block cache (flexigpt.block_io.collect_block_io)")
    ids = calibration_ids(windows, max_tokens)
    per_block = 4 * ids.numel() * int(base.config.hidden_size) * 4
    group = max(1, cache_mb * 2**20 // per_block)
    for i in range(0, len(blocks), group):
        chunk = collect_block_io(base, ids, blocks[i:i + group], batch_size=batch_size)
        yield from (chunk.pop(b) for b in blocks[i:i + group])


def batches(io: BlockIO, batch_size: int) -> Iterator[slice]:
    """Consecutive window slices of ``batch_size`` over the cache."""
    for start in range(0, io.num_windows, batch_size):
        yield slice(start, start + batch_size)


@torch.no_grad()
def block_r2(block: nn.Module, io: BlockIO, *, batch_size: int = 8) -> float:
    """Share of the cached block's residual update ``out - in`` that ``block`` (e.g. the slot
    standing at its position) reproduces on the cached inputs:
    ``1 - ||block(in) - out||^2 / ||out - in||^2``; 0 for the identity, 1 for a perfect copy."""
    ref = next(block.parameters())
    err = upd = 0.0
    for sl in batches(io, batch_size):
        x, y = io.inputs[sl].to(ref.device, ref.dtype), io.outputs[sl].to(ref.device, torch.float32)
        pred = replay(block, x, io.call_kwargs).float()
        err += float(((pred - y) ** 2).sum())
        upd += float(((y - x.float()) ** 2).sum())
    return 1.0 - err / max(upd, 1e-30)
