"""Plan: validation (one place, messages naming the value), derived views, edits, JSON, constructors."""
from __future__ import annotations

import json

import pytest

from flexigpt.plan import AdapterSpec, Plan, extend_plan, plan_from_analysis, plan_from_scores
from flexigpt.plan import suggested_donor


def _plan(lm=(0, 1, 1, 3, 3, 5), method="flexigpt", **kw):
    return Plan("tiny", 6, tuple(lm), method, **kw)


def test_views_flexigpt():
    p = _plan()
    assert p.replaced_slots == (2, 4) and p.unstored_blocks == (2, 4)
    assert p.kept_blocks == (0, 1, 3, 5) and p.donors == {2: 1, 4: 3} and p.num_slots == 6


def test_views_drop_and_extend():
    d = _plan((0, 1, 3, 5), "drop")
    assert d.unstored_blocks == (2, 4) and d.replaced_slots == () and d.kept_blocks == (0, 1, 3, 5)
    e = extend_plan("tiny", 6, [1, 4], "block")
    assert e.layer_map == (0, 1, 1, 2, 3, 4, 4, 5) and e.replaced_slots == (2, 6) and e.unstored_blocks == ()
    assert e.donors == {2: 1, 6: 4}
    s = extend_plan("tiny", 6, [2, 3, 4], "sequential")
    assert s.layer_map == (0, 1, 2, 3, 4, 2, 3, 4, 5) and s.replaced_slots == (5, 6, 7)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(layer_map=(0, 1, 7, 3, 4, 5)), "7"),  # out of range
        (dict(layer_map=(0, 1, 4, 3, 3, 5)), "donor block 4"),  # donor itself pruned
        (dict(layer_map=()), "empty"),
        (dict(layer_map=(0, 1, 2)), "3 slots"),  # flexigpt needs one slot per block
        (dict(layer_map=(0, 1, 1, 3), method="drop"), "[0, 1, 1, 3]"),  # duplicate in drop
        (dict(layer_map=(0, 2, 1), method="drop"), "[0, 2, 1]"),
        (dict(layer_map=(0, 1, 2, 3, 4, 5), method="prune"), "'prune'"),
        (dict(layer_map=(0, 1, 2, 3, 4, 5), format_version=5), "5"),  # format 4 is the newest
        (dict(layer_map=(0, 1.5, 2, 3, 4, 5)), "1.5"),
        (dict(layer_map=(0, "1", 2, 3, 4, 5)), "'1'"),
        (dict(layer_map=(0, True, 2, 3, 4, 5)), "True"),
        (dict(layer_map=(0, 10**30, 2, 3, 4, 5)), str(10**30)),
        (dict(layer_map=(0, 2, 1, 3, 4, 5), method="extend"), "first occurrences"),
    ],
)
def test_invalid_plans_name_the_value(kwargs, fragment):
    kwargs = {"method": "flexigpt", **kwargs}
    with pytest.raises(ValueError, match=None) as err:
        Plan("tiny", 6, **kwargs)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(rank=0), "0"), (dict(rank=-3), "-3"), (dict(rank=10**9), str(10**9)), (dict(rank=4.0), "4.0"),
        (dict(out_norm="batchnorm"), "batchnorm"), (dict(init="random"), "random"),
        (dict(out_norm_scale=float("nan")), "nan"), (dict(out_norm_scale=1e9), "1000000000"),
        (dict(targets=["q_proj"]), "q_proj"), (dict(targets=("q_proj", "q_proj")), "duplicates"),
        (dict(train_prenorms="yes"), "yes"),
    ],
)
def test_invalid_adapter_spec(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        AdapterSpec(**kwargs)
    assert fragment in str(err.value)


def test_num_blocks_and_base_model_validated():
    with pytest.raises(ValueError, match="0"):
        Plan("tiny", 0, (0,))
    with pytest.raises(ValueError, match="nan"):
        Plan("tiny", float("nan"), (0,))
    with pytest.raises(ValueError, match="base_model"):
        Plan("", 2, (0, 1))


def test_json_round_trip_equal_and_hashable():
    for p in (_plan(notes=(("ratio", 0.3),)), _plan((0, 3), "drop"), extend_plan("tiny", 6, [2, 3], "sequential"),
              _plan(adapter=AdapterSpec(rank=4, targets=("q_proj", "v_proj"), out_norm="scale"))):
        q = Plan.from_json(p.to_json())
        assert q == p and hash(q) == hash(p)
    assert len({_plan(), _plan()}) == 1


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d["adapter"].update(alpha=2), "alpha"),
        (lambda d: d.update(num_blocks="6"), "'6'"),
        (lambda d: d.update(layer_map="0,1"), "0,1"),
        (lambda d: d.pop("layer_map"), "layer_map"),
        (lambda d: d.update(format_version=99), "99"),
        (lambda d: d["adapter"].update(rank=None), "None"),
    ],
)
def test_from_json_is_strict(mutate, fragment):
    d = _plan().to_dict()
    mutate(d)
    with pytest.raises(ValueError) as err:
        Plan.from_json(json.dumps(d))
    assert fragment in str(err.value)


