"""What does the model look like before we prune it? Block scores + share-error matrix, cached.

``analyze`` runs one calibration pass for the block scores (``flexigpt.scoring``), optionally the
remove-one-block perplexity, and the exact share-error matrix for donor matching
(``flexigpt.sharing``), then suggests donors for the ``ratio`` lowest-BI blocks. The result is an
``Analysis`` whose ``to_dict()`` is the ``analysis.json`` contract (format_version 1). Results are
cached on disk under ``cache_dir()/analysis``, keyed by the model fingerprint, the data reference,
every setting and the format version, and written atomically (temp file + ``os.replace``).

Default donor metric: ``paper`` (the literal rank-r reconstruction variant, method.md 1.4) at the
largest requested rank. Measured on the embedded SmolLM2 (30 blocks; a 30% plan prunes the 9
lowest-BI blocks 3, 12-17, 25, 26): the exact D-form residual ``||D - SVD_r(D)||`` picks block 0 as
the donor of all 9 at ranks 8 and 32 (``absolute``), and of all 9 at rank 32 / 7 of 9 at rank 8
(``relative``). Different blocks' weights are nearly orthogonal, so ``e(i, j)^2`` is about
``||W_i||^2 + ||W_j||^2`` minus a small top-r share, and the donor with the smallest (most
low-rank) weights wins for every row; dividing by ``||W_i||`` rescales a row and cannot change
that. The paper variant compares only the top-r structure of the two blocks and picks nearby
blocks (rank 8: 3->4, 12->11, 13->11, 14->8, 15->18, 16->19, 17->18, 25->27, 26->27; rank 32: the
same except 16->18 and 25, 26 -> 0), which is the diverse, depth-local choice the paper's
low-rank metric is meant to give. All three metrics are always reported, and any can be chosen.

Function metric (``function``, the default whenever it is computed): blocks are nearly orthogonal
in weight space (relative residual about 1.3 at rank 32, worse than no donor at all), while a slot
must reproduce the pruned block's output on real inputs. The same calibration pass that scores the
blocks collects every linear's input second moment (``flexigpt.activations``), and the whitened
residual of each pruned x donor pair, plus each pruned block's no-donor residual, follow
(``flexigpt.function_share``). A suggested donor that does not beat "no donor" is flagged.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from flexigpt import data as data_mod
from flexigpt.activations import MomentCollector
from flexigpt.arch import get_blocks
from flexigpt.atomic import write_text
from flexigpt.function_share import FUNCTION_METRIC, function_share_error
from flexigpt.models import cache_dir, fingerprint
from flexigpt.recovery_data import has_chat_template
from flexigpt.scoring import ppl_drop as run_ppl_drop
from flexigpt.scoring import score_blocks
from flexigpt.sharing import DONOR_METRICS, block_weights, choose_donors, degeneracy_warning, max_rank, share_error
from flexigpt.whiten import DAMP

log = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "DEFAULT_DONOR_METRIC", "FUNCTION_METRIC", "METRICS", "Analysis", "analyze", "write_json"]

FORMAT_VERSION = 1
DEFAULT_DONOR_METRIC = "paper"  # the default weight-space metric (and the default without the function metric)
METRICS = DONOR_METRICS + (FUNCTION_METRIC,)
_PAIRS = ("all", "subset")


@dataclass(frozen=True)
class Analysis:
    """One analysis result; ``to_dict()`` is exactly the ``analysis.json`` object."""

    payload: dict[str, Any] = field(repr=False)

    def __getitem__(self, key: str) -> Any:
        return self.payload[key]

    @property
    def block_influence(self) -> list[float]:
        return list(self.payload["block_influence"])

    @property
    def donors(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.payload["donor_suggestion"]["donors"].items()}

    @property
    def suggested(self) -> dict[int, int | None]:
        """``{pruned: donor}`` with ``None`` where no donor beats a slot without one."""
        sugg = self.payload["donor_suggestion"]
        picks = sugg.get("suggested") or sugg["donors"]
        return {int(k): None if v == "none" else int(v) for k, v in picks.items()}

    @property
    def cached(self) -> bool:
        return bool(self.payload.get("cached", False))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.payload))

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "Analysis":
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"analysis format_version {version!r} is not supported; expected {FORMAT_VERSION}")
        return cls(payload=json.loads(json.dumps(obj)))

    def share_matrix(self, metric: str, rank: int) -> list[list[float | None]]:
        """The ``L x L`` aggregated matrix of one metric and rank (None where not computed)."""
        se = self.payload.get("share_error")
        if not se:
            raise ValueError("this analysis has no share-error matrix")
        table = se["paper"] if metric == "paper" else se.get(metric)
        if table is None or str(rank) not in table:
            raise ValueError(f"metric {metric!r} at rank {rank} is not in this analysis; ranks: {se['ranks']}")
        return table[str(rank)]

    def no_donor(self, rank: int) -> list[float | None]:
        """Per block: the function-space relative residual of a rank-r fit with no donor (None: not computed)."""
        se = self.payload.get("share_error") or {}
        table = ((se.get("no_donor") or {}).get(FUNCTION_METRIC) or {}).get(str(rank))
        if table is None:
            raise ValueError(f"no function-space no-donor residual at rank {rank} in this analysis")
        return table

    def to_frame(self):
        """One row per block: BI, prune rank, single-block angular distance, ppl without it, suggested donor."""
        # pandas is heavy: imported on first use
        import pandas as pd

        bi = self.payload["block_influence"]
        order = sorted(range(len(bi)), key=lambda i: (bi[i], i))
        rank = {b: r for r, b in enumerate(order)}
        frame = pd.DataFrame(
            {
                "block": list(range(len(bi))),
                "block_influence": bi,
                "prune_rank": [rank[i] for i in range(len(bi))],
                "angular_distance": self.payload["angular_distance"]["values"][0],
            }
        )
        drop = self.payload.get("ppl_drop")
        if drop:
            frame["ppl_without"] = drop["ppl"]
            frame["nll_increase"] = drop["nll_increase"]
        donors = self.donors
        frame["donor"] = [donors.get(i) for i in range(len(bi))]
        return frame


def _jsonable(t: torch.Tensor) -> list:
    """Nested lists with NaN/inf -> None (JSON has no NaN)."""
    return [_jsonable(x) for x in t] if t.ndim > 1 else [None if not math.isfinite(v) else v for v in t.tolist()]


def _parse_ranks(ranks: Sequence[int] | str) -> tuple[int, ...]:
    if isinstance(ranks, str):
        parts = [p.strip() for p in ranks.split(",")]
        try:
            ranks = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"ranks {ranks!r} must be comma-separated positive integers, e.g. '8,32'") from None
    out = tuple(sorted(set(int(r) for r in ranks)))
    if not out:
        raise ValueError("ranks must name at least one rank, e.g. 8,32")
    return out


def _validate(model: nn.Module, *, samples: int, seq_len: int, ranks: tuple[int, ...], max_span: int | None,
              ppl_samples: int, pairs: str, donor_metric: str, ratio: float) -> int:
    L = len(get_blocks(model))
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer (1 or more), got {samples!r}")
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if not isinstance(seq_len, int) or seq_len < 2 or (context and seq_len > context):
        raise ValueError(f"seq_len {seq_len!r} is outside 2..{context or 'the context length'} (the model's context)")
    if max_span is not None and (not isinstance(max_span, int) or not 1 <= max_span <= L):
        raise ValueError(f"max_span {max_span!r} is outside 1..{L}")
    if not isinstance(ppl_samples, int) or ppl_samples < 1:
        raise ValueError(f"ppl_samples must be a positive integer, got {ppl_samples!r}")
    if pairs not in _PAIRS:
        raise ValueError(f"pairs {pairs!r} is not one of {', '.join(_PAIRS)}")
    if donor_metric not in METRICS:
        raise ValueError(f"unknown donor metric {donor_metric!r}; valid: {', '.join(METRICS)}")
    if not isinstance(ratio, (int, float)) or not 0 < ratio < 1 or int(round(ratio * L)) < 1:
        raise ValueError(f"ratio {ratio!r} must be in (0, 1) and prune at least one of {L} blocks (>= {0.5 / L:.3f})")
    return L


def _cache_path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "analysis" / f"{digest}.json"


def write_json(obj: dict[str, Any], path: str | Path) -> Path:
    """Write ``obj`` as JSON atomically (``flexigpt.atomic.write_text``)."""
    return write_text(path, json.dumps(obj, allow_nan=False))


def _share_json(se) -> dict[str, Any]:
    ranks = se.ranks
    return {
        "ranks": list(ranks), "matrices": list(se.matrices), "pairs": se.pairs,
        "rows": list(se.rows), "cols": list(se.cols),
        "absolute": {str(r): _jsonable(se.absolute[r]) for r in ranks},
        "relative": {str(r): _jsonable(se.relative[r]) for r in ranks},
        "per_matrix": {
            "absolute": {str(r): {n: _jsonable(se.per_matrix_absolute[r][n]) for n in se.matrices} for r in ranks},
            "relative": {str(r): {n: _jsonable(se.per_matrix_relative[r][n]) for n in se.matrices} for r in ranks},
        },
        "paper": {str(r): _jsonable(se.paper[r]) for r in ranks},
        "weight_norms": {n: se.weight_norms[n].tolist() for n in se.matrices},
    }


def _suggestion(se, fs, metric: str, rank: int, pruned: list[int]) -> dict[str, Any]:
    """Donors for ``pruned`` from one metric; with ``function``, blocks no donor helps are flagged."""
    table = fs.relative[rank] if metric == FUNCTION_METRIC else se.metric(metric, rank)
    donors = choose_donors(torch.nan_to_num(table, nan=float("inf")), pruned)
    block: dict[str, Any] = {
        "metric": metric, "rank": rank, "pruned": pruned,
        "donors": {str(i): j for i, j in donors.items()}, "warning": degeneracy_warning(donors),
    }
    if fs is not None:
        block.update(fs.no_donor_flags(donors, rank, compare=metric == FUNCTION_METRIC))
    return block


def analyze(
    model: nn.Module,
    tokenizer: Any,
    *,
    model_ref: str = "default",
    data: str = "default",
    samples: int = 32,
    seq_len: int = 256,
    ranks: Sequence[int] | str = (8, 32),
    max_span: int | None = None,
    ppl_drop: bool = False,
    ppl_samples: int = 4,
    pruned: Sequence[int] | None = None,
    pairs: str = "all",
    donor_metric: str | None = None,
    ratio: float = 0.3,
    share: bool = True,
    function: bool = True,
    use_cache: bool = True,
    progress: Callable[[float, str], None] | None = None,
    show_progress: bool = False,
) -> Analysis:
    """Block scores, optional remove-one perplexity, share-error matrix and donor suggestion.

    Args:
        model, tokenizer: a supported causal LM and its tokenizer.
        model_ref: the reference the model was loaded from (recorded, not used to load).
        data: a data reference (``flexigpt.data``); calibration uses the train split.
        samples: calibration windows (>= 1); seq_len: tokens per window (<= the model's context).
        ranks: share-error ranks (each 1..smallest matrix dimension), e.g. ``(8, 32)`` or ``"8,32"``.
        max_span: largest angular-distance span (default: all blocks).
        ppl_drop: also measure perplexity with each block removed, on ``ppl_samples`` held-out windows.
        pruned: candidate pruned blocks for ``pairs="subset"`` (default: the ``ratio`` lowest-BI blocks).
        pairs: ``"all"`` block pairs or ``"subset"`` (pruned rows x kept columns).
        donor_metric: ``function`` (the default when computed), ``paper`` (the default otherwise),
            ``relative`` or ``absolute``; the suggestion uses the largest rank.
        ratio: share of blocks in the suggested pruned set (lowest BI first).
        share: compute the share-error matrix at all (False: scores only, ``share_error`` is null).
        function: with ``share``, also the function-space (activation-aware) metric ``function``,
            from the inputs each linear sees in the scoring pass.
        use_cache: read/write the on-disk cache.
        progress: ``progress(fraction, message)``.

    Raises:
        ValueError: a setting out of range, naming the value and the valid range.
    """
    t0 = time.perf_counter()
    ranks = _parse_ranks(ranks)
    function = bool(function) and bool(share)
    if donor_metric is None:
        donor_metric = FUNCTION_METRIC if function else DEFAULT_DONOR_METRIC
    L = _validate(model, samples=samples, seq_len=seq_len, ranks=ranks, max_span=max_span, ppl_samples=ppl_samples,
                  pairs=pairs, donor_metric=donor_metric, ratio=ratio)
    if donor_metric == FUNCTION_METRIC and not function:
        raise ValueError("donor metric 'function' needs the function-space metric (share=True and function=True)")
    weights = block_weights(model) if share else None
    if weights is not None:
        limit = max_rank(weights)
        for r in ranks:
            if not 1 <= r <= limit:
                raise ValueError(f"rank {r} is outside 1..{limit} (the smallest matrix dimension of this model)")
    if pruned is not None:
        pruned = sorted(set(int(i) for i in pruned))
        bad = [i for i in pruned if not 0 <= i < L]
        if bad or not pruned or len(pruned) >= L:
            raise ValueError(f"pruned blocks {pruned} must be 1..{L - 1} distinct ids in 0..{L - 1}")
    report = progress or (lambda fraction, message: None)
    key = {
        "format_version": FORMAT_VERSION, "fingerprint": fingerprint(model), "data": data, "samples": samples,
        "seq_len": seq_len, "ranks": list(ranks), "max_span": max_span, "ppl_drop": ppl_drop,
        "ppl_samples": ppl_samples if ppl_drop else None, "pruned": pruned, "pairs": pairs,
        "donor_metric": donor_metric, "ratio": ratio, "share": share,
        "function": {"damp": DAMP} if function else False,
    }
    path = _cache_path(key)
    if use_cache and path.is_file():
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            payload["cached"] = True
            payload["model"] = model_ref
            payload["chat_template"] = has_chat_template(tokenizer)
            report(1.0, "loaded from cache")
            return Analysis.from_dict(payload)
        except (OSError, ValueError) as err:  # a damaged cache entry is recomputed, never trusted
            log.warning("ignoring unreadable analysis cache %s (%s)", path, err)

    windows = data_mod.token_windows(tokenizer, data, seq_len=seq_len, split="train", max_windows=samples)
    scores_weight = 0.3 if share else 0.9
    t = time.perf_counter()
    # the linears' input moments come from the scoring pass itself: no second pass over the windows
    collector = MomentCollector(model, blocks=pruned if pairs == "subset" else None) if function else None
    with collector if collector is not None else nullcontext():
        scores = score_blocks(model, windows.input_ids, max_span=max_span,
                              progress=lambda f, m: report(scores_weight * f, m), show_progress=show_progress)
    timings = {"scores": time.perf_counter() - t}
    drop = None
    if ppl_drop:
        t = time.perf_counter()
        held = data_mod.token_windows(tokenizer, data, seq_len=seq_len, split="heldout", max_windows=ppl_samples)
        drop = run_ppl_drop(model, held.input_ids, show_progress=show_progress,
                            progress=lambda f, m: report(scores_weight + 0.1 * f, m)).to_dict()
        timings["ppl_drop"] = time.perf_counter() - t
    order = scores.prune_order()
    suggested = sorted(order[: max(1, int(round(ratio * L)))])
    share_obj, donors_block = None, None
    if share:
        t = time.perf_counter()
        sugg_pruned = pruned if pruned is not None else suggested
        subset = sugg_pruned if pairs == "subset" else None
        base = scores_weight + (0.1 if ppl_drop else 0.0)
        mid = base + (1 - base) * (0.4 if function else 1.0)
        se = share_error(weights, ranks, pruned=subset, progress=lambda f, m: report(base + (mid - base) * f, m))
        timings["share_error"] = time.perf_counter() - t
        share_obj = _share_json(se)
        fs = None
        if function:
            t = time.perf_counter()
            rows = subset if subset is not None else list(range(L))
            for b in set(collector.blocks) - set(rows):  # moments nobody will read
                for k in collector.groups(b):
                    collector.release(b, k)
            fs = function_share_error(weights, collector, rows, ranks, cols=se.cols,
                                      progress=lambda f, m: report(mid + (1 - mid) * f, m))
            timings["function"] = time.perf_counter() - t
            share_obj.update(fs.json_fields())
            share_obj["per_matrix"][FUNCTION_METRIC] = fs.per_matrix_json()
        donors_block = _suggestion(se, fs, donor_metric, max(ranks), sugg_pruned)
    timings["total"] = time.perf_counter() - t0
    payload = {
        "format_version": FORMAT_VERSION, "model": model_ref, "fingerprint": key["fingerprint"], "num_blocks": L,
        "data": data, "samples": windows.num_windows, "seq_len": seq_len, "protocol": windows.protocol(),
        "block_influence": scores.block_influence.tolist(),
        "angular_distance": {"max_span": int(scores.angular_distance.shape[0]), "values": scores.angular_rows()},
        "similarity": scores.similarity.tolist(), "ppl_drop": drop, "share_error": share_obj,
        "donor_suggestion": donors_block, "timings_s": {k: round(v, 4) for k, v in timings.items()}, "cached": False,
        "chat_template": has_chat_template(tokenizer),
    }
    if use_cache:
        write_json(payload, path)
    report(1.0, "analysis done")
    return Analysis.from_dict(payload)
