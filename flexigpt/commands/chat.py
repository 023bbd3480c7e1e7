"""``chat``: one reply from a model, printed alone on stdout (greedy unless sampling options are given)."""
from __future__ import annotations

import argparse
import time

HELP = "print the model's reply to one prompt (chat template applied; greedy unless sampling options are given)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2), a folder, a compact export, or a hub id")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--speculative", action="store_true",
                   help="decode self-speculatively: the model drafts for itself with the sub-layers, weight precision "
                        "and head rows that measured fastest on this machine (searched once per model, then cached); "
                        "greedy, same reply as without the switch; statistics go to stderr and --json")
    p.add_argument("--draft-len", type=int, default=None,
                   help="most tokens the draft proposes per round (--speculative; default: the searched draft's)")


def run(args: argparse.Namespace):
    # imported when the command runs, so `--help` stays fast
    from flexigpt.chat import reply
    from flexigpt.models import load_model

    sampling_given = any(v is not None for v in (args.top_p, args.top_k, args.seed))
    temperature = args.temperature if args.temperature is not None else (1.0 if sampling_given else 0.0)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]
    if args.speculative and temperature != 0:
        raise ValueError("--speculative decodes greedily; drop --temperature/--top-p/--top-k/--seed")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.speculative:
        return _speculative(args, loaded, messages)
    start = time.perf_counter()
    text = reply(loaded.model, loaded.tokenizer, messages, max_new_tokens=args.max_new_tokens, temperature=temperature,
                 top_p=args.top_p if args.top_p is not None else 1.0, top_k=args.top_k or 0,
                 repetition_penalty=args.repetition_penalty, seed=args.seed)
    seconds = time.perf_counter() - start
    result = {"model": args.model, "reply": text, "greedy": temperature == 0, "temperature": temperature,
              "seconds": round(seconds, 3), "reply_tokens": len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])}
    return result, text


def _speculative(args: argparse.Namespace, loaded, messages):
    # sys: only this path needs it
    import sys

    # imported when the command runs, so `--help` stays fast
    from flexigpt.runner import runner_support
    from flexigpt.speculative import draft_for, speculative_reply

    if args.repetition_penalty != 1.0:
        raise ValueError("--speculative does not support --repetition-penalty")
    model, tokenizer = loaded.model, loaded.tokenizer
    extra: dict = {}
    if runner_support(model) is None:
        # imported when the command runs, so `--help` stays fast
        from flexigpt.draft_search import self_draft

        draft = self_draft(model, tokenizer)
        config, choice = draft.choice.config, draft.choice
        extra = {"precision": config.precision, "skip_attention": list(config.skip_attn), "skip_mlp": list(config.skip_mlp),
                 "draft_vocab": config.draft_vocab, "draft_source": choice.source,
                 "search_seconds": round(choice.search_seconds, 1), "draft_extra_bytes": choice.extra_bytes}
        draft_len = args.draft_len or config.max_draft
    else:  # other families: the FlexiGPT build without its replacement slots drafts
        draft = draft_for(model)
        draft_len = args.draft_len or 4
    text, stats = speculative_reply(model, tokenizer, messages, draft=draft, max_new_tokens=args.max_new_tokens,
                                    draft_len=draft_len)
    info = {"model": args.model, "reply": text, "greedy": True, "speculative": True, "draft_len": draft_len,
            "acceptance_rate": round(stats.acceptance_rate, 4), "drafted": stats.drafted, "accepted": stats.accepted,
            "target_calls": stats.target_calls, "new_tokens": stats.new_tokens, "seconds": round(stats.seconds, 3),
            "tokens_per_second": round(stats.tokens_per_second, 2), **extra}
    if not args.json:
        print(f"speculative: {stats.accepted}/{stats.drafted} draft tokens accepted "
              f"({100 * stats.acceptance_rate:.1f}%), {stats.target_calls} full-model passes for "
              f"{stats.new_tokens} tokens, {stats.seconds:.2f} s", file=sys.stderr)
    return info, text
