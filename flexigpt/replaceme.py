"""Which linear map stands in for a span of blocks? Training-free span replacement (ReplaceMe).

A *span* ``(start, end)`` is a contiguous run of 0-based block ids, ``end`` exclusive. ReplaceMe
deletes the span and fits one ``d x d`` matrix ``T`` so that the block before the span, with its
MLP output ``M`` multiplied by ``T``, lands where the span used to end:

    (h_s - M) + M T  ~  h_e,        T = (M^T M + alpha I)^{-1} (M^T (h_e - h_s + M) + alpha I)

where ``h_s`` is the state leaving block ``start - 1`` and ``h_e`` the state leaving block
``end - 1``, over every calibration token. Both Gram products are accumulated in float64. ``T``
is then folded into the MLP output projection of block ``start - 1`` (``nn.Linear`` stores
``W`` as ``(out, in)`` and computes ``x W^T``, so ``M T = x (T^T W)^T``: ``W <- T^T W``; a bias
``b`` becomes ``b T``). The result has exactly the parameters of a plain drop of the span and is
an ordinary checkpoint of the same architecture.

A span starting at block 0 is refused: there is no block before it to fold into. Folding ``T``
into the token embedding instead would change the LM head too wherever embeddings are tied (the
embedded SmolLM2 ties them), so the export would need an extra untied matrix and would no
longer store the same parameters as a plain drop. Blocks with a post-norm (OPT-350m style,
``do_layer_norm_before=False``) are refused too: their MLP output is normalised after the
residual sum, so the fitted map would not be the one applied.

Several spans are fitted one after another in ascending order, each on the model with the
earlier spans already cut (so a later fit sees, and corrects for, the earlier replacements).

Paper: ReplaceMe (Shopkhoev et al., NeurIPS 2025), https://arxiv.org/abs/2505.02819
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from flexigpt.arch import SUPPORTED, ArchSpec, arch_of, get_blocks, get_submodule, set_blocks
from flexigpt.residual_states import block_states, window_ids
from flexigpt.spans import check_spans, lowest_spans
from flexigpt.slots import structural_copy

log = logging.getLogger(__name__)

__all__ = ["SpanFit", "check_spans", "fit_span", "fit_transform", "fold_transform_", "replaceme",
           "lowest_distance_spans"]

Span = tuple[int, int]


@dataclass(frozen=True)
class SpanFit:
    """One fitted span.

    Attributes:
        span: the span in the base model's block ids.
        transform: the fitted ``(d, d)`` float64 map ``T``.
        tokens: calibration tokens it was fitted on.
        error_vs_drop: squared error of ``(h_s - M) + M T`` against ``h_e``, divided by that of a
            plain drop (``T = I``, i.e. ``h_s`` against ``h_e``); below 1 means the map helps.
    """

    span: Span
    transform: torch.Tensor
    tokens: int
    error_vs_drop: float


def _down_proj(block: nn.Module, spec: ArchSpec) -> nn.Linear:
    linear = get_submodule(block, spec.out_linears[1])
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{spec.out_linears[1]} of this block is a {type(linear).__name__}, not a plain nn.Linear; "
                         "fold the map into a base model, before adapters are attached")
    return linear


def _check_prenorm(model: nn.Module) -> None:
    if getattr(model.config, "do_layer_norm_before", True) is False:
        raise ValueError("this model normalises after the residual sum (do_layer_norm_before=False); "
                         "ReplaceMe needs pre-norm blocks whose MLP output is added to the residual stream")


@torch.no_grad()
def _accumulate(model: nn.Module, span: Span, ids: torch.Tensor, batch_size: int):
    """``M^T M``, ``M^T Y``, ``M^T M`` trace terms and ``sum |Y - M|^2`` in float64 over all tokens."""
    start, end = span
    blocks = get_blocks(model)
    down = _down_proj(blocks[start - 1], arch_of(model))
    d = down.out_features
    mtm = torch.zeros(d, d, dtype=torch.float64)
    mty = torch.zeros(d, d, dtype=torch.float64)
    yty, drop_err, tokens = 0.0, 0.0, 0
    for first in range(0, ids.shape[0], batch_size):
        st = block_states(model, ids[first : first + batch_size], outputs=(start - 1, end - 1), modules={"m": down})
        m = st.modules["m"].reshape(-1, d).double().cpu()
        h_s = st.outputs[start - 1].reshape(-1, d).double().cpu()
        h_e = st.outputs[end - 1].reshape(-1, d).double().cpu()
        y = h_e - h_s + m
        mtm += m.T @ m
        mty += m.T @ y
        yty += float((y * y).sum())
        drop_err += float(((h_e - h_s) ** 2).sum())
        tokens += m.shape[0]
    return mtm, mty, yty, drop_err, tokens


def _solve(mtm: torch.Tensor, mty: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin ||M T - Y||^2 + ridge ||T - I||^2``: the ridge pulls ``T`` toward the identity, that
    is toward the plain drop of the span, never toward removing the MLP output (``T = 0``)."""
    eye = torch.eye(mtm.shape[0], dtype=torch.float64)
    a, rhs = mtm + ridge * eye, mty + ridge * eye
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    # Singular Gram matrix (fewer tokens than dimensions, dead MLP channels): minimum-norm solution.
    log.warning("M^T M is singular at ridge %g; using the pseudo-inverse (consider a ridge > 0)", ridge)
    return torch.linalg.pinv(a, hermitian=True) @ rhs


