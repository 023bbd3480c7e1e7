"""How much does permutation alignment shrink the share error? (embedded model, exact SVD)

For pairs (pruned block i, donor j), the relative residual of the best rank-r correction,
||D - SVD_r(D)||_F / ||W_i||_F with D = W_i - W_j, before and after relabelling the donor's
MLP neurons and attention heads to match block i. Prints one row per matrix type (median over
pairs) and, with --json, one JSON object as the last line.

    python bench/alignment.py [--pairs 12] [--ranks 8,32] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flexigpt.align import align_donor, aligned_weights  # noqa: E402
from flexigpt.arch import arch_of, block_linears, get_blocks  # noqa: E402
from flexigpt.models import load_model  # noqa: E402


def residual(w_i: torch.Tensor, w_j: torch.Tensor, r: int) -> float:
    d = (w_i.float() - w_j.float()).double()
    s = torch.linalg.svdvals(d)
    return float(torch.sqrt(torch.clamp((s**2).sum() - (s[:r] ** 2).sum(), min=0)) / w_i.double().norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--pairs", type=int, default=12, help="number of (pruned, donor) pairs: neighbours in the middle of the stack")
    ap.add_argument("--ranks", default="8,32")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ranks = [int(x) for x in args.ranks.split(",")]
    loaded = load_model(args.model)
    model = loaded.model
    spec = arch_of(model)
    blocks = get_blocks(model)
    n = len(blocks)
    pairs = [(i, i + 1) for i in range(2, n - 2)][: args.pairs]
    rows: dict[str, dict[str, list[float]]] = {}
    start = time.perf_counter()
    align_s = []
    for i, j in pairs:
        t = time.perf_counter()
        al = align_donor(blocks[i], blocks[j], spec, model.config)
        align_s.append(time.perf_counter() - t)
        aligned = aligned_weights(blocks[j], al, spec)
        for name, layer in block_linears(blocks[i], spec).items():
            w_i, w_j = layer.weight, block_linears(blocks[j], spec)[name].weight
            rec = rows.setdefault(name, {})
            for r in ranks:
                rec.setdefault(f"before_r{r}", []).append(residual(w_i, w_j, r))
                rec.setdefault(f"after_r{r}", []).append(residual(w_i, aligned[name], r))
    result = {"model": args.model, "pairs": pairs, "ranks": ranks, "align_seconds_median": statistics.median(align_s),
              "seconds": time.perf_counter() - start, "per_matrix": {}}
    header = f"{'matrix':<10}" + "".join(f"{'r=' + str(r) + ' before':>14}{'after':>9}{'cut %':>8}" for r in ranks)
    print(f"relative rank-r residual ||D - SVD_r(D)|| / ||W_i||, median over {len(pairs)} neighbour pairs")
    print(header)
    for name, rec in rows.items():
        entry = {}
        line = f"{name:<10}"
        for r in ranks:
            b = statistics.median(rec[f"before_r{r}"])
            a = statistics.median(rec[f"after_r{r}"])
            entry[f"r{r}"] = {"before": b, "after": a, "reduction_pct": 100 * (b - a) / b}
            line += f"{b:>14.4f}{a:>9.4f}{100 * (b - a) / b:>8.1f}"
        result["per_matrix"][name] = entry
        print(line)
    print(f"alignment time per pair (median): {result['align_seconds_median']:.2f} s; total {result['seconds']:.1f} s")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
