"""Heal the pruned model: a short recovery loop over the parameters that ``requires_grad``.

The loop trains exactly the parameters whose ``requires_grad`` is set (after
``flexigpt.surgery.apply_plan`` these are the slot adapters and norms; every shared or frozen
tensor stays bit-identical) with AdamW, linear warm-up and cosine decay, gradient accumulation
and clipping. The objective is language modelling, distillation from the original model
(logit KL at a temperature, and/or a relative MSE on the last block's hidden state, FoldGPT's
tail distillation), or a mix. It yields one ``StepLog`` per optimizer step, can be cancelled
between steps, and checkpoints atomically (``flexigpt.recover_state``), so an interrupted run
resumes to the same end point. Pass an ``accelerate.Accelerator`` to run the same loop
data-parallel (see ``flexigpt.accelerate_recover``).

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713; FoldGPT tail
distillation: https://arxiv.org/abs/2407.00928
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from flexigpt.arch import get_blocks
from flexigpt.recover_spec import RecoverSpec
from flexigpt.recover_state import (CHECKPOINT_NAME, copy_into, load_checkpoint, load_trainable, save_checkpoint,
                                    save_trainable, trainable_state)

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_NAME", "RecoverSpec", "StepLog", "load_trainable", "recover", "save_trainable", "trainable_state"]

# Fields that may differ between a checkpoint and the run that resumes it.
_RESUME_FREE = ("checkpoint_every",)
_RESUME_ADDED = {"hidden_layers": "last"}  # spec fields added after checkpoints were written, as those ran


@dataclass(frozen=True)
class StepLog:
    """One optimizer step. ``loss`` is the objective averaged over the step's micro-batches
    (and processes); ``lr`` the rate used for this step; ``grad_norm`` the norm before clipping."""

    step: int
    loss: float
    lr: float
    tokens_seen: int
    elapsed_s: float
    grad_norm: float


def _windows_tensor(windows: Any, seq_len: int) -> torch.Tensor:
    ids = getattr(windows, "input_ids", windows)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype != torch.long or ids.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty (N, T) int64 tensor or flexigpt.data.Windows, got {type(ids).__name__}")
    if ids.shape[1] < seq_len:
        raise ValueError(f"windows have {ids.shape[1]} tokens, fewer than recover.seq_len={seq_len}")
    return ids[:, :seq_len]


def _digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()[:16]


def _permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _indices(seed: int, n: int, start: int, count: int, perms: dict[int, torch.Tensor]) -> torch.Tensor:
    """Window ids at positions start..start+count-1 of the seeded, epoch-wise shuffled stream."""
    out = []
    for pos in range(start, start + count):
        epoch = pos // n
        if epoch not in perms:
            perms.clear()  # keep only the current epoch's permutation
            perms[epoch] = _permutation(seed, epoch, n)
        out.append(perms[epoch][pos % n])
    return torch.stack(out)


def _output_hook(store: dict[tuple[str, int], torch.Tensor], key: tuple[str, int]):
    def hook(_module, _args, output):
        store[key] = output[0] if isinstance(output, (tuple, list)) else output

    return hook


def _hidden_error(s: torch.Tensor, t: torch.Tensor, *, per_token: bool) -> torch.Tensor:
    """Scale-free squared error of block outputs ``s`` against the teacher's ``t`` (B, T, D).

    ``per_token=False``: the MSE over every element divided by the teacher's mean square (the
    tail term as FoldGPT's cure was measured). ``per_token=True``: each token's squared error
    divided by its own teacher norm, averaged over tokens. The middle blocks of SmolLM2 carry a
    massive activation on the first token (about 22,500 against an RMS near 58), which would
    otherwise make the whole mean square and leave every other token's error a rounding error."""
    if not per_token:
        return F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-8)
    return ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-8)).mean()


def _hidden_pairs(student: Any, teacher: Any, layers: str) -> list[tuple[nn.Module, nn.Module]]:
    """(student block, teacher block) pairs whose outputs the hidden-state term matches."""
    if layers == "last":
        return [(student[-1], teacher[-1])]
    if len(student) != len(teacher):
        raise ValueError(f"recover.hidden_layers 'all' matches every block's output, so the model needs as many "
                         f"blocks as the original ({len(teacher)}); it has {len(student)} (use 'last', or a plan "
                         f"whose pruned blocks all become replacement slots)")
    return list(zip(student, teacher))


