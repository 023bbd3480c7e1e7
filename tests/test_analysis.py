"""analyze(): schema, cache, validation, and the `analyze` CLI (tiny model in a tmp folder)."""
from __future__ import annotations

import json
import math
import time

import pytest

from flexigpt.analysis import Analysis, analyze


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXIGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _run(model, tok, data_file, **kw):
    settings = dict(data=str(data_file), samples=4, seq_len=16, ranks=(2, 8))
    settings.update(kw)
    return analyze(model, tok, **settings)


def _no_nan(obj):
    if isinstance(obj, float):
        assert math.isfinite(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _no_nan(v)
    elif isinstance(obj, list):
        for v in obj:
            _no_nan(v)


def test_schema_and_cache_hit(tiny_model, tiny_tokenizer, tiny_text_file, cache):
    first = _run(tiny_model, tiny_tokenizer, tiny_text_file, ppl_drop=True, ppl_samples=2)
    d = first.to_dict()
    L = 6
    assert d["format_version"] == 1 and d["num_blocks"] == L and not d["cached"]
    assert d["protocol"]["windows"] == 4 and d["protocol"]["split"] == "train"
    assert len(d["block_influence"]) == L
    assert d["angular_distance"]["max_span"] == L
    assert [len(r) for r in d["angular_distance"]["values"]] == [6, 5, 4, 3, 2, 1]
    assert len(d["similarity"]) == L and all(len(r) == L for r in d["similarity"])
    assert d["ppl_drop"]["samples"] == 2 and d["ppl_drop"]["tokens"] == 2 * 15 and len(d["ppl_drop"]["ppl"]) == L
    se = d["share_error"]
    assert se["ranks"] == [2, 8] and len(se["matrices"]) == 7 and se["pairs"] == "all"
    assert se["absolute"]["8"][0][0] is None and se["absolute"]["8"][0][1] > 0
    assert set(se["per_matrix"]["relative"]["2"]) == set(se["matrices"])
    assert se["paper"]["2"][1][0] is not None and len(se["weight_norms"]["q_proj"]) == L
    sugg = d["donor_suggestion"]
    assert sugg["metric"] == "function" and sugg["rank"] == 8 and len(sugg["pruned"]) == 2  # round(0.3 * 6)
    fn = se["function"]["8"]
    assert len(fn) == L and fn[0][0] is None and all(fn[i][j] > 0 for i in range(L) for j in range(L) if i != j)
    assert set(se["per_matrix"]["function"]["2"]) == set(se["matrices"])
    alone = se["no_donor"]["function"]["8"]
    assert len(alone) == L and all(0 < v < 1 for v in alone)  # a rank-r fit of W_i alone always leaves less than W_i
    assert se["function_settings"]["tokens"] == 4 * 16 and se["function_settings"]["rows"] == list(range(L))
    # random blocks are unrelated: no donor beats a fit of the block alone, and the suggestion says so
    assert set(sugg["suggested"].values()) == {"none"} and set(sugg["no_donor_better"]) == set(sugg["donors"])
    assert "no_donor_note" in sugg and first.suggested == {int(k): None for k in sugg["donors"]}
    bi = d["block_influence"]
    assert sorted(sugg["pruned"]) == sorted(sorted(range(L), key=lambda i: bi[i])[:2])
    assert all(int(j) not in sugg["pruned"] for j in sugg["donors"].values())
    json.dumps(d, allow_nan=False)  # strict JSON: no NaN anywhere
    assert list(cache.joinpath("analysis").glob("*.json"))

    t = time.perf_counter()
    second = _run(tiny_model, tiny_tokenizer, tiny_text_file, ppl_drop=True, ppl_samples=2)
    assert time.perf_counter() - t < 1.0
    assert second.cached
    a, b = first.to_dict(), second.to_dict()
    a.pop("cached"), b.pop("cached")
    assert a == b
    assert Analysis.from_dict(second.to_dict()).donors == first.donors
    assert list(first.to_frame()["block"]) == list(range(L))


def test_settings_change_the_cache_key_and_subset(tiny_model, tiny_tokenizer, tiny_text_file, cache):
    full = _run(tiny_model, tiny_tokenizer, tiny_text_file, ranks=(4,))
    sub = _run(tiny_model, tiny_tokenizer, tiny_text_file, ranks=(4,), pairs="subset", pruned=[2, 3])
    assert not sub.cached
    se = sub["share_error"]
    assert se["pairs"] == "subset" and se["rows"] == [2, 3] and se["cols"] == [0, 1, 4, 5]
    assert se["relative"]["4"][2][0] == pytest.approx(full["share_error"]["relative"]["4"][2][0], rel=1e-6)
    assert se["relative"]["4"][0][2] is None
    assert sub["donor_suggestion"]["pruned"] == [2, 3]
    other = _run(tiny_model, tiny_tokenizer, tiny_text_file, ranks=(4,), use_cache=False)
    assert not other.cached


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"samples": 0}, "samples must be a positive integer.*0"),
        ({"samples": -3}, "-3"),
        ({"seq_len": 129}, "seq_len 129 is outside 2..128"),
        ({"ranks": (0,)}, "rank 0 is outside 1..32"),
        ({"ranks": (33,)}, "rank 33 is outside 1..32"),
        ({"ranks": "8,x"}, "'8,x'"),
        ({"donor_metric": "cosine"}, "unknown donor metric 'cosine'"),
        ({"pairs": "some"}, "pairs 'some'"),
        ({"ratio": 1.5}, "ratio 1.5"),
        ({"max_span": 9}, "max_span 9 is outside 1..6"),
        ({"data": "/no/such/file.txt"}, "/no/such/file.txt"),
    ],
)
def test_bad_settings_raise(tiny_model, tiny_tokenizer, tiny_text_file, cache, kw, match):
    with pytest.raises(ValueError, match=match):
        _run(tiny_model, tiny_tokenizer, tiny_text_file, **kw)


