"""Does replacing beat dropping? An honest side-by-side recovery benchmark on one machine, one run.

On the embedded model (or --model) at --ratio (default 0.3: the 9 lowest-BI of 30 blocks), with
the same recovery data, steps, tokens and learning rates for every trained row (`build`'s rates for
a text model, flexigpt.pipeline.default_rates; and --objective, default next-token loss, except
where a row names its own):

- original                   no training (the reference)
- original + LoRA (=r8)      the same budget of LoRA on the unpruned model: how much the recovery
                             text alone lowers perplexity ("domain adaptation only")
- drop                       ShortGPT, no training
- drop + LoRA (=rN)          LoRA on the kept blocks at the trainable-parameter count of FlexiGPT rN
- drop + LoRA (=r8), OBJ     the same recovered with `build`'s objective for a text model
                             (flexigpt.pipeline.TEXT_RECIPE, when it is not --objective)
- flexigpt r8 (svd, one lr)  FlexiGPT as first shipped: SVD init, LayerNorm output norms, one
                             learning rate for everything
- flexigpt r8 budget (defaults)  what `plan` then `build --steps N` gives a text model with no other
                             flag: the r8 budget split into lower-rank slots + a LoRA on the kept
                             blocks (flexigpt.plan.budget; the row's name says the ranks), whitened
                             init with closed-form output scales, per-feature scale output norms,
                             gate learning-rate multiplier, no donor where the analysis' function
                             metric finds the block's own rank-r fit better than any donor,
                             `build`'s block-local fitting and objective for a text model:
                             flexigpt.pipeline.TEXT_FIT_STEPS and TEXT_RECIPE); also with --objective
                             (each slot reads what reaches it in the built model while it is fitted;
                             --fit-inputs original: what enters its pruned block in the original model)
- flexigpt r8 (r8 slots alone)  the same with r8 slots and no kept-block LoRA (the text defaults before
                             the split, and still what a chat model's plan gets)
- flexigpt r8 (no fit)       r8 slots without block-local fitting (the defaults until 2026-12-06)
- flexigpt r8 (svd, layernorm, gate lr)  the previous defaults
- flexigpt r8 shared donors  every slot shares its best donor (`plan --keep-donors`): does sharing
                             a donor help at all?
- flexigpt r32 (defaults)    the same at rank 32
- replaceme                  ReplaceMe: the lowest angular-distance span of as many blocks, cut, and
                             one least-squares linear map folded into the block before it (no training)
- replaceme + LoRA (=r8)     the same recovered with LoRA on the kept blocks at FlexiGPT r8's budget
- streamline                 LLM-Streamline: the same span replaced by one block trained locally
                             (--fit-steps, default 200), then recovered (the whole block trains)
- drop (iterative)           SLEB: blocks removed one at a time by calibration perplexity; alone
                             and + LoRA (=r8)
- foldgpt gG (...)           FoldGPT with its cure (distillation incl. the last-block hidden state),
                             with the first member's weights per group and with the members' average

Columns: held-out perplexity at the start (after init and local fit, before any end-to-end step)
and after recovery (in-domain, and on a second, differently styled text), stored and trainable
parameters, fit and recovery wall time. Writes a CSV into --out-dir and prints the table; with
--json the last stdout line is a JSON object.

    python bench/quality.py --steps 100 --json       # the recorded run
    python bench/quality.py --steps 3 --seq-len 64 --eval-windows 4 --calib-windows 4   # smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flexigpt import evaluate  # noqa: E402
from flexigpt.analysis import analyze  # noqa: E402
from flexigpt.data import token_windows  # noqa: E402
from flexigpt.models import load_model  # noqa: E402
from flexigpt.params import estimate_params, matched_lora_rank, measure_params  # noqa: E402
from flexigpt.pipeline import TEXT_RECIPE, build, default_fit_steps, default_rates, needs_calibration  # noqa: E402
from flexigpt.pipeline import recover_model  # noqa: E402
from flexigpt.plan import AdapterSpec, Plan, plan_from_analysis  # noqa: E402
from flexigpt.plan.budget import text_model_budget  # noqa: E402
from flexigpt.recover import RecoverSpec  # noqa: E402
from flexigpt.slot_fit import FIT_INPUTS, fit_slots  # noqa: E402


@dataclasses.dataclass
class Row:
    name: str
    plan: Plan | None
    trained: bool = True
    spec: dict = dataclasses.field(default_factory=dict)  # RecoverSpec changes for this row
    fit_steps: int = 0


def _lora_rank_for_budget(plan: Plan, base, budget: int) -> int:
    """Kept-block LoRA rank on ``plan`` whose trainable count is closest to ``budget``."""
    return min(range(1, 129), key=lambda r: (abs(estimate_params(plan, base, kept_lora_rank=r).trainable - budget), r))


def _rows(args, analysis, base) -> tuple[list[Row], Plan]:
    defaults = AdapterSpec(out_norm=args.out_norm or AdapterSpec().out_norm)
    flexi = {r: plan_from_analysis(analysis, args.ratio, method="flexigpt", adapter=dataclasses.replace(defaults, rank=r))
             for r in (8, 32)}
    first = flexi[8]
    drop = first.with_method("drop")
    identity = Plan.identity(args.model, base.config.num_hidden_layers, method="drop")
    budget = estimate_params(first, base).trainable
    rows = [Row("original", identity, trained=False),
            Row("original + LoRA (=r8)", identity.with_kept_lora(_lora_rank_for_budget(identity, base, budget))),
            Row("drop", drop, trained=False)]
    for r in (8, 32):
        rows.append(Row(f"drop + LoRA (=r{r})", drop.with_kept_lora(matched_lora_rank(flexi[r], base))))
    objective = TEXT_RECIPE[0]  # `build`'s objective for a model recovering on its text
    if objective != args.objective:  # the baseline recovered the way `build` recovers the defaults row
        rows.append(Row(f"drop + LoRA (=r8), {objective}", drop.with_kept_lora(matched_lora_rank(first, base)),
                        spec={"objective": objective}))
    rows.append(Row("flexigpt r8 (svd, one lr)", first.with_adapter(init="svd", out_norm="layernorm"),
                    spec={"gate_lr_scale": 1.0}))
    fit = default_fit_steps(first, chat_model=False)  # `build`'s local fit for a model recovering on its text
    inputs = "" if args.fit_inputs == "built" else f" on {args.fit_inputs} inputs"
    hybrid = text_model_budget(first)  # `plan`'s split of the r8 budget for a model without a chat template
    split = f"r{hybrid.adapter.rank} slots + kept LoRA r{hybrid.kept_lora_rank}, " if hybrid != first else ""
    rows.append(Row(f"flexigpt r8 budget (defaults: {split}{defaults.init}, {defaults.out_norm}, gate lr, "
                    f"fit {fit}{inputs}, {objective})", hybrid, spec={"objective": objective}, fit_steps=fit))
    if hybrid != first:
        rows.append(Row(f"flexigpt r8 (r8 slots alone, {defaults.init}, {defaults.out_norm}, gate lr, fit {fit}{inputs}, "
                        f"{objective}: the text defaults before the split)", first, spec={"objective": objective},
                        fit_steps=fit))
    if objective != args.objective:
        rows.append(Row(f"flexigpt r8 ({defaults.init}, {defaults.out_norm}, gate lr, fit {fit}{inputs}, "
                        f"{args.objective})", first, fit_steps=fit))
    rows.append(Row(f"flexigpt r8 (no fit: {defaults.init}, {defaults.out_norm}, gate lr, {objective})", first,
                    spec={"objective": objective}))
    rows.append(Row("flexigpt r8 (svd, layernorm, gate lr: the previous defaults)",
                    first.with_adapter(init="svd", out_norm="layernorm")))
    shared = plan_from_analysis(analysis, args.ratio, method="flexigpt", adapter=dataclasses.replace(defaults, rank=8),
                                keep_donors=True)
    if shared != first:
        rows.append(Row(f"flexigpt r8 shared donors ({defaults.init}, gate lr)", shared))
    rows.append(Row(f"flexigpt r32 (defaults: {defaults.init})", flexi[32]))
    n = len(first.pruned_blocks)
    spans = {m: plan_from_analysis(analysis, args.ratio, method=m) for m in ("replaceme", "streamline")}
    rows.append(Row("drop (replaceme's span)", spans["replaceme"].with_method("drop"), trained=False))
    rows.append(Row("replaceme", spans["replaceme"], trained=False))
    rows.append(Row("replaceme + LoRA (=r8)", spans["replaceme"].with_kept_lora(matched_lora_rank(first, base))))
    rows.append(Row(f"streamline (local fit {args.fit_steps}, then recovery)", spans["streamline"],
                    fit_steps=args.fit_steps))
    rows.append(Row("drop (iterative selection)", None, trained=False))
    rows.append(Row("drop (iterative) + LoRA (=r8)", None))
    assert all(len(p.pruned_blocks) == n for p in spans.values())
    # FoldGPT's cure as it was measured: logit KL at weight 1 beside the tail term of the same weight
    rows.append(Row(f"foldgpt g{args.group_size} (cure: distill + tail, gate lr)", None,
                    spec={"objective": "distill", "kd_weight": 1.0, "hidden_weight": args.fold_hidden_weight}))
    rows.append(Row(f"foldgpt g{args.group_size} averaged representative (same cure)", None,
                    spec={"objective": "distill", "kd_weight": 1.0, "hidden_weight": args.fold_hidden_weight}))
    return rows, first


def _names(arg: str) -> set[str]:
    """Row names or prefixes from a comma-separated list. A comma followed by a space is part of a
    name (`drop + LoRA (=r8), mix`), so only a bare comma separates two names."""
    return {s.strip() for s in re.split(r",(?!\s)", arg) if s.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="default", help="calibration, recovery (train split) and in-domain eval (held-out)")
    ap.add_argument("--other-data", default="shakespeare", help="a second text for cross-domain held-out perplexity")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    text_rates = default_rates(False)  # every row recovers at the rates `build` uses for a text model
    ap.add_argument("--lr", type=float, default=text_rates["lr"])
    ap.add_argument("--gate-lr-scale", type=float, default=text_rates["gate_lr_scale"])
    ap.add_argument("--kd-weight", type=float, default=text_rates["kd_weight"],
                    help="weight of the logit KL of the rows recovered with distillation (FoldGPT's cure sets its own)")
    ap.add_argument("--objective", default="lm", choices=("lm", "distill", "mix"))
    ap.add_argument("--fit-steps", type=int, default=200, help="local fitting steps of the streamline row")
    ap.add_argument("--out-norm", default=None, choices=("layernorm", "scale"),
                    help="the FlexiGPT rows' output norms (default: the plan's)")
    ap.add_argument("--fit-inputs", default="built", choices=FIT_INPUTS,
                    help="what each slot reads while it is fitted in the defaults rows (flexigpt.slot_fit)")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=2, help="FoldGPT: kept blocks per group")
    ap.add_argument("--gates-steps", type=int, default=30, help="FoldGPT: gate training steps on the calibration windows")
    ap.add_argument("--fold-hidden-weight", type=float, default=1.0,
                    help="FoldGPT cure: weight of the last-block hidden-state (tail distillation) term")
    names = "comma-separated row names (or name prefixes; a comma followed by a space belongs to a name)"
    ap.add_argument("--only", default="", help=f"{names} to run (default all)")
    ap.add_argument("--skip", default="", help=f"{names} to leave out")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--save-dir", default=None, help="also write a compact export of every trained pruned row here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    wall = time.perf_counter()

    loaded = load_model(args.model)
    base, tok = loaded.model, loaded.tokenizer
    analysis = analyze(base, tok, model_ref=args.model, data=args.data, samples=args.calib_windows,
                       seq_len=min(args.seq_len, 256), ranks=(8, 32), ratio=args.ratio).to_dict()
    spec = RecoverSpec(steps=args.steps, lr=args.lr, gate_lr_scale=args.gate_lr_scale, kd_weight=args.kd_weight,
                       batch_size=args.batch_size, seq_len=args.seq_len, objective=args.objective, checkpoint_every=0)
    train = token_windows(tok, args.data, seq_len=args.seq_len, split="train")
    calib = token_windows(tok, args.data, seq_len=min(args.seq_len, 256), split="train", max_windows=args.calib_windows)
    held = token_windows(tok, args.data, seq_len=args.seq_len, split="heldout", max_windows=args.eval_windows)
    other = token_windows(tok, args.other_data, seq_len=args.seq_len, split="heldout", max_windows=args.eval_windows)
    rows, first = _rows(args, analysis, base)
    only = _names(args.only)
    if only:
        rows = [r for r in rows if r.name == "original" or any(r.name.startswith(o) for o in only)]
    skip = _names(args.skip)
    rows = [r for r in rows if not any(r.name.startswith(o) for o in skip)]
    iterative = fold = None
    for row in rows:
        if row.name.startswith("drop (iterative"):
            if iterative is None:
                from flexigpt.selection import iterative_selection

                sel = iterative_selection(base, token_windows(tok, args.data, seq_len=128, split="train",
                                                              max_windows=8), len(first.pruned_blocks))
                bi_drop = first.with_method("drop")
                iterative = bi_drop.method_spec.from_pruned(bi_drop, set(sel.removed()))
                print(f"iterative selection (SLEB, 8 x 128 calibration tokens, {sel.seconds:.0f} s): removed "
                      f"{sel.removed()} (one-shot BI: {list(first.pruned_blocks)})")
            row.plan = iterative if not row.trained else iterative.with_kept_lora(matched_lora_rank(first, base))
        if row.name.startswith("foldgpt"):
            if fold is None:
                from flexigpt.gates import GateSpec, train_gates
                from flexigpt.plan import foldgpt_plan

                gates = train_gates(base, calib.input_ids, GateSpec(ratio=args.ratio, steps=args.gates_steps))
                fold = foldgpt_plan(args.model, gates.gates, args.ratio, args.group_size)
                print(f"FoldGPT gates ({args.gates_steps} steps, {gates.seconds:.0f} s): removed "
                      f"{list(fold.removed_blocks)}, groups {[list(g) for g in fold.groups]}")
            row.plan = fold.with_notes(representative="average") if "averaged" in row.name else fold

    print(f"pruned blocks (0-based, lowest BI): {list(first.pruned_blocks)}; donors: {first.donors} "
          f"(metric {analysis.get('donor_suggestion', {}).get('metric')}); FlexiGPT output norms: {first.adapter.out_norm}; "
          f"local fit on {args.fit_inputs} inputs")
    print(f"recovery: {spec.steps} steps x batch {spec.batch_size} x {spec.seq_len} tokens = "
          f"{spec.steps * spec.batch_size * spec.seq_len} tokens per trained row; objective {spec.objective}, "
          f"lr {spec.lr}, gate lr x{spec.gate_lr_scale}")
    results = []
    for row in rows:
        fit: dict = {}
        calibration = calib if needs_calibration(row.plan, row.fit_steps) else None
        own_fit = row.fit_steps and row.plan.method == "flexigpt" and args.fit_inputs != "built"
        model = build(base, row.plan, calibration=calibration, fit_steps=0 if own_fit else row.fit_steps, report=fit)
        if own_fit:  # the ablation: `build` fits on the built model's inputs
            fitted = fit_slots(model, base, calib, steps=row.fit_steps, inputs=args.fit_inputs)
            fit["fit_seconds"] = round(fit.get("fit_seconds", 0.0) + fitted.seconds, 2)
            fit["r2"] = {str(f.slot): round(f.r2_after, 4) for f in fitted.slots}
            model.eval()
        start_ppl = evaluate.perplexity(model, held).ppl
        seconds, final_loss = 0.0, None
        row_spec = dataclasses.replace(spec, **row.spec)
        if row.trained:
            t0 = time.perf_counter()
            for log in recover_model(model, base, train, row_spec):
                final_loss = log.loss
            seconds = time.perf_counter() - t0
        after = evaluate.perplexity(model, held).ppl if row.trained else start_ppl
        after_other = evaluate.perplexity(model, other).ppl
        counts = measure_params(model)
        results.append({"method": row.name, "ppl_start": start_ppl, "ppl_after": after, "ppl_other_after": after_other,
                        "stored_params": counts.stored, "trainable_params": counts.trainable,
                        "kept_lora_rank": row.plan.kept_lora_rank, "fit_seconds": fit.get("fit_seconds", 0.0),
                        "seconds": round(seconds, 1), "final_loss": final_loss,
                        "fit_r2": fit.get("r2") or fit.get("scale_r2")})
        if args.save_dir and row.trained and row.plan.pruned_blocks:
            from flexigpt.export import save_compact

            save_compact(model, row.plan, tok, Path(args.save_dir) / row.name.split(" (")[0].replace(" ", "-"),
                         overwrite=True)
        print(f"  {row.name:<40} start {start_ppl:9.2f} -> {after:9.2f}   other {after_other:9.2f}   "
              f"trainable {counts.trainable:>9,}   fit {fit.get('fit_seconds', 0.0):6.1f} s   {seconds:6.1f} s",
              flush=True)
        del model

    ref = {r["method"]: r for r in results}
    summary = {}
    lora_ref = ref.get("original + LoRA (=r8)")
    if "drop" in ref and lora_ref:
        gap = ref["drop"]["ppl_start"] - lora_ref["ppl_after"]
        for k, r in ref.items():
            if k.startswith(("flexigpt", "drop + LoRA")) and gap > 0:
                summary[f"{k}: gap closed"] = round((ref["drop"]["ppl_start"] - r["ppl_after"]) / gap, 3)
            if k.startswith("flexigpt"):
                summary[f"{k}: start / drop"] = round(r["ppl_start"] / ref["drop"]["ppl_start"], 3)

    w = max(24, *(len(r["method"]) + 1 for r in results))
    print()
    print(f"held-out protocol: {json.dumps(held.protocol())}")
    print(f"other-domain protocol: {json.dumps(other.protocol())}")
    print(f"{'method':<{w}}{'ppl start':>11}{'ppl after':>11}{'other after':>12}{'stored':>13}{'trainable':>11}"
          f"{'fit s':>8}{'seconds':>9}")
    for r in results:
        print(f"{r['method']:<{w}}{r['ppl_start']:>11.2f}{r['ppl_after']:>11.2f}{r['ppl_other_after']:>12.2f}"
              f"{r['stored_params']:>13,}{r['trainable_params']:>11,}{r['fit_seconds']:>8.1f}{r['seconds']:>9.1f}")
    for k, v in summary.items():
        print(f"{k}: {v}")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    import pandas as pd

    pd.DataFrame(results).to_csv(out_dir / f"quality-{stamp}.csv", index=False)
    print(f"wrote {out_dir / f'quality-{stamp}.csv'}; total {time.perf_counter() - wall:.0f} s")
    if args.json:
        keep = ("method", "ppl_start", "ppl_after", "ppl_other_after", "stored_params", "trainable_params",
                "kept_lora_rank", "fit_seconds", "seconds")
        print(json.dumps({"rows": [{k: r[k] for k in keep} for r in results], "summary": summary,
                          "protocol": held.protocol(), "steps": spec.steps, "recover": spec.to_dict(),
                          "pruned": list(first.pruned_blocks), "out_norm": first.adapter.out_norm,
                          "fit_inputs": args.fit_inputs, "donors": {str(k): v for k, v in first.donors.items()}}))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