def _check_fit_args(ridge: float, batch_size: int, name: str = "ridge") -> None:
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {ridge!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def fit_span(model: nn.Module, span: Sequence[int], windows: Any, *, ridge: float = 0.0, ridge_scale: float = 0.0,
             batch_size: int = 8) -> SpanFit:
    """Fit ``T`` for one span of ``model`` on calibration ``windows`` (see the module docstring).

    Args:
        model: a supported pre-norm ``*ForCausalLM``; it is not modified.
        span: ``(start, end)`` with ``1 <= start < end <= L``.
        windows: ``flexigpt.data.Windows`` (use the train split) or an ``(N, T)`` id tensor.
        ridge: ``alpha >= 0`` added to the diagonal of ``M^T M``; it pulls ``T`` toward the identity.
        ridge_scale: adds ``ridge_scale`` x the mean diagonal of ``M^T M`` to ``alpha`` (scale-free).
        batch_size: windows per forward pass.

    Raises:
        ValueError: a bad span, ridge, batch size or windows.
    """
    _check_fit_args(ridge, batch_size)
    _check_fit_args(ridge_scale, batch_size, "ridge_scale")
    _check_prenorm(model)
    (s, e), = check_spans([span], len(get_blocks(model)))
    mtm, mty, yty, drop_err, tokens = _accumulate(model, (s, e), window_ids(windows), batch_size)
    alpha = float(ridge) + float(ridge_scale) * float(mtm.diagonal().mean())
    t = _solve(mtm, mty, alpha)
    err = yty - 2 * float((t * mty).sum()) + float((t * (mtm @ t)).sum())
    return SpanFit(span=(s, e), transform=t, tokens=tokens, error_vs_drop=max(err, 0.0) / max(drop_err, 1e-300))


def fit_transform(model: nn.Module, span: Sequence[int], windows: Any, *, ridge: float = 0.0,
                  batch_size: int = 8) -> torch.Tensor:
    """The fitted ``(d, d)`` float64 map ``T`` of one span (``fit_span(...).transform``)."""
    return fit_span(model, span, windows, ridge=ridge, batch_size=batch_size).transform


@torch.no_grad()
def fold_transform_(block: nn.Module, transform: torch.Tensor, spec: ArchSpec | None = None) -> nn.Module:
    """Fold ``T`` into ``block``'s MLP output projection: ``W <- T^T W``, ``b <- b T``.

    The projection gets new Parameter objects (the old tensors are never written), so this is
    safe on a ``structural_copy`` that shares its tensors with a base model. Computed in float64
    and stored in the weight's dtype.

    Args:
        block: one decoder block (modified in place; returned for chaining).
        transform: ``(d, d)`` map, ``d`` the hidden size.
        spec: the block's ``ArchSpec`` (default: the first supported layout whose MLP output
            projection the block has).

    Raises:
        ValueError: a transform of the wrong shape, or a projection that is not a plain ``nn.Linear``.
    """
    if spec is None:
        spec = next((s for s in SUPPORTED if _has(block, s.out_linears[1])), None)
        if spec is None:
            raise ValueError(f"{type(block).__name__} has no MLP output projection of a supported architecture")
    down = _down_proj(block, spec)
    d = down.out_features
    if not isinstance(transform, torch.Tensor) or tuple(transform.shape) != (d, d):
        shape = tuple(transform.shape) if isinstance(transform, torch.Tensor) else type(transform).__name__
        raise ValueError(f"transform must be a ({d}, {d}) tensor for hidden size {d}, got {shape}")
    t = transform.to(device=down.weight.device, dtype=torch.float64)
    weight = (t.T @ down.weight.double()).to(down.weight.dtype)
    down.weight = nn.Parameter(weight, requires_grad=down.weight.requires_grad)
    if down.bias is not None:
        bias = (down.bias.double() @ t).to(down.bias.dtype)
        down.bias = nn.Parameter(bias, requires_grad=down.bias.requires_grad)
    return block


def _has(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
        return True
    except AttributeError:
        return False


def replaceme(model: nn.Module, spans: Sequence[Sequence[int]], windows: Any, *, ridge: float = 0.0,
              ridge_scale: float = 0.0, batch_size: int = 8,
              progress: Callable[[float, str], None] | None = None) -> nn.Module:
    """A NEW model with every span replaced by a fitted linear map folded into the block before it.

    The input model is not modified: the result is a ``structural_copy`` (shared tensors) whose
    folded projections get new tensors and whose span blocks are removed (``set_blocks``
    renumbers ``layer_idx`` and ``num_hidden_layers``). Spans are fitted in ascending order, each
    on the model with the earlier spans already cut. The fits are kept on the result as
    ``model.replaceme_fits`` (a tuple of ``SpanFit`` with base-model block ids).

    Args:
        model: a supported pre-norm ``*ForCausalLM``.
        spans: ``[start, end)`` pairs (see ``check_spans``; a span may not start at block 0).
        windows: calibration windows (train split) or an ``(N, T)`` id tensor.
        ridge: ``alpha >= 0`` for every fit (toward the identity, the plain drop).
        ridge_scale: a scale-free part of ``alpha``: this many times the mean diagonal of ``M^T M``.
        batch_size: windows per forward pass.
        progress: ``progress(fraction, message)`` after each span.

    Raises:
        ValueError: bad spans (naming the span and the valid range), ridge, batch size or windows.
    """
    _check_fit_args(ridge, batch_size)
    _check_fit_args(ridge_scale, batch_size, "ridge_scale")
    _check_prenorm(model)
    spec = arch_of(model)
    L = len(get_blocks(model))
    spans = check_spans(spans, L)
    ids = window_ids(windows)
    new = structural_copy(model)
    types = getattr(new.config, "layer_types", None)
    types = list(types) if isinstance(types, (list, tuple)) else None
    sources = list(range(L))  # base block id of each current slot
    for b, src in zip(get_blocks(new), sources):
        b._flexigpt_source = src
    fits: list[SpanFit] = []
    for n, (start, end) in enumerate(spans):
        s, e = sources.index(start), sources.index(end - 1) + 1  # positions in the already-cut model
        fit = fit_span(new, (s, e), ids, ridge=ridge, ridge_scale=ridge_scale, batch_size=batch_size)
        blocks = list(get_blocks(new))
        fold_transform_(blocks[s - 1], fit.transform, spec)
        kept = blocks[:s] + blocks[e:]
        sources = sources[:s] + sources[e:]
        if types is not None:  # set_blocks re-slices layer_types by base block id
            new.config.layer_types = list(types)
        set_blocks(new, kept)
        fits.append(SpanFit(span=(start, end), transform=fit.transform, tokens=fit.tokens,
                            error_vs_drop=fit.error_vs_drop))
        log.info("replaceme span [%d, %d): %d tokens, error %.3f of a plain drop", start, end, fit.tokens,
                 fit.error_vs_drop)
        if progress is not None:
            progress((n + 1) / len(spans), f"fitted span [{start}, {end})")
    new.replaceme_fits = tuple(fits)
    return new.eval()


def _distance_table(distances: Any) -> torch.Tensor:
    """``(max_span, L)`` angular distances from BlockScores, an analysis (object or dict), or a tensor."""
    if hasattr(distances, "angular_distance") and isinstance(distances.angular_distance, torch.Tensor):
        return distances.angular_distance.float()
    payload = distances.to_dict() if hasattr(distances, "to_dict") and not isinstance(distances, dict) else distances
    if isinstance(payload, dict) and "angular_distance" in payload:
        rows = payload["angular_distance"]["values"]
        L = len(rows[0])
        table = torch.full((len(rows), L), float("nan"))
        for n, row in enumerate(rows):
            table[n, : len(row)] = torch.tensor([float("nan") if v is None else float(v) for v in row])
        return table
    if isinstance(distances, torch.Tensor) and distances.ndim == 2:
        return distances.float()
    raise ValueError("distances must be BlockScores, an analysis (or its dict), a (max_span, L) tensor, "
                     f"or a model with windows; got {type(distances).__name__}")


def lowest_distance_spans(distances_or_model: Any, length: int, count: int = 1, *, windows: Any = None,
                          allow_first: bool = False) -> list[Span]:
    """The ``count`` non-overlapping spans of ``length`` blocks with the lowest angular distance.

    The angular distance of span ``(l, l + n)`` is ``arccos(cos(x_l, x_{l+n})) / pi`` between the
    state entering block ``l`` and the one leaving block ``l + n - 1`` (``flexigpt.scoring``).
    Spans are taken greedily, lowest first, skipping any that overlap an earlier pick.

    Args:
        distances_or_model: ``BlockScores``, an ``Analysis`` or its dict, a ``(max_span, L)`` tensor,
            or a model (then ``windows`` are scored with ``flexigpt.scoring.score_blocks``).
        length: blocks per span, ``1..L-1`` (and within the table's ``max_span``).
        count: spans to pick (>= 1).
        windows: calibration windows, only when a model is given.
        allow_first: allow spans starting at block 0 (not for ReplaceMe).

    Returns:
        Sorted ``(start, end)`` spans.

    Raises:
        ValueError: ``length`` or ``count`` out of range, or not enough non-overlapping spans.
    """
    if isinstance(distances_or_model, nn.Module):
        if windows is None:
            raise ValueError("windows are required to score a model's spans")
        # imported on first use: keeps importing this module light
        from flexigpt.scoring import score_blocks

        L = len(get_blocks(distances_or_model))
        if not isinstance(length, int) or not 1 <= length < L:
            raise ValueError(f"span length {length!r} is outside 1..{L - 1}")
        distances_or_model = score_blocks(distances_or_model, window_ids(windows), max_span=length)
    table = _distance_table(distances_or_model)
    max_span, L = table.shape
    if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= min(max_span, L - 1):
        raise ValueError(f"span length {length!r} is outside 1..{min(max_span, L - 1)}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    row = [float(v) for v in table[length - 1].tolist()]
    return lowest_spans(row, length, L, count, allow_first=allow_first)
