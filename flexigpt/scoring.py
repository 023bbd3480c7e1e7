"""Which blocks matter least? Block scores from one pass over calibration windows.

One forward pass with hooks on the decoder blocks captures, for every token, the L+1 residual
states (the input of block 0 and the output of every block). Forward hooks see the true block
input and output; ``output_hidden_states`` would not, because its last entry is taken after the
final norm. Per token we normalise the states and form their (L+1) x (L+1) cosine matrix with one
batched matmul; every score below is a (masked) token mean of an entry of that matrix:

* Block Influence (ShortGPT, https://arxiv.org/abs/2403.03853): ``BI_i = 1 - mean cos(x_i, x_{i+1})``.
* Angular distance of a span of n blocks (Gromov et al., "The Unreasonable Ineffectiveness of the
  Deeper Layers", https://arxiv.org/abs/2403.17887): ``arccos(cos(x_l, x_{l+n})) / pi``.
* Block-to-block similarity: mean cosine between the outputs of blocks a and b.

Optionally, the perplexity when each block alone is removed (SLEB, https://arxiv.org/abs/2402.09025;
Shortened LLaMA) on a small sample, by running the block stack without it (no model copy).

All math runs in float32; padding positions (``attention_mask == 0``) are excluded.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from flexigpt.arch import get_blocks

__all__ = ["BlockScores", "PplDrop", "score_blocks", "ppl_drop"]


@dataclass(frozen=True)
class BlockScores:
    """Scores of every block from one calibration pass (0-based block ids).

    Attributes:
        block_influence: ``(L,)`` BI; low = the block barely rotates the residual stream.
        angular_distance: ``(max_span, L)``; row ``n-1``, column ``l`` is the span starting at block
            ``l`` covering n blocks; entries past the last block are NaN.
        similarity: ``(L, L)`` mean token cosine between block outputs.
        tokens: number of (unmasked) tokens averaged over.
    """

    block_influence: torch.Tensor
    angular_distance: torch.Tensor
    similarity: torch.Tensor
    tokens: int

    @property
    def num_blocks(self) -> int:
        return int(self.block_influence.shape[0])

    def prune_order(self) -> list[int]:
        """Block ids sorted from most to least removable (lowest BI first)."""
        return [int(i) for i in torch.argsort(self.block_influence, stable=True)]

    def angular_rows(self) -> list[list[float]]:
        """Angular distance as ragged rows: row ``n-1`` has ``L-n+1`` entries."""
        L = self.num_blocks
        return [self.angular_distance[n, : L - n].tolist() for n in range(self.angular_distance.shape[0])]

    def to_frame(self):
        """One row per block: BI, its rank (0 = most removable) and the single-block angular distance."""
        # pandas is heavy: imported on first use
        import pandas as pd

        order = self.prune_order()
        rank = {b: r for r, b in enumerate(order)}
        return pd.DataFrame(
            {
                "block": list(range(self.num_blocks)),
                "block_influence": self.block_influence.tolist(),
                "prune_rank": [rank[b] for b in range(self.num_blocks)],
                "angular_distance": self.angular_distance[0].tolist(),
            }
        )


@dataclass(frozen=True)
class PplDrop:
    """Perplexity with each block removed alone, on a small sample."""

    samples: int
    seq_len: int
    tokens: int
    base_ppl: float
    ppl: list[float] = field(default_factory=list)
    nll_increase: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "samples": self.samples, "seq_len": self.seq_len, "tokens": self.tokens,
            "base_ppl": self.base_ppl, "ppl": list(self.ppl), "nll_increase": list(self.nll_increase),
        }


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, seq) tensor, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    return attention_mask.bool()


@torch.no_grad()
def score_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_span: int | None = None,
    batch_size: int = 8,
    progress: Callable[[float, str], None] | None = None,
    show_progress: bool = False,
) -> BlockScores:
    """BI, span angular distances and block similarity from one pass over ``input_ids``.

    Args:
        model: a supported ``*ForCausalLM`` (see ``flexigpt.arch``).
        input_ids: ``(N, T)`` calibration windows.
        attention_mask: optional ``(N, T)``; zero positions (padding) are not counted.
        max_span: largest span n of the angular distance, ``1..L`` (default L).
        batch_size: windows per forward pass.
        progress: ``progress(fraction, message)`` callback.
        show_progress: show a tqdm bar.

    Returns:
        BlockScores.

    Raises:
        ValueError: bad shapes, ``max_span`` out of range, or no unmasked token.
    """
    mask = _check_inputs(input_ids, attention_mask)
    blocks = get_blocks(model)
    L = len(blocks)
    max_span = L if max_span is None else max_span
    if not isinstance(max_span, int) or not 1 <= max_span <= L:
        raise ValueError(f"max_span {max_span!r} is outside 1..{L}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = next(model.parameters()).device
    states: list[torch.Tensor | None] = [None] * (L + 1)

    def unit(x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> unit rows in float32
        x = x.float()
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def hook(i: int):
        def fn(module, args, kwargs, out):
            if i == 0:
                states[0] = unit(args[0] if args else kwargs["hidden_states"])
            states[i + 1] = unit(out[0] if isinstance(out, (tuple, list)) else out)

        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    cos_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    ang_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    n_tok = 0
    # Run the backbone only: the final norm and the LM head (a fifth of SmolLM2's compute) are not needed.
    backbone = getattr(model, "base_model", model)
    was_training = model.training
    model.eval()
    n = input_ids.shape[0]
    steps = range(0, n, batch_size)
    try:
        for step, start in enumerate(tqdm(steps, desc="Scoring blocks", disable=not show_progress)):
            ids = input_ids[start : start + batch_size].to(device)
            m = mask[start : start + batch_size].to(device)
            # An all-ones mask is passed as None so attention keeps its fast causal path.
            backbone(input_ids=ids, attention_mask=None if bool(m.all()) else m.long(), use_cache=False)
            u = torch.stack(states, dim=2)[m]  # (tokens, L+1, d) unmasked tokens only
            cos = (u @ u.transpose(-2, -1)).clamp_(-1.0, 1.0)  # (tokens, L+1, L+1)
            cos_sum += cos.sum(0).double().cpu()
            ang_sum += torch.arccos(cos).sum(0).double().cpu()  # clamped first: acos of 1+eps is NaN
            n_tok += int(u.shape[0])
            states[:] = [None] * (L + 1)
            if progress is not None:
                progress((step + 1) / len(steps), f"scored {min(start + batch_size, n)}/{n} windows")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_tok == 0:
        raise ValueError("attention_mask masks every token; nothing to score")
    cos_mean = (cos_sum / n_tok).float()
    ang_mean = (ang_sum / n_tok / math.pi).float()
    idx = torch.arange(L)
    bi = 1.0 - cos_mean[idx, idx + 1]
    spans = torch.full((max_span, L), float("nan"))
    for span in range(1, max_span + 1):
        starts = torch.arange(L - span + 1)
        spans[span - 1, : L - span + 1] = ang_mean[starts, starts + span]
    return BlockScores(block_influence=bi, angular_distance=spans, similarity=cos_mean[1:, 1:].clone(), tokens=n_tok)


class _Skip(nn.Module):
    """Stands in for a removed block: returns its input hidden states unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@torch.no_grad()