def test_from_json_rejects_garbage_nan_and_oversized():
    with pytest.raises(ValueError, match="JSON"):
        Plan.from_json("{not json")
    with pytest.raises(ValueError, match="NaN"):
        Plan.from_json(_plan().to_json().replace('"out_norm_scale": 0.001', '"out_norm_scale": NaN'))
    with pytest.raises(ValueError, match="limit"):
        Plan.from_json(" " * 2_000_000)
    with pytest.raises(ValueError, match="list"):
        Plan.from_json("[1, 2]")


def test_edits_return_new_plans():
    p = Plan.identity("tiny", 6)
    q = p.drop(2)
    assert p.layer_map == (0, 1, 2, 3, 4, 5) and q.layer_map == (0, 1, 1, 3, 4, 5)  # nearest, lower first
    q = q.drop(4, donor=5).with_donor(2, 3)
    assert q.donors == {2: 3, 4: 5}
    assert q.keep(2).donors == {4: 5}
    with pytest.raises(ValueError, match="donor of slots"):
        q.drop(3)
    with pytest.raises(ValueError, match="own donor"):
        q.with_donor(2, 2)
    with pytest.raises(ValueError, match="block 4 is itself pruned"):
        q.with_donor(2, 4)
    d = q.with_method("drop")
    assert d.layer_map == (0, 1, 3, 5) and d.drop(0).layer_map == (1, 3, 5) and d.keep(2).layer_map == (0, 1, 2, 3, 5)
    assert d.with_method("flexigpt", donors={2: 1}).donors == {2: 1, 4: 3}
    assert q.with_rank(32).adapter.rank == 32 and q.with_rank(32).layer_map == q.layer_map
    with pytest.raises(ValueError, match="rank"):
        q.with_rank(0)
    with pytest.raises(ValueError, match="7"):
        q.drop(7)


def test_plan_from_scores_picks_lowest_bi_and_donors():
    bi = [0.9, 0.1, 0.05, 0.3, 0.02, 0.5, 0.4, 0.8]
    p = plan_from_scores("m", bi, 0.3)  # round(2.4) = 2 blocks: 4 and 2
    assert p.unstored_blocks == (2, 4) and p.donors == {2: 1, 4: 3} and p.note("ratio") == 0.3
    err = [[None] * 8 for _ in range(8)]
    err[2] = [5.0, 4.0, None, 3.0, None, 1.0, 2.0, 9.0]
    err[4] = [1.0, 4.0, None, 3.0, None, 2.0, 2.0, 9.0]
    p = plan_from_scores("m", bi, 0.3, share_error=err)
    assert p.donors == {2: 5, 4: 0}
    assert plan_from_scores("m", bi, 0.3, protect=(4,)).unstored_blocks == (1, 2)
    assert plan_from_scores("m", bi, 0.3, method="drop").layer_map == (0, 1, 3, 5, 6, 7)
    assert plan_from_scores("m", bi, 0.0).replaced_slots == ()
    for bad in (-0.1, 0.95, float("nan"), "0.3"):
        with pytest.raises(ValueError) as e:
            plan_from_scores("m", bi, bad)
        assert str(bad) in str(e.value) or repr(bad) in str(e.value)


def _analysis(L=8):
    bi = [0.9, 0.1, 0.05, 0.3, 0.02, 0.5, 0.4, 0.8]
    rel = [[None if i == j else abs(i - j) + (0.0 if j != 6 else -10) for j in range(L)] for i in range(L)]
    return {"format_version": 1, "model": "default", "fingerprint": "abc", "num_blocks": L, "data": "default",
            "samples": 32, "seq_len": 256, "block_influence": bi,
            "share_error": {"ranks": [8], "relative": {"8": rel}, "absolute": {"8": rel}},
            "donor_suggestion": {"metric": "relative", "rank": 8, "pruned": [2, 4], "donors": {"2": 6, "4": 6}}}


