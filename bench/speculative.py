"""Does the pruned sub-network draft well for its FlexiGPT model? Self-speculative decoding, measured.

For 20 chat prompts, greedy replies of a FlexiGPT model decoded plainly and self-speculatively
(the same network with its replacement slots skipped drafts, the full model verifies), timed
side by side in one process. Checks that every reply is identical, and prints the acceptance
rate and the speed-up for each draft length.

    python bench/speculative.py --model runs/m1          # a FlexiGPT export (e.g. after `build --steps 100`)
    python bench/speculative.py --ratio 0.3              # builds the plan from the embedded model, no recovery
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
from flexigpt.models import load_model  # noqa: E402
from flexigpt.speculative import draft_for, speculative_reply  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
    "Write one sentence about the sea.", "What does a compiler do?", "Give me a synonym for happy.",
    "What is the boiling point of water in Celsius?", "Who wrote Romeo and Juliet?", "What is a prime number?",
    "Translate 'good morning' into French.", "What is the largest planet in the solar system?",
    "Explain what a list is in Python.", "How many days are in a week?", "What color is the sky on a clear day?",
    "Name a mammal that can fly.", "What is the opposite of cold?", "What is photosynthesis?",
    "What is the square root of 81?", "Suggest a name for a cat.", "What language is spoken in Brazil?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a FlexiGPT export (default: build one from the embedded model)")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--draft-lens", default="2,4")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.model:
        loaded = load_model(args.model)
        model, tok, source = loaded.model, loaded.tokenizer, args.model
    else:
        from flexigpt.analysis import analyze
        from flexigpt.plan import plan_from_analysis
        from flexigpt.surgery import apply_plan

        loaded = load_model("default")
        analysis = analyze(loaded.model, loaded.tokenizer, samples=32, seq_len=256, ratio=args.ratio).to_dict()
        model = apply_plan(loaded.model, plan_from_analysis(analysis, args.ratio))
        tok, source = loaded.tokenizer, f"default, ratio {args.ratio}, no recovery"
    draft = draft_for(model)
    prompts = PROMPTS[: args.prompts]
    result = {"model": source, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "runs": []}
    reply(model, tok, "Hello", max_new_tokens=4)  # warm-up
    plain_s, plain_texts = [], []
    for p in prompts:
        t = time.perf_counter()
        plain_texts.append(reply(model, tok, p, max_new_tokens=args.max_new_tokens))
        plain_s.append(time.perf_counter() - t)
    for k in [int(x) for x in args.draft_lens.split(",")]:
        spec_s, drafted, accepted, tokens, same = [], 0, 0, 0, 0
        for p, expected in zip(prompts, plain_texts):
            t = time.perf_counter()
            text, stats = speculative_reply(model, tok, p, draft=draft, max_new_tokens=args.max_new_tokens, draft_len=k)
            spec_s.append(time.perf_counter() - t)
            drafted += stats.drafted
            accepted += stats.accepted
            tokens += stats.new_tokens
            same += text == expected
        run = {"draft_len": k, "identical": same, "acceptance_rate": accepted / drafted if drafted else 0.0,
               "plain_s": sum(plain_s), "speculative_s": sum(spec_s), "speedup": sum(plain_s) / sum(spec_s),
               "median_speedup": statistics.median(a / b for a, b in zip(plain_s, spec_s)), "tokens": tokens}
        result["runs"].append(run)
        print(f"draft_len {k}: {same}/{len(prompts)} replies identical, acceptance {100 * run['acceptance_rate']:.1f}%, "
              f"plain {run['plain_s']:.1f} s vs speculative {run['speculative_s']:.1f} s -> speed-up x{run['speedup']:.2f} "
              f"({tokens} tokens)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