def _nll(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> tuple[float, int]:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        target = ids[:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += int(target.numel())
    return total, count


@torch.no_grad()
def ppl_drop(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 4,
    progress: Callable[[float, str], None] | None = None,
    show_progress: bool = False,
) -> PplDrop:
    """Perplexity and NLL increase (nats/token) when each block alone is removed.

    Each block is swapped out of the block list for a pass-through module and put back
    (always, even on error); the model is never copied.

    Args:
        model: a supported ``*ForCausalLM``.
        input_ids: ``(k, T)`` windows (a small sample: the cost is L + 1 passes).

    Returns:
        PplDrop with ``ppl[i]`` the perplexity without block i.
    """
    _check_inputs(input_ids, None)
    blocks = get_blocks(model)
    L = len(blocks)
    was_training = model.training
    model.eval()
    try:
        base_total, count = _nll(model, input_ids, batch_size)
        ppl, inc = [], []
        for i in tqdm(range(L), desc="Removing blocks", disable=not show_progress):
            original = blocks[i]
            blocks[i] = _Skip()
            try:
                total, _ = _nll(model, input_ids, batch_size)
            finally:
                blocks[i] = original
            ppl.append(math.exp(min(total / count, 700.0)))
            inc.append((total - base_total) / count)
            if progress is not None:
                progress((i + 1) / L, f"removed block {i}")
    finally:
        model.train(was_training)
    return PplDrop(
        samples=int(input_ids.shape[0]), seq_len=int(input_ids.shape[1]), tokens=count,
        base_ppl=math.exp(base_total / count), ppl=ppl, nll_increase=inc,
    )
