"""Can a donor be lined up with the block it replaces? Permutation-aligned donors.

A block's function does not change when its MLP neurons are permuted (rows of gate/up, columns
of down), or when its attention heads are permuted (rows of q/k/v, columns of o), as long as
grouped KV heads move together with the query heads that read them. Two blocks trained
separately have no reason to number their neurons alike, so the weight difference
``W_pruned - W_donor`` that FlexiGPT's adapter must absorb is larger than it needs to be.
Here we find, for a (pruned, donor) pair, the relabelling of the donor that best matches the
pruned block (a linear assignment on weight inner products, via scipy), which shrinks the
difference before its truncated SVD is taken.

Nothing extra has to be stored or run: an aligned adapter can be folded back into the donor's
own labelling (``fold_lora``), because relabelling the hidden units of a slot leaves its
function unchanged. So an aligned slot still uses its donor's tensors as they are.

Beyond the paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from flexigpt.arch import ArchSpec, block_linears

__all__ = ["Alignment", "align_donor", "aligned_weights", "fold_lora", "permute_block_", "head_layout"]


@dataclass(frozen=True)
class Alignment:
    """Index permutations: aligned donor unit ``a`` is donor unit ``perm[a]``.

    Attributes:
        mlp: ``(intermediate,)`` neuron permutation.
        q: ``(num_heads * head_dim,)`` row permutation of the query projection (whole heads).
        kv: ``(num_kv_heads * head_dim,)`` row permutation of the key/value projections.
    """

    mlp: torch.Tensor
    q: torch.Tensor
    kv: torch.Tensor

    def index(self, group: str) -> torch.Tensor:
        return {"mlp": self.mlp, "q": self.q, "kv": self.kv}[group]

    def is_identity(self) -> bool:
        return all(torch.equal(t, torch.arange(len(t))) for t in (self.mlp, self.q, self.kv))


def head_layout(config) -> tuple[int, int, int]:
    """``(num_heads, num_kv_heads, head_dim)`` of a config."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv, head_dim


def _assign(score: torch.Tensor) -> torch.Tensor:
    """Maximise the total score: ``perm[a] = b`` pairs target unit a with donor unit b."""
    from scipy.optimize import linear_sum_assignment  # Hungarian/LAPJV, exact

    rows, cols = linear_sum_assignment(score.double().cpu().numpy(), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def _units(w: nn.Module, axis: str, size: int) -> torch.Tensor:
    """Weight (and bias) of a linear as one feature row per unit along ``axis``: (units, features)."""
    weight = w.weight.detach().float()
    mat = weight if axis == "rows" else weight.T
    feats = mat.reshape(size, -1)
    bias = getattr(w, "bias", None)
    if axis == "rows" and bias is not None:
        feats = torch.cat([feats, bias.detach().float().reshape(size, -1)], dim=1)
    return feats


def _group_features(block: nn.Module, spec: ArchSpec, group: str, units: int) -> torch.Tensor:
    lin = block_linears(block, spec)
    parts = [_units(lin[m], axis, units) for m, axis, g in spec.permutable if g == group]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def align_donor(pruned: nn.Module, donor: nn.Module, spec: ArchSpec, config) -> Alignment:
    """The donor relabelling that best matches ``pruned`` (maximal weight inner product).

    MLP neurons are matched by one assignment over their (gate row, up row, down column)
    features. Attention is matched hierarchically: KV groups first (key/value rows plus the best
    inner matching of their query heads and output columns), then query heads inside each group.
    """
    if not spec.permutable:
        raise ValueError(f"architecture {spec.family!r} has no permutation layout")
    heads, kv_heads, hd = head_layout(config)
    first_rows = next(m for m, axis, g in spec.permutable if g == "mlp" and axis == "rows")
    n_mlp = block_linears(pruned, spec)[first_rows].weight.shape[0]  # intermediate size
    fm_p = _group_features(pruned, spec, "mlp", n_mlp)
    fm_d = _group_features(donor, spec, "mlp", n_mlp)
    mlp = _assign(fm_p @ fm_d.T)

    fq_p = _group_features(pruned, spec, "q", heads)  # (heads, feats)
    fq_d = _group_features(donor, spec, "q", heads)
    fk_p = _group_features(pruned, spec, "kv", kv_heads)
    fk_d = _group_features(donor, spec, "kv", kv_heads)
    per = heads // kv_heads
    qscore = fq_p @ fq_d.T  # (heads, heads)
    group_score = fk_p @ fk_d.T
    inner: dict[tuple[int, int], torch.Tensor] = {}
    for g in range(kv_heads):
        for h in range(kv_heads):
            sub = qscore[g * per:(g + 1) * per, h * per:(h + 1) * per]
            p = _assign(sub)
            inner[(g, h)] = p
            group_score[g, h] += sub[torch.arange(per), p].sum()
    kv_perm = _assign(group_score)
    q_heads = torch.cat([kv_perm[g] * per + inner[(g, int(kv_perm[g]))] for g in range(kv_heads)])
    q_rows = (q_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
    kv_rows = (kv_perm[:, None] * hd + torch.arange(hd)).reshape(-1)
    return Alignment(mlp=mlp, q=q_rows, kv=kv_rows)


def aligned_weights(donor: nn.Module, alignment: Alignment, spec: ArchSpec) -> dict[str, torch.Tensor]:
    """The donor's weights relabelled to line up with the pruned block (new tensors, float32)."""
    lin = block_linears(donor, spec)
    out = {}
    for m, axis, group in spec.permutable:
        w = lin[m].weight.detach().float()
        idx = alignment.index(group)
        out[m] = w[idx] if axis == "rows" else w[:, idx]
    return out


def fold_lora(matrix: str, lora_A: torch.Tensor, lora_B: torch.Tensor, alignment: Alignment, spec: ArchSpec):
    """Move an adapter fitted against the aligned donor back into the donor's own labelling.

    With ``W_pruned ~ W_donor[perm] + B @ A`` (rows) the slot computes the same function as
    ``W_donor + B[inv] @ A``; for column-permuted matrices it is ``W_donor + B @ A[:, inv]``.

    Returns:
        ``(lora_A, lora_B)`` to install on the slot that shares the donor's tensors unchanged.
    """
    for m, axis, group in spec.permutable:
        if m == matrix:
            inv = torch.argsort(alignment.index(group))
            return (lora_A, lora_B[inv]) if axis == "rows" else (lora_A[:, inv], lora_B)
    return lora_A, lora_B


@torch.no_grad()
def permute_block_(block: nn.Module, alignment: Alignment, spec: ArchSpec) -> None:
    """Relabel ``block`` in place (function-preserving); used to build test cases."""
    lin = block_linears(block, spec)
    for m, axis, group in spec.permutable:
        idx = alignment.index(group)
        layer = lin[m]
        if axis == "rows":
            layer.weight.copy_(layer.weight[idx])
            if getattr(layer, "bias", None) is not None:
                layer.bias.copy_(layer.bias[idx])
        else:
            layer.weight.copy_(layer.weight[:, idx])
