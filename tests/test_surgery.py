"""Surgery: slots share the donor's tensors (by data_ptr), own module objects, generate() works,
the base model is untouched, and the trainability contract holds."""
from __future__ import annotations

import pytest
import torch

from flexigpt.adapters import base_linear
from flexigpt.trainable import trainable_parameters
from flexigpt.arch import arch_of, block_linears, get_blocks
from flexigpt.plan import AdapterSpec, Plan, extend_plan
from flexigpt.surgery import apply_plan, build_info

IDS = torch.tensor([[5, 9, 17, 33, 2, 64, 100, 7], [1, 2, 3, 4, 5, 6, 7, 8]])


def _ptrs(block, spec):
    return {n: base_linear(m).weight.data_ptr() for n, m in block_linears(block, spec).items()}


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_slots_share_donor_storage_and_nothing_else(tiny_model):
    spec = arch_of(tiny_model)
    plan = Plan("tiny", 6, (0, 1, 1, 3, 1, 5))  # slots 2 and 4 both run block 1
    model = apply_plan(tiny_model, plan)
    blocks = get_blocks(model)
    base_ptrs = [_ptrs(b, spec) for b in get_blocks(tiny_model)]
    for slot in (1, 2, 4):
        assert _ptrs(blocks[slot], spec) == base_ptrs[1]  # the very same tensors as the base's block 1
    assert _ptrs(blocks[3], spec) == base_ptrs[3]
    others = {p for s in (0, 3, 5) for p in _ptrs(blocks[s], spec).values()}
    assert not others & set(base_ptrs[1].values())
    assert len({id(b) for b in blocks}) == 6 and len({id(b.self_attn) for b in blocks}) == 6
    assert [b.self_attn.layer_idx for b in blocks] == list(range(6))
    # adapters are distinct per slot; own pre-norms are not the donor's
    a2 = blocks[2].self_attn.q_proj.lora_A["default"].weight
    a4 = blocks[4].self_attn.q_proj.lora_A["default"].weight
    assert a2.data_ptr() != a4.data_ptr() and not torch.equal(a2, a4)
    assert blocks[2].input_layernorm.weight.data_ptr() != blocks[1].input_layernorm.weight.data_ptr()


def test_base_model_unchanged_and_generate_after_every_surgery(tiny_model):
    before = _snapshot(tiny_model)
    ref = tiny_model(IDS).logits
    plans = [
        Plan("tiny", 6, (0, 1, 1, 3, 3, 5)),
        Plan("tiny", 6, (0, 1, 3, 5), "drop"),
        extend_plan("tiny", 6, [1, 4], "block"),
        extend_plan("tiny", 6, [2, 3, 4], "sequential"),
        Plan("tiny", 6, (0, 1, 1, 3, 3, 5), adapter=AdapterSpec(out_norm="scale")),
    ]
    for plan in plans:
        model = apply_plan(tiny_model, plan)
        assert model.config.num_hidden_layers == plan.num_slots == len(get_blocks(model))
        out = model.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False, pad_token_id=1)
        assert out.shape == (1, 8)
        # the KV-cache path gives the same next token as a full forward pass
        assert int(model(out[:, :7]).logits[0, -1].argmax()) == int(out[0, 7])
    assert all(torch.equal(before[n], t) for n, t in tiny_model.state_dict().items())
    assert torch.equal(tiny_model(IDS).logits, ref)
    assert tiny_model.config.num_hidden_layers == 6 and len(get_blocks(tiny_model)) == 6


def test_opt_flexigpt_shares_bias_and_generates(tiny_opt_model):
    spec = arch_of(tiny_opt_model)
    model = apply_plan(tiny_opt_model, Plan("opt", 4, (0, 0, 2, 3)))
    blocks, base = get_blocks(model), get_blocks(tiny_opt_model)
    assert base_linear(blocks[1].fc1).bias.data_ptr() == base[0].fc1.bias.data_ptr()  # donor's bias, shared
    assert _ptrs(blocks[1], spec) == _ptrs(base[0], spec)
    out = model.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert out.shape == (1, 8)
    drop = apply_plan(tiny_opt_model, Plan("opt", 4, (0, 2, 3), "drop"))
    assert drop.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False, pad_token_id=1).shape == (1, 8)


