"""The plan's settings objects: the per-slot adapter and the extension layout."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flexigpt.validate import MAX_RANK, check_bool, check_float, check_int

__all__ = ["ADAPTER_INITS", "AdapterSpec", "ExtendSpec", "NoteValue"]

ADAPTER_INITS = ("svd", "zeros", "whitened")
NoteValue = str | int | float | bool | None


@dataclass(frozen=True)
class AdapterSpec:
    """The per-slot parameters of replacement (and extension) slots.

    Attributes:
        rank: LoRA rank; each matrix's rank is capped at ``min(d_in, d_out)`` at build time.
        targets: short matrix names (``q_proj``...); empty = every linear of the architecture.
        init: ``whitened`` (the default: the fit of ``W_pruned - W_donor`` weighted by the pruned
            block's calibration inputs, so it reproduces the block's outputs rather than its
            weights, plus output-norm scales set in closed form; needs calibration windows at
            build time; plan format 3), ``svd`` (the paper's truncated SVD of
            ``W_pruned - W_donor``, singular values on the output side, output norms at
            ``out_norm_scale``) or ``zeros`` (standard LoRA: output-side factor zero). Extension
            copies always use ``zeros``.
        out_norm: ``scale`` (the default: a learnable per-feature scale vector; linear, so a
            merged export can fold it into the out linears) or ``layernorm`` (the paper's output
            feature normalisation: a LayerNorm on the attention and MLP outputs with a tiny
            gamma; it gives every token an update of the same size, which generalises worse).
            Measured in bench/quality.py (bench/RESULTS.md): whitened + scale beats svd +
            layernorm in-domain, on text of another domain and at the start.
        out_norm_scale: the starting gamma / scale; small, so a slot starts near the identity.
        train_prenorms: whether recovery trains the slot's own pre-norms (for ``foldgpt``: every
            slot's pre-norms, the only parameters it trains).
        align: relabel each donor's neurons and heads to line up with the pruned block before
            the SVD (``flexigpt.align``); the adapter is folded back, so the slot still runs
            the donor's tensors unchanged. A weight-space initialisation: with
            ``init="whitened"`` it selects ``init="svd"``; ``zeros`` is refused. Plan format 2.
    """

    rank: int = 8
    targets: tuple[str, ...] = ()
    init: Literal["svd", "zeros", "whitened"] = "whitened"
    out_norm: Literal["layernorm", "scale"] = "scale"
    out_norm_scale: float = 1e-3
    train_prenorms: bool = True
    align: bool = False

    def __post_init__(self) -> None:
        check_int(self.rank, "adapter rank", 1, MAX_RANK)
        if not isinstance(self.targets, tuple) or not all(isinstance(t, str) and t.isidentifier() for t in self.targets):
            raise ValueError(f"adapter targets must be a tuple of matrix names like ('q_proj', 'v_proj'), got {self.targets!r}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"adapter targets contain duplicates: {self.targets!r}")
        if self.init not in ADAPTER_INITS:
            raise ValueError(f"adapter init must be one of {', '.join(map(repr, ADAPTER_INITS))}, got {self.init!r}")
        if self.out_norm not in ("layernorm", "scale"):
            raise ValueError(f"out_norm must be 'layernorm' or 'scale', got {self.out_norm!r}")
        check_float(self.out_norm_scale, "out_norm_scale", 0.0, 10.0)
        check_bool(self.train_prenorms, "train_prenorms")
        check_bool(self.align, "align")
        if self.align and self.init == "whitened":
            # aligning donors is a weight-space (SVD) initialisation: asking for it selects init 'svd'
            object.__setattr__(self, "init", "svd")
        if self.align and self.init != "svd":
            raise ValueError(f"align=True only changes the SVD initialisation; it needs init 'svd', got {self.init!r}")

    @property
    def required_version(self) -> int:
        """The lowest plan format that expresses these settings."""
        if self.init == "whitened":
            return 3
        return 2 if self.align else 1


@dataclass(frozen=True)
class ExtendSpec:
    """How an ``extend`` plan was laid out: ``block`` (each chosen block followed by its copy)
    or ``sequential`` (a contiguous span repeated once, after itself)."""

    mode: Literal["block", "sequential"] = "block"

    def __post_init__(self) -> None:
        if self.mode not in ("block", "sequential"):
            raise ValueError(f"extend mode must be 'block' or 'sequential', got {self.mode!r}")
