"""Recovery at scale: the same ``recover()`` loop data-parallel under ``accelerate launch``.

Every process loads the model, builds the same trainable set, and draws the same seeded window
order; each takes its own slice of every global micro-batch (global batch = ``batch_size`` x
``grad_accum`` x processes) and DDP all-reduces the gradients, so all processes hold identical
trainable tensors after every step. Only the main process writes checkpoints and outputs.
Mixed precision is bf16 on GPUs that support it (fp16 on older ones), fp32 on CPU; trainable
tensors stay fp32 either way.

Usage::

    # two CPU processes (gloo), e.g. to test. accelerate's own --cpu flag starts a single
    # process unless mpirun is set up, so ask for torchrun-style workers and force the CPU:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m flexigpt.accelerate_recover \\
        --model default --data default --out runs/r1 --steps 200 --lora-rank 8
    # a FlexiGPT plan (slot adapters + output norms trainable), distilled from the original
    accelerate launch --num_processes 4 -m flexigpt.accelerate_recover \\
        --model default --plan plan.json --objective distill --out runs/r2

Recovery data, objective and rates default to the recipe ``build`` uses (``flexigpt.pipeline.default_recovery``
and ``default_rates``: next-token loss on ``mixed`` chat + text data at lr 1e-3 for a model with a chat
template; otherwise next-token loss plus distillation on ``--data`` at lr 2e-3); ``--train-data``,
``--chat-share``, ``--chat-loss``, ``--objective``, ``--lr``, ``--gate-lr-scale`` and ``--kd-weight``
choose another, as in ``build``.

Outputs in ``--out``: ``trainable.safetensors`` (load with ``flexigpt.recover.load_trainable``
into a model built the same way), ``recover-log.jsonl`` (one ``StepLog`` per line),
``recover.json`` (settings, final loss, one digest of the trainable tensors per process), the
checkpoint under ``checkpoint/`` (``--resume`` continues from it) and, with ``--plan``, a compact
export under ``model/`` that ``flexigpt.models.load_model`` reads.

GPU clusters and FSDP: the base model is frozen, so plain DDP (the default of ``accelerate
launch``) fits whenever the model fits on one GPU (a 7B model in bf16 is about 13.5 GB). If you
need FSDP, do **not** use the usual per-decoder-layer auto-wrap (``TRANSFORMER_BASED_WRAP`` with
``LlamaDecoderLayer``): a FlexiGPT slot shares its donor block's tensors, and per-layer units
would put the donor and its replacement in different units, so the replacement reads a freed
or resharded parameter. Wrap the whole decoder stack as one unit and keep original parameters,
e.g. an ``accelerate config`` file with::

    distributed_type: FSDP
    mixed_precision: bf16
    fsdp_config:
      fsdp_version: 1
      fsdp_auto_wrap_policy: NO_WRAP        # one FSDP unit over the model
      fsdp_use_orig_params: true            # required with frozen + trainable tensors in one unit
      fsdp_sharding_strategy: FULL_SHARD
      fsdp_state_dict_type: FULL_STATE_DICT
      fsdp_sync_module_states: true

(or a custom wrap policy that puts every donor and all its replacement slots in one unit).

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import sys
from pathlib import Path

import torch
import torch.nn as nn

from flexigpt.adapters import inject_lora, lora_factor_modules, matrix_ranks, valid_targets
from flexigpt.arch import arch_of, get_blocks
from flexigpt.recover import recover, save_trainable, trainable_state
from flexigpt.recover_spec import RATE_FIELDS, add_arguments, add_data_arguments, from_args, rate_flags_help

log = logging.getLogger(__name__)

__all__ = ["attach_lora", "main", "trainable_digest"]


def attach_lora(model: nn.Module, rank: int, targets: list[str] | None = None, blocks: list[int] | None = None,
                seed: int = 0) -> nn.Module:
    """Freeze everything, then add LoRA (``flexigpt.adapters.lora_config``: standard init, scaling 1)
    on ``targets`` (default: every linear of the architecture) of ``blocks`` (default: all)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--lora-rank must be a positive integer, got {rank!r}")
    spec = arch_of(model)
    names = valid_targets(spec, tuple(targets or ()))
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)  # same adapters on every process (DDP also broadcasts rank 0's)
    all_blocks = get_blocks(model)
    chosen = list(range(len(all_blocks))) if not blocks else list(blocks)
    bad = [b for b in chosen if not 0 <= b < len(all_blocks)]
    if bad:
        raise ValueError(f"--lora-blocks {bad} out of range 0..{len(all_blocks) - 1}")
    for b in chosen:
        inject_lora(all_blocks[b], matrix_ranks(all_blocks[b], spec, rank, names))
    for factor in lora_factor_modules(model):
        factor.requires_grad_(True)
    return model


