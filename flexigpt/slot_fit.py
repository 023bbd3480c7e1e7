"""Can each replacement slot stand in for its pruned block? Train it alone, on that block's own activations.

After ``apply_plan`` built a FlexiGPT model (and, typically, after ``closed_form_scales_`` opened
its output norms), each replaced slot is trained alone to reproduce the hidden state leaving its
pruned block in the original model, cached on calibration windows (``flexigpt.block_io``): mean
squared error on the residual stream, no LM head, no other block involved. Slots are fitted one
after another, in depth order, and only one slot's activations and gradients are alive at a time.

What a slot reads while it is fitted (``inputs``):

* ``"built"`` (the default): the hidden state that reaches the slot in the *built* model, with the
  slots before it already fitted. The slot then also learns to undo what the model in front of it
  gets wrong, which is what it meets at run time. Measured on the embedded model at ratio 0.3
  (nine slots, 200 steps each): start perplexity 30.41 against 35.54 with ``"original"``
  (bench/RESULTS.md).
* ``"original"``: the hidden state entering the pruned block in the original model. Each slot
  then copies its own block, independently of the others.

The figure reported is R^2, the share of the residual update ``out - in`` the slot reproduces:
``1 - ||slot(in) - out||^2 / ||out - in||^2`` (0 for the identity, that is for a plain drop of
the block; 1 for a perfect copy), ``in`` being the inputs the slot was fitted on.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from flexigpt.arch import get_blocks
from flexigpt.block_io import BlockIO, block_r2, calibration_ids, collect_block_io, iter_block_io, replay
from flexigpt.slot_scales import check_int, closed_form_scales_, replaced_slots

log = logging.getLogger(__name__)

__all__ = ["FIT_INPUTS", "SlotFit", "SlotFitReport", "closed_form_scales_", "fit_slots"]

FIT_INPUTS = ("built", "original")  # what a slot reads while it is fitted (see the module docstring)


def _check_pos(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SlotFit:
    """One slot's block-local fit: R^2 of the pruned block's residual update, before and after."""

    slot: int
    r2_before: float
    r2_after: float
    loss_first: float
    loss_last: float
    steps: int
    seconds: float
    kept: bool  # False when training made it worse and the slot was restored


@dataclass(frozen=True)
class SlotFitReport:
    """What ``fit_slots`` did, slot by slot, and with which settings."""

    slots: tuple[SlotFit, ...]
    steps: int
    lr: float
    gate_lr: float
    batch_tokens: int
    tokens: int  # calibration tokens per slot
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["slots"] = [asdict(s) for s in self.slots]
        return d


def _groups(slot: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(lora, gates)``: the slot's trainable LoRA factors and its other trainable parameters
    (output-norm gamma/beta, own pre-norms)."""
    lora, gates = [], []
    for name, p in slot.named_parameters():
        if p.requires_grad:
            (lora if ".lora_A." in name or ".lora_B." in name else gates).append(p)
    return lora, gates


