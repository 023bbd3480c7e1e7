"""Adapters: SVD init reproduces the pruned weights at full rank, zero adapters + zero output
scale give exactly the drop model, rank caps, kept-block LoRA."""
from __future__ import annotations

import torch

from flexigpt.adapters import base_linear, lora_factors
from flexigpt.trainable import attach_kept_lora, trainable_parameters
from flexigpt.arch import arch_of, block_linears, get_blocks
from flexigpt.params import matched_lora_rank, measure_params
from flexigpt.plan import AdapterSpec, Plan
from flexigpt.surgery import apply_plan, build_info

IDS = torch.tensor([[5, 9, 17, 33, 2, 64, 100, 7, 8, 9, 10, 11]])


def test_svd_init_at_full_rank_reproduces_the_pruned_weights(tiny_model):
    spec = arch_of(tiny_model)
    model = apply_plan(tiny_model, Plan("tiny", 6, (0, 1, 2, 3, 3, 5), adapter=AdapterSpec(rank=64)))
    slot, pruned = get_blocks(model)[4], get_blocks(tiny_model)[4]
    for name, layer in block_linears(slot, spec).items():
        lora = layer.inner if hasattr(layer, "inner") else layer
        A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        assert lora.scaling["default"] == 1.0
        assert A.shape[0] == min(base_linear(layer).weight.shape)  # capped at min(d_in, d_out)
        rebuilt = base_linear(layer).weight + B @ A
        torch.testing.assert_close(rebuilt, block_linears(pruned, spec)[name].weight, atol=1e-5, rtol=1e-4)
    assert build_info(model).ranks == {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": 64,
                                       "gate_proj": 64, "up_proj": 64, "down_proj": 64}


def test_lora_factors_put_singular_values_on_the_output_side():
    delta = torch.randn(12, 8, dtype=torch.float64)
    B, A = lora_factors(delta, 3)
    torch.testing.assert_close(A @ A.T, torch.eye(3), atol=1e-5, rtol=0)  # rows of V^T are orthonormal
    s = torch.linalg.svdvals(delta.float())
    torch.testing.assert_close(B.norm(dim=0), s[:3], atol=1e-5, rtol=1e-5)


def test_zero_adapters_and_zero_scale_give_exactly_the_drop_model(tiny_model):
    plan = Plan("tiny", 6, (0, 1, 1, 3, 3, 5), adapter=AdapterSpec(init="zeros", out_norm_scale=0.0))
    flexi = apply_plan(tiny_model, plan)
    drop = apply_plan(tiny_model, plan.with_method("drop"))
    assert torch.equal(flexi(IDS).logits, drop(IDS).logits)
    scaled = apply_plan(tiny_model, plan.with_adapter(out_norm="scale"))
    assert torch.equal(scaled(IDS).logits, drop(IDS).logits)


def test_identity_slots_with_full_rank_and_unit_scale_approach_the_original(tiny_model):
    # With the output scale at 1 the "scale" slot runs W_donor + SVD(W_pruned - W_donor) = W_pruned.
    plan = Plan("tiny", 6, (0, 1, 1, 3, 3, 5), adapter=AdapterSpec(rank=64, out_norm="scale", out_norm_scale=1.0))
    model = apply_plan(tiny_model, plan)
    torch.testing.assert_close(model(IDS).logits, tiny_model(IDS).logits, atol=1e-4, rtol=1e-4)


def test_kept_lora_on_drop_model(tiny_model):
    plan = Plan("tiny", 6, (0, 1, 3, 5), "drop")
    model = apply_plan(tiny_model, plan)
    ref = model(IDS).logits
    attach_kept_lora(model, 4, ("q_proj", "v_proj"))
    assert torch.equal(model(IDS).logits, ref)  # B = 0 at start
    names = [n for n, _ in trainable_parameters(model)]
    assert len(names) == 4 * 2 * 2 and all("lora_" in n for n in names)
    assert measure_params(model).trainable == 4 * (4 * (64 + 64) + 4 * (64 + 32))
    assert not any("lora" in n for n, _ in tiny_model.named_parameters())  # base untouched
    flexi = Plan("tiny", 6, (0, 1, 1, 3, 3, 5))
    r = matched_lora_rank(flexi, tiny_model)
    f_train = measure_params(apply_plan(tiny_model, flexi)).trainable
    costs = {k: measure_params(attach_kept_lora(apply_plan(tiny_model, plan), k)).trainable for k in (r - 1, r, r + 1)}
    assert abs(costs[r] - f_train) <= min(abs(costs[r - 1] - f_train), abs(costs[r + 1] - f_train))
