"""``plan``: write a plan.json from an analysis (or edit an existing plan)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "make a plan (which blocks to prune, share or repeat, donors, adapter rank) from an analysis.json"


SELECT = ("bi", "ppl", "iterative")


def add_arguments(p: argparse.ArgumentParser) -> None:
    # the registry is light (no torch): method names and each method's own options
    from flexigpt.methods import method_names, methods

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--analysis", help="analysis.json (or the folder holding it) written by `analyze`")
    src.add_argument("--from-plan", help="an existing plan.json to edit")
    p.add_argument("--ratio", type=float, default=None, help="fraction of blocks to prune (or to copy for extend), 0..0.9")
    p.add_argument("--select", choices=SELECT, default="bi",
                   help="how --analysis chooses the blocks to prune: bi (lowest Block Influence, one shot), ppl "
                        "(smallest perplexity rise when the block alone is removed; needs `analyze --ppl-drop`) or "
                        "iterative (SLEB: remove the block whose removal raises calibration perplexity least, "
                        "re-measure, repeat; cached)")
    p.add_argument("--shortlist", type=int, default=None,
                   help="with --select iterative: blocks per round measured on all calibration windows after every "
                        "block is screened on the first two (default 3; 0: every block on every window, exact SLEB, "
                        "about twice as slow)")
    p.add_argument("--drop", default="", help="extra blocks to prune, e.g. 3,12")
    p.add_argument("--keep", default="", help="blocks to keep, e.g. 5")
    p.add_argument("--donor", action="append", default=[], help="set a donor: PRUNED=DONOR, e.g. 12=11, or PRUNED=none for a slot with no donor "
                   "(its own low-rank factors only; repeatable)")
    p.add_argument("--keep-donors", action="store_true",
                   help="with --analysis: give every flexigpt slot its best donor, even where the analysis finds "
                        "the block reproduced better by its own low-rank fit (by default such a slot gets no donor)")
    p.add_argument("--method", choices=method_names(), default=None,
                   help="; ".join(f"{m.name}: {m.description}" for m in methods()))
    for m in methods():
        m.add_cli_options(p)
    p.add_argument("--align", action=argparse.BooleanOptionalAction, default=None,
                   help="initialise each adapter against its donor permutation-aligned to the pruned block")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank of the replacement slots")
    p.add_argument("--init", choices=("svd", "whitened", "zeros"), default=None,
                   help="adapter initialisation: svd (default), whitened (fit to the pruned block's outputs on "
                        "calibration text, closed-form output scales), zeros")
    p.add_argument("--out-norm", choices=("layernorm", "scale"), default=None, help="output normalisation kind")
    p.add_argument("--out-norm-scale", type=float, default=None, help="starting gamma / scale of the output norms")
    p.add_argument("--kept-lora-rank", type=int, default=None,
                   help="LoRA rank on the kept blocks, trained with recovery (stored in the plan; a recovered drop "
                        "plan without one gets the rank matched to the FlexiGPT budget)")
    p.add_argument("--out", required=True, help="where to write plan.json")


def _ids(text: str, flag: str) -> list[int]:
    out = []
    for part in filter(None, (t.strip() for t in text.split(","))):
        if not part.lstrip("-").isdigit():
            raise ValueError(f"{flag} expects comma-separated block ids, got {text!r}")
        out.append(int(part))
    return out


def _load_json(path: str, what: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "analysis.json"
    if not p.is_file():
        raise ValueError(f"{what} {str(p)!r} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {str(p)!r} is not valid JSON ({err.msg})") from err


def _base_config(ref: str):
    """The base model's config, read without loading weights where possible."""
    # transformers is heavy: imported on first use
    from transformers import AutoConfig

    # imported when the command runs, so `--help` stays fast
    from flexigpt import models

    if ref == "default":
        folder = models.cache_dir() / "models" / models._DEFAULT_CACHE_NAME
        if (folder / "config.json").is_file():
            return AutoConfig.from_pretrained(str(folder))
        return models.load_model(ref).model.config
    if Path(ref).expanduser().is_dir():
        return AutoConfig.from_pretrained(str(Path(ref).expanduser()))
    return models.load_model(ref).model.config


