"""``build``: build the model a plan describes, optionally recover it, measure it and export it.

Runs unchanged under ``accelerate launch`` (several processes, DDP): every process builds the
same model and trains on its slice of each batch; only the main process evaluates, exports
and prints. A ``drop`` plan recovered with ``--steps N > 0`` gets LoRA on its kept blocks at the
rank whose trainable-parameter count matches the same plan built as FlexiGPT (ShortGPT + LoRA).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

HELP = "build a plan (FlexiGPT, drop or extend), optionally recover it, measure held-out perplexity and export it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from flexigpt.recover import RecoverSpec

    d = RecoverSpec()
    p.add_argument("--plan", required=True, help="plan.json written by `plan` (or downloaded from the app)")
    p.add_argument("--out", required=True, help="export folder (compact; the merged export goes to OUT-merged)")
    p.add_argument("--steps", type=int, default=0, help="recovery steps (0 = build and export only)")
    p.add_argument("--objective", choices=("lm", "distill", "mix"), default=d.objective,
                   help="recovery loss: language modelling, distillation from the original model, or both")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per micro-batch (per process)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=float, default=d.warmup, help="warm-up: a fraction of the steps (<1) or a step count")
    p.add_argument("--kd-temperature", type=float, default=d.kd_temperature, help="distillation temperature")
    p.add_argument("--hidden-weight", type=float, default=d.hidden_weight,
                   help="weight of the last-block hidden-state matching term (tail distillation)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data order and adapters")
    p.add_argument("--kept-lora-rank", type=int, default=None,
                   help="LoRA rank on kept blocks of a drop plan (default: matched to the FlexiGPT budget)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="write a checkpoint every K steps (0 = never)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT-checkpoint")
    p.add_argument("--train-data", default=None, help="recovery text, train split (default: --data)")
    p.add_argument("--train-windows", type=int, default=None, help="use at most this many training windows")
    p.add_argument("--merged", action="store_true", help="also write a plain Hugging Face checkpoint (OUT-merged)")
    p.add_argument("--data", default="default", help="text for the held-out perplexity")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows for perplexity")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (training and evaluation)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run(args: argparse.Namespace) -> dict | None:
    from flexigpt import evaluate
    from flexigpt.data import token_windows
    from flexigpt.export import save_compact, save_merged
    from flexigpt.models import load_model
    from flexigpt.params import matched_lora_rank, measure_params
    from flexigpt.plan import Plan
    from flexigpt.recover import RecoverSpec, recover
    from flexigpt.surgery import apply_plan

    if not isinstance(args.steps, int) or args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    if args.eval_windows < 1:
        raise ValueError(f"--eval-windows must be >= 1, got {args.eval_windows}")
    path = Path(args.plan)
    if not path.is_file():
        raise ValueError(f"plan file {args.plan!r} does not exist")
    if path.stat().st_size > 1_000_000:
        raise ValueError(f"plan file {args.plan!r} is {path.stat().st_size} bytes; a plan is at most 1,000,000")
    plan = Plan.from_json(path.read_bytes())
    if args.merged and plan.replaced_slots and plan.adapter.out_norm == "layernorm":
        raise ValueError(
            "--merged needs out_norm 'scale' (a LayerNorm output norm cannot be folded into plain weights); "
            "rebuild the plan with --out-norm scale, or drop --merged and use the compact export"
        )
    spec = None
    if args.steps > 0:  # validate every recovery flag before loading anything
        spec = RecoverSpec(steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                           seq_len=args.seq_len, warmup=args.warmup, objective=args.objective,
                           kd_temperature=args.kd_temperature, hidden_weight=args.hidden_weight, seed=args.seed,
                           checkpoint_every=max(0, args.checkpoint_every))
    if args.resume and spec is None:
        raise ValueError("--resume needs --steps > 0")
    start = time.perf_counter()
    accelerator = None
    if spec is not None and _distributed():
        from accelerate import Accelerator

        accelerator = Accelerator()
    main = accelerator is None or accelerator.is_main_process
    loaded = load_model(plan.base_model)
    base, tok = loaded.model, loaded.tokenizer
    context = getattr(base.config, "max_position_embeddings", None)
    model = apply_plan(base, plan)
    kept_rank = None
    if spec is not None and plan.method == "drop":
        from flexigpt.adapters import attach_kept_lora

        kept_rank = args.kept_lora_rank or matched_lora_rank(plan, base)
        model = attach_kept_lora(model, kept_rank)
    heldout = token_windows(tok, args.data, seq_len=args.seq_len, split="heldout", max_windows=args.eval_windows,
                            max_len=context)
    result: dict = {"plan": str(path), "method": plan.method, "slots": plan.num_slots}
    if main:
        before = evaluate.perplexity(model, heldout)
        result["ppl_before"] = round(before.ppl, 4)
    last = None
    if spec is not None:
        train = token_windows(tok, args.train_data or args.data, seq_len=args.seq_len, split="train",
                              max_windows=args.train_windows, max_len=context)
        ckpt = Path(str(Path(args.out)) + "-checkpoint") if spec.checkpoint_every or args.resume else None
        teacher = base if spec.objective != "lm" else None
        for record in recover(model, train, spec, teacher=teacher, checkpoint_dir=ckpt, resume=args.resume,
                              accelerator=accelerator):
            last = record
        result["recovery"] = {
            **spec.to_dict(), "train_data": args.train_data or args.data, "train_windows": train.num_windows,
            "final_loss": last.loss if last else None, "tokens_seen": last.tokens_seen if last else 0,
            "seconds": round(last.elapsed_s, 2) if last else 0.0, "checkpoint": str(ckpt) if ckpt else None,
            "processes": accelerator.num_processes if accelerator else 1,
        }
        if kept_rank is not None:
            result["recovery"]["kept_lora_rank"] = kept_rank
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not main:
        return None
    counts, original = measure_params(model), measure_params(base)
    after = evaluate.perplexity(model, heldout) if spec is not None else None
    ppl = after.ppl if after is not None else result["ppl_before"]
    result.update({
        "stored_parameters": counts.stored, "run_parameters": counts.run, "trainable_parameters": counts.trainable,
        "original_parameters": original.stored,
        "ppl": round(ppl, 4), "perplexity": round(ppl, 4), "ppl_after": round(after.ppl, 4) if after else None,
        "protocol": heldout.protocol(),
    })
    manifest = save_compact(model, plan, tok, args.out, overwrite=args.overwrite or args.resume)
    result["export"] = manifest["path"]
    result["export_weights_bytes"] = manifest["weights_bytes"]
    if args.merged:
        merged = save_merged(model, plan, tok, str(Path(args.out)) + "-merged", overwrite=args.overwrite or args.resume)
        result["merged_export"] = merged["path"]
        result["merged_weights_bytes"] = merged["weights_bytes"]
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result
