"""Inference forms: the fast view computes the model's own logits, the dense form the adapter form's."""
from __future__ import annotations

import pytest
import torch

from flexigpt.arch import get_blocks
from flexigpt.inference import FastLinear, LowPrecisionLinear, extra_bytes, fast_view, inference_form, int8_available
from flexigpt.runner import BlockRunner


def _flexigpt_build(tiny_model):
    from flexigpt.plan import Plan
    from flexigpt.surgery import apply_plan

    model = apply_plan(tiny_model, Plan("t", 6, (0, 1, 1, 3, 3, 5)))
    with torch.no_grad():  # make the slots matter, as after recovery: perturb what recovery trains
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_fast_view_shares_weights_and_gives_the_same_logits(tiny_model):
    view = fast_view(tiny_model)
    block = get_blocks(view)[0]
    assert all(isinstance(m, FastLinear) for m in (block.mlp.gate_proj, block.mlp.down_proj, block.self_attn.k_proj))
    assert {p.data_ptr() for p in view.parameters()} == {p.data_ptr() for p in tiny_model.parameters()}
    assert extra_bytes(view, tiny_model) == 0
    ids = torch.randint(4, 128, (1, 12))
    with torch.inference_mode():
        assert torch.equal(view(ids).logits, tiny_model(ids).logits)  # 12 rows: the model's own kernel
        for rows in (1, 2, 3, 4):  # verify-sized passes: a different kernel, the same values up to rounding
            a, b = view(ids[:, :rows]).logits, tiny_model(ids[:, :rows]).logits
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            if rows == 1:
                assert torch.equal(a, b)


def test_dense_form_matches_the_adapter_form_within_float32_rounding(tiny_model):
    model = _flexigpt_build(tiny_model)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    dense = inference_form(model)
    slot = get_blocks(dense)[2]  # a replacement slot: one dense weight per linear, no LoRA left
    assert isinstance(slot.self_attn.q_proj, FastLinear) and not any("lora" in n for n, _ in slot.named_parameters())
    assert isinstance(slot.self_attn.o_proj.inner, FastLinear)  # the output norm stays around the out linear
    kept = get_blocks(dense)[0]
    assert kept.mlp.up_proj.weight.data_ptr() == get_blocks(model)[0].mlp.up_proj.weight.data_ptr()  # no copy
    slots = len(model.flexigpt_build.plan.shared_slots)
    per_slot = sum(p.numel() for p in get_blocks(tiny_model)[0].parameters() if p.ndim == 2) * 4
    assert extra_bytes(dense, model) == slots * per_slot
    assert dense._flexigpt_inference["extra_bytes"] == slots * per_slot
    ids = torch.randint(4, 128, (2, 16))
    with torch.inference_mode():
        a, b = dense(ids).logits, model(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # the stored form is untouched
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_dense_form_of_a_real_prompt_decodes_the_same_reply(tiny_model, tiny_tokenizer):
    from flexigpt.chat import reply

    model = _flexigpt_build(tiny_model)
    dense = inference_form(model)
    for prompt in ("w1 w2 w3", "w7 w9 w11 w13 w15"):
        assert reply(dense, tiny_tokenizer, prompt, max_new_tokens=12) == reply(model, tiny_tokenizer, prompt, max_new_tokens=12)


@pytest.mark.parametrize("precision", ["float16", "int8"])
def test_low_precision_forms_are_close_and_small(tiny_model, precision):
    if precision == "int8" and not int8_available():
        pytest.skip("no int8 kernel in this torch")
    model = _flexigpt_build(tiny_model)
    low = inference_form(model, precision)
    assert isinstance(get_blocks(low)[1].mlp.down_proj, LowPrecisionLinear)
    ids = torch.randint(4, 128, (1, 10))
    with torch.inference_mode():
        a, b = low(ids).logits, model(ids).logits
    assert float((a - b).abs().max()) < 0.1 * float(b.abs().max())
    block_bytes = sum(p.numel() for b in get_blocks(tiny_model) for p in b.parameters() if p.ndim == 2) * 4
    assert extra_bytes(low, model) < (0.6 if precision == "float16" else 0.35) * block_bytes * 6 / 4


def test_runner_on_a_form_matches_the_model_forward(tiny_model):
    model = _flexigpt_build(tiny_model)
    dense = inference_form(model)
    runner = BlockRunner(dense)
    ids = torch.randint(4, 128, (1, 9))
    with torch.inference_mode():
        cache = runner.new_cache(9)
        logits = runner.logits(runner.run(runner.embed(ids), 0, runner.num_layers, cache, 0)[:, -1:])
        assert torch.equal(logits, dense(ids, logits_to_keep=1).logits[0])


def test_bad_precision_is_refused(tiny_model):
    with pytest.raises(ValueError, match="precision must be one of float32, float16, int8, got 'int4'"):
        inference_form(tiny_model, "int4")
