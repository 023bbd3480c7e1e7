"""Does self-speculative decoding pay off? Plain greedy vs exact self-speculative decoding, measured.

For each model (the original embedded model, a FlexiGPT export, ...), 20 chat prompts are answered
greedily twice in one process, interleaved prompt by prompt: plainly (our chat decoding path) and
self-speculatively with the draft chosen by measured speed (``flexigpt.draft_search``: skipped
attention/MLP sub-layers, a lower-precision or shorter-vocabulary draft, adaptive stopping; the
choice is searched once per model and cached). Checks that every reply is identical, and prints
acceptance, tokens per second and the speed-up.

    python bench/speculative.py --models default,runs/m1 --json     # the original and a FlexiGPT export
    python bench/speculative.py --models default --prompts 4         # smoke run
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

from flexigpt.chat import reply  # noqa: E402
from flexigpt.draft_search import self_draft  # noqa: E402
from flexigpt.models import load_model  # noqa: E402
from flexigpt.speculative import speculative_reply  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
    "Write one sentence about the sea.", "What does a compiler do?", "Give me a synonym for happy.",
    "What is the boiling point of water in Celsius?", "Who wrote Romeo and Juliet?", "What is a prime number?",
    "Translate 'good morning' into French.", "What is the largest planet in the solar system?",
    "Explain what a list is in Python.", "How many days are in a week?", "What color is the sky on a clear day?",
    "Name a mammal that can fly.", "What is the opposite of cold?", "What is photosynthesis?",
    "What is the square root of 81?", "Suggest a name for a cat.", "What language is spoken in Brazil?",
]


def _bench(ref: str, prompts: list[str], max_new_tokens: int) -> dict:
    loaded = load_model(ref)
    model, tok = loaded.model.eval(), loaded.tokenizer
    t = time.perf_counter()
    draft = self_draft(model, tok)  # searched once per model, then cached
    search_s = time.perf_counter() - t
    config = draft.choice.config
    reply(model, tok, "Hello", max_new_tokens=4)  # warm-up of both paths
    speculative_reply(model, tok, "Hello", draft=draft, max_new_tokens=4)
    plain_s, spec_s, same, drafted, accepted, tokens = [], [], 0, 0, 0, 0
    for p in prompts:  # interleaved, so both see the same machine load
        t = time.perf_counter()
        expected = reply(model, tok, p, max_new_tokens=max_new_tokens)
        plain_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        text, stats = speculative_reply(model, tok, p, draft=draft, max_new_tokens=max_new_tokens)
        spec_s.append(time.perf_counter() - t)
        same += text == expected
        drafted, accepted, tokens = drafted + stats.drafted, accepted + stats.accepted, tokens + stats.new_tokens
    run = {"model": ref, "prompts": len(prompts), "identical": same, "tokens": tokens,
           "acceptance_rate": accepted / drafted if drafted else 0.0, "plain_s": sum(plain_s),
           "speculative_s": sum(spec_s), "plain_tokens_per_s": tokens / sum(plain_s),
           "speculative_tokens_per_s": tokens / sum(spec_s), "speedup": sum(plain_s) / sum(spec_s),
           "median_speedup": statistics.median(a / b for a, b in zip(plain_s, spec_s)),
           "draft": {"precision": config.precision, "skip_attention": list(config.skip_attn),
                     "skip_mlp": list(config.skip_mlp), "draft_vocab": config.draft_vocab,
                     "max_draft": config.max_draft, "source": draft.choice.source,
                     "search_seconds": round(search_s, 1)}}
    print(f"{ref}: {same}/{len(prompts)} replies identical, acceptance {100 * run['acceptance_rate']:.1f}%, "
          f"plain {run['plain_tokens_per_s']:.1f} tok/s vs speculative {run['speculative_tokens_per_s']:.1f} tok/s "
          f"-> x{run['speedup']:.2f} (median per prompt x{run['median_speedup']:.2f}); draft {run['draft']}",
          flush=True)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="default", help="comma-separated model references (the embedded "
                    "original 'default', FlexiGPT exports, ...)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    prompts = PROMPTS[: args.prompts]
    runs = [_bench(ref.strip(), prompts, args.max_new_tokens) for ref in args.models.split(",") if ref.strip()]
    if args.json:
        print(json.dumps({"max_new_tokens": args.max_new_tokens, "greedy": True, "runs": runs}))


if __name__ == "__main__":
    main()
