"""Which blocks matter once their coupling is taken into account? FoldGPT's learnable block gates.

Block Influence scores each block alone, in one pass. FoldGPT instead puts a learnable scalar
gate on every block, ``x_out = x_in + g * (block(x_in) - x_in)`` with ``g = sigmoid(a)``, and
trains only the gates on calibration text with the language-modelling loss plus

- a polarisation penalty (Zhuang et al. 2020 style, ``t * sum(g) - sum(|g - mean(g)|)``) that
  pushes gates towards 0 or 1, and
- a budget penalty that asks the gates to keep about ``(1 - ratio) * L`` blocks' worth of compute
  (every block of these models has the same FLOPs, so the FLOPs constraint is a block count).

Blocks whose gate ends lowest are the ones the model can do without *given the others*. The
model's own weights are never changed: the gates live outside it and act through forward hooks.
The formulas of the penalties are our reading (method.md section 3); the paper's exact
constants could not be checked.

Paper: FoldGPT (Liu et al., 2024), https://arxiv.org/abs/2407.00928
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexigpt.arch import get_blocks

log = logging.getLogger(__name__)

__all__ = ["GateSpec", "GateResult", "train_gates"]


@dataclass(frozen=True)
class GateSpec:
    """Settings of the gate training (validated)."""

    ratio: float = 0.3  # share of blocks the budget asks to switch off
    steps: int = 30
    lr: float = 0.1
    batch_size: int = 2
    polarization: float = 0.02
    budget: float = 0.5
    init_logit: float = 3.0  # sigmoid(3) = 0.95: every block starts (almost) fully on
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0.0 <= self.ratio <= 0.9):
            raise ValueError(f"ratio must be in [0, 0.9], got {self.ratio!r}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100_000:
                raise ValueError(f"{name} must be an integer in 1..100000, got {value!r}")
        for name in ("lr", "polarization", "budget"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value != value or not 0 <= value <= 1e3:
                raise ValueError(f"{name} must be a number in [0, 1000], got {value!r}")


@dataclass
class GateResult:
    """Final gate value per block (0-based) and the loss history."""

    gates: list[float]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    spec: GateSpec = field(default_factory=GateSpec)

    def removal_order(self) -> list[int]:
        """Block ids from the lowest gate (remove first) to the highest."""
        return sorted(range(len(self.gates)), key=lambda i: (self.gates[i], i))


def _gate_hook(logits: torch.Tensor, i: int):
    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        g = torch.sigmoid(logits[i]).to(y.dtype)  # indexed at call time: the leaf changes every step
        mixed = x + g * (y - x)
        return (mixed,) + tuple(output[1:]) if isinstance(output, tuple) else mixed

    return hook


def train_gates(
    model: nn.Module,
    windows: torch.Tensor,
    spec: GateSpec = GateSpec(),
    *,
    progress: Callable[[float, str], None] | None = None,
) -> GateResult:
    """Train one gate per block on ``windows`` (N, T) and return the final gate values.

    The model's parameters are frozen for the duration (their ``requires_grad`` flags are
    restored afterwards) and its weights are not modified.
    """
    if windows.ndim != 2 or windows.shape[0] < 1:
        raise ValueError(f"windows must be a non-empty (N, T) tensor, got shape {tuple(windows.shape)}")
    blocks = get_blocks(model)
    n = len(blocks)
    logits = torch.full((n,), float(spec.init_logit), requires_grad=True)
    opt = torch.optim.Adam([logits], lr=spec.lr)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    handles = [b.register_forward_hook(_gate_hook(logits, i), with_kwargs=True) for i, b in enumerate(blocks)]
    gen = torch.Generator().manual_seed(spec.seed)
    keep_target = (1.0 - spec.ratio) * n
    losses: list[float] = []
    start = time.perf_counter()
    was_training = model.training
    model.eval()  # no dropout: the gates should see the deterministic function
    try:
        for step in range(spec.steps):
            idx = torch.randint(0, windows.shape[0], (spec.batch_size,), generator=gen)
            ids = windows[idx]
            with torch.enable_grad():
                out = model(input_ids=ids, labels=ids, use_cache=False)
                g = torch.sigmoid(logits)
                polar = n * g.mean() * 0.5 - (g - g.mean()).abs().sum()  # t = 0.5: low when gates split to 0/1
                budget = F.relu(g.sum() - keep_target) ** 2 / n
                loss = out.loss + spec.polarization * polar + spec.budget * budget
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress((step + 1) / spec.steps, f"gate step {step + 1}/{spec.steps}: loss {losses[-1]:.3f}")
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    gates = torch.sigmoid(logits.detach()).tolist()
    log.info("gates after %d steps: %s", spec.steps, [round(x, 3) for x in gates])
    return GateResult(gates=gates, losses=losses, seconds=time.perf_counter() - start, spec=spec)
