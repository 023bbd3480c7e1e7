"""``analyze``: block scores (BI, angular distance, similarity), share-error matrix, donor suggestion."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "score every block and compute the share-error matrices; writes DIR/analysis.json"


def _ranks(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"--ranks {text!r} must be comma-separated positive integers, e.g. 8,32")
    return tuple(int(p) for p in parts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2), a folder, or a hub id")
    p.add_argument("--data", default="default", help="calibration data reference (default: pydoc text)")
    p.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--ranks", default="8,32", help="share-error ranks, comma-separated (default 8,32)")
    p.add_argument("--max-span", type=int, default=None, help="largest angular-distance span (default: all blocks)")
    p.add_argument("--ppl-drop", action="store_true", help="also measure perplexity with each block removed")
    p.add_argument("--ppl-samples", type=int, default=4, help="held-out windows for --ppl-drop (default 4)")
    p.add_argument("--pairs", default="all", help="all: every block pair; subset: pruned x kept only")
    p.add_argument("--ratio", type=float, default=0.3, help="share of lowest-BI blocks in the suggested plan")
    p.add_argument("--donor-metric", default=None,
                   help="function (default: activation-aware), paper (default with --no-function), relative or absolute")
    p.add_argument("--no-function", action="store_true",
                   help="skip the function-space (activation-aware) share error; weight space only")
    p.add_argument("--no-cache", action="store_true", help="recompute even if a cached result exists")
    p.add_argument("--out", required=True, help="output folder; analysis.json is written there")


def run(args: argparse.Namespace):
    # imported when the command runs, so `--help` stays fast
    from flexigpt.analysis import analyze, write_json
    from flexigpt.models import load_model

    ranks = _ranks(args.ranks)
    if args.pairs not in ("all", "subset"):
        raise ValueError(f"--pairs {args.pairs!r} must be 'all' or 'subset'")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} exists and is not a folder")
    loaded = load_model(args.model)
    result = analyze(
        loaded.model, loaded.tokenizer, model_ref=args.model, data=args.data, samples=args.samples,
        seq_len=args.seq_len, ranks=ranks, max_span=args.max_span, ppl_drop=args.ppl_drop,
        ppl_samples=args.ppl_samples, pairs=args.pairs, donor_metric=args.donor_metric or None,
        ratio=args.ratio, function=not args.no_function, use_cache=not args.no_cache,
    )
    obj = result.to_dict()
    path = write_json(obj, out / "analysis.json")
    bi = obj["block_influence"]
    order = sorted(range(len(bi)), key=lambda i: (bi[i], i))
    sugg = obj.get("donor_suggestion") or {}
    human = "\n".join([
        f"wrote {path}" + (" (from cache)" if obj.get("cached") else ""),
        f"blocks: {obj['num_blocks']}; calibration: {obj['protocol']['windows']} x {obj['seq_len']} tokens of {obj['data']!r}",
        "lowest BI first: " + ", ".join(f"{i} ({bi[i]:.3f})" for i in order[:10]),
        f"donors ({sugg.get('metric')}, rank {sugg.get('rank')}): {sugg.get('suggested') or sugg.get('donors')}",
    ] + [f"{k.replace('_', ' ')}: {sugg[k]}" for k in ("no_donor_note", "warning") if sugg.get(k)])
    return obj, human
