"""What enters and leaves each block? Residual states captured with hooks, and blocks re-run on them.

Span replacement (``flexigpt.replaceme``, ``flexigpt.streamline``) and iterative selection
(``flexigpt.selection``) all need the residual stream at block boundaries, and some need to run a
block (or the rest of the stack) again on a stored state. Forward pre-hooks with ``with_kwargs``
see exactly the arguments the model passes to each decoder block (attention mask, rotary
position embeddings, position ids...), so a block re-run with ``run_block`` is called the same way
the model calls it, whatever the installed transformers version computes for them. A forward pass
stops as soon as the last requested state is captured.

Captures run under ``torch.no_grad`` (not ``inference_mode``): the stored states are ordinary
tensors, so a block can be trained on them.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexigpt.arch import arch_of, get_blocks

log = logging.getLogger(__name__)

__all__ = ["BlockStates", "window_ids", "block_states", "run_block", "head_logits", "head_nll"]


@dataclass
class BlockStates:
    """States of one batch of windows.

    Attributes:
        inputs: block id -> hidden state entering that block ``(B, T, d)``.
        kwargs: block id -> the keyword arguments the model passed to that block.
        outputs: block id -> hidden state leaving that block.
        modules: name -> output of an extra hooked submodule.
    """

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, torch.Tensor] = field(default_factory=dict)


class _Done(Exception):
    """Raised by a hook once every requested state is captured, to skip the rest of the pass."""


def window_ids(windows: Any) -> torch.Tensor:
    """The ``(N, T)`` token ids of ``flexigpt.data.Windows`` or of a tensor.

    Raises:
        ValueError: not a non-empty 2-D integer tensor with at least 2 tokens per window.
    """
    ids = getattr(windows, "input_ids", windows)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2 \
            or ids.dtype.is_floating_point:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"windows must be flexigpt.data.Windows or a non-empty (N, T>=2) integer tensor, got {shape}")
    return ids


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _hidden_arg(args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict[str, Any]]:
    if args:
        return args[0], dict(kwargs)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), rest


@torch.no_grad()
def block_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    inputs: Iterable[int] = (),
    outputs: Iterable[int] = (),
    modules: Mapping[str, nn.Module] | None = None,
    stop: bool = True,
) -> BlockStates:
    """Run ``model`` on one batch and capture block inputs, outputs and submodule outputs.

    Args:
        model: a supported ``*ForCausalLM``.
        input_ids: ``(B, T)`` token ids (no padding).
        inputs: block ids whose input state and call arguments are captured.
        outputs: block ids whose output state is captured.
        modules: extra submodules (any depth) whose output is captured, by name.
        stop: end the pass after the last captured block instead of running the whole model.

    Returns:
        BlockStates.

    Raises:
        ValueError: a block id outside ``0..L-1``.
    """
    blocks = get_blocks(model)
    L = len(blocks)
    inputs, outputs, modules = sorted(set(inputs)), sorted(set(outputs)), dict(modules or {})
    for i in inputs + outputs:
        if not isinstance(i, int) or not 0 <= i < L:
            raise ValueError(f"block id {i!r} is outside 0..{L - 1}")
    last = max(inputs + outputs, default=L - 1)
    states = BlockStates()
    handles = []

    def pre_hook(i: int):
        def fn(module, args, kwargs):
            states.inputs[i], states.kwargs[i] = _hidden_arg(args, kwargs)
        return fn

    def post_hook(i: int):
        def fn(module, args, kwargs, out):
            if i in outputs:
                states.outputs[i] = _first(out)
            if stop and i == last:
                raise _Done
        return fn

    def module_hook(name: str):
        def fn(module, args, out):
            states.modules[name] = _first(out)
        return fn

    was_training = model.training
    model.eval()
    try:
        for i in inputs:
            handles.append(blocks[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        for i in sorted(set(outputs) | {last}):
            handles.append(blocks[i].register_forward_hook(post_hook(i), with_kwargs=True))
        for name, module in modules.items():
            handles.append(module.register_forward_hook(module_hook(name)))
        device = next(model.parameters()).device
        backbone = getattr(model, "base_model", model)
        try:
            backbone(input_ids=input_ids.to(device), use_cache=False)
        except _Done:
            pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return states


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """Call ``block`` on ``hidden`` with the arguments the model passed it; returns the output state."""
    return _first(block(hidden, **kwargs))


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the state leaving the last block: final norm (and OPT's output projection), LM head."""
    spec = arch_of(model)
    parent_path, _, name = spec.final_norm.rpartition(".")
    parent = model.get_submodule(parent_path)
    norm = getattr(parent, name, None)
    if norm is not None:
        hidden = norm(hidden)
    project_out = getattr(parent, "project_out", None)  # OPT models whose word_embed_proj_dim != hidden
    if project_out is not None:
        hidden = project_out(hidden)
    return model.get_output_embeddings()(hidden)


def head_nll(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood (nats) of ``input_ids`` given the last block's output."""
    logits = head_logits(model, hidden)[:, :-1].float()
    target = input_ids[:, 1:].to(logits.device)
    return float(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
