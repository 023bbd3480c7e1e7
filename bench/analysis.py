"""Benchmark of the analysis engine on the embedded model (default settings).

Times (a) one bare forward pass over the calibration windows (the full causal LM, and the
backbone alone), (b) all block scores, (c) the exact share-error matrix for all pairs, 7 matrices,
ranks 8 and 32 (with the paper variant), (c2) the pruned-by-kept subset of a 30% plan, (d) a cached
repeat of ``analyze``; prints a table, the ratios (b)/(a) and (c)/(a), peak RSS and the largest
relative deviation of the exact residuals from ``torch.linalg.svdvals`` on a sample of pairs.

Function space (activation-aware): (b') the block scores with every linear's input moments
collected in the same pass, (e) the function-space share error of the same 30% subset's pairs
(plus each pruned block's no-donor residual), next to (c2), and (e') all ordered pairs inside
``analyze``, next to its weight-space share error; the target is at most 1.5x the weight-space cost
for the same pairs.

Usage: ``.venv/bin/python bench/analysis.py [--samples 32] [--seq-len 256] [--json]``
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from flexigpt.activations import MomentCollector  # noqa: E402
from flexigpt.analysis import analyze  # noqa: E402
from flexigpt.data import token_windows  # noqa: E402
from flexigpt.function_share import function_share_error  # noqa: E402
from flexigpt.lowrank import pair_residuals, residual_from_svdvals  # noqa: E402
from flexigpt.models import load_model  # noqa: E402
from flexigpt.scoring import score_blocks  # noqa: E402
from flexigpt.sharing import block_weights, share_error  # noqa: E402
from flexigpt.whiten import whitened_residuals, whitener  # noqa: E402


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


@torch.no_grad()
def _forward(model, ids, batch_size=8, backbone=False):
    net = model.base_model if backbone else model
    for start in range(0, ids.shape[0], batch_size):
        net(input_ids=ids[start : start + batch_size], use_cache=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--check-pairs", type=int, default=6, help="pairs per matrix checked against svdvals")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    loaded = load_model("default")
    model, tok = loaded.model, loaded.tokenizer
    windows = token_windows(tok, "default", seq_len=args.seq_len, max_windows=args.samples)
    ids = windows.input_ids
    _forward(model, ids[:1])  # warm-up
    _, t_fwd = _timed(lambda: _forward(model, ids))
    _, t_fwd_backbone = _timed(lambda: _forward(model, ids, backbone=True))
    scores, t_scores = _timed(lambda: score_blocks(model, ids))
    weights = block_weights(model)
    full, t_share = _timed(lambda: share_error(weights, (8, 32)))
    pruned = sorted(scores.prune_order()[: round(0.3 * scores.num_blocks)])
    _, t_subset = _timed(lambda: share_error(weights, (8, 32), pruned=pruned))

    # function space: the moments ride on the scoring pass; then the same subset's pairs
    collector = MomentCollector(model, blocks=pruned)
    with collector:
        _, t_scores_mom = _timed(lambda: score_blocks(model, ids))
    kept = [j for j in range(scores.num_blocks) if j not in pruned]
    check_rows = pruned[:2]
    dense = {b: {n: collector.moment(b, n) for n in weights} for b in check_rows}  # for the exactness check
    fs, t_function = _timed(lambda: function_share_error(weights, collector, pruned, (8, 32), cols=kept))
    fworst = 0.0
    for name, w in weights.items():
        for b in check_rows:
            s = whitener(dense[b][name])
            sample_pairs = [(b, kept[0]), (b, kept[-1]), (b, None)]
            got = whitened_residuals(w, {b: s.float()}, sample_pairs, (8, 32)).absolute
            for k, (i, j) in enumerate(sample_pairs):
                d = w[i].double() - (0 if j is None else w[j].double())
                ref = residual_from_svdvals(torch.linalg.svdvals(d @ s), (8, 32))
                fworst = max(fworst, float(((got[:, k] - ref).abs() / ref).max()))
    del dense

    # Exactness: residuals against float64 svdvals on a spread of pairs of every matrix.
    L = scores.num_blocks
    all_pairs = [(i, j) for i in range(L) for j in range(i + 1, L)]
    step = max(1, len(all_pairs) // args.check_pairs)
    sample = all_pairs[::step][: args.check_pairs]
    worst = 0.0
    for name, w in weights.items():
        res, _ = pair_residuals(w, sample, (8, 32))
        d = torch.stack([w[i].double() - w[j].double() for i, j in sample])
        ref = residual_from_svdvals(torch.linalg.svdvals(d), (8, 32))
        worst = max(worst, float(((res - ref).abs() / ref).max()))

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FLEXIGPT_CACHE"] = tmp
        kw = dict(samples=args.samples, seq_len=args.seq_len)
        first, t_analyze = _timed(lambda: analyze(model, tok, **kw))
        again, t_cached = _timed(lambda: analyze(model, tok, **kw))
        a, b = first.to_dict(), again.to_dict()
        a.pop("cached"), b.pop("cached")
        identical = a == b and again.cached

    result = {
        "tokens": int(ids.numel()), "threads": torch.get_num_threads(),
        "a_forward_s": round(t_fwd, 3), "a_backbone_forward_s": round(t_fwd_backbone, 3),
        "b_scores_s": round(t_scores, 3), "c_share_all_s": round(t_share, 3), "c2_share_subset_s": round(t_subset, 3),
        "analyze_s": round(t_analyze, 3), "d_cached_s": round(t_cached, 4), "cache_identical": identical,
        "ratio_b_over_a": round(t_scores / t_fwd, 3), "ratio_b_over_backbone": round(t_scores / t_fwd_backbone, 3),
        "ratio_c_over_a": round(t_share / t_fwd, 3), "peak_rss_gb": round(_peak_rss_gb(), 3),
        "max_rel_dev_vs_svdvals": worst, "checked_pairs": len(sample) * len(weights),
        "pruned_30pct": pruned, "donors": first.donors, "bi_top3": sorted(range(L), key=lambda i: -scores.block_influence[i])[:3],
        "b2_scores_with_moments_s": round(t_scores_mom, 3), "e_function_subset_s": round(t_function, 3),
        "ratio_e_over_c2": round(t_function / t_subset, 3),
        "e2_function_all_ordered_s": first["timings_s"].get("function"),
        "c_share_all_in_analyze_s": first["timings_s"].get("share_error"),
        "function_max_rel_dev_vs_svdvals": fworst,
    }
    f_all, w_all = result["e2_function_all_ordered_s"], result["c_share_all_in_analyze_s"]
    result["ratio_e2_over_c_in_analyze"] = round(f_all / w_all, 3) if f_all and w_all else None
    # what the function metric says about the 30% plan: each pruned block's best donor vs no donor, rank 32
    result["function_rank32"] = {
        str(i): {"donor": j, "donor_error": round(float(fs.relative[32][i, j]), 4),
                 "no_donor_error": round(float(fs.no_donor[32][i]), 4),
                 "weight_relative_error": round(float(full.relative[32][i, j]), 4)}
        for i, j in first.donors.items()}
    result["function_suggested"] = {str(k): v for k, v in first.suggested.items()}
    rows = [
        ("(a) forward, causal LM", t_fwd), ("(a') forward, backbone only", t_fwd_backbone),
        ("(b) block scores (BI, spans, similarity)", t_scores), ("(c) share error, all 435 pairs x 7, r=8,32", t_share),
        ("(c2) share error, 30% subset (9 x 21)", t_subset),
        ("(b') block scores + input moments, one pass", t_scores_mom),
        ("(e) function share error, same subset + no donor", t_function),
        ("analyze() first call", t_analyze), ("(d) analyze() cached", t_cached),
    ]
    if f_all and w_all:
        rows += [("  in analyze: weight share error, all pairs", w_all), ("  in analyze: function, all ordered pairs", f_all)]
    print(f"{'step':46s} {'seconds':>9s}")
    for name, sec in rows:
        print(f"{name:46s} {sec:9.3f}")
    print(f"(b)/(a) = {result['ratio_b_over_a']}, (b)/(a') = {result['ratio_b_over_backbone']}, (c)/(a) = {result['ratio_c_over_a']}")
    print(f"(e)/(c2) = {result['ratio_e_over_c2']} (function vs weight space, the same {len(pruned)} x {len(kept)} pairs); "
          f"in analyze, all pairs: {result['ratio_e2_over_c_in_analyze']} ({L * (L - 1)} ordered vs {L * (L - 1) // 2} pairs); "
          f"moments add {t_scores_mom - t_scores:+.1f} s to the scoring pass")
    print("rank 32, each pruned block's donor: function error (weight relative error) vs no donor:")
    for i, v in result["function_rank32"].items():
        print(f"  {i:>2} <- {v['donor']:>2}: {v['donor_error']:.3f} ({v['weight_relative_error']:.3f}) vs "
              f"no donor {v['no_donor_error']:.3f}; suggested: {result['function_suggested'][i]}")
    targets = [
        ("(b) <= 1.3x one bare forward pass", t_scores / t_fwd <= 1.3, f"{result['ratio_b_over_a']:.2f}x"),
        ("(c) all pairs < 30 s", t_share < 30, f"{t_share:.1f} s"),
        ("(c2) 30% subset < 12 s", t_subset < 12, f"{t_subset:.1f} s"),
        ("(d) cached repeat < 1 s", t_cached < 1, f"{t_cached:.2f} s"),
        ("exact: within 1e-4 of svdvals", worst < 1e-4, f"{worst:.1e}"),
        ("(e) function <= 1.5x (c2), same pairs", t_function <= 1.5 * t_subset, f"{t_function / t_subset:.2f}x"),
        ("function exact: within 1e-4 of svdvals", fworst < 1e-4, f"{fworst:.1e}"),
        ("peak RSS < 3 GB", result["peak_rss_gb"] < 3, f"{result['peak_rss_gb']:.2f} GB"),
    ]
    result["targets_met"] = {name: ok for name, ok, _ in targets}
    for name, ok, value in targets:
        print(f"target {name:38s} {value:>10s}  {'met' if ok else 'MISSED'}")
    print(f"peak RSS {result['peak_rss_gb']} GB; max rel. deviation from svdvals {worst:.2e} over {result['checked_pairs']} matrix pairs")
    print(f"cached repeat identical: {identical}; {torch.get_num_threads()} threads; {ids.numel()} calibration tokens")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
