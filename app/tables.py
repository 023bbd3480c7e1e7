"""Pure display tables for the explorer: results in, ``pandas.DataFrame`` out (no gradio import).

Column names say their unit and every block id is 0-based.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

PLAN_COLUMNS = ["block (0-based)", "BI", "action", "donor (0-based)"]
ACTIONS = ("keep", "prune")


def _fmt_int(n: Any) -> str:
    return "n/a" if n is None else f"{int(n):,}"


def model_summary(info: Mapping[str, Any]) -> pd.DataFrame:
    """``model_info`` as a two-column property table."""
    rows = [
        ("architecture", f"{info.get('architecture')} ({info.get('model_type')})"),
        ("blocks", str(info.get("num_blocks"))),
        ("width (hidden size)", str(info.get("hidden_size"))),
        ("MLP width", str(info.get("intermediate_size"))),
        ("attention heads / KV heads", f"{info.get('num_attention_heads')} / {info.get('num_key_value_heads')}"),
        ("vocabulary", _fmt_int(info.get("vocab_size"))),
        ("parameters", _fmt_int(info.get("num_parameters"))),
        ("parameters per block", _fmt_int(info.get("block_parameters"))),
        ("tied embeddings", "yes" if info.get("tied_embeddings") else "no"),
        ("chat template", "yes" if info.get("chat_template") else "no"),
        ("context length", _fmt_int(info.get("max_position_embeddings"))),
        ("dtype", str(info.get("dtype"))),
    ]
    return pd.DataFrame(rows, columns=["property", "value"])


def score_columns(analysis: Mapping[str, Any]) -> dict[str, list[float | None]]:
    """The per-block score lists of an analysis dict (schema v1), for ``figures.scores_bar``."""
    out: dict[str, list[float | None]] = {"block_influence": list(analysis["block_influence"])}
    ad = (analysis.get("angular_distance") or {}).get("values")
    if ad:
        out["angular_distance_1"] = list(ad[0])
    drop = analysis.get("ppl_drop")
    out["nll_increase"] = list(drop["nll_increase"]) if drop else None
    out["ppl_without"] = list(drop["ppl"]) if drop else None
    gates = analysis.get("foldgpt_gates")
    out["foldgpt_gate"] = list(gates["gates"]) if gates and len(gates.get("gates") or ()) == len(out["block_influence"]) \
        else None
    return out


def scores_table(analysis: Mapping[str, Any]) -> pd.DataFrame:
    """One row per block: BI, its rank, angular distance and (when measured) the ppl without it."""
    cols = score_columns(analysis)
    bi = cols["block_influence"]
    order = sorted(range(len(bi)), key=lambda i: bi[i])
    rank = {b: r + 1 for r, b in enumerate(order)}
    df = pd.DataFrame({
        "block (0-based)": list(range(len(bi))),
        "BI": [round(float(v), 4) for v in bi],
        "BI rank (1 = most removable)": [rank[i] for i in range(len(bi))],
    })
    if cols.get("angular_distance_1") is not None:
        df["angular distance"] = [None if v is None else round(float(v), 4) for v in cols["angular_distance_1"]]
    if cols.get("ppl_without") is not None:
        df["ppl without the block"] = [None if v is None else round(float(v), 2) for v in cols["ppl_without"]]
        df["loss increase (nats/token)"] = [None if v is None else round(float(v), 4) for v in cols["nll_increase"]]
    if cols.get("foldgpt_gate") is not None:
        df["FoldGPT gate"] = [round(float(v), 4) for v in cols["foldgpt_gate"]]
    return df


def plan_table(num_blocks: int, layer_map: Sequence[int], method: str,
               block_influence: Sequence[float] | None = None, sources: Sequence[int] | None = None) -> pd.DataFrame:
    """The editable per-block view of a plan: keep/prune and the donor of each pruned block.

    For ``flexigpt`` a pruned block's donor is the block its slot runs; for ``drop`` it is empty;
    for ``foldgpt`` (with ``sources``, the block each slot stands for) removed blocks read
    ``prune`` and a kept block whose slot runs another block's weights names that block;
    ``extend`` plans are shown per slot by the figure, here every block reads ``keep``.
    """
    layer_map = [None if b is None else int(b) for b in layer_map]
    runs = {int(b): layer_map[s] for s, b in enumerate(sources)} if sources is not None else {}
    rows = []
    for b in range(num_blocks):
        if method == "foldgpt":
            pruned = b not in runs
            donor = runs[b] if not pruned and runs[b] != b else None
        elif method == "flexigpt":
            pruned = layer_map[b] != b
            donor = ("none" if layer_map[b] is None else layer_map[b]) if pruned else None
        elif method == "drop":
            pruned, donor = b not in layer_map, None
        else:
            pruned, donor = False, None
        bi = None if block_influence is None else round(float(block_influence[b]), 4)
        rows.append((b, bi, "prune" if pruned else "keep", "" if donor is None else str(donor)))
    return pd.DataFrame(rows, columns=PLAN_COLUMNS)


def params_table(estimate: Mapping[str, Any], base_total: int | None = None) -> pd.DataFrame:
    """Stored / run / trainable parameter counts of a plan, with the change against the base model."""
    labels = [
        ("stored", "stored parameters (each shared tensor once)"),
        ("run", "parameters per forward pass (run cost)"),
        ("trainable", "trainable in recovery (adapters + norms)"),
    ]
    rows = []
    for key, label in labels:
        value = estimate.get(key)
        if value is None:
            continue
        change = ""
        if base_total and key in ("stored", "run"):
            change = f"{100.0 * (value - base_total) / base_total:+.1f} %"
        elif base_total and key == "trainable":
            change = f"{100.0 * value / base_total:.2f} % of base"
        rows.append((label, f"{int(value):,}", change))
    return pd.DataFrame(rows, columns=["count", "parameters", "vs base"])


def protocol_text(protocol: Mapping[str, Any] | None) -> str:
    """One line: ``default, heldout (last 10%), 8 x 128 tokens, token-level, no BOS``."""
    if not protocol:
        return "n/a"
    bos = "BOS" if protocol.get("bos") else "no BOS"
    return (f"{protocol.get('data')}, {protocol.get('split')}, {protocol.get('windows')} x "
            f"{protocol.get('seq_len')} tokens, {protocol.get('level', 'token')}-level, {bos}")


def compare_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Original and built models: perplexity before/after recovery (with protocol), size, speed."""
    cols = ["model", "method", "slots", "ppl before recovery", "ppl after recovery", "steps",
            "stored params", "forward ms", "tokens/s", "speed-up", "chat fidelity",
            "perplexity protocol"]
    out = []
    for r in rows:
        ppl_b, ppl_a = r.get("ppl_before"), r.get("ppl_after")
        out.append((
            r["name"], r.get("method", ""), r.get("slots", ""),
            "n/a" if ppl_b is None else f"{ppl_b:.2f}",
            "n/a" if ppl_a is None else f"{ppl_a:.2f}",
            r.get("steps", 0),
            _fmt_int(r.get("stored_params")),
            "n/a" if r.get("forward_s") is None else
            f"{1000 * r['forward_s']:.0f} (x{r.get('forward_ratio') or 1.0:.2f})",
            "n/a" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:.1f}",
            "n/a" if r.get("throughput_ratio") is None else f"x{r['throughput_ratio']:.2f}",
            "n/a" if r.get("fidelity") is None else f"{r['fidelity']:.2f}",
            protocol_text(r.get("protocol")),
        ))
    return pd.DataFrame(out, columns=cols)
