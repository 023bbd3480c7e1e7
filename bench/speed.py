"""How fast are the built models, as users run them? Honest speed figures, side by side in one run.

Every model is loaded the way a user loads it (the original from its reference, a built model
from its compact export, ``flexigpt.load_model``) and put in eval mode; the models are then timed
interleaved, round by round (``flexigpt.evaluate.compare_speed``), median of ``--repeats``
rounds with the spread printed:

- forward latency of one pass over a ``--prompt-tokens`` prompt (no KV cache);
- greedy generation tokens/s (``--new-tokens`` tokens, KV cache, prefill included), and the
  memory-bandwidth bound next to it (``flexigpt.bandwidth``: measured copy bandwidth over the
  weight bytes read per token);
- our chat decoding path (``flexigpt.chat.reply``, greedy) against transformers' ``generate`` for
  the same prompts and the same number of tokens, interleaved.

    python bench/speed.py --models default,runs/m1 --json
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

from flexigpt import evaluate  # noqa: E402
from flexigpt.bandwidth import copy_bandwidth, decode_bound, weight_bytes_per_token  # noqa: E402
from flexigpt.chat import build_prompt, reply  # noqa: E402
from flexigpt.models import load_model  # noqa: E402

CHAT_PROMPTS = ["What is the capital of France?", "Explain what a list is in Python.", "Name three primary colors.",
                "Write one sentence about the sea.", "What is photosynthesis?", "What is 12 times 12?"]


def _chat_vs_generate(model, tok, prompts: list[str], max_new_tokens: int, repeats: int) -> dict:
    """Seconds of our greedy chat path and of ``generate`` for the same prompts and token counts."""
    ours, theirs, tokens = [], [], 0
    for _ in range(repeats):
        a = b = 0.0
        for p in prompts:
            t = time.perf_counter()
            text = reply(model, tok, p, max_new_tokens=max_new_tokens)
            a += time.perf_counter() - t
            n = max(1, len(tok(text, add_special_tokens=False)["input_ids"]))
            ids = torch.tensor([build_prompt(tok, p).ids])
            t = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
            b += time.perf_counter() - t
            tokens += n
        ours.append(a)
        theirs.append(b)
    return {"chat_s": statistics.median(ours), "generate_s": statistics.median(theirs),
            "chat_over_generate": statistics.median(ours) / statistics.median(theirs),
            "tokens_per_round": tokens // repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="default", help="comma-separated references; the first is the reference")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--chat-repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    refs = [r.strip() for r in args.models.split(",") if r.strip()]
    loaded = {ref: load_model(ref) for ref in refs}
    tok = loaded[refs[0]].tokenizer
    models = {ref: lo.model.eval() for ref, lo in loaded.items()}
    bandwidth = copy_bandwidth()
    report = evaluate.compare_speed(models, tok, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                    repeats=args.repeats, warmup=2)
    rows = []
    print(f"protocol: {json.dumps(report.protocol)}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'model':<34}{'forward s':>11}{'x orig':>8}{'spread':>8}{'tok/s':>8}{'x orig':>8}{'spread':>8}"
          f"{'bound tok/s':>13}{'of bound':>10}")
    for row in report.rows:
        m = models[row.name]
        bound = decode_bound(m, bandwidth)
        rows.append({**vars(row), "weight_bytes_per_token": weight_bytes_per_token(m), "bound_tokens_per_s": bound,
                     "share_of_bound": row.tokens_per_s / bound})
        print(f"{row.name[-34:]:<34}{row.forward_s:>11.4f}{row.forward_ratio:>8.3f}{row.forward_spread:>8.2f}"
              f"{row.tokens_per_s:>8.1f}{row.throughput_ratio:>8.3f}{row.generate_spread:>8.2f}{bound:>13.1f}"
              f"{row.tokens_per_s / bound:>10.2f}", flush=True)
    chat = {}
    for ref, m in models.items():
        chat[ref] = _chat_vs_generate(m, loaded[ref].tokenizer, CHAT_PROMPTS, 48, args.chat_repeats)
        print(f"{ref}: chat decoding {chat[ref]['chat_s']:.2f} s vs generate {chat[ref]['generate_s']:.2f} s for "
              f"{chat[ref]['tokens_per_round']} tokens (x{chat[ref]['chat_over_generate']:.2f})", flush=True)
    if args.json:
        print(json.dumps({"protocol": report.protocol, "copy_bandwidth": bandwidth, "rows": rows, "chat": chat}))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
