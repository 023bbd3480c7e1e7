"""Which single block stands in for a span? A trained one-block span replacement (LLM-Streamline).

Each span ``(start, end)`` (0-based block ids, end exclusive; see ``flexigpt.spans.check_spans``)
is replaced by ONE block, initialised from a copy of the span's first block (its own tensors, never
the base's) and trained locally: Adam on the mean squared error between its output and the state
leaving the span's last block, given the state entering the span. Both states are cached once from
the ORIGINAL model on calibration windows, together with the exact arguments the model passes to
the span's first block (attention mask, rotary embeddings), so the replacement is called the same
way it will run in the cut model. Every span is trained on the original model's activations,
independently of the others. A span may start at block 0 (nothing is folded into a previous block).

Training runs in float32 even for a half-precision model; the block is cast back afterwards. The
result is an ordinary model of the same architecture with fewer blocks, and the fit quality of
each span is reported as R^2 over the calibration tokens (1 = the span's output reproduced, 0 =
no better than the per-feature mean) before training, after training, and for a plain drop.

Paper: LLM-Streamline (Chen et al., ICLR 2025), https://arxiv.org/abs/2403.19135
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexigpt.arch import get_blocks, set_blocks
from flexigpt.residual_states import block_states, run_block, window_ids
from flexigpt.spans import check_spans
from flexigpt.slots import structural_copy

log = logging.getLogger(__name__)

__all__ = ["SpanTraining", "StreamlineResult", "streamline"]

Span = tuple[int, int]


@dataclass(frozen=True)
class SpanTraining:
    """How one span's replacement block was trained.

    Attributes:
        span: the span (base block ids).
        r2_start: R^2 of the initial block (a copy of the span's first block).
        r2: R^2 after training.
        r2_drop: R^2 of a plain drop (the span's input passed through unchanged).
        losses: training MSE at every step.
        seconds: training wall time.
    """

    span: Span
    r2_start: float
    r2: float
    r2_drop: float
    losses: tuple[float, ...]
    seconds: float


@dataclass(frozen=True)
class StreamlineResult:
    """The new model and one ``SpanTraining`` per span."""

    model: nn.Module
    fits: tuple[SpanTraining, ...]

    @property
    def r2(self) -> list[float]:
        """R^2 after training, one per span."""
        return [f.r2 for f in self.fits]


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def _check(steps: int, lr: float, batch_size: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= 100_000:
        raise ValueError(f"steps must be an integer in 0..100000, got {steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or not 0 < lr <= 1:
        raise ValueError(f"lr must be a number in (0, 1], got {lr!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


@torch.no_grad()
def _r2(block: nn.Module | None, batches: list[tuple[torch.Tensor, torch.Tensor, dict]]) -> float:
    """1 - SSE / SST over all tokens; SST around the per-feature mean of the targets."""
    sse, total, sq, count = 0.0, 0.0, 0.0, 0
    for x, y, kwargs in batches:
        pred = x if block is None else run_block(block, x, kwargs)
        y64 = y.double()
        sse += float(((pred.double() - y64) ** 2).sum())
        total = total + y64.sum(dim=(0, 1))
        sq += float((y64 ** 2).sum())
        count += y.shape[0] * y.shape[1]
    sst = sq - float((total ** 2).sum()) / count
    return 1.0 - sse / max(sst, 1e-300)


def _train(block: nn.Module, batches: list, *, steps: int, lr: float, seed: int,
           report: Callable[[int, float], None]) -> list[float]:
    params = [p for p in block.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    order = torch.Generator().manual_seed(seed)
    block.eval()  # no dropout: the target is the deterministic span output
    losses: list[float] = []
    try:
        with torch.enable_grad():
            for step in range(steps):
                x, y, kwargs = batches[int(torch.randint(len(batches), (1,), generator=order))]
                loss = F.mse_loss(run_block(block, x, kwargs), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(float(loss.detach()))
                report(step, losses[-1])
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
    return losses


def streamline(
    model: nn.Module,
    spans: Sequence[Sequence[int]],
    windows: Any,
    *,
    steps: int = 300,
    lr: float = 1e-4,
    batch_size: int = 4,
    seed: int = 0,
    progress: Callable[[float, str], None] | None = None,
) -> StreamlineResult:
    """A NEW model with each span replaced by one locally trained block; ``model`` is not modified.

    Args:
        model: a supported ``*ForCausalLM`` (the original, uncut model).
        spans: ``[start, end)`` pairs (``flexigpt.spans.check_spans``; block 0 may start one).
        windows: calibration windows (train split) or an ``(N, T)`` id tensor.
        steps: Adam steps per span, each on ``batch_size`` windows (0: copy of the first block, untrained).
        lr: Adam learning rate.
        batch_size: windows per cached batch and per step.
        seed: order in which cached batches are drawn.
        progress: ``progress(fraction, message)`` during training.

    Returns:
        StreamlineResult; the new blocks' parameters keep the ``requires_grad`` flags of the blocks
        they were copied from, the rest of the model shares the base's Parameter objects.

    Raises:
        ValueError: bad spans (naming the span and the valid range), steps, lr, batch size or windows.
    """
    _check(steps, lr, batch_size)
    base_blocks = get_blocks(model)
    L = len(base_blocks)
    spans = check_spans(spans, L, allow_first=True)
    ids = window_ids(windows)
    report = progress or (lambda fraction, message: None)
    cached: dict[Span, list] = {span: [] for span in spans}
    for first in range(0, ids.shape[0], batch_size):
        st = block_states(model, ids[first : first + batch_size], inputs=[s for s, _ in spans],
                          outputs=[e - 1 for _, e in spans])
        for s, e in spans:
            cached[(s, e)].append((st.inputs[s].float(), st.outputs[e - 1].float(), _cast(st.kwargs[s], torch.float32)))
    report(0.0, f"cached span activations of {ids.shape[0]} windows")
    trained: dict[int, nn.Module] = {}
    fits: list[SpanTraining] = []
    for n, span in enumerate(spans):
        source = base_blocks[span[0]]
        dtype = next(source.parameters()).dtype
        block = copy.deepcopy(source).float()  # own tensors: the base block is never trained
        batches = cached[span]
        r2_start, r2_drop = _r2(block, batches), _r2(None, batches)
        every = max(1, steps // 20)

        def tick(step: int, loss: float, n=n, span=span) -> None:
            if (step + 1) % every == 0 or step + 1 == steps:
                report((n + (step + 1) / steps) / len(spans),
                       f"span [{span[0]}, {span[1]}): step {step + 1}/{steps}, mse {loss:.4g}")

        start = time.perf_counter()
        losses = _train(block, batches, steps=steps, lr=lr, seed=seed, report=tick)
        seconds = time.perf_counter() - start
        r2 = _r2(block, batches)
        block = block.to(dtype)
        block._flexigpt_source = span[0]  # set_blocks re-slices per-layer config lists with it
        trained[span[0]] = block
        fits.append(SpanTraining(span=span, r2_start=r2_start, r2=r2, r2_drop=r2_drop, losses=tuple(losses),
                                 seconds=seconds))
        log.info("streamline span [%d, %d): R^2 %.4f -> %.4f (plain drop %.4f), %d steps in %.1f s",
                 span[0], span[1], r2_start, r2, r2_drop, steps, seconds)
    new = structural_copy(model)
    copies = list(get_blocks(new))
    removed = {b for s, e in spans for b in range(s + 1, e)}
    slots = []
    for i, block in enumerate(copies):
        if i in trained:
            slots.append(trained[i])
        elif i not in removed:
            block._flexigpt_source = i
            slots.append(block)
    set_blocks(new, slots)
    report(1.0, "streamline done")
    return StreamlineResult(model=new.eval(), fits=tuple(fits))