def test_plan_from_analysis_uses_the_suggested_metric():
    p = plan_from_analysis(_analysis(), 0.3)
    assert p.base_model == "default" and p.unstored_blocks == (2, 4) and p.donors == {2: 6, 4: 6}
    assert p.note("donor_metric") == "relative" and p.note("analysis_fingerprint") == "abc"
    a = _analysis()
    del a["share_error"]
    donorless = plan_from_analysis(a, 0.3)  # no share error measured: no donor, the benchmarks' winner
    assert donorless.donors == {2: None, 4: None} and donorless.note("donor_metric") == "none measured"
    assert "no share error was measured" in donorless.note("donor_rule")
    assert plan_from_analysis(a, 0.3, keep_donors=True).donors == {2: 1, 4: 3}  # nearest kept block
    assert plan_from_analysis(a, 0.3, method="drop").pruned_blocks == (2, 4)
    assert plan_from_analysis(a, 0.25, method="extend").layer_map.count(4) == 2
    with pytest.raises(ValueError, match="format_version"):
        plan_from_analysis({**a, "format_version": 3}, 0.3)
    assert plan_from_analysis(a, 0.0).replaced_slots == ()


def test_hand_pruned_block_gets_the_suggested_donor():
    a = _analysis()
    p = plan_from_analysis(a, 0.3)  # prunes 2 and 4, both from donor 6
    assert p.drop(1).donors[1] == 0  # the plan's own default: the nearest kept block
    assert suggested_donor(a, p, 1) == 6  # the analysis: block 6 has the lowest share error
    assert suggested_donor(a, p.keep(2), 2) == 6
    without = {k: v for k, v in a.items() if k != "share_error"}
    assert suggested_donor(without, p, 1) is None
    assert suggested_donor(_analysis(L=8) | {"num_blocks": 9}, p, 1) is None  # another depth
    with pytest.raises(ValueError, match="donor of slots"):
        suggested_donor(a, p, 6)  # 6 donates to slots 2 and 4: it cannot be pruned


def test_extend_plan_validation():
    with pytest.raises(ValueError, match="contiguous"):
        extend_plan("m", 6, [1, 3], "sequential")
    with pytest.raises(ValueError, match="duplicates"):
        extend_plan("m", 6, [1, 1])
    with pytest.raises(ValueError, match="'tree'"):
        extend_plan("m", 6, [1], "tree")
    with pytest.raises(ValueError, match="9"):
        extend_plan("m", 6, [9])


# ---- CLI: python -m flexigpt plan ---------------------------------------------------------
def _cli(argv, capsys):
    from flexigpt.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_plan_from_analysis_with_edits(tmp_path, capsys):
    a = _analysis()
    a["model"] = "default"
    (tmp_path / "analysis.json").write_text(json.dumps(a))
    out = tmp_path / "plan.json"
    code, stdout, err = _cli(["plan", "--analysis", str(tmp_path), "--ratio", "0.3", "--drop", "3", "--keep", "4",
                              "--donor", "3=6", "--rank", "4", "--out-norm", "scale", "--out", str(out)], capsys)
    assert code == 0, err
    plan = Plan.from_json(out.read_text())
    assert plan.donors == {2: 6, 3: 6} and plan.adapter.rank == 4 and plan.adapter.out_norm == "scale"
    code, _, err = _cli(["plan", "--from-plan", str(out), "--method", "drop", "--out", str(out)], capsys)
    assert code == 0 and Plan.from_json(out.read_text()).layer_map == (0, 1, 4, 5, 6, 7)
    code, _, _ = _cli(["plan", "--analysis", str(tmp_path / "analysis.json"), "--method", "extend",
                       "--extend-blocks", "2,3", "--extend-mode", "sequential", "--out", str(out)], capsys)
    assert code == 0 and Plan.from_json(out.read_text()).layer_map == (0, 1, 2, 3, 2, 3, 4, 5, 6, 7)


@pytest.mark.parametrize("args, fragment", [
    (["--ratio", "0.95"], "0.95"),
    (["--ratio", "0.3", "--donor", "2=4"], "donor block 4"),
    (["--ratio", "0.3", "--drop", "3,x"], "3,x"),
    (["--ratio", "0.3", "--drop", "99"], "99"),
    (["--ratio", "0.3", "--rank", "0"], "0"),
    (["--ratio", "0.3", "--donor", "2-1"], "2-1"),
])
def test_cli_plan_invalid_exits_2_without_traceback(tmp_path, capsys, args, fragment):
    (tmp_path / "analysis.json").write_text(json.dumps(_analysis()))
    out = tmp_path / "plan.json"
    code, _, err = _cli(["plan", "--analysis", str(tmp_path), *args, "--out", str(out)], capsys)
    assert code == 2 and err.startswith("error: ") and fragment in err and "Traceback" not in err
    assert not out.exists()
