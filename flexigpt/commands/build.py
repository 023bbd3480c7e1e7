"""``build``: build the model a plan describes, measure it and export it (compact, optionally merged)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

HELP = "build a plan (FlexiGPT, drop or extend), measure held-out perplexity and export it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", required=True, help="plan.json written by `plan`")
    p.add_argument("--out", required=True, help="export folder (compact; the merged export goes to OUT-merged)")
    p.add_argument("--steps", type=int, default=0, help="recovery steps (not available yet: must be 0)")
    p.add_argument("--merged", action="store_true", help="also write a plain Hugging Face checkpoint")
    p.add_argument("--data", default="default", help="text for the held-out perplexity")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows for perplexity")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")


@torch.no_grad()
def _perplexity(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> float:
    """Token-level perplexity over (N, T) windows (each window scored independently)."""
    total, count = 0.0, 0
    model.eval()
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += float(loss) * n
        count += n
    return math.exp(total / count)


def run(args: argparse.Namespace) -> dict:
    from flexigpt.data import token_windows
    from flexigpt.export import save_compact, save_merged
    from flexigpt.models import load_model
    from flexigpt.params import measure_params
    from flexigpt.plan import Plan
    from flexigpt.surgery import apply_plan

    if args.steps != 0:
        raise ValueError(f"--steps {args.steps}: recovery is not available yet; use --steps 0")
    if args.eval_windows < 1:
        raise ValueError(f"--eval-windows must be >= 1, got {args.eval_windows}")
    path = Path(args.plan)
    if not path.is_file():
        raise ValueError(f"plan file {args.plan!r} does not exist")
    plan = Plan.from_json(path.read_text())
    if args.merged and plan.replaced_slots and plan.adapter.out_norm == "layernorm":
        raise ValueError(
            "--merged needs out_norm 'scale' (a LayerNorm output norm cannot be folded into plain weights); "
            "rebuild the plan with --out-norm scale, or drop --merged and use the compact export"
        )
    loaded = load_model(plan.base_model)
    base = loaded.model
    model = apply_plan(base, plan)
    windows = token_windows(loaded.tokenizer, args.data, seq_len=args.seq_len, split="heldout",
                            max_windows=args.eval_windows, max_len=getattr(base.config, "max_position_embeddings", None))
    counts, original = measure_params(model), measure_params(base)
    result = {
        "plan": str(path), "method": plan.method, "slots": plan.num_slots,
        "stored_parameters": counts.stored, "run_parameters": counts.run, "trainable_parameters": counts.trainable,
        "original_parameters": original.stored,
        "perplexity": round(_perplexity(model, windows.input_ids), 4),
        "protocol": windows.protocol(),
    }
    manifest = save_compact(model, plan, loaded.tokenizer, args.out, overwrite=args.overwrite)
    result["export"] = manifest["path"]
    result["export_weights_bytes"] = manifest["weights_bytes"]
    if args.merged:
        merged = save_merged(model, plan, loaded.tokenizer, str(Path(args.out)) + "-merged", overwrite=args.overwrite)
        result["merged_export"] = merged["path"]
        result["merged_weights_bytes"] = merged["weights_bytes"]
    return result
