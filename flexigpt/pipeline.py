"""Run the whole story: build a plan's model, fit its slots, recover, evaluate, export.

The CLI's ``build`` (also under ``accelerate launch``), the app's build tab and the accelerate
entry all call these functions; each caller keeps only its own I/O (argument parsing, progress
display, JSON printing).

* ``recipe(plan, base, recovering)``: the plan as it will be built: a drop plan that is
  recovered gets kept-block LoRA at the rank whose trainable count matches the same blocks
  built as FlexiGPT (the ShortGPT + LoRA baseline), unless the plan names a rank itself;
* ``build(base, plan, calibration=...)``: ``apply_plan`` and, where the plan asks for it, the
  calibration-based slot initialisation;
* ``recover_model(...)``: the recovery loop, with the original model as teacher when needed;
* ``run(...)``: all of it plus held-out perplexity and the exports, returning the result dict
  the ``build`` command prints.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from flexigpt import evaluate
from flexigpt.data import Windows, token_windows
from flexigpt.export import save_compact, save_merged
from flexigpt.params import matched_lora_rank, measure_params
from flexigpt.plan import Plan
from flexigpt.recover import RecoverSpec, StepLog, recover
from flexigpt.recover_spec import CHAT_RATES, RATE_FIELDS, TEXT_RATES, default_rates  # the recipes' rates
from flexigpt.recovery_data import RECOVERY_SOURCES, has_chat_template, recovery_windows
from flexigpt.surgery import apply_plan

log = logging.getLogger(__name__)

__all__ = ["CHAT_LOSS", "CHAT_LOSSES", "CHAT_RATES", "CHAT_RECIPE", "CHAT_SHARE", "RATE_FIELDS", "TEXT_FIT_STEPS",
           "TEXT_RATES", "TEXT_RECIPE", "RunOptions", "build", "check_fit_steps", "default_fit_steps", "default_rates",
           "default_recovery",
           "drop_baseline", "needs_calibration", "recipe", "resolve_fit_steps",
           "recover_model", "run"]


# The recovery objective and data that `build` (with no --objective/--train-data) and the app use:
# for models with a chat template the recipe that won bench/chat.py, else the one that won bench/quality.py
# (bench/RESULTS.md). ``None`` data means the text the user names (--data). For chat models that is
# next-token loss on `mixed` data with a fifth of the windows chat: the best chat fidelity among the recipes
# whose held-out perplexity stays within 10 % of next-token loss on the text (0.288 vs 0.110 at 1.04 x,
# measured with svd slots; with today's whitened + scale slots this recipe reaches 0.301, and adding
# distillation on the same data 0.288, though 140.98 against 149.81 on another text). For other models
# it is next-token loss plus distillation from the original ("mix"): with the default slots, at lr 5e-4,
# it kept in-domain perplexity (20.34 against 20.03 for next-token loss alone) and cut the other text's
# (136.74 against 147.26). Distillation alone loses in-domain (22.77). Both cost about twice the time
# per step (the original runs beside the model). At today's learning rate (1e-3, RecoverSpec) the text
# recipe gives 19.31 / 136.66 (next-token loss: 19.00 / 149.73; drop + LoRA: 19.49 / 133.51, still
# ahead on the other text), and the chat recipe 0.274 with 2 looping replies at 20.04 held-out, against
# 0.082 with 12 for next-token loss on the text (19.00). With the text recipe's local fit (TEXT_FIT_STEPS)
# and the KL at twice the weight (RecoverSpec.kd_weight) the text recipe gives 18.33 / 135.83, and with
# `plan`'s split of a text model's budget (flexigpt.plan.budget: r4 slots + kept-block LoRA r2) 17.94 /
# 126.79, against drop + LoRA's 19.48 / 134.37 in the same bench run; at the text recipe's rates
# (flexigpt.recover_spec.TEXT_RATES: lr 2e-3, gate x15, KL weight 0.5) 15.52 / 132.90 against drop + LoRA's
# 16.41 / 136.23 in the same bench run (0.85 of the drop -> original + LoRA gap).
CHAT_RECIPE: tuple[str, str | None] = ("lm", "mixed")
TEXT_RECIPE: tuple[str, str | None] = ("mix", None)
CHAT_SHARE = 0.2  # share of chat windows in `mixed` recovery data when none is given
# What recovery learns on chat windows: every token ("all") or only the original's replies
# ("replies": the chat template and the prompts are read, not learned); bench/RESULTS.md.
CHAT_LOSSES = ("replies", "all")
CHAT_LOSS = "all"


# Block-local fitting that `build` runs by default before recovery (no --fit-steps), for FlexiGPT plans of
# models without a chat template. Measured with the text recipe (bench/RESULTS.md, "Local fitting and
# the distillation weight"): 200 steps per slot start the default plan at 0.53x the plain drop's
# perplexity (0.69x without), for 70 to 190 s of fitting on 2 CPU cores. With the KL weight 2 they end
# better on both texts than the earlier defaults (no fit, weight 1); at the same weight, fitting costs
# about 1.5 % on the other text for about 1.4 lower in-domain perplexity.
# Chat models get none: fitting on the recovery data cost chat answers every time it was measured
# (18 of 73 against 22 and 20), while it buys held-out perplexity.
TEXT_FIT_STEPS = 200


def check_fit_steps(fit_steps: int | None) -> None:
    """Refuse a ``--fit-steps`` value outside 0..100000 (``None``: the model's default)."""
    if fit_steps is not None and (not isinstance(fit_steps, int) or not 0 <= fit_steps <= 100_000):
        raise ValueError(f"--fit-steps must be in 0..100000, got {fit_steps}")


def default_fit_steps(plan: Plan, chat_model: bool) -> int:
    """Block-local fitting steps per slot that ``build`` runs when none are given: ``TEXT_FIT_STEPS``
    for a FlexiGPT plan with replacement slots on a model without a chat template, else 0 (other
    methods keep their own defaults, e.g. Streamline's local training)."""
    if chat_model or plan.method != "flexigpt" or not plan.replaced_slots:
        return 0
    return TEXT_FIT_STEPS


def resolve_fit_steps(plan: Plan, fit_steps: int | None, tokenizer: Any) -> int:
    """``fit_steps`` as given, or the model's default (``default_fit_steps``) when ``None``."""
    return default_fit_steps(plan, has_chat_template(tokenizer)) if fit_steps is None else fit_steps


def default_recovery(chat_model: bool) -> tuple[str, str | None]:
    """``(objective, train data or None)`` to recover with when the user names neither."""
    return CHAT_RECIPE if chat_model else TEXT_RECIPE


def recipe(plan: Plan, base: nn.Module, *, recovering: bool, kept_lora_rank: int | None = None) -> Plan:
    """The plan as it will be built.

    Args:
        plan: the plan as written.
        base: the base model (for the matched rank).
        recovering: whether recovery will run (only then does a drop plan need kept LoRA).
        kept_lora_rank: an explicit kept-block LoRA rank (overrides the plan's).
    """
    if kept_lora_rank is not None:
        return plan.with_kept_lora(kept_lora_rank)
    if recovering and plan.method == "drop" and plan.kept_lora_rank is None:
        return plan.with_kept_lora(matched_lora_rank(plan, base))
    return plan


def drop_baseline(plan: Plan, base: nn.Module) -> Plan:
    """The plain drop of ``plan``'s pruned blocks, as the ShortGPT + LoRA baseline it is compared with.

    Without kept-block LoRA in ``plan``, the drop carries none and recovery matches the rank
    (``recipe``). A hybrid FlexiGPT plan (slots plus its own kept-block LoRA) would otherwise pass
    that small rank on to the drop; here the drop gets the rank matched to the hybrid's whole
    trainable count instead.
    """
    drop = plan.with_method("drop")
    if plan.method == "drop" or plan.kept_lora_rank is None:
        return drop
    return drop.with_kept_lora(matched_lora_rank(plan, base))


def needs_calibration(plan: Plan, fit_steps: int = 0) -> bool:
    """Whether building ``plan`` reads calibration windows (the plan's method decides: whitened
    init or local fitting of FlexiGPT slots, ReplaceMe's span maps, Streamline's span blocks)."""
    return plan.method_spec.needs_calibration(plan, fit_steps)


def build(base: nn.Module, plan: Plan, *, calibration: Windows | None = None, fit_steps: int = 0,
          progress: Callable[[float, str], None] | None = None, report: dict | None = None) -> nn.Module:
    """Build ``plan`` from ``base`` (which stays unchanged) and fit it to the original where the
    method does so (``Method.calibrate``), before any end-to-end step.

    For ``flexigpt`` with ``adapter.init == "whitened"`` each replaced slot's LoRA starts from the
    whitened fit of ``W_pruned - W_donor`` and each output-norm gamma/beta is set in closed form;
    with ``fit_steps > 0`` every slot is then trained alone to reproduce its pruned block's output
    (block-local fitting). ``replaceme`` fits each span's linear map; ``streamline`` trains each
    span's block (``fit_steps`` steps, or its default when 0).

    Args:
        base: the base model.
        plan: the plan (with its kept-block LoRA rank, see ``recipe``).
        calibration: train-split windows of the original model's text (see ``needs_calibration``).
        fit_steps: block-local fitting steps per slot (0: none).
        progress: ``progress(fraction, message)`` callback.
        report: filled with what the fit measured (per-slot residuals, R^2, span errors, seconds).

    Raises:
        ValueError: calibration windows missing where needed, and every ``apply_plan`` error.
    """
    if progress:
        progress(0.0, f"building the {plan.method} model")
    model = apply_plan(base, plan)
    method = plan.method_spec
    if not method.needs_calibration(plan, fit_steps):
        return model.eval()
    if calibration is None:
        raise ValueError(f"building this {plan.method} plan fits it to the original model's activations; pass "
                         "calibration windows" + (" (or use adapter init 'svd' and fit_steps 0)"
                                                  if plan.method == "flexigpt" else ""))
    start = time.perf_counter()
    out = dict(method.calibrate(model, base, plan, calibration, fit_steps=fit_steps, progress=progress))
    out["fit_seconds"] = round(time.perf_counter() - start, 2)
    if report is not None:
        report.update(out)
    return model.eval()


def recover_model(model: nn.Module, base: nn.Module, windows: Any, spec: RecoverSpec, **kwargs: Any) -> Iterator[StepLog]:
    """``flexigpt.recover.recover`` with the original model as teacher where the objective needs it."""
    teacher = base if spec.objective != "lm" else None
    yield from recover(model, windows, spec, teacher=teacher, **kwargs)
    model.eval()


@dataclass(frozen=True)
class RunOptions:
    """What ``run`` reads, writes and measures besides the plan and the recovery settings.

    Attributes:
        out: the compact export folder.
        data: text for the held-out perplexity (and recovery, unless ``train_data``).
        train_data: recovery data: a text (train split), ``chat`` (the original's own chat replies)
            or ``mixed`` (half each); see ``flexigpt.recovery_data``.
        train_windows: use at most this many training windows.
        eval_windows: held-out windows for perplexity.
        seq_len: tokens per window.
        merged: also write a plain Hugging Face checkpoint to ``OUT-merged``.
        overwrite: replace existing export folders.
        resume: continue recovery from ``OUT-checkpoint``.
        kept_lora_rank: override the plan's kept-block LoRA rank.
        calibration_windows: train windows for the slot initialisation and local fitting.
        fit_steps: block-local fitting steps per slot before recovery (0: none; ``None``: the
            model's default, ``default_fit_steps``).
        chat_share: the share of chat windows in ``mixed`` recovery data (``CHAT_SHARE`` by default).
        chat_loss: which tokens of chat windows recovery learns, one of ``CHAT_LOSSES``
            (``CHAT_LOSS`` by default).
    """

    out: str
    data: str = "default"
    train_data: str | None = None
    train_windows: int | None = None
    eval_windows: int = 16
    seq_len: int = 256
    merged: bool = False
    overwrite: bool = False
    resume: bool = False
    kept_lora_rank: int | None = None
    calibration_windows: int = 32
    fit_steps: int | None = None
    chat_share: float | None = None
    chat_loss: str | None = None


def run(plan: Plan, options: RunOptions, spec: RecoverSpec | None = None, *, base: nn.Module | None = None,
        tokenizer: Any = None, accelerator: Any = None, on_step: Callable[[StepLog], None] | None = None) -> dict | None:
    """Build, optionally recover, measure and export; the ``build`` command's result dict
    (``None`` on processes other than the main one under data parallelism)."""
    from flexigpt.models import load_model  # loads torch weights: only when no base is given

    start = time.perf_counter()
    problem = plan.method_spec.merge_problem(plan) if options.merged else None
    if problem:
        raise ValueError(f"--merged cannot be exact for this plan: {problem}; drop --merged and use the compact export")
    if options.resume and spec is None:
        raise ValueError("--resume needs --steps > 0")
    share = CHAT_SHARE if options.chat_share is None else options.chat_share
    if not (isinstance(share, (int, float)) and not isinstance(share, bool) and 0.0 < share < 1.0):
        raise ValueError(f"chat share must be a number between 0 and 1 (exclusive), got {share!r}")
    chat_loss = CHAT_LOSS if options.chat_loss is None else options.chat_loss
    if chat_loss not in CHAT_LOSSES:
        raise ValueError(f"chat loss {chat_loss!r} is not one of {', '.join(CHAT_LOSSES)}")
    main = accelerator is None or accelerator.is_main_process
    if base is None:
        loaded = load_model(plan.base_model)
        base, tokenizer = loaded.model, loaded.tokenizer
    context = getattr(base.config, "max_position_embeddings", None)
    built = recipe(plan, base, recovering=spec is not None, kept_lora_rank=options.kept_lora_rank)
    train_ref = options.train_data or options.data
    fit_steps = resolve_fit_steps(built, options.fit_steps, tokenizer)
    calibration = None
    if needs_calibration(built, fit_steps):
        calibration = recovery_windows(base, tokenizer, train_ref, text=options.data, seq_len=options.seq_len,
                                       max_windows=options.calibration_windows, max_len=context, fraction=share)
    fit: dict = {}
    model = build(base, built, calibration=calibration, fit_steps=fit_steps, report=fit)
    heldout = token_windows(tokenizer, options.data, seq_len=options.seq_len, split="heldout",
                            max_windows=options.eval_windows, max_len=context)
    result: dict = {"plan": None, "method": plan.method, "slots": plan.num_slots}
    if fit:
        result["fit"] = fit
    if main:
        result["ppl_before"] = round(evaluate.perplexity(model, heldout).ppl, 4)
    if spec is not None:
        train = recovery_windows(base, tokenizer, train_ref, text=options.data, seq_len=spec.seq_len,
                                 max_windows=options.train_windows, max_len=context, fraction=share,
                                 replies_only=chat_loss == "replies")
        ckpt = Path(str(Path(options.out)) + "-checkpoint") if spec.checkpoint_every or options.resume else None
        last = None
        for record in recover_model(model, base, train, spec, checkpoint_dir=ckpt, resume=options.resume,
                                    accelerator=accelerator):
            last = record
            if on_step is not None:
                on_step(record)
        result["recovery"] = {
            **spec.to_dict(), "train_data": train_ref, "train_windows": train.num_windows,
            **({"chat_share": share} if train_ref == "mixed" else {}),
            **({"chat_loss": chat_loss} if train_ref in RECOVERY_SOURCES else {}),
            "final_loss": last.loss if last else None, "tokens_seen": last.tokens_seen if last else 0,
            "seconds": round(last.elapsed_s, 2) if last else 0.0, "checkpoint": str(ckpt) if ckpt else None,
            "processes": accelerator.num_processes if accelerator else 1,
        }
        if built.kept_lora_rank is not None:
            result["recovery"]["kept_lora_rank"] = built.kept_lora_rank
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
        "ppl": round(ppl, 4), "ppl_after": round(after.ppl, 4) if after else None,
        "protocol": heldout.protocol(),
    })
    manifest = save_compact(model, built, tokenizer, options.out, overwrite=options.overwrite or options.resume)
    result["export"] = manifest["path"]
    result["export_weights_bytes"] = manifest["weights_bytes"]
    if options.merged:
        merged = save_merged(model, built, tokenizer, str(Path(options.out)) + "-merged",
                             overwrite=options.overwrite or options.resume)
        result["merged_export"] = merged["path"]
        result["merged_weights_bytes"] = merged["weights_bytes"]
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result