def _select_scores(analysis: dict, select: str, ratio: float,
                   shortlist: int | None = None) -> tuple[list[float] | None, str | None]:
    """``(scores, description)`` for ``--select`` (``None`` scores: Block Influence)."""
    L = int(analysis.get("num_blocks") or 0)
    if select == "bi":
        return None, None
    if select == "ppl":
        drop = analysis.get("ppl_drop")
        if not drop or not drop.get("nll_increase"):
            raise ValueError("--select ppl needs the perplexity of each block removed: run `analyze --ppl-drop`")
        return [1e6 if v is None else float(v) for v in drop["nll_increase"]], \
            "smallest perplexity rise when removed alone"
    # imported when the command runs, so `--help` stays fast
    from flexigpt.data import token_windows
    from flexigpt.models import load_model
    from flexigpt.selection import SHORTLIST, iterative_selection

    shortlist = SHORTLIST if shortlist is None else shortlist
    if isinstance(shortlist, bool) or not isinstance(shortlist, int) or not 0 <= shortlist <= L:
        raise ValueError(f"--shortlist must be in 0..{L} (0: exact SLEB), got {shortlist!r}")
    n = int(round(ratio * L))
    if n < 1:
        raise ValueError(f"--select iterative removes round(ratio x {L}) blocks; ratio {ratio} removes none")
    loaded = load_model(str(analysis.get("model")))
    windows = token_windows(loaded.tokenizer, str(analysis.get("data") or "default"), seq_len=128, split="train",
                            max_windows=8)
    result = iterative_selection(loaded.model, windows, n, shortlist=shortlist)
    how = "every block on every window" if not shortlist else f"shortlist {shortlist} after screening"
    return result.scores(L), f"iterative (SLEB: lowest calibration perplexity rise, re-measured after each removal; {how})"


def _gate_scores(analysis: dict, ratio: float, steps: int) -> list[float]:
    """FoldGPT gates trained on the analysis's own calibration windows (train split)."""
    # imported when the command runs, so `--help` stays fast
    from flexigpt.data import token_windows
    from flexigpt.gates import GateSpec, train_gates
    from flexigpt.models import load_model

    loaded = load_model(str(analysis.get("model")))
    windows = token_windows(loaded.tokenizer, str(analysis.get("data") or "default"),
                            seq_len=int(analysis.get("seq_len") or 128), split="train",
                            max_windows=int(analysis.get("samples") or 16))
    return train_gates(loaded.model, windows.input_ids, GateSpec(ratio=ratio, steps=steps)).gates