@pytest.fixture
def tiny_folder(tmp_path, tiny_model, tiny_tokenizer):
    folder = tmp_path / "tiny"
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_cli_writes_analysis_json(tiny_folder, tiny_text_file, tmp_path, cache, capsys):
    from flexigpt.cli import main

    out = tmp_path / "out"
    code = main(["analyze", "--model", str(tiny_folder), "--data", str(tiny_text_file), "--samples", "3",
                 "--seq-len", "16", "--ranks", "2,4", "--pairs", "subset", "--ratio", "0.5", "--out", str(out), "--json"])
    assert code == 0
    written = json.loads((out / "analysis.json").read_text())
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert written == printed
    assert written["share_error"]["pairs"] == "subset" and len(written["donor_suggestion"]["pruned"]) == 3
    assert written["share_error"]["ranks"] == [2, 4]
    assert written["donor_suggestion"]["metric"] == "function" and written["share_error"]["function"]["4"]
    code = main(["analyze", "--model", str(tiny_folder), "--data", str(tiny_text_file), "--samples", "3",
                 "--seq-len", "16", "--ranks", "4", "--no-function", "--out", str(out)])
    assert code == 0 and "donors (paper, rank 4)" in capsys.readouterr().out
    weight_only = json.loads((out / "analysis.json").read_text())
    assert "function" not in weight_only["share_error"] and "suggested" not in weight_only["donor_suggestion"]


def test_plan_select_and_span_methods_from_an_analysis(tiny_folder, tiny_text_file, tmp_path, cache, capsys):
    """plan --select bi|ppl|iterative, and the span methods' proposal, from one analysis.json."""
    from flexigpt.cli import main
    from flexigpt.plan import Plan

    out = tmp_path / "a"
    assert main(["analyze", "--model", str(tiny_folder), "--data", str(tiny_text_file), "--samples", "3",
                 "--seq-len", "16", "--ranks", "4", "--no-function", "--out", str(out)]) == 0
    plans = {}
    for select in ("bi", "iterative"):
        path = tmp_path / f"{select}.json"
        assert main(["plan", "--analysis", str(out), "--ratio", "0.34", "--method", "drop", "--select", select,
                     "--out", str(path)]) == 0
        plans[select] = Plan.from_json(path.read_text())
    assert len(plans["iterative"].pruned_blocks) == len(plans["bi"].pruned_blocks) == 2
    assert "iterative" in plans["iterative"].note("selection")
    path = tmp_path / "exact.json"
    assert main(["plan", "--analysis", str(out), "--ratio", "0.34", "--method", "drop", "--select", "iterative",
                 "--shortlist", "0", "--out", str(path)]) == 0
    assert "every block on every window" in Plan.from_json(path.read_text()).note("selection")
    capsys.readouterr()
    for flags, match in ((["--select", "iterative", "--shortlist", "-1"], "--shortlist must be in 0..6"),
                         (["--shortlist", "2"], "needs --analysis and --select iterative")):
        assert main(["plan", "--analysis", str(out), "--ratio", "0.34", *flags, "--out", str(tmp_path / "s.json")]) == 2
        assert match in capsys.readouterr().err and not (tmp_path / "s.json").exists()
    assert main(["plan", "--analysis", str(out), "--ratio", "0.34", "--select", "ppl", "--out",
                 str(tmp_path / "p.json")]) == 2
    assert "--ppl-drop" in capsys.readouterr().err and not (tmp_path / "p.json").exists()
    assert main(["plan", "--analysis", str(out), "--ratio", "0.34", "--method", "replaceme", "--out",
                 str(tmp_path / "r.json")]) == 0
    span = Plan.from_json((tmp_path / "r.json").read_text())
    assert span.method == "replaceme" and len(span.spans) == 1 and span.spans[0][1] - span.spans[0][0] == 2
    assert "angular distance" in span.note("selection")


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--ranks", "8,x"], "--ranks '8,x'"),
        (["--samples", "0"], "samples"),
        (["--pairs", "half"], "--pairs 'half'"),
        (["--donor-metric", "nope"], "nope"),
    ],
)
def test_cli_bad_flags_exit_2(tiny_folder, tiny_text_file, tmp_path, cache, capsys, flags, match):
    from flexigpt.cli import main

    code = main(["analyze", "--model", str(tiny_folder), "--data", str(tiny_text_file), "--seq-len", "16",
                 "--out", str(tmp_path / "o")] + flags)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0]
    assert not (tmp_path / "o" / "analysis.json").exists()


