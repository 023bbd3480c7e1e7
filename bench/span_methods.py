"""Span replacement and iterative selection at zero training, on the embedded model (one run, a few minutes).

Rows, all removing the same number of blocks (--ratio of L, default 0.3: 9 of 30):

- drop (BI)           the lowest Block-Influence blocks (ShortGPT one-shot selection)
- drop (iterative)    SLEB: remove the block whose removal raises calibration perplexity least, repeat
- drop (span)         the lowest angular-distance contiguous span, plainly dropped
- replaceme (span)    the same span replaced by a least-squares linear map folded into the block before
- streamline (span)   the same span replaced by one block trained locally on the original's activations

Held-out perplexity follows bench/quality.py's protocol (--eval-windows x --seq-len of the held-out
split). Calibration for BI, the span distances, ReplaceMe and Streamline: --calib-windows x --seq-len
of the train split; for iterative selection --select-windows x --select-len (cache disabled, so the
seconds are compute).

    python bench/span_methods.py                   # all rows
    python bench/span_methods.py --streamline-steps 0   # skip the trained row
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flexigpt import evaluate  # noqa: E402
from flexigpt.arch import get_blocks, set_blocks  # noqa: E402
from flexigpt.data import token_windows  # noqa: E402
from flexigpt.models import load_model  # noqa: E402
from flexigpt.replaceme import lowest_distance_spans, replaceme  # noqa: E402
from flexigpt.scoring import score_blocks  # noqa: E402
from flexigpt.selection import iterative_selection  # noqa: E402
from flexigpt.streamline import streamline  # noqa: E402
from flexigpt.surgery import structural_copy  # noqa: E402


def _drop(base, removed):
    model = structural_copy(base)
    blocks = list(get_blocks(model))
    set_blocks(model, [b for i, b in enumerate(blocks) if i not in set(removed)])
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="default")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--select-windows", type=int, default=8)
    ap.add_argument("--select-len", type=int, default=128)
    ap.add_argument("--ridge", type=float, default=0.0)
    ap.add_argument("--streamline-steps", type=int, default=200)
    ap.add_argument("--streamline-lr", type=float, default=1e-4)
    args = ap.parse_args()
    loaded = load_model(args.model)
    base, tok = loaded.model, loaded.tokenizer
    L = len(get_blocks(base))
    n = int(round(args.ratio * L))
    held = token_windows(tok, args.data, seq_len=args.seq_len, split="heldout", max_windows=args.eval_windows)
    calib = token_windows(tok, args.data, seq_len=args.seq_len, split="train", max_windows=args.calib_windows)
    rows, extra = [], {}

    def row(name, model, removed, seconds):
        ppl = evaluate.perplexity(model, held).ppl
        rows.append({"method": name, "removed": sorted(removed), "ppl_start": ppl, "seconds": round(seconds, 1)})
        print(f"  {name:<20} ppl {ppl:10.2f}   {seconds:6.1f} s   removed {sorted(removed)}", flush=True)

    row("original", base, [], 0.0)
    t = time.perf_counter()
    scores = score_blocks(base, calib.input_ids, max_span=n)
    score_s = time.perf_counter() - t
    bi = sorted(scores.prune_order()[:n])
    row("drop (BI)", _drop(base, bi), bi, score_s)

    select = token_windows(tok, args.data, seq_len=args.select_len, split="train", max_windows=args.select_windows)
    t = time.perf_counter()
    sel = iterative_selection(base, select, n, cache=False)
    sel_s = time.perf_counter() - t
    with torch.inference_mode():
        t = time.perf_counter()
        base(input_ids=select.input_ids, use_cache=False)
        fwd_s = time.perf_counter() - t
    extra["iterative"] = {"order": list(sel.order), "calib_ppl": [round(p, 3) for p in sel.ppl],
                          "seconds": round(sel_s, 1), "forward_s": round(fwd_s, 3),
                          "forward_passes_per_block": round(sel_s / fwd_s / n, 1)}
    row("drop (iterative)", _drop(base, sel.order), sel.order, sel_s)

    span = lowest_distance_spans(scores, n)[0]
    removed = list(range(*span))
    extra["span"] = list(span)
    row("drop (span)", _drop(base, removed), removed, score_s)
    t = time.perf_counter()
    rm = replaceme(base, [span], calib, ridge=args.ridge)
    extra["replaceme_error_vs_drop"] = round(rm.replaceme_fits[0].error_vs_drop, 4)
    row("replaceme (span)", rm, removed, score_s + time.perf_counter() - t)
    if args.streamline_steps > 0:
        t = time.perf_counter()
        sl = streamline(base, [span], calib, steps=args.streamline_steps, lr=args.streamline_lr)
        fit = sl.fits[0]
        extra["streamline_r2"] = {"start": round(fit.r2_start, 4), "trained": round(fit.r2, 4),
                                  "drop": round(fit.r2_drop, 4)}
        row(f"streamline (span, {args.streamline_steps} steps)", sl.model, removed, score_s + time.perf_counter() - t)
    protocol = {"held_out": held.protocol(), "calibration": calib.protocol(), "selection": select.protocol(),
                "threads": torch.get_num_threads()}
    print(json.dumps({"rows": rows, **extra, "protocol": protocol}))


if __name__ == "__main__":
    main()
