"""Block-local slot fitting: cached block IO, closed-form output scales, per-slot training."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from flexigpt.arch import get_blocks
from flexigpt.block_io import block_r2, collect_block_io, replay
from flexigpt.plan import AdapterSpec, Plan
from flexigpt.slot_fit import closed_form_scales_, fit_slots
from flexigpt.surgery import apply_plan

SLOTS = (2, 4)


def _ids(n: int = 6, t: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randint(4, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _build(base, out_norm: str = "layernorm", rank: int = 4):
    L = base.config.num_hidden_layers
    lm = list(range(L))
    lm[2], lm[L - 2] = 1, L - 3  # 6 blocks: 2 <- 1, 4 <- 3; 4 blocks (OPT): 2 <- 1
    plan = Plan("tiny", L, tuple(lm), "flexigpt", AdapterSpec(rank=rank, out_norm=out_norm, init="svd"))
    return apply_plan(base, plan)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_opt_model"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_replay_reproduces_the_cached_block_exactly(fixture, attn, request):
    base = request.getfixturevalue(fixture)
    base.config._attn_implementation = attn
    cache = collect_block_io(base, _ids(), [1, 2], batch_size=4)
    for b, io in cache.items():
        out = replay(get_blocks(base)[b], io.inputs, io.call_kwargs)  # all windows at once, kwargs of one
        assert torch.equal(out, io.outputs)
        assert torch.equal(io.inputs + io.attn_out + io.mlp_out, io.outputs)  # pre-norm residual adds
        assert block_r2(get_blocks(base)[b], io) == pytest.approx(1.0)
    assert collect_block_io(base, _ids(), [1], max_tokens=50)[1].num_windows == 2  # 50 // 24 windows


def _brute_force_fit(base, model, slot: int, ids: torch.Tensor, kind: str):
    """n and delta computed directly from the modules, solved with lstsq feature by feature."""
    block, pruned = get_blocks(model)[slot], get_blocks(base)[slot]
    io = collect_block_io(base, ids, [slot])[slot]
    kw = {k: v.expand(ids.shape[0], *v.shape[1:]) if isinstance(v, torch.Tensor) else v
          for k, v in io.call_kwargs.items()}
    if "position_embeddings" in kw:
        kw["position_embeddings"] = tuple(t.expand(ids.shape[0], *t.shape[1:]) for t in io.call_kwargs["position_embeddings"])
    seen = {}
    hooks = [block.self_attn.o_proj.inner.register_forward_hook(lambda m, a, o: seen.__setitem__("attention", o)),
             block.mlp.down_proj.inner.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", o))]
    with torch.no_grad():
        block.self_attn(hidden_states=block.input_layernorm(io.inputs), **{k: v for k, v in kw.items() if k != "use_cache"})
        mid = io.inputs + pruned.self_attn(hidden_states=pruned.input_layernorm(io.inputs),
                                           **{k: v for k, v in kw.items() if k != "use_cache"})[0]
        block.mlp(block.post_attention_layernorm(mid))
        deltas = {"attention": mid - io.inputs, "mlp": pruned.mlp(pruned.post_attention_layernorm(mid))}
    for h in hooks:
        h.remove()
    fits = {}
    for key, y in seen.items():
        y = y.double().reshape(-1, y.shape[-1])
        n = F.layer_norm(y, (y.shape[-1],), eps=1e-5) if kind == "layernorm" else y
        delta = deltas[key].double().reshape(n.shape)
        gamma, beta, sse = [], [], 0.0
        for c in range(n.shape[1]):
            X = torch.stack([n[:, c], torch.ones_like(n[:, c])], 1) if kind == "layernorm" else n[:, c:c + 1]
            sol = torch.linalg.lstsq(X, delta[:, c:c + 1]).solution.flatten()
            gamma.append(sol[0])
            beta.append(sol[1] if kind == "layernorm" else torch.zeros((), dtype=torch.float64))
            sse += float(((X @ sol - delta[:, c]) ** 2).sum())
        fits[key] = (torch.stack(gamma), torch.stack(beta), 1 - sse / float((delta ** 2).sum()))
    return fits


@pytest.mark.parametrize("kind", ["layernorm", "scale"])
def test_closed_form_scale_is_the_least_squares_optimum(tiny_model, kind):
    model = _build(tiny_model, kind)
    ids = _ids()
    result = closed_form_scales_(model, tiny_model, ids, guard=False)
    assert sorted(result) == list(SLOTS)
    for slot in SLOTS:
        want = _brute_force_fit(tiny_model, model, slot, ids, kind)
        block = get_blocks(model)[slot]
        for key, norm in (("attention", block.self_attn.o_proj), ("mlp", block.mlp.down_proj)):
            gamma, beta, r2 = want[key]
            got = norm.norm.weight if kind == "layernorm" else norm.scale
            torch.testing.assert_close(got.double(), gamma, rtol=1e-4, atol=1e-5)
            if kind == "layernorm":
                torch.testing.assert_close(norm.norm.bias.double(), beta, rtol=1e-4, atol=1e-5)
            assert result[slot][key] == pytest.approx(r2, abs=1e-5)
        assert result[slot]["shrink"] == 1.0
        assert result[slot]["block"] == pytest.approx(block_r2(block, collect_block_io(tiny_model, ids, [slot])[slot]))


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_opt_model"])
@pytest.mark.parametrize("kind", ["layernorm", "scale"])
def test_closed_form_never_starts_worse_than_identity(fixture, kind, request):
    base = request.getfixturevalue(fixture)
    model = _build(base, kind)
    cache = collect_block_io(base, _ids(), list(model.flexigpt_build.plan.replaced_slots))
    before = {s: block_r2(get_blocks(model)[s], io) for s, io in cache.items()}
    result = closed_form_scales_(model, base, cache=cache)
    for s, io in cache.items():
        after = block_r2(get_blocks(model)[s], io)
        assert after == pytest.approx(result[s]["block"])
        assert after >= 0.0  # the identity (a plain drop of the block) scores 0
        assert after >= before[s] - 1e-3  # the as-built slot is the identity up to gamma 1e-3


def test_guard_shrinks_a_fit_that_would_be_worse_than_identity(tiny_model):
    model = _build(tiny_model)
    cache = collect_block_io(tiny_model, _ids(), list(SLOTS))
    for io in cache.values():  # targets pointing the wrong way: the best per-feature fit hurts the block
        io.attn_out.neg_()
        io.mlp_out.neg_()
    result = closed_form_scales_(model, tiny_model, cache=cache)
    for s in SLOTS:
        assert result[s]["shrink"] < 1.0
        assert result[s]["block"] >= 0.0


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_opt_model"])
def test_fit_slots_raises_r2_and_touches_nothing_shared(fixture, request):
    base = request.getfixturevalue(fixture)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = _build(base)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = _ids()  # from the identity start (tiny gates), where there is room to improve
    calls = []
    report = fit_slots(model, base, ids, steps=15, lr=1e-3, gate_lr=1e-2, batch_tokens=48,
                       callback=lambda slot, done, total: calls.append((slot, done, total)))
    replaced = list(model.flexigpt_build.plan.replaced_slots)
    assert [f.slot for f in report.slots] == replaced
    for f in report.slots:
        assert f.kept and f.steps == 15
        assert f.r2_after > f.r2_before
        assert math.isfinite(f.loss_last) and f.loss_last < f.loss_first
    assert [c[1] for c in calls] == list(range(1, 15 * len(replaced) + 1))
    assert {c[2] for c in calls} == {15 * len(replaced)} and [c[0] for c in calls[::15]] == replaced
    for k, v in base.state_dict().items():
        assert torch.equal(v, base_state[k]), k
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    json.dumps(report.to_dict())


def _built_io(model, base, ids, slot: int):
    """What reaches ``slot`` in ``model`` now, paired with the pruned block's output in ``base``."""
    got, want = collect_block_io(model, ids, [slot])[slot], collect_block_io(base, ids, [slot])[slot]
    got.outputs = want.outputs
    return got