def run(args: argparse.Namespace) -> dict:
    # torch-heavy: loaded only when the command runs, so `--help` stays fast
    from flexigpt.atomic import write_text
    from flexigpt.methods import get_method
    from flexigpt.params import estimate_params
    from flexigpt.plan import Plan, drop_with_suggestion, extend_plan, foldgpt_plan, plan_from_analysis

    drops, keeps, ext = _ids(args.drop, "--drop"), _ids(args.keep, "--keep"), _ids(args.extend_blocks, "--extend-blocks")
    donors = {}
    for item in args.donor:
        pruned, sep, donor = item.partition("=")
        none = donor.strip().lower() == "none"
        if not sep or not pruned.strip().isdigit() or not (donor.strip().isdigit() or none):
            raise ValueError(f"--donor expects PRUNED=DONOR with block ids (or PRUNED=none), got {item!r}")
        donors[int(pruned)] = None if none else int(donor)
    if args.gates_steps and (args.method != "foldgpt" or not args.analysis):
        raise ValueError(f"--gates-steps {args.gates_steps} needs --method foldgpt and --analysis")
    if args.shortlist is not None and (args.select != "iterative" or not args.analysis):
        raise ValueError(f"--shortlist {args.shortlist} needs --analysis and --select iterative")
    analysis = None
    if args.analysis:
        analysis = _load_json(args.analysis, "analysis file")
        method = args.method or "flexigpt"
        if method == "foldgpt" and args.gates_steps:
            if not isinstance(args.gates_steps, int) or not 1 <= args.gates_steps <= 10_000:
                raise ValueError(f"--gates-steps must be in 1..10000, got {args.gates_steps}")
            ratio = args.ratio if args.ratio is not None else 0.0
            gates = _gate_scores(analysis, ratio, args.gates_steps)
            plan = foldgpt_plan(str(analysis.get("model")), gates, ratio, args.group_size or 2,
                                notes={"gates_steps": args.gates_steps, "analysis_data": analysis.get("data"),
                                       "analysis_samples": analysis.get("samples"),
                                       "analysis_seq_len": analysis.get("seq_len"),
                                       "gates": ",".join(f"{g:.4f}" for g in gates)})
        elif method == "extend" and ext:
            plan = extend_plan(str(analysis.get("model")), int(analysis.get("num_blocks", 0)), ext, args.extend_mode)
        elif getattr(args, "spans", None) and get_method(method).uses_spans:  # spans given: no proposal needed
            plan = Plan.identity(str(analysis.get("model")), int(analysis.get("num_blocks", 0)), method="drop")
            plan = get_method(method).apply_cli_options(plan, args)
        else:
            ratio = args.ratio if args.ratio is not None else 0.0
            scores, selection = _select_scores(analysis, args.select, ratio, args.shortlist)
            plan = plan_from_analysis(analysis, ratio, method="flexigpt" if method in ("drop", "foldgpt") else method,
                                      extend_mode=args.extend_mode, scores=scores, selection=selection,
                                      keep_donors=args.keep_donors)
    else:
        plan = Plan.from_json(Path(args.from_plan).read_text()) if Path(args.from_plan).is_file() else None
        if plan is None:
            raise ValueError(f"plan file {args.from_plan!r} does not exist")
        method = args.method or plan.method
        if method == "extend" and ext:
            plan = extend_plan(plan.base_model, plan.num_blocks, ext, args.extend_mode, adapter=plan.adapter)
    if getattr(args, "spans", None):
        if not get_method(method).uses_spans:
            raise ValueError(f"--spans applies to span methods (replaceme, streamline), not {method}")
        plan = get_method(method).apply_cli_options(plan, args)
    for b in keeps:
        plan = plan.keep(b)
    for b in drops:
        if b not in donors and analysis is not None and plan.method_spec.chooses_donors:
            # no --donor for it: the analysis' choice, as for the proposed slots (and the app's "auto")
            plan = drop_with_suggestion(plan, analysis, b, no_donor=not args.keep_donors)
            continue
        plan = plan.drop(b, donors.get(b))
        if b in donors and donors[b] is None:
            plan = plan.with_donor(b, None)
    for b, d in donors.items():
        if b not in drops:
            plan = plan.with_donor(b, d)
    if args.group_size is not None and method != "foldgpt":
        raise ValueError(f"--group-size {args.group_size} applies to --method foldgpt, not {method}")
    if method != plan.method or (method == "foldgpt" and args.group_size is not None):
        plan = plan.with_method(method, group_size=args.group_size)
    if getattr(args, "representative", None) is not None:
        if method != "foldgpt":
            raise ValueError(f"--representative {args.representative} applies to --method foldgpt, not {method}")
        plan = plan.with_notes(representative=args.representative)
    changes = {k: v for k, v in (("rank", args.rank), ("out_norm", args.out_norm), ("out_norm_scale", args.out_norm_scale),
                                 ("align", args.align), ("init", args.init)) if v is not None}
    if changes:
        plan = plan.with_adapter(**changes)
    if args.ratio is not None:
        plan = plan.with_notes(ratio=float(args.ratio))
    if args.kept_lora_rank is not None:
        plan = plan.with_kept_lora(args.kept_lora_rank)
    elif analysis is not None and args.rank is None:
        # a text model's measured split of the slots' budget
        from flexigpt.plan.budget import analysis_budget

        plan = analysis_budget(plan, analysis)
    out = Path(args.out)
    write_text(out, plan.to_json() + "\n")
    result = {"plan": plan.to_dict(), "path": str(out), "pruned": list(plan.unstored_blocks),
              "replaced_slots": list(plan.replaced_slots), "donors": {str(k): v for k, v in plan.donors.items()}}
    if plan.method == "foldgpt":
        result.update(removed=list(plan.removed_blocks), groups=[list(g) for g in plan.groups],
                      group_size=plan.group_size)
    if args.json:
        result["params"] = estimate_params(plan, _base_config(plan.base_model)).to_dict()
    return result
