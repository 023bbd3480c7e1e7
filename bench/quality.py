"""Does replacing beat dropping? An honest side-by-side recovery benchmark on one machine, one run.

On the embedded model (or --model) at --ratio (default 0.3: the 9 lowest-BI of 30 blocks), with
the same recovery data, steps and tokens for every trained row:

- original                  no training (the reference)
- original + LoRA           the same budget of LoRA on the unpruned model: how much the recovery
                            text alone lowers perplexity ("domain adaptation only")
- drop                      ShortGPT, no training
- drop + LoRA (=rN)         LoRA on the kept blocks at the trainable-parameter count of FlexiGPT rN
- flexigpt rN               FlexiGPT replacement slots with adapter rank N (default 8 and 32)
- foldgpt gG (...)          FoldGPT: the lowest-gated blocks removed (gates trained on the
                            calibration windows), groups of G kept blocks sharing one block's
                            weights, own pre-norms; its cure is the same budget with distillation
                            from the original including the last-block hidden-state term

Columns: held-out perplexity before/after recovery (in-domain, and on a second, differently
styled text), stored and trainable parameters, forward latency relative to the original
(measured side by side in one process), recovery wall time. Writes a CSV and a plotly HTML
figure into --out-dir and prints the table; with --json the last stdout line is a JSON object.

    python bench/quality.py                      # full run (--steps 100, batch 4 x 256)
    python bench/quality.py --steps 3 --seq-len 64 --eval-windows 4   # quick smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flexigpt import evaluate  # noqa: E402
from flexigpt.trainable import attach_kept_lora  # noqa: E402
from flexigpt.analysis import analyze  # noqa: E402
from flexigpt.data import token_windows  # noqa: E402
from flexigpt.models import load_model  # noqa: E402
from flexigpt.params import estimate_params, matched_lora_rank, measure_params  # noqa: E402
from flexigpt.plan import AdapterSpec, Plan, plan_from_analysis  # noqa: E402
from flexigpt.recover import RecoverSpec, recover  # noqa: E402
from flexigpt.surgery import apply_plan  # noqa: E402


def _lora_rank_for_budget(plan: Plan, base, budget: int) -> int:
    """Kept-block LoRA rank on ``plan`` whose trainable count is closest to ``budget``."""
    return min(range(1, 129), key=lambda r: (abs(estimate_params(plan, base, kept_lora_rank=r).trainable - budget), r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="default", help="calibration, recovery (train split) and in-domain eval (held-out)")
    ap.add_argument("--other-data", default="shakespeare", help="a second text for cross-domain held-out perplexity")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--ranks", default="8,32", help="FlexiGPT adapter ranks, one row each")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--objective", default="lm", choices=("lm", "distill", "mix"))
    ap.add_argument("--out-norm", default="layernorm", choices=("layernorm", "scale"))
    ap.add_argument("--out-norm-scale", type=float, default=1e-3, help="start scale of the slots' output norms")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=2, help="FoldGPT: kept blocks per group")
    ap.add_argument("--gates-steps", type=int, default=30, help="FoldGPT: gate training steps on the calibration windows")
    ap.add_argument("--fold-hidden-weight", type=float, default=1.0,
                    help="FoldGPT cure: weight of the last-block hidden-state (tail distillation) term")
    ap.add_argument("--only", default="", help="comma-separated row names (or name prefixes) to run (default all)")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--save-dir", default=None, help="also write a compact export of every trained FlexiGPT row here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    wall = time.perf_counter()

    loaded = load_model(args.model)
    base, tok = loaded.model, loaded.tokenizer
    L = base.config.num_hidden_layers
    analysis = analyze(base, tok, model_ref=args.model, data=args.data, samples=args.calib_windows,
                       seq_len=min(args.seq_len, 256), ranks=tuple(sorted(set(ranks))), ratio=args.ratio).to_dict()
    spec = RecoverSpec(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                       objective=args.objective, checkpoint_every=0)
    train = token_windows(tok, args.data, seq_len=args.seq_len, split="train")
    held = token_windows(tok, args.data, seq_len=args.seq_len, split="heldout", max_windows=args.eval_windows)
    other = token_windows(tok, args.other_data, seq_len=args.seq_len, split="heldout", max_windows=args.eval_windows)

    flexi = {r: plan_from_analysis(analysis, args.ratio, method="flexigpt",
                                   adapter=AdapterSpec(rank=r, out_norm=args.out_norm,
                                                                      out_norm_scale=args.out_norm_scale)) for r in ranks}
    first = flexi[ranks[0]]
    drop = first.with_method("drop")
    identity = Plan.identity(args.model, L, method="drop")
    budget = {r: estimate_params(p, base).trainable for r, p in flexi.items()}

    rows_spec: list[tuple[str, Plan, int | None, bool]] = [("original", identity, None, False)]
    rows_spec.append((f"original + LoRA (={ranks[0]})", identity, _lora_rank_for_budget(identity, base, budget[ranks[0]]), True))
    rows_spec.append(("drop", drop, None, False))
    for r in ranks:
        rows_spec.append((f"drop + LoRA (=r{r})", drop, matched_lora_rank(flexi[r], base), True))
    for r in ranks:
        rows_spec.append((f"flexigpt r{r}", flexi[r], None, True))
    fold_name = f"foldgpt g{args.group_size} (gates {args.gates_steps} steps, distill+tail {args.fold_hidden_weight:g})"
    rows_spec.append((fold_name, None, None, True))  # its plan needs the gates: made below only when selected
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if only:
        rows_spec = [row for row in rows_spec if row[0] == "original" or any(row[0].startswith(o) for o in only)]
    cure = {}  # per-row recovery settings that differ from `spec`
    if any(row[0] == fold_name for row in rows_spec):
        from dataclasses import replace

        from flexigpt.gates import GateSpec, train_gates
        from flexigpt.plan import foldgpt_plan

        calib = token_windows(tok, args.data, seq_len=min(args.seq_len, 256), split="train",
                              max_windows=args.calib_windows)
        gates = train_gates(base, calib.input_ids, GateSpec(ratio=args.ratio, steps=args.gates_steps))
        fold = foldgpt_plan(args.model, gates.gates, args.ratio, args.group_size)
        print(f"FoldGPT gates ({args.gates_steps} steps, {gates.seconds:.0f} s): removed {list(fold.removed_blocks)}, "
              f"groups {[list(g) for g in fold.groups]}")
        rows_spec = [(n, fold if n == fold_name else p, k, t) for n, p, k, t in rows_spec]
        cure[fold_name] = replace(spec, objective="distill", hidden_weight=args.fold_hidden_weight)

    print(f"pruned blocks (0-based, lowest BI): {list(first.pruned_blocks)}; donors: {first.donors}")
    print(f"recovery: {spec.steps} steps x batch {spec.batch_size} x {spec.seq_len} tokens = "
          f"{spec.steps * spec.batch_size * spec.seq_len} tokens per trained row; objective {spec.objective}, lr {spec.lr}")
    results, models = [], {}
    for name, plan, kept_rank, trained in rows_spec:
        model = apply_plan(base, plan)
        if kept_rank is not None:
            model = attach_kept_lora(model, kept_rank)
        before = evaluate.perplexity(model, held).ppl
        seconds, final_loss = 0.0, None
        if trained:
            start = time.perf_counter()
            row_spec = cure.get(name, spec)
            teacher = base if row_spec.objective != "lm" else None
            for log in recover(model, train, row_spec, teacher=teacher):
                final_loss = log.loss
            seconds = time.perf_counter() - start
        after = evaluate.perplexity(model, held).ppl if trained else before
        after_other = evaluate.perplexity(model, other).ppl
        counts = measure_params(model)
        row = {"method": name, "ppl_before": before, "ppl_after": after, "ppl_other_after": after_other,
               "stored_params": counts.stored, "trainable_params": counts.trainable, "kept_lora_rank": kept_rank,
               "seconds": round(seconds, 1), "final_loss": final_loss}
        results.append(row)
        models[name] = model
        if args.save_dir and name.startswith(("flexigpt", "foldgpt")) and trained:
            from flexigpt.export import save_compact

            save_compact(model, plan, tok, Path(args.save_dir) / name.split(" (")[0].replace(" ", "-"), overwrite=True)
        print(f"  {name:<24} ppl {before:9.2f} -> {after:9.2f}   other {after_other:9.2f}   "
              f"trainable {counts.trainable:>9,}   {seconds:6.1f} s", flush=True)

    speed = evaluate.compare_speed(models, tok, prompt_tokens=min(128, args.seq_len), new_tokens=16, repeats=3)
    by_name = {r.name: r for r in speed.rows}
    for row in results:
        row["rel_latency"] = round(by_name[row["method"]].forward_ratio, 3)

    ref = {r["method"]: r for r in results}
    summary = {}
    if "drop" in ref and any(k.startswith("original + LoRA") for k in ref):
        ref_lora = next(v for k, v in ref.items() if k.startswith("original + LoRA"))
        gap = ref["drop"]["ppl_before"] - ref_lora["ppl_after"]
        for r in ranks:
            k = f"flexigpt r{r}"
            if k in ref and gap > 0:
                summary[f"{k} gap closed"] = round((ref["drop"]["ppl_before"] - ref[k]["ppl_after"]) / gap, 3)

    w = max(24, *(len(r["method"]) + 1 for r in results))
    header = (f"{'method':<{w}}{'ppl before':>11}{'ppl after':>11}{'other after':>12}{'stored':>13}"
              f"{'trainable':>11}{'rel lat':>9}{'seconds':>9}")
    print()
    print(f"held-out protocol: {json.dumps(held.protocol())}")
    print(f"other-domain protocol: {json.dumps(other.protocol())}")
    print(header)
    for r in results:
        print(f"{r['method']:<{w}}{r['ppl_before']:>11.2f}{r['ppl_after']:>11.2f}{r['ppl_other_after']:>12.2f}"
              f"{r['stored_params']:>13,}{r['trainable_params']:>11,}{r['rel_latency']:>9.3f}{r['seconds']:>9.1f}")
    for k, v in summary.items():
        print(f"{k} (share of the drop -> original+LoRA gap): {v}")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    import pandas as pd

    frame = pd.DataFrame(results)
    frame.to_csv(out_dir / f"quality-{stamp}.csv", index=False)
    try:
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_bar(name="before recovery", x=frame["method"], y=frame["ppl_before"])
        fig.add_bar(name="after recovery", x=frame["method"], y=frame["ppl_after"])
        fig.add_bar(name="after, other domain", x=frame["method"], y=frame["ppl_other_after"])
        fig.update_layout(barmode="group", yaxis_type="log", yaxis_title="held-out perplexity (log scale)",
                          title=f"{args.model}: ratio {args.ratio}, {spec.steps} recovery steps per trained row")
        fig.write_html(out_dir / f"quality-{stamp}.html", include_plotlyjs="cdn")
    except ImportError:
        pass
    print(f"wrote {out_dir / f'quality-{stamp}.csv'}; total {time.perf_counter() - wall:.0f} s")
    if args.json:
        keep = ("method", "ppl_before", "ppl_after", "stored_params", "trainable_params", "rel_latency", "seconds")
        print(json.dumps({"rows": [{k: r[k] for k in keep} | {"ppl_other_after": r["ppl_other_after"]} for r in results],
                          "summary": summary, "protocol": held.protocol(), "steps": spec.steps,
                          "pruned": list(first.pruned_blocks)}))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
