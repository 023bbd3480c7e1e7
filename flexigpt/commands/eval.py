"""``eval``: how good and how fast is this model? Held-out perplexity, optional speed, zero-shot and chat fidelity."""
from __future__ import annotations

import argparse

HELP = ("held-out perplexity with its protocol; optionally speed (--speed), zero-shot tasks (--tasks) and chat "
        "fidelity (--chat-fidelity)")


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
    p.add_argument("--chat-fidelity", action="store_true",
                   help="also answer the built-in chat prompts greedily: key score, agreement with the original's "
                        "replies, share of looping replies")
    p.add_argument("--prompts", default=None,
                   help='a .jsonl prompt set for the chat fidelity, one {"prompt": ..., "keys": [...]} per line '
                        "(implies --chat-fidelity)")
    p.add_argument("--fidelity-max-new-tokens", type=int, default=48, help="reply length limit of the chat fidelity")
    p.add_argument("--reference", default=None,
                   help="model whose greedy replies the agreement compares with (default: the base model of an "
                        "exported build, else none; 'none' to skip)")


def run(args: argparse.Namespace):
    # deferred: `--help` and the other subcommands must not pay for importing torch and transformers
    from flexigpt import evaluate
    from flexigpt.data import token_windows
    from flexigpt.models import load_model, parameter_count

    fidelity = args.chat_fidelity or args.prompts is not None
    if fidelity:  # a bad prompt file or length fails before any model is loaded
        from flexigpt.fidelity import AGREEMENT_TOKENS, builtin_prompts, load_prompts  # only for --chat-fidelity

        pset = load_prompts(args.prompts) if args.prompts is not None else builtin_prompts()
        if args.fidelity_max_new_tokens < AGREEMENT_TOKENS:
            raise ValueError(f"--fidelity-max-new-tokens: max_new_tokens must be an integer >= {AGREEMENT_TOKENS}, "
                             f"got {args.fidelity_max_new_tokens}")
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
    if fidelity:
        report, ref_name, ref_report = _chat_fidelity(args, loaded, pset)
        result["chat_fidelity"] = {**report.to_dict(), "reference": ref_name,
                                   "reference_score": ref_report.score if ref_report else None,
                                   "regressions": [r.prompt for r, _ in report.regressions(ref_report)]
                                   if ref_report else None}
        lines.append(report.summary())
        lines.append(report.kinds_line(ref_report))
        if ref_report is not None:
            lost = report.regressions(ref_report)
            lines.append(f"reference {ref_name}: score {ref_report.score:.3f}; {len(lost)} prompt(s) it answers and "
                         f"this model does not" + (": " + "; ".join(repr(r.prompt) for r, _ in lost[:5]) if lost else "")
                         + (" ..." if len(lost) > 5 else ""))
    return result, "\n".join(lines + zs_lines)


def _reference_ref(args: argparse.Namespace) -> str | None:
    """The model to compare replies with: --reference, else the base model an export records."""
    if args.reference is not None:
        return None if args.reference.strip().lower() == "none" else args.reference
    import json  # deferred with the rest of the command's imports
    from pathlib import Path

    plan = Path(args.model).expanduser() / "plan.json"
    if plan.is_file():
        try:
            base = json.loads(plan.read_text(encoding="utf-8")).get("base_model")
        except (OSError, ValueError, AttributeError):
            return None
        return base if isinstance(base, str) and base != args.model else None
    return None


def _chat_fidelity(args: argparse.Namespace, loaded, pset):
    # deferred: only --chat-fidelity needs the decoding modules
    from flexigpt.chat import build_prompt
    from flexigpt.fidelity import chat_fidelity
    from flexigpt.models import load_model

    ref_name = _reference_ref(args)
    ref_report = None
    options = {"prompts": pset, "max_new_tokens": args.fidelity_max_new_tokens, "progress": args.verbose}
    if ref_name is not None:
        if ref_name == args.model:
            ref_model, ref_tok = loaded.model, loaded.tokenizer
        else:
            ref_loaded = load_model(ref_name, dtype=args.dtype, device=args.device)
            ref_model, ref_tok = ref_loaded.model, ref_loaded.tokenizer
        first = pset.items[0].prompt
        if build_prompt(ref_tok, first).ids != build_prompt(loaded.tokenizer, first).ids:
            raise ValueError(f"reference {ref_name!r} renders prompts with another tokenizer or chat template; token "
                             "agreement needs the same one (pass --reference none to skip it)")
        # the original is measured again and again: its replies come from the disk cache after the first time
        ref_report = chat_fidelity(ref_model, ref_tok, cache=True, **options)
    report = chat_fidelity(loaded.model, loaded.tokenizer, reference=ref_report, **options)
    return report, ref_name, ref_report
