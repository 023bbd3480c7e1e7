"""FoldGPT gates: trained on calibration text, they switch off a block that does nothing."""
from __future__ import annotations

import pytest
import torch

from flexigpt.arch import get_blocks
from flexigpt.gates import GateSpec, train_gates


def test_gates_leave_weights_untouched_and_identity_block_gets_no_lm_signal(tiny_model):
    blocks = get_blocks(tiny_model)
    with torch.no_grad():  # block 3 becomes an exact identity: the LM loss cannot see its gate
        blocks[3].self_attn.o_proj.weight.zero_()
        blocks[3].mlp.down_proj.weight.zero_()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    flags = [p.requires_grad for p in tiny_model.parameters()]
    windows = torch.randint(4, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    spec = GateSpec(steps=6, lr=0.2, polarization=0.0, budget=0.0)
    result = train_gates(tiny_model, windows, spec)
    start = torch.sigmoid(torch.tensor(spec.init_logit)).item()
    assert result.gates[3] == pytest.approx(start, abs=1e-7)
    assert max(abs(g - start) for i, g in enumerate(result.gates) if i != 3) > 1e-3
    assert result.losses[-1] < result.losses[0]
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert not any(b._forward_hooks for b in blocks)


def test_budget_pushes_gates_down(tiny_model):
    windows = torch.randint(4, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    result = train_gates(tiny_model, windows, GateSpec(ratio=0.5, steps=8, lr=0.3, budget=5.0))
    assert sum(result.gates) < 6 * 0.95 - 0.5
    assert sorted(result.removal_order()) == list(range(6))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"ratio": 0.95}, r"ratio must be in \[0, 0.9\], got 0.95"),
    ({"steps": 0}, "steps must be an integer in 1..100000, got 0"),
    ({"lr": float("nan")}, "lr must be a number"),
])
def test_bad_gate_settings(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        GateSpec(**kwargs)
