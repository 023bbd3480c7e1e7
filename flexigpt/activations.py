"""What does each linear of a block see on real text? Second moments of every linear's input.

An activation-aware (whitened) low-rank fit of a block's matrix needs, for each linear, the
uncentred second moment ``C = X^T X / N`` of its input over ``N`` calibration tokens (see
``flexigpt.whiten``). Forward pre-hooks on the linears capture exactly those inputs in one pass
of the original model: the normed hidden state for the attention's q/k/v and the MLP's input
projections, the attention context for the attention's output projection, and the gated (or
activated) hidden layer for the MLP's output projection. Linears that read the very same tensor
(q/k/v; gate/up) share one accumulator, and the returned dict maps their names to one tensor
object.

Memory stays bounded whatever the number of tokens: each batch's ``X^T X`` (BLAS ``ssyrk``,
half the flops of a general product) is added to a float64 accumulator of the lower triangle
only, and no activation is kept past its hook. For the embedded SmolLM2 that is about 12 MB per
block (two 576-wide inputs and one 1536-wide).
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from flexigpt import lapack
from flexigpt.arch import arch_of, get_blocks, get_submodule

log = logging.getLogger(__name__)

__all__ = ["MomentCollector", "linear_input_moments"]


class _Moment:
    """A running ``sum X^T X`` of one input width (its lower triangle, float32, added to by ``ssyrk``)."""

    def __init__(self, dim: int):
        self.dim = dim
        self.sum = np.zeros((dim, dim), dtype=np.float32)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, self.dim)
        if flat.device.type == "cpu":
            lapack.gram(flat.float().contiguous().numpy(), out=self.sum, accumulate=True)
        else:
            f = flat.float()
            self.sum += (f.T @ f).cpu().numpy()  # full matrix: its lower triangle is what counts
        self.tokens += int(flat.shape[0])

    def moment(self) -> torch.Tensor:
        """The dense symmetric ``X^T X / N`` in float64."""
        low = torch.from_numpy(self.sum).double().tril()
        return (low + low.tril(-1).T) / max(self.tokens, 1)


class MomentCollector:
    """Forward pre-hooks that accumulate every linear's input second moment, block by block.

    Use as a context manager around any forward passes of the model (e.g. the block-scoring
    pass, so the moments cost no extra pass); the hooks are removed on exit, always.

    Args:
        model: a supported ``*ForCausalLM`` (the original model).
        blocks: block ids to collect (default: all); each costs one accumulator per distinct input.
    """

    def __init__(self, model: nn.Module, blocks: Iterable[int] | None = None):
        self.spec = arch_of(model)
        self._blocks = get_blocks(model)
        L = len(self._blocks)
        wanted = sorted(set(range(L) if blocks is None else (int(b) for b in blocks)))
        bad = [b for b in wanted if not 0 <= b < L]
        if bad:
            raise ValueError(f"blocks {bad} are out of range 0..{L - 1}")
        self.blocks = tuple(wanted)
        self._acc: dict[int, dict[str, _Moment]] = {b: {} for b in self.blocks}
        self._owner: dict[int, dict[str, str]] = {b: {} for b in self.blocks}  # matrix -> accumulator key
        # weak references: holding the inputs themselves would keep every block's activations alive
        self._seen: dict[int, list[tuple[weakref.ref, str]]] = {b: [] for b in self.blocks}
        self._tokens: dict[int, int] = {b: 0 for b in self.blocks}
        self._handles: list = []

    def __enter__(self) -> "MomentCollector":
        for b in self.blocks:
            block = self._blocks[b]
            self._handles.append(block.register_forward_pre_hook(self._block_hook(b)))
            for name in self.spec.matrix_names:
                linear = get_submodule(block, self.spec.path_of(name))
                self._handles.append(linear.register_forward_pre_hook(self._linear_hook(b, name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for seen in self._seen.values():
            seen.clear()

    def _block_hook(self, b: int):
        def fn(module, args):
            self._seen[b].clear()  # a new forward through this block: forget the last batch's inputs

        return fn

    def _linear_hook(self, b: int, name: str):
        def fn(module, args):
            x = args[0]
            seen = self._seen[b]
            key = next((k for ref, k in seen if ref() is x), None)  # q/k/v (gate/up) read one tensor object
            known = self._owner[b].get(name)
            if key is None:
                key = name
                acc = self._acc[b].get(key)
                if acc is None:
                    acc = self._acc[b][key] = _Moment(int(x.shape[-1]))
                acc.add(x)
                self._tokens[b] = max(self._tokens[b], acc.tokens)
                seen.append((weakref.ref(x), key))
            if known is not None and known != key:
                raise RuntimeError(f"block {b}: {name} shared its input with {known} in one pass and not in another")
            self._owner[b][name] = key

        return fn

    @property
    def tokens(self) -> int:
        """Tokens seen by the collected blocks (0 before any pass)."""
        return max(self._tokens.values(), default=0)

    def groups(self, block: int) -> dict[str, tuple[str, ...]]:
        """``{accumulator key: matrix names reading that input}`` of one collected block."""
        out: dict[str, list[str]] = {}
        for name in self.spec.matrix_names:
            if name in self._owner[block]:
                out.setdefault(self._owner[block][name], []).append(name)
        return {k: tuple(v) for k, v in out.items()}

    def moment(self, block: int, name: str) -> torch.Tensor:
        """The float64 ``X^T X / N`` of one matrix's input (names sharing an input get equal values)."""
        if block not in self._acc:
            raise ValueError(f"block {block} was not collected; collected: {list(self.blocks)}")
        key = self._owner[block].get(name)
        if key is None:
            raise ValueError(f"no input seen for {name!r} of block {block}: run a forward pass inside the collector")
        return self._acc[block][key].moment()

    def release(self, block: int, key: str) -> None:
        """Free one accumulator (after its moment has been used)."""
        self._acc[block].pop(key, None)

    def moments(self) -> dict[int, dict[str, torch.Tensor]]:
        """``{block: {matrix name: C}}``; names sharing an input map to the same tensor object."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        for b in self.blocks:
            per: dict[str, torch.Tensor] = {}
            for key, names in self.groups(b).items():
                c = self._acc[b][key].moment()
                for n in names:
                    per[n] = c
            out[b] = per
        return out


def _input_ids(windows) -> torch.Tensor:
    ids = getattr(windows, "input_ids", windows)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"windows must be flexigpt.data.Windows or a non-empty (N, T) token tensor, got {shape}")
    if ids.dtype != torch.int64:
        raise ValueError(f"windows must hold int64 token ids, got {ids.dtype}")
    return ids


@torch.no_grad()
def linear_input_moments(
    model: nn.Module,
    windows,
    *,
    batch_size: int = 4,
    blocks: Sequence[int] | None = None,
    progress: bool = False,
) -> dict[int, dict[str, torch.Tensor]]:
    """Second moment of every linear's input, from one hooked pass over calibration windows.

    Args:
        model: a supported ``*ForCausalLM``: the original model, so each block sees its own inputs.
        windows: ``flexigpt.data.Windows`` or an ``(N, T)`` int64 tensor of token ids.
        batch_size: windows per forward pass (>= 1).
        blocks: block ids to collect (default: all).
        progress: show a tqdm bar.

    Returns:
        ``{block: {matrix name: C}}`` with ``C = X^T X / N`` float64 ``(d_in, d_in)`` on the CPU;
        matrices reading one input (q/k/v, gate/up) map to the same tensor object.

    Raises:
        ValueError: bad windows, batch size or block ids.
    """
    ids = _input_ids(windows)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = next(model.parameters()).device
    backbone = getattr(model, "base_model", model)  # the LM head reads no linear's input we need
    was_training = model.training
    model.eval()
    try:
        with MomentCollector(model, blocks) as collector:
            starts = range(0, ids.shape[0], batch_size)
            for start in tqdm(starts, desc="Collecting input moments", disable=not progress):
                backbone(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)
    log.info("input moments of %d blocks from %d tokens", len(collector.blocks), collector.tokens)
    return collector.moments()