def test_trainability_contract(tiny_model):
    plan = Plan("tiny", 6, (0, 1, 1, 3, 3, 5), adapter=AdapterSpec(out_norm="layernorm"))
    model = apply_plan(tiny_model, plan)
    names = [n for n, _ in trainable_parameters(model)]
    assert all(n.startswith(("model.layers.2.", "model.layers.4.")) for n in names)
    lora = [n for n in names if "lora_" in n]
    assert len(lora) == 2 * 2 * 7  # 2 slots x (A, B) x 7 matrices
    assert sum("norm.weight" in n and "out" not in n for n in names) > 0
    assert any(n.endswith("o_proj.norm.weight") for n in names) and any(n.endswith("down_proj.norm.bias") for n in names)
    assert any("input_layernorm" in n for n in names)
    frozen = apply_plan(tiny_model, plan.with_adapter(train_prenorms=False))
    assert not any("layernorm" in n for n, _ in trainable_parameters(frozen))
    scaled = [n for n, _ in trainable_parameters(apply_plan(tiny_model, plan.with_adapter(out_norm="scale")))]
    assert any(n.endswith("o_proj.scale") for n in scaled) and not any(n.endswith(".norm.bias") for n in scaled)
    assert trainable_parameters(apply_plan(tiny_model, plan.with_method("drop"))) == []
    ext = apply_plan(tiny_model, extend_plan("tiny", 6, [2]))
    assert {n.split(".")[2] for n, _ in trainable_parameters(ext)} == {"3"}


def test_depth_mismatch_and_bad_targets(tiny_model):


    with pytest.raises(ValueError, match="8 blocks"):
        apply_plan(tiny_model, Plan("tiny", 8, tuple(range(8))))
    with pytest.raises(ValueError, match="fc1"):
        apply_plan(tiny_model, Plan("tiny", 6, (0, 0, 2, 3, 4, 5), adapter=AdapterSpec(targets=("fc1",))))
    with pytest.raises(ValueError, match="rank 4096"):
        apply_plan(tiny_model, Plan("tiny", 6, (0, 0, 2, 3, 4, 5), adapter=AdapterSpec(rank=4096)))
    assert build_info(apply_plan(tiny_model, Plan.identity("tiny", 6))).plan.replaced_slots == ()


# ---- the embedded model (slow: still cheap, a few windows) ----------------------------------
def _ppl(model, ids):
    with torch.no_grad():
        return float(torch.exp(model(input_ids=ids, labels=ids, use_cache=False).loss))


def _block_influence(model, ids):
    import torch.nn.functional as F

    blocks, bi = get_blocks(model), torch.zeros(len(get_blocks(model)))

    def hook(i):
        def fn(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            bi[i] += float((1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).mean())
        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return bi.tolist()


@pytest.mark.slow
def test_embedded_flexigpt_starts_at_the_drop_and_extend_at_the_original(smollm):
    from flexigpt.data import token_windows
    from flexigpt.plan import plan_from_scores

    model, tok = smollm.model, smollm.tokenizer
    calib = token_windows(tok, "default", seq_len=256, split="train", max_windows=4).input_ids
    held = token_windows(tok, "default", seq_len=256, split="heldout", max_windows=4).input_ids
    bi = _block_influence(model, calib)
    plan = plan_from_scores("default", bi, 0.3)
    assert len(plan.unstored_blocks) == 9 and 0 not in plan.unstored_blocks
    drop = _ppl(apply_plan(model, plan.with_method("drop")), held)
    flexi = _ppl(apply_plan(model, plan), held)
    assert abs(flexi - drop) / drop < 0.05, (flexi, drop)  # not thousands, as plain sharing gives
    original = _ppl(model, held)
    low = sorted(range(2, 28), key=lambda b: bi[b])[:6]
    extended = _ppl(apply_plan(model, extend_plan("default", 30, low, "block")), held)
    assert abs(extended - original) / original < 0.01, (extended, original)


@pytest.mark.parametrize("layer_map", [
    (0, 1, 1, 4, 4, 5),        # two slots, each on its own donor
    (0, 1, 1, 1, 4, 5),        # one donor run three times
    (0, 1, None, None, 4, 5),  # slots without donors
    (0, 1, 4, 5),              # a plain drop
], ids=["donors", "one-donor-thrice", "no-donor", "drop"])
def test_cached_greedy_decoding_equals_recomputing_every_step(tiny_model, layer_map):
    """A slot that runs a donor's attention must keep its own KV-cache entry: greedy decoding with the
    cache (as the chat tab and the fidelity check run) equals recomputing the whole sequence each step."""
    method = "flexigpt" if len(layer_map) == 6 else "drop"
    model = apply_plan(tiny_model, Plan("tiny", 6, tuple(layer_map), method, AdapterSpec(rank=4, init="svd")))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in trainable_parameters(model) if method == "flexigpt" else ():
            p.add_(0.05 * torch.randn_like(p))  # adapters and scales away from their start, so slots differ
        cached = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=10, do_sample=False,
                                pad_token_id=1, use_cache=True)
        seq = IDS
        for _ in range(10):
            seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(cached, seq)
