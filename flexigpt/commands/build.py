"""``build``: build the model a plan describes, optionally recover it, measure it and export it.

Runs unchanged under ``accelerate launch`` (several processes, DDP): every process builds the
same model and trains on its slice of each batch; only the main process evaluates, exports
and prints. The work is ``flexigpt.pipeline.run``; this module parses flags and reads the plan.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = ("build a plan (any registered method: FlexiGPT, drop, extend, FoldGPT, ...), optionally recover it, "
        "measure held-out perplexity and export it")


def add_arguments(p: argparse.ArgumentParser) -> None:
    # the spec module is light (no torch): flags come from the RecoverSpec fields
    from flexigpt.recover_spec import RATE_FIELDS, add_data_arguments, rate_flags_help
    from flexigpt.recover_spec import add_arguments as add_recover_arguments

    p.add_argument("--plan", required=True, help="plan.json written by `plan` (or downloaded from the app)")
    p.add_argument("--out", required=True, help="export folder (compact; the merged export goes to OUT-merged)")
    add_recover_arguments(p, defaults={"steps": 0, "checkpoint_every": 50, "objective": None,
                                       **{f: None for f in RATE_FIELDS}},
                          help_overrides={"steps": "recovery steps (0 = build and export only)", **rate_flags_help(),
                                          "seq_len": "tokens per window (training and evaluation)",
                                          "objective": "lm (next-token loss), distill (match the original's "
                                                       "predictions) or mix (default: the measured best recipe "
                                                       "for the model, flexigpt.pipeline.default_recovery: lm "
                                                       "on mixed data with a chat template, else mix)"})
    p.add_argument("--kept-lora-rank", type=int, default=None,
                   help="LoRA rank on the kept blocks (default: the plan's; for a recovered drop plan without one, "
                        "matched to the FlexiGPT budget)")
    p.add_argument("--fit-steps", type=int, default=None,
                   help="block-local fitting: train each replacement slot alone for N steps to reproduce its pruned "
                        "block's output on calibration text, before recovery (0 = none; default: the measured "
                        "best for the model, flexigpt.pipeline.default_fit_steps: 200 for a FlexiGPT plan of a "
                        "model without a chat template, else none)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT-checkpoint")
    add_data_arguments(p)
    p.add_argument("--train-windows", type=int, default=None, help="use at most this many training windows")
    p.add_argument("--merged", action="store_true", help="also write a plain Hugging Face checkpoint (OUT-merged)")
    p.add_argument("--data", default="default", help="text for the held-out perplexity")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows for perplexity")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run(args: argparse.Namespace) -> dict | None:
    # torch-heavy: loaded only when the command runs, so `--help` stays fast
    from flexigpt.pipeline import RATE_FIELDS, RunOptions, check_fit_steps
    from flexigpt.pipeline import run as run_pipeline
    from flexigpt.plan import Plan
    from flexigpt.recover_spec import from_args

    if not isinstance(args.steps, int) or args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    check_fit_steps(args.fit_steps)
    if args.chat_share is not None and not 0.0 < args.chat_share < 1.0:
        raise ValueError(f"--chat-share must be between 0 and 1 (exclusive), got {args.chat_share}")
    if args.eval_windows < 1:
        raise ValueError(f"--eval-windows must be >= 1, got {args.eval_windows}")
    path = Path(args.plan)
    if not path.is_file():
        raise ValueError(f"plan file {args.plan!r} does not exist")
    if path.stat().st_size > 1_000_000:
        raise ValueError(f"plan file {args.plan!r} is {path.stat().st_size} bytes; a plan is at most 1,000,000")
    plan = Plan.from_json(path.read_bytes())
    # validate every recovery flag before loading anything (the default objective is resolved below)
    spec = from_args(args, checkpoint_every=max(0, args.checkpoint_every),
                     objective=args.objective or "lm") if args.steps > 0 else None
    base = tokenizer = None
    train_data = args.train_data
    if spec is not None and (args.objective is None or train_data is None
                             or any(getattr(args, f) is None for f in RATE_FIELDS)):
        # the model decides the default recipe (chat template or not): load it once, here
        from flexigpt.models import load_model
        from flexigpt.pipeline import default_rates, default_recovery
        from flexigpt.recovery_data import has_chat_template

        loaded = load_model(plan.base_model)
        base, tokenizer = loaded.model, loaded.tokenizer
        chat = has_chat_template(tokenizer)
        objective, data = default_recovery(chat)
        spec = from_args(args, recipe=default_rates(chat), checkpoint_every=max(0, args.checkpoint_every),
                         objective=args.objective or objective)
        train_data = train_data or data
    options = RunOptions(out=args.out, data=args.data, train_data=train_data, train_windows=args.train_windows,
                         eval_windows=args.eval_windows, seq_len=args.seq_len, merged=args.merged,
                         overwrite=args.overwrite, resume=args.resume, kept_lora_rank=args.kept_lora_rank,
                         fit_steps=args.fit_steps, chat_share=args.chat_share, chat_loss=args.chat_loss)
    accelerator = None
    if spec is not None and _distributed():
        # accelerate is heavy and needed only under `accelerate launch`
        from accelerate import Accelerator

        accelerator = Accelerator()
    result = run_pipeline(plan, options, spec, base=base, tokenizer=tokenizer, accelerator=accelerator)
    if result is not None:
        result["plan"] = str(path)
    return result