@pytest.mark.parametrize("inputs", ["built", "original"])
def test_each_slot_is_fitted_on_the_inputs_it_was_asked_to_read(tiny_model, inputs):
    """Slots are fitted in depth order and never touched again, so the hidden state reaching a
    slot in the finished model is the one it was fitted on with ``inputs="built"``: its reported
    R^2 is measured on exactly those inputs. With ``"original"`` it is measured on the base's."""
    base = tiny_model
    L = base.config.num_hidden_layers
    lm = list(range(L))
    lm[2], lm[3] = 1, 1  # two adjacent slots: the second reads what the first now writes
    model = apply_plan(base, Plan("tiny", L, tuple(lm), "flexigpt", AdapterSpec(rank=4, init="svd")))
    ids = _ids()
    closed_form_scales_(model, base, ids)
    report = fit_slots(model, base, ids, steps=8, lr=1e-3, gate_lr=1e-2, batch_tokens=48, inputs=inputs)
    assert report.settings["inputs"] == inputs
    for fit in report.slots:
        slot = get_blocks(model)[fit.slot]
        io = (_built_io(model, base, ids, fit.slot) if inputs == "built"
              else collect_block_io(base, ids, [fit.slot])[fit.slot])
        assert fit.r2_after == pytest.approx(block_r2(slot, io), rel=1e-5, abs=1e-6)
    built_in, base_in = _built_io(model, base, ids, 3).inputs, collect_block_io(base, ids, [3])[3].inputs
    assert not torch.allclose(built_in, base_in)  # the second slot's two kinds of inputs differ