def trainable_digest(model: nn.Module) -> str:
    """A hash of the trainable tensors' names and exact bytes (equal digests = identical tensors)."""
    h = hashlib.sha256()
    for name, t in sorted(trainable_state(model).items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _ints(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ValueError(f"--lora-blocks must be comma-separated block ids, got {text!r}") from err


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="accelerate launch -m flexigpt.accelerate_recover", description=__doc__.split("\n")[0])
    p.add_argument("--model", "--model-dir", dest="model", default="default", help="'default', a folder or a hub id")
    p.add_argument("--data", default="default", help="text (train split): 'default', a file, hf:NAME:SPLIT; the "
                   "recovery data itself unless --train-data says otherwise")
    add_data_arguments(p)
    p.add_argument("--out", required=True, help="output folder (written by the main process)")
    p.add_argument("--plan", default=None, help="a plan.json: build it with apply_plan and train what it marks")
    p.add_argument("--kept-lora", type=int, default=None, help="with --plan: also LoRA of this rank on kept blocks")
    p.add_argument("--fit-steps", type=int, default=None,
                   help="with --plan: block-local fitting steps per slot before recovery (as `build --fit-steps`; "
                        "default: build's, flexigpt.pipeline.default_fit_steps)")
    p.add_argument("--lora-rank", type=int, default=8, help="without --plan: LoRA rank")
    p.add_argument("--lora-targets", default="", help="without --plan: comma-separated matrix names "
                   "(default: every linear of the architecture)")
    p.add_argument("--lora-blocks", default=None, help="without --plan: comma-separated block ids (default: all)")
    p.add_argument("--max-windows", type=int, default=None, help="use at most this many training windows")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    p.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the frozen weights (trainable tensors are always fp32); bfloat16 halves GPU memory")
    p.add_argument("-v", "--verbose", action="store_true")
    add_arguments(p, defaults={"objective": None, **{f: None for f in RATE_FIELDS}},
                  help_overrides={"objective": "lm, distill or mix (default: as `build`, the measured best recipe for "
                                               "the model, flexigpt.pipeline.default_recovery)", **rate_flags_help()})
    return p


def _precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def run(args: argparse.Namespace) -> dict | None:
    # accelerate is heavy: imported on first use
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    # imported on first use: keeps importing this module light; the recipe is the one `build` uses
    from flexigpt.models import load_model
    from flexigpt.pipeline import CHAT_LOSS, CHAT_SHARE, build, check_fit_steps, default_rates, default_recovery
    from flexigpt.pipeline import needs_calibration, recipe, resolve_fit_steps
    from flexigpt.plan import Plan
    from flexigpt.recovery_data import RECOVERY_SOURCES, has_chat_template, recovery_windows

    acc = Accelerator(mixed_precision=_precision(args.mixed_precision))
    from_args(args, objective=args.objective or "lm")  # every recovery flag is checked before the model loads
    share = CHAT_SHARE if args.chat_share is None else args.chat_share
    if not 0.0 < share < 1.0:
        raise ValueError(f"--chat-share must be between 0 and 1 (exclusive), got {share}")
    chat_loss = args.chat_loss or CHAT_LOSS
    check_fit_steps(args.fit_steps)
    if args.dtype != "float32" and acc.mixed_precision == "no":
        raise ValueError(f"--dtype {args.dtype} needs mixed precision (autocast); use --mixed-precision bf16 or fp16")
    loaded = load_model(args.model, dtype=args.dtype)
    base, tok = loaded.model, loaded.tokenizer
    chat = has_chat_template(tok)
    objective, data = default_recovery(chat)
    spec = from_args(args, recipe=default_rates(chat), objective=args.objective or objective)
    train_ref = args.train_data or data or args.data
    context = getattr(base.config, "max_position_embeddings", None)
    # before any adapter touches the base: chat data are the original model's own replies. The main
    # process generates (and caches) them first, the others then read the cache.
    with acc.main_process_first():
        windows = recovery_windows(base, tok, train_ref, text=args.data, seq_len=spec.seq_len,
                                   max_windows=args.max_windows, max_len=context, fraction=share,
                                   replies_only=chat_loss == "replies")
    plan = None
    if args.plan:
        plan = recipe(Plan.from_json(Path(args.plan).read_text(encoding="utf-8")), base, recovering=True,
                      kept_lora_rank=args.kept_lora)
        fit_steps = resolve_fit_steps(plan, args.fit_steps, tok)
        calibration = None
        if needs_calibration(plan, fit_steps):
            with acc.main_process_first():
                calibration = recovery_windows(base, tok, train_ref, text=args.data, seq_len=spec.seq_len,
                                               max_windows=32, max_len=context, fraction=share)
        # every process builds (and fits) the same slots from the same windows and seed
        model, teacher = build(base, plan, calibration=calibration, fit_steps=fit_steps), base  # the base stays frozen
    else:
        teacher = copy.deepcopy(base) if spec.objective != "lm" else None
        model = attach_lora(base, args.lora_rank, [t for t in args.lora_targets.split(",") if t.strip()],
                            _ints(args.lora_blocks), seed=spec.seed)
    if teacher is not None:
        teacher.requires_grad_(False)
    out = Path(args.out)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        logfile = (out / "recover-log.jsonl").open("a" if args.resume else "w", encoding="utf-8")
    last = None
    try:
        for record in recover(model, windows, spec, teacher=teacher, checkpoint_dir=out / "checkpoint",
                              resume=args.resume, progress=args.verbose and acc.is_main_process, accelerator=acc):
            last = record
            if acc.is_main_process:
                logfile.write(json.dumps(vars(record)) + "\n")
                logfile.flush()
    finally:
        if acc.is_main_process:
            logfile.close()
    digests = gather_object([trainable_digest(model)])
    result = None
    if acc.is_main_process:
        save_trainable(model, out / "trainable.safetensors")
        if plan is not None:
            # the export stack is needed only with --plan
            from flexigpt.export import save_compact

            save_compact(model, plan, tok, out / "model", overwrite=True)
        result = {
            "model": args.model, "data": args.data, "windows": windows.num_windows, "spec": spec.to_dict(),
            "train_data": train_ref, **({"chat_share": share} if train_ref == "mixed" else {}),
            **({"chat_loss": chat_loss} if train_ref in RECOVERY_SOURCES else {}),
            "plan": args.plan, "lora": None if plan is not None else
            {"rank": args.lora_rank, "targets": args.lora_targets, "blocks": _ints(args.lora_blocks)},
            "world_size": acc.num_processes, "backend": acc.state.backend, "mixed_precision": acc.mixed_precision,
            "device": str(acc.device),
            "final_step": last.step if last else None, "final_loss": last.loss if last else None,
            "tokens_seen": last.tokens_seen if last else None, "elapsed_s": last.elapsed_s if last else None,
            "trainable_parameters": sum(t.numel() for t in trainable_state(model).values()),
            "rank_digests": digests, "ranks_identical": len(set(digests)) == 1,
        }
        (out / "recover.json").write_text(json.dumps(result, indent=2))
    acc.wait_for_everyone()
    acc.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