def _window_mask(windows: Any, ids: torch.Tensor) -> torch.Tensor | None:
    """The windows' loss mask cut like ``ids``, or ``None`` (every token is learned)."""
    mask = getattr(windows, "loss_mask", None)
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape[0] != ids.shape[0] \
            or mask.shape[1] < ids.shape[1]:
        raise ValueError(f"windows.loss_mask must be a bool tensor shaped like the windows {tuple(ids.shape)}, "
                         f"got {getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    return mask[:, : ids.shape[1]]


def _objective(model, teacher, batch, spec: RecoverSpec, tails: dict, autocast,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """The step's loss; with ``mask`` (B, T) the token and distillation terms count only the
    positions whose next token is marked (a batch with none marked contributes zero)."""
    logits = model(input_ids=batch, use_cache=False).logits.float()  # (B, T, V)
    loss = logits.new_zeros(())
    learn = None if mask is None else mask[:, 1:].to(logits.device)  # position t predicts token t + 1
    if spec.objective in ("lm", "mix"):
        if learn is None:
            loss = loss + F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        else:
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
            loss = loss + (nll * learn.flatten()).sum() / learn.sum().clamp_min(1)
    if spec.objective in ("distill", "mix"):
        with torch.no_grad(), autocast():
            t_logits = teacher(input_ids=batch, use_cache=False).logits.float()
        if spec.kd_weight > 0:
            temp = spec.kd_temperature
            if learn is None:
                kl = F.kl_div(
                    F.log_softmax(logits / temp, -1).flatten(0, 1),
                    F.log_softmax(t_logits / temp, -1).flatten(0, 1),
                    log_target=True, reduction="batchmean",  # mean over tokens
                )
            else:
                per_token = F.kl_div(F.log_softmax(logits[:, :-1] / temp, -1), F.log_softmax(t_logits[:, :-1] / temp, -1),
                                     log_target=True, reduction="none").sum(-1)
                kl = (per_token * learn).sum() / learn.sum().clamp_min(1)
            loss = loss + spec.kd_weight * kl * temp * temp
        if spec.hidden_weight > 0:
            terms = []
            for key in sorted(k for k in tails if k[0] == "student"):
                s, t = tails[key].float(), tails[("teacher", key[1])].float()  # (B, T, D)
                terms.append(_hidden_error(s, t, per_token=spec.hidden_layers == "all"))
            loss = loss + spec.hidden_weight * torch.stack(terms).mean()
    return loss


def recover(
    model: nn.Module,
    windows: Any,
    spec: RecoverSpec = RecoverSpec(),
    *,
    teacher: nn.Module | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = False,
    accelerator: Any = None,
) -> Iterator[StepLog]:
    """Train the model's ``requires_grad`` parameters; yield a ``StepLog`` per optimizer step.

    Args:
        model: the model to heal, in place. Trainable parameters are upcast to fp32; a bf16/fp16
            frozen base then needs autocast, i.e. an ``accelerator`` with mixed precision.
        windows: ``(N, T)`` int64 token windows or ``flexigpt.data.Windows`` (whose ``loss_mask``,
            when set, limits the loss to the marked tokens).
        spec: budget, optimiser and objective.
        teacher: the original model, required for ``distill``/``mix``; never changed.
        checkpoint_dir: where ``recover-checkpoint.pt`` goes (only the main process writes it).
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one.
        should_stop: polled after every step; ``True`` saves a checkpoint and ends the loop.
        progress: show a tqdm bar.
        accelerator: an ``accelerate.Accelerator``; each process then takes its own slice of
            every global micro-batch, gradients are all-reduced, and autocast follows its
            mixed-precision setting.

    Raises:
        ValueError: no trainable parameters, a missing teacher, bad windows, or a corrupt or
            mismatched checkpoint.
    """
    ids = _windows_tensor(windows, spec.seq_len)
    mask = _window_mask(windows, ids)
    if spec.objective != "lm" and teacher is None:
        raise ValueError(f"recover.objective {spec.objective!r} needs the original model as teacher=")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True); attach adapters or unfreeze norms first")
    acc = accelerator
    world, rank, main = (acc.num_processes, acc.process_index, acc.is_main_process) if acc else (1, 0, True)
    device = acc.device if acc else next(iter(params.values())).device
    for name, p in params.items():  # fp32 master copies: bf16 updates of tiny gates round to zero
        if p.dtype != torch.float32:
            p.data = p.data.float()
    if acc:
        model.to(device)
        if teacher is not None:
            teacher.to(device)
    # Matrices (LoRA factors) decay at the base rate. Vectors (output-norm gammas and scales,
    # norms, biases) are gates: no decay, and their own rate, since Adam moves a parameter by
    # about one learning rate per step and a 1e-3 gate could not open in a short run otherwise.
    decay = [p for p in params.values() if p.ndim >= 2]
    gates = [p for p in params.values() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay, "lr": spec.lr},
         {"params": gates, "weight_decay": 0.0, "lr": spec.lr * spec.gate_lr_scale}],
        lr=spec.lr, betas=spec.betas,
    )
    # transformers is heavy: loaded when a recovery starts
    from transformers import get_cosine_schedule_with_warmup

    sched = get_cosine_schedule_with_warmup(opt, spec.warmup_steps, spec.steps)
    data = _digest(ids) + ("" if mask is None else "+mask:" + _digest(mask.to(torch.uint8)))
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, cursor, elapsed0 = 0, 0, 0.0
    if resume and (ckpt_dir / CHECKPOINT_NAME).is_file():
        state = load_checkpoint(ckpt_dir / CHECKPOINT_NAME, spec.to_dict(), data, world, _RESUME_FREE, _RESUME_ADDED)
        copy_into(params, state["trainable"], f"recovery checkpoint {str(ckpt_dir / CHECKPOINT_NAME)!r}")
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if state.get("scaler") and acc is not None and getattr(acc, "scaler", None) is not None:
            acc.scaler.load_state_dict(state["scaler"])  # fp16 loss scale
        start, cursor, elapsed0 = state["step"], state["cursor"], state["elapsed_s"]
        log.info("resuming recovery at step %d of %d", start, spec.steps)
    elif resume:
        log.warning("no recovery checkpoint in %s; starting from step 0", ckpt_dir)
    train_model = model
    if acc:
        train_model, opt = acc.prepare(model, opt)  # the scheduler is stepped by hand, once per step
    autocast = acc.autocast if acc else contextlib.nullcontext
    tails: dict[tuple[str, int], torch.Tensor] = {}
    hooks = []
    if spec.objective != "lm" and spec.hidden_weight > 0:
        pairs = _hidden_pairs(get_blocks(model), get_blocks(teacher), spec.hidden_layers)
        hooks = [h for i, (s, t) in enumerate(pairs)
                 for h in (s.register_forward_hook(_output_hook(tails, ("student", i))),
                           t.register_forward_hook(_output_hook(tails, ("teacher", i))))]
    was_training = model.training
    model.train()
    if teacher is not None:
        teacher.eval()
    n, seq = ids.shape
    per_step = spec.batch_size * spec.grad_accum * world
    perms: dict[int, torch.Tensor] = {}

    def checkpoint(step: int) -> None:
        if ckpt_dir is None or not main:
            return
        save_checkpoint(ckpt_dir, {
            "step": step, "spec": spec.to_dict(), "data": data,
            "world_size": world, "cursor": cursor, "epoch": cursor // n,
            "permutation": _permutation(spec.seed, cursor // n, n),
            "trainable": {k: v.detach().cpu().clone() for k, v in params.items()},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(), "elapsed_s": elapsed0 + time.perf_counter() - t0,
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "scaler": acc.scaler.state_dict() if acc is not None and getattr(acc, "scaler", None) is not None else {},
        })

    bar = tqdm(total=spec.steps, initial=start, disable=not progress, desc="Recovering")
    t0 = time.perf_counter()
    try:
        for step in range(start + 1, spec.steps + 1):
            lr = float(sched.get_last_lr()[0])
            total = torch.zeros((), device=device)
            for micro in range(spec.grad_accum):
                first = cursor + (micro * world + rank) * spec.batch_size
                picked = _indices(spec.seed, n, first, spec.batch_size, perms)
                batch = ids[picked].to(device)
                sync = acc.no_sync(train_model) if acc and micro < spec.grad_accum - 1 else contextlib.nullcontext()
                with sync:
                    loss = _objective(train_model, teacher, batch, spec, tails, autocast,
                                      None if mask is None else mask[picked]) / spec.grad_accum
                    acc.backward(loss) if acc else loss.backward()
                total += loss.detach()
            cursor += per_step
            max_norm = spec.clip if spec.clip is not None else float("inf")
            clip = acc.clip_grad_norm_ if acc else torch.nn.utils.clip_grad_norm_
            grad_norm = float(clip(list(params.values()), max_norm))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if acc:
                total = acc.reduce(total, reduction="mean")
            record = StepLog(step=step, loss=float(total), lr=lr, tokens_seen=step * per_step * seq,
                             elapsed_s=elapsed0 + time.perf_counter() - t0, grad_norm=grad_norm)
            saved = spec.checkpoint_every and step % spec.checkpoint_every == 0 or step == spec.steps
            if saved:
                checkpoint(step)
            bar.update(1)
            bar.set_postfix(loss=f"{record.loss:.4f}")
            yield record
            stop = bool(should_stop()) if should_stop is not None else False
            if acc:  # every process stops at the same step
                stop = bool(acc.reduce(torch.tensor(float(stop), device=device), reduction="sum") > 0)
            if stop and step < spec.steps:
                if not saved:
                    checkpoint(step)
                log.info("recovery stopped at step %d of %d", step, spec.steps)
                return
    finally:
        bar.close()
        for h in hooks:
            h.remove()
        model.train(was_training)