def _fit_one(slot: nn.Module, io: BlockIO, *, steps: int, lr: float, gate_lr: float, batch_tokens: int,
             batch_size: int, gen: torch.Generator, tick: Callable[[int], None]) -> SlotFit:
    """Train one slot on its pruned block's cache; restore it if it ends worse than it started."""
    start = time.perf_counter()
    lora, gates = _groups(slot)
    saved = [p.detach().clone() for p in lora + gates]
    r2_before = block_r2(slot, io, batch_size=batch_size)
    n, t = io.inputs.shape[:2]
    per_step = min(n, max(1, batch_tokens // t))
    scale = float(((io.outputs - io.inputs).double() ** 2).sum()) / n  # mean squared update per window
    ref = next(slot.parameters())
    groups = [g for g in ({"params": lora, "lr": lr}, {"params": gates, "lr": gate_lr}) if g["params"]]
    losses: list[float] = []
    if steps and groups:
        opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
        for _ in range(steps):
            idx = torch.randperm(n, generator=gen)[:per_step]
            x = io.inputs[idx].to(ref.device, ref.dtype)
            y = io.outputs[idx].to(ref.device, torch.float32)
            with torch.enable_grad():
                loss = ((replay(slot, x, io.call_kwargs).float() - y) ** 2).sum() / (scale * per_step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            tick(io.block)
        opt.zero_grad(set_to_none=True)
    r2_after = block_r2(slot, io, batch_size=batch_size) if losses else r2_before
    kept = r2_after >= r2_before
    if not kept:
        with torch.no_grad():
            for p, v in zip(lora + gates, saved):
                p.copy_(v)
    return SlotFit(slot=io.block, r2_before=r2_before, r2_after=max(r2_after, r2_before),
                   loss_first=losses[0] if losses else 1 - r2_before, loss_last=losses[-1] if losses else 1 - r2_before,
                   steps=len(losses), seconds=time.perf_counter() - start, kept=kept)


def _built_inputs(model: nn.Module, ids: torch.Tensor, io: BlockIO, batch_size: int) -> BlockIO:
    """``io`` with its inputs replaced by what reaches slot ``io.block`` in the built model now."""
    if ids.shape[:2] != io.inputs.shape[:2]:
        raise ValueError(f"the block cache holds {tuple(io.inputs.shape[:2])} (windows, tokens) but the calibration "
                         f"windows are {tuple(ids.shape)}; pass the windows the cache was collected on")
    got = collect_block_io(model, ids, [io.block], batch_size=batch_size)[io.block]
    return BlockIO(block=io.block, inputs=got.inputs, outputs=io.outputs, attn_out=io.attn_out, mlp_out=io.mlp_out,
                   call_kwargs=io.call_kwargs)


def fit_slots(model: nn.Module, base: nn.Module, windows: Any = None, *, cache: dict[int, BlockIO] | None = None,
              slots=None, steps: int = 200, lr: float = 1e-2, gate_lr: float = 3e-2, batch_tokens: int = 1024,
              max_tokens: int | None = None, batch_size: int = 8, seed: int = 0, inputs: str = "built",
              progress: bool = False, callback: Callable[[int, int, int], None] | None = None) -> SlotFitReport:
    """Train each replaced slot alone to reproduce its pruned block's output on calibration windows.

    The loss of one step is ``||slot(in) - out||^2`` over a random batch of cached windows,
    divided by the mean ``||out - in||^2`` of the whole cache, so it reads as ``1 - R^2``. Only
    the slot's trainable parameters move (Adam, cosine decay to zero; the LoRA factors at
    ``lr``, the output norms and own pre-norms at ``gate_lr``: Adam moves every parameter by
    about its learning rate per step, and these gates must travel far further than the LoRA
    entries). Donor tensors, kept blocks and the base stay bit-identical. A slot that ends
    worse than it started is restored.

    Args:
        model: a flexigpt build (``apply_plan``), trained in place.
        base: the original model (not modified).
        windows: calibration windows; with ``inputs="original"`` not needed when ``cache`` is given.
        cache: ``collect_block_io`` output covering the slots.
        slots: replaced slots to fit (default all), fitted one after another.
        steps: optimizer steps per slot (0 only measures R^2).
        lr: learning rate of the LoRA factors.
        gate_lr: learning rate of the output-norm parameters and own pre-norms.
        batch_tokens: tokens per step (whole windows, at least one).
        max_tokens: calibration tokens to use at most.
        batch_size: windows per forward pass when caching and measuring.
        seed: the window sampling seed.
        inputs: what a slot reads while it is fitted, one of ``FIT_INPUTS``: ``"built"`` (the hidden
            state reaching it in the built model, slots fitted in depth order) or ``"original"``
            (the one entering its pruned block in the original model).
        progress: show a tqdm bar over all steps.
        callback: ``callback(slot, done, total)`` after every step, ``done`` counting steps over
            all slots and ``total = steps * len(slots)``.

    Returns:
        SlotFitReport.
    """
    check_int("steps", steps, 0)
    _check_pos("lr", lr)
    _check_pos("gate_lr", gate_lr)
    check_int("batch_tokens", batch_tokens, 1)
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, 0)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {callback!r}")
    if inputs not in FIT_INPUTS:
        raise ValueError(f"inputs must be one of {', '.join(FIT_INPUTS)}, got {inputs!r}")
    if inputs == "built" and windows is None:
        raise ValueError("fitting on the built model's own inputs runs it on the calibration windows; pass them "
                         "(or inputs='original' with a block cache)")
    chosen = sorted(replaced_slots(model, slots))
    ids = calibration_ids(windows, max_tokens) if inputs == "built" else None
    blocks = get_blocks(model)
    total, fits, tokens = steps * len(chosen), [], 0
    start_all = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()  # no dropout: the slot must match a deterministic target
    try:
        with tqdm(total=total, disable=not progress, desc="Fitting slots") as bar:
            done = [0]  # tqdm does not count while disabled

            def tick(slot: int) -> None:
                done[0] += 1
                bar.update(1)
                if callback is not None:
                    callback(slot, done[0], total)

            for io in iter_block_io(base, windows, chosen, cache, batch_size=batch_size, max_tokens=max_tokens):
                if ids is not None:
                    io = _built_inputs(model, ids, io, batch_size)
                tokens = io.inputs.shape[0] * io.inputs.shape[1]
                fit = _fit_one(blocks[io.block], io, steps=steps, lr=lr, gate_lr=gate_lr, batch_tokens=batch_tokens,
                               batch_size=batch_size, gen=gen, tick=tick)
                fits.append(fit)
                log.info("slot %d fitted: R2 %.3f -> %.3f in %d steps (%.1f s)", fit.slot, fit.r2_before,
                         fit.r2_after, fit.steps, fit.seconds)
    finally:
        model.train(was_training)
    return SlotFitReport(slots=tuple(fits), steps=steps, lr=float(lr), gate_lr=float(gate_lr), batch_tokens=batch_tokens,
                         tokens=tokens, seconds=time.perf_counter() - start_all, settings={"seed": seed, "inputs": inputs})
