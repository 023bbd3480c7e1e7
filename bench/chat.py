"""Does the pruned model still chat? Chat fidelity and held-out perplexity per recovery recipe, one run.

On the embedded model (or --model), FlexiGPT at --ratio (default 0.3) and adapter rank --rank
(default 8) is planned from the analysis with the `plan` command's defaults and built with the
`build` command's defaults; then every recipe recovers its own copy for --steps steps (same
batch, sequence length and learning rate) and is measured side by side with the original and
the unrecovered build:

- chat fidelity on the built-in prompt set (or --prompts): score (share of replies with an
  answer key), agreement (first 16 reply tokens equal to the original's), degeneration (share of
  looping replies), and how many prompts the original answers and the build does not;
- held-out perplexity on `default` (the last 10 % of the pydoc text), and on --other-data (default
  `shakespeare`, a differently styled text: does the recipe keep general ability?).

A recipe is OBJECTIVE:DATA: objective `lm` (next-token loss), `distill` (logit KL to the original)
or `mix` (both); data `default` (pydoc text, train split), `chat` (self-distillation chat data:
the original's cached greedy replies to template prompts that hold the fidelity set out) or
`mixed` (--mix-fraction of the windows from `chat`, the rest from `default`). Each recipe row
says whether it meets the targets: score >= 0.7 x the original's, no degenerate reply, held-out
perplexity within 10 % of `lm:default` (when that recipe is in the run).

    python bench/chat.py --recipes lm:default,distill:default,distill:chat,mix:chat,distill:mixed --steps 100 --json
    python bench/chat.py --recipes lm:default,distill:chat --steps 3 --eval-windows 4   # smoke run
    python bench/chat.py --select iterative --recipes lm:mixed --steps 100 --json   # SLEB's blocks instead of BI's
    python bench/chat.py --select iterative --select-data chat --recipes lm:mixed --steps 100 --json   # SLEB on chat
    python bench/chat.py --donors nearest --recipes lm:mixed --steps 100 --json   # each slot on its nearest kept block (the app's proposal before a share-error run, until 2026-12-06)
    python bench/chat.py --calib-data chat --recipes lm:mixed --steps 100 --json   # slots calibrated on the chat data alone
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flexigpt import evaluate  # noqa: E402
from flexigpt.analysis import analyze  # noqa: E402
from flexigpt.chat_data import chat_data, mix_windows  # noqa: E402
from flexigpt.data import token_windows  # noqa: E402
from flexigpt.fidelity import builtin_prompts, chat_fidelity, load_prompts  # noqa: E402
from flexigpt.models import load_model  # noqa: E402
from flexigpt.params import measure_params  # noqa: E402
from flexigpt.pipeline import CHAT_LOSS, CHAT_LOSSES, CHAT_SHARE, build, default_rates, needs_calibration  # noqa: E402
from flexigpt.pipeline import recover_model  # noqa: E402
from flexigpt.plan import AdapterSpec, plan_from_analysis  # noqa: E402
from flexigpt.plan.specs import ADAPTER_INITS  # noqa: E402
from flexigpt.recover import RecoverSpec  # noqa: E402
from flexigpt.recovery_data import recovery_windows  # noqa: E402
from flexigpt.selection import iterative_selection  # noqa: E402

OBJECTIVES = ("lm", "distill", "mix")
DATA = ("default", "chat", "mixed")
SCORE_SHARE, PPL_SLACK = 0.7, 0.10


def _recipes(args) -> list[tuple[str, str]]:
    text = args.recipes or f"{args.objective}:{args.data}"
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        objective, _, data = part.partition(":")
        if objective not in OBJECTIVES or data not in DATA:
            raise SystemExit(f"error: recipe {part!r} must be OBJECTIVE:DATA with OBJECTIVE in {OBJECTIVES} and "
                             f"DATA in {DATA}")
        out.append((objective, data))
    if not out:
        raise SystemExit("error: --recipes names no recipe")
    return out


def _row(name: str, report, ppls: tuple[float, float], original, **extra) -> dict:
    """One table row; ``ppls`` is the model's (held-out, other-text) perplexity."""
    return {"method": name, "score": report.score, "agreement": report.agreement, "degeneration": report.degeneration,
            "passed": report.passed, "degenerate": report.degenerate,
            "lost_vs_original": len(report.regressions(original)) if original is not None else 0,
            "ppl_heldout": ppls[0], "ppl_other": ppls[1], "fidelity_seconds": round(report.seconds, 1),
            "by_kind": report.to_dict(rows=False)["by_kind"], **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--rank", type=int, default=8, help="FlexiGPT adapter rank")
    ap.add_argument("--init", default=AdapterSpec().init, choices=ADAPTER_INITS,
                    help="slot init (default: the plan's)")
    ap.add_argument("--fit-steps", type=int, default=0,
                    help="block-local fitting steps per slot before recovery (as `build --fit-steps`)")
    ap.add_argument("--select", default="bi", choices=("bi", "iterative"),
                    help="which blocks to prune: lowest Block Influence (as `plan`) or iterative selection (SLEB, "
                         "as `plan --select iterative`, 8 x 128 calibration tokens)")
    ap.add_argument("--select-data", default="default", choices=DATA,
                    help="what iterative selection measures perplexity on: the text (as `plan`), the original's "
                         "own chat replies, or the mix recovery reads")
    ap.add_argument("--donors", default="analysis", choices=("analysis", "nearest"),
                    help="slot donors: the analysis's suggestion as `plan` makes it (default), or the nearest kept "
                         "block (what a plan proposed before any share-error run got until 2026-12-06)")
    ap.add_argument("--recipes", default=None, help="comma-separated OBJECTIVE:DATA recipes, e.g. lm:default,distill:chat")
    ap.add_argument("--objective", default="lm", choices=OBJECTIVES, help="the one recipe's objective without --recipes")
    ap.add_argument("--data", default="default", choices=DATA, help="the one recipe's data without --recipes")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=RecoverSpec().batch_size)
    ap.add_argument("--seq-len", type=int, default=256)
    chat_rates = default_rates(True)  # `build`'s rates for a chat model
    ap.add_argument("--lr", type=float, default=chat_rates["lr"])
    ap.add_argument("--gate-lr-scale", type=float, default=chat_rates["gate_lr_scale"],
                    help="learning-rate multiplier of output-norm scales, norms and biases (as `build --gate-lr-scale`)")
    ap.add_argument("--kept-lora-rank", type=int, default=None,
                    help="also put LoRA of this rank on the kept blocks (as `build --kept-lora-rank`; default none)")
    ap.add_argument("--mix-fraction", type=float, default=CHAT_SHARE,
                    help="share of chat windows in the `mixed` data (default: build's, flexigpt.pipeline.CHAT_SHARE)")
    ap.add_argument("--chat-loss", default=CHAT_LOSS, choices=CHAT_LOSSES,
                    help="which tokens of the chat windows recovery learns (default: build's)")
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out windows of `default` for perplexity")
    ap.add_argument("--other-data", default="shakespeare",
                    help="a second, differently styled text for held-out perplexity (general ability)")
    ap.add_argument("--calib-windows", type=int, default=32, help="analysis (and calibration) windows")
    ap.add_argument("--calib-data", default=None, choices=DATA,
                    help="data the slots' whitened init and local fit calibrate on (default: each recipe's own "
                         "recovery data, as `build` does)")
    ap.add_argument("--prompts", default=None, help="a .jsonl prompt set instead of the built-in one")
    ap.add_argument("--fidelity-max-new-tokens", type=int, default=48)
    ap.add_argument("--chat-max-new-tokens", type=int, default=96, help="reply length of the self-distillation data")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 is much faster than 2 on a machine shared with other jobs)")
    ap.add_argument("--save-dir", default=None, help="also write a compact export of every recovered recipe here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    recipes = _recipes(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    wall, cpu = time.perf_counter(), time.process_time()

    loaded = load_model(args.model)
    base, tok = loaded.model, loaded.tokenizer
    pset = load_prompts(args.prompts) if args.prompts else builtin_prompts()
    fid = {"prompts": pset, "max_new_tokens": args.fidelity_max_new_tokens}
    analysis = analyze(base, tok, model_ref=args.model, data="default", samples=args.calib_windows,
                       seq_len=min(args.seq_len, 256), ranks=(args.rank,), ratio=args.ratio).to_dict()
    scores = selection = None
    if args.select == "iterative":
        L = base.config.num_hidden_layers
        sel_windows = recovery_windows(base, tok, args.select_data, seq_len=128, max_windows=8,
                                       fraction=args.mix_fraction)
        sel = iterative_selection(base, sel_windows, int(round(args.ratio * L)))
        scores, selection = sel.scores(L), "iterative"
    nearest = args.donors == "nearest"
    if nearest:  # without its share error (and with keep_donors) plan_from_analysis gives each slot its nearest kept block
        analysis = {k: v for k, v in analysis.items() if k not in ("share_error", "donor_suggestion")}
    plan = plan_from_analysis(analysis, args.ratio, method="flexigpt", adapter=AdapterSpec(rank=args.rank,
                                                                                            init=args.init),
                              scores=scores, selection=selection, keep_donors=nearest)
    if args.kept_lora_rank:
        plan = plan.with_kept_lora(args.kept_lora_rank)
    held = token_windows(tok, "default", seq_len=args.seq_len, split="heldout", max_windows=args.eval_windows)
    other = token_windows(tok, args.other_data, seq_len=args.seq_len, split="heldout", max_windows=args.eval_windows)

    def ppls(model) -> tuple[float, float]:
        return evaluate.perplexity(model, held).ppl, evaluate.perplexity(model, other).ppl

    print(f"plan: flexigpt r{args.rank} at ratio {args.ratio}: pruned {list(plan.pruned_blocks)}, donors {plan.donors}")

    t0 = time.perf_counter()
    original = chat_fidelity(base, tok, cache=True, **fid)  # cached on disk after the first run
    rows = [_row("original", original, ppls(base), None, steps=0, recovery_seconds=0.0)]
    print(f"original ({time.perf_counter() - t0:.1f} s): {original.summary()}", flush=True)

    windows: dict[str, object] = {}
    data_info: dict[str, dict] = {}

    def data(name: str):
        if name not in windows:
            if name == "default":
                windows[name] = token_windows(tok, "default", seq_len=args.seq_len, split="train")
            elif name == "chat":
                t = time.perf_counter()
                chat = chat_data(base, tok, max_new_tokens=args.chat_max_new_tokens)
                windows[name] = chat.windows(seq_len=args.seq_len, replies_only=args.chat_loss == "replies")
                data_info["chat"] = {**chat.protocol(), "generated": chat.generated, "seconds": round(chat.seconds, 1),
                                     "windows": windows[name].num_windows}
                print(f"chat data: {len(chat.replies)} conversations, {windows[name].num_windows} windows, "
                      f"{'generated' if chat.generated else 'read from the cache'} in {time.perf_counter() - t:.1f} s",
                      flush=True)
            else:
                windows[name] = mix_windows(data("default"), data("chat"), args.mix_fraction)
            data_info.setdefault(name, {})["windows"] = windows[name].num_windows
        return windows[name]

    fitted: dict[str, object] = {}  # calibration data -> the fitted, unrecovered build

    def built(source: str):
        """The build as `build` makes it: whitened init and local fitting calibrate on the recovery data."""
        if not needs_calibration(plan, args.fit_steps):
            return build(base, plan)
        if source not in fitted:  # fitted once per calibration data; each recipe recovers a copy
            windows = recovery_windows(base, tok, source, seq_len=min(args.seq_len, 256),
                                       max_windows=args.calib_windows, fraction=args.mix_fraction)
            fit: dict = {}
            fitted[source] = build(base, plan, calibration=windows, fit_steps=args.fit_steps, report=fit)
            print(f"built on {source} calibration: fit {fit.get('fit_seconds', 0.0):.0f} s, "
                  f"R2 {fit.get('r2') or fit.get('scale_r2')}", flush=True)
        return copy.deepcopy(fitted[source])

    model = built(args.calib_data or recipes[0][1])
    report = chat_fidelity(model, tok, reference=original, **fid)
    rows.append(_row(f"flexigpt r{args.rank} (no recovery)", report, ppls(model), original, steps=0,
                     recovery_seconds=0.0, trainable_params=measure_params(model).trainable))
    print(f"no recovery: {report.summary()}", flush=True)
    del model
    base_spec = dataclasses.replace(RecoverSpec(), steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                    lr=args.lr, gate_lr_scale=args.gate_lr_scale, checkpoint_every=0)
    for objective, source in recipes:
        name = f"flexigpt r{args.rank} {objective}:{source}"
        spec = dataclasses.replace(base_spec, objective=objective)
        train = data(source)
        model = built(args.calib_data or source)
        t, c, last = time.perf_counter(), time.process_time(), None
        for last in recover_model(model, base, train, spec):
            pass
        seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - c
        report = chat_fidelity(model, tok, reference=original, **fid)
        ppl, ppl_other = ppls(model)
        rows.append(_row(name, report, (ppl, ppl_other), original, steps=spec.steps, recovery_seconds=round(seconds, 1),
                         seconds_per_step=round(seconds / spec.steps, 2), cpu_seconds_per_step=round(cpu_seconds / spec.steps, 2),
                         final_loss=last.loss if last else None, tokens_seen=last.tokens_seen if last else 0,
                         train_windows=train.num_windows, trainable_params=measure_params(model).trainable))
        lost = report.regressions(original)
        print(f"{name}: ppl {ppl:.2f}, {seconds / spec.steps:.2f} s/step; {report.summary()}\n"
              f"  answered by the original, not by this build ({len(lost)}): "
              + ("; ".join(repr(r.prompt) for r, _ in lost[:6]) or "none") + (" ..." if len(lost) > 6 else ""),
              flush=True)
        if args.save_dir:
            from flexigpt.export import save_compact  # only when exports are asked for

            save_compact(model, plan, tok, Path(args.save_dir) / name.replace(" ", "-").replace(":", "-"), overwrite=True)
        del model

    lm = next((r for r in rows if r["method"].endswith(" lm:default")), None)
    for r in rows[2:]:
        r["score_vs_original"] = round(r["score"] / original.score, 3) if original.score else None
        r["ppl_vs_lm_default"] = round(r["ppl_heldout"] / lm["ppl_heldout"], 3) if lm else None
        r["meets_targets"] = bool(r["score"] >= SCORE_SHARE * original.score and r["degenerate"] == 0
                                  and (lm is None or r["ppl_heldout"] <= (1 + PPL_SLACK) * lm["ppl_heldout"]))

    w = max(len(r["method"]) for r in rows) + 2
    print()
    print(f"chat-fidelity protocol: {json.dumps({k: v for k, v in original.protocol.items() if k != 'loop_rule'})}")
    print(f"held-out protocol: {json.dumps(held.protocol())}")
    print(f"other-text protocol: {json.dumps(other.protocol())}")
    print(f"pruned blocks (0-based): {', '.join(map(str, plan.pruned_blocks))}, chosen by "
          + ("Block Influence" if args.select == "bi" else f"iterative selection on {args.select_data}"))
    print(f"slots: init {args.init}, {args.fit_steps} local-fit steps per slot, calibration {args.calib_windows} windows "
          + (f"of {args.calib_data}" if args.calib_data else "of each recipe's data"))
    print(f"recovery: {args.steps} steps x batch {args.batch_size} x {args.seq_len} tokens, lr {args.lr}, "
          f"gate lr x{args.gate_lr_scale:g}, kept-block LoRA rank {args.kept_lora_rank or 'none'}; "
          f"mixed = {args.mix_fraction:g} chat; chat loss on {args.chat_loss}")
    kinds = original.by_kind()
    print(f"answered by kind ({', '.join(f'{k}: {n}' for k, (_, n) in kinds.items())} prompts):")
    for r in rows:
        print(f"  {r['method']:<{w}}" + "".join(f"{k} {r['by_kind'].get(k, {}).get('passed', 0):>3}  " for k in kinds))
    print(f"{'method':<{w}}{'score':>7}{'agree':>7}{'degen':>7}{'lost':>6}{'ppl':>9}{'other':>9}{'ppl/lm':>8}{'s/step':>8}{'meets':>7}")
    for r in rows:
        ratio = r.get("ppl_vs_lm_default")
        print(f"{r['method']:<{w}}{r['score']:>7.3f}{(r['agreement'] if r['agreement'] is not None else 1.0):>7.3f}"
              f"{r['degeneration']:>7.3f}{r['lost_vs_original']:>6}{r['ppl_heldout']:>9.2f}{r['ppl_other']:>9.2f}"
              f"{(f'{ratio:.3f}' if ratio else '-'):>8}{(str(r.get('seconds_per_step', '-'))):>8}"
              f"{('yes' if r.get('meets_targets') else 'no') if 'meets_targets' in r else '-':>7}")
    print(f"total {time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")
    if args.json:
        print(json.dumps({"rows": rows, "fidelity_protocol": original.protocol, "heldout_protocol": held.protocol(), "other_protocol": other.protocol(),
                          "data": data_info, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                          "lr": args.lr, "gate_lr_scale": args.gate_lr_scale, "kept_lora_rank": args.kept_lora_rank, "init": args.init, "fit_steps": args.fit_steps, "calib_data": args.calib_data, "donors": args.donors, "mix_fraction": args.mix_fraction, "chat_loss": args.chat_loss, "pruned": list(plan.pruned_blocks), "select": args.select, "select_data": args.select_data if args.select == "iterative" else None,
                          "targets": {"score_share": SCORE_SHARE, "ppl_slack": PPL_SLACK}}))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