def test_fit_on_built_inputs_needs_the_cache_windows(tiny_model):
    model = _build(tiny_model)
    ids = _ids()
    cache = collect_block_io(tiny_model, ids, list(SLOTS))
    with pytest.raises(ValueError, match="pass the windows"):
        fit_slots(model, tiny_model, ids[:3], cache=cache, steps=1)
    with pytest.raises(ValueError, match="calibration windows"):
        fit_slots(model, tiny_model, cache=cache, steps=1)
    with pytest.raises(ValueError, match="'sideways'"):
        fit_slots(model, tiny_model, ids, steps=1, inputs="sideways")
    assert fit_slots(model, tiny_model, cache=cache, steps=1, inputs="original").settings["inputs"] == "original"


def test_fit_slots_restores_a_slot_that_training_made_worse(tiny_model):
    model = _build(tiny_model)
    ids = _ids()
    closed_form_scales_(model, tiny_model, ids)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    report = fit_slots(model, tiny_model, ids, steps=3, lr=5.0, gate_lr=5.0, slots=[2])  # absurd steps
    (fit,) = report.slots
    if not fit.kept:
        for n, p in model.named_parameters():
            if n in before:
                assert torch.equal(p, before[n]), n
    assert fit.r2_after >= fit.r2_before


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"steps": -1}, "-1"), ({"steps": 2.5}, "2.5"), ({"lr": 0.0}, "0.0"), ({"gate_lr": float("nan")}, "nan"),
    ({"batch_tokens": 0}, "batch_tokens"), ({"slots": [0]}, "[0]"), ({"max_tokens": 0}, "max_tokens"),
    ({"callback": 3}, "3"), ({"batch_size": True}, "True"),
])
def test_bad_fit_arguments_raise_value_error(tiny_model, kwargs, needle):
    model = _build(tiny_model)
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        fit_slots(model, tiny_model, _ids(2, 8), **kwargs)


def test_bad_scale_inputs_raise_value_error(tiny_model):
    model = _build(tiny_model)
    with pytest.raises(ValueError, match="float32"):
        closed_form_scales_(model, tiny_model, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="windows"):
        closed_form_scales_(model, tiny_model, None)
    with pytest.raises(ValueError, match=r"\[1\]"):
        closed_form_scales_(model, tiny_model, cache=collect_block_io(tiny_model, _ids(2, 8), [1]), slots=[2])
    drop = apply_plan(tiny_model, model.flexigpt_build.plan.with_method("drop"))
    with pytest.raises(ValueError, match="'drop'"):
        closed_form_scales_(drop, tiny_model, _ids(2, 8))
    with pytest.raises(ValueError, match="blocks"):
        collect_block_io(tiny_model, _ids(2, 8), [6])
