"""``eval``: how good and how fast is this model? Held-out perplexity, optional speed and zero-shot."""
from __future__ import annotations

import argparse

HELP = "held-out perplexity with its protocol; optionally speed (--speed) and zero-shot tasks (--tasks)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2), a folder, a compact export, or a hub id")
    p.add_argument("--data", default="default", help="'default' (pydoc text), a .txt/.jsonl file, or hf:NAME:SPLIT")
    p.add_argument("--split", default="heldout", choices=("heldout", "train"), help="which part of the token stream")
    p.add_argument("--windows", type=int, default=16, help="number of windows (at most)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--bos", action="store_true", help="start every window with the BOS token")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks ('paper' = arc_easy,arc_challenge,piqa,winogrande,hellaswag)")
    p.add_argument("--task-path", default=None, help="a folder of extra lm-eval task yamls")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions per task (quick look)")
    p.add_argument("--speed", action="store_true", help="also measure forward latency and generation tokens/s")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per speed measurement")
    p.add_argument("--repeats", type=int, default=3, help="measured repeats for --speed (median)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def run(args: argparse.Namespace):
    from flexigpt import evaluate
    from flexigpt.data import token_windows
    from flexigpt.models import load_model, parameter_count

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    model, tok = loaded.model, loaded.tokenizer
    context = getattr(model.config, "max_position_embeddings", None)
    windows = token_windows(tok, args.data, seq_len=args.seq_len, split=args.split, max_windows=args.windows,
                            bos=args.bos, max_len=context)
    # zero-shot first: a task whose data is unreachable fails in about a second, before the perplexity run
    extra, zs_lines = {}, []
    if args.tasks:
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        names = [n for t in names for n in (evaluate.PAPER_TASKS if t == "paper" else (t,))]
        zs = evaluate.zero_shot(model, tok, names, limit=args.limit, include_path=args.task_path)
        extra = {"zero_shot": zs.scores, "zero_shot_protocol": zs.protocol}
        for task, scores in zs.scores.items():
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if not k.endswith("_stderr"))
            zs_lines.append(f"{task}: {metrics} ({zs.protocol['samples'].get(task, 0)} questions)")
    ppl = evaluate.perplexity(model, windows, batch_size=args.batch_size, progress=args.verbose)
    result = {"model": args.model, **ppl.to_dict(), "parameters": parameter_count(model)}
    lines = [f"ppl {ppl.ppl:.4f} (nll {ppl.nll:.4f}) over {ppl.tokens} predicted tokens: data {windows.data!r}, "
             f"split {windows.split}, {windows.num_windows} windows x {windows.seq_len} tokens, bos {windows.bos}"]
    if args.speed:
        report = evaluate.compare_speed({args.model: model}, tok, new_tokens=args.new_tokens, repeats=args.repeats)
        row = report.rows[0]
        result.update({"forward_s": row.forward_s, "tokens_per_s": row.tokens_per_s, "speed_protocol": report.protocol})
        lines.append(f"forward {row.forward_s * 1000:.1f} ms ({report.protocol['prompt_tokens']} tokens), "
                     f"generation {row.tokens_per_s:.1f} tokens/s (median of {args.repeats})")
    result.update(extra)
    return result, "\n".join(lines + zs_lines)