@pytest.mark.slow
def test_embedded_model_block0_has_the_largest_bi(smollm, cache):
    result = analyze(smollm.model, smollm.tokenizer, samples=2, seq_len=64, ranks=(8,), pairs="subset", pruned=[13, 14])
    d = result.to_dict()
    bi = d["block_influence"]
    assert len(bi) == 30 and max(range(30), key=lambda i: bi[i]) == 0
    assert len(d["similarity"]) == 30 and len(d["angular_distance"]["values"]) == 30
    se = d["share_error"]
    assert se["pairs"] == "subset" and se["rows"] == [13, 14] and len(se["cols"]) == 28
    assert len(se["matrices"]) == 7 and len(se["absolute"]["8"]) == 30
    assert set(int(k) for k in d["donor_suggestion"]["donors"]) == set(se["rows"])


def test_function_metric_is_the_whitened_residual_and_drives_the_suggestion(tiny_model, tiny_tokenizer,
                                                                             tiny_text_file, cache):
    import torch

    from flexigpt.activations import linear_input_moments
    from flexigpt.arch import arch_of, block_linears, get_blocks
    from flexigpt.data import token_windows
    from flexigpt.whiten import whitener

    blocks = get_blocks(tiny_model)
    with torch.no_grad():  # block 1 is a near copy of block 0: the best donor, better than none
        for (_, a), (_, b) in zip(blocks[0].named_parameters(), blocks[1].named_parameters()):
            b.copy_(a + 1e-3 * torch.randn_like(a))
    result = _run(tiny_model, tiny_tokenizer, tiny_text_file, ranks=(4,), pairs="subset", pruned=[0, 3])
    se, sugg = result["share_error"], result["donor_suggestion"]
    assert se["function_settings"]["rows"] == [0, 3] and se["function_settings"]["cols"] == [1, 2, 4, 5]
    assert se["function"]["4"][1][0] is None and se["function"]["4"][0][3] is None  # kept rows / pruned cols
    assert sugg["metric"] == "function" and sugg["donors"]["0"] == 1 and sugg["suggested"]["0"] == 1
    assert sugg["suggested"]["3"] == "none" and list(sugg["no_donor_better"]) == ["3"]
    assert sugg["no_donor_better"]["3"]["no_donor_error"] < sugg["no_donor_better"]["3"]["donor_error"]

    # the stored value, recomputed from the calibration inputs
    spec = arch_of(tiny_model)
    windows = token_windows(tiny_tokenizer, str(tiny_text_file), seq_len=16, split="train", max_windows=4)
    moments = linear_input_moments(tiny_model, windows)
    lin = [block_linears(b, spec) for b in blocks]
    for i, j in [(0, 1), (3, 2), (3, None)]:
        rels = []
        for name in spec.matrix_names:
            w_i = lin[i][name].weight.detach().double()
            s = whitener(moments[i][name])
            d = w_i - (0 if j is None else lin[j][name].weight.detach().double())
            sig = torch.linalg.svdvals(d @ s)
            rels.append(float(sig[4:].pow(2).sum().sqrt() / torch.linalg.matrix_norm(w_i @ s)))
        stored = se["no_donor"]["function"]["4"][i] if j is None else se["function"]["4"][i][j]
        assert stored == pytest.approx(sum(rels) / len(rels), rel=1e-4)
        if j is None:
            assert se["no_donor"]["per_matrix"]["function"]["4"]["down_proj"][i] == pytest.approx(rels[-1], rel=1e-4)

    weight_only = _run(tiny_model, tiny_tokenizer, tiny_text_file, ranks=(4,), function=False)
    assert weight_only["donor_suggestion"]["metric"] == "paper" and "function" not in weight_only["share_error"]
    paper = _run(tiny_model, tiny_tokenizer, tiny_text_file, ranks=(4,), donor_metric="paper")
    assert paper["donor_suggestion"]["suggested"] == paper["donor_suggestion"]["donors"]  # weight space: no flags
    with pytest.raises(ValueError, match="donor metric 'function' needs the function-space metric"):
        _run(tiny_model, tiny_tokenizer, tiny_text_file, donor_metric="function", function=False)
