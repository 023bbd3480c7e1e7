"""Input second moments of every linear: equal to an explicit recomputation from captured inputs."""
from __future__ import annotations

import pytest
import torch

from flexigpt.activations import MomentCollector, linear_input_moments
from flexigpt.arch import arch_of, get_blocks, get_submodule


def _captured_moments(model, ids):
    """Reference: keep every linear's input of one plain forward pass, then X^T X / N in float64."""
    spec = arch_of(model)
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for b, block in enumerate(get_blocks(model)):
        for name in spec.matrix_names:
            def hook(module, args, key=(b, name)):
                seen.setdefault(key, []).append(args[0].detach().double().reshape(-1, args[0].shape[-1]))
            handles.append(get_submodule(block, spec.path_of(name)).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    out = {}
    for key, xs in seen.items():
        x = torch.cat(xs)
        out[key] = x.T @ x / x.shape[0]
    return out


@pytest.mark.parametrize("which", ["tiny_model", "tiny_opt_model"])
def test_moments_match_captured_inputs(which, request):
    model = request.getfixturevalue(which)
    ids = torch.randint(0, 128, (5, 12))
    got = linear_input_moments(model, ids, batch_size=2)
    ref = _captured_moments(model, ids)
    spec = arch_of(model)
    assert sorted(got) == list(range(len(get_blocks(model))))
    for (b, name), c in ref.items():
        assert got[b][name].dtype == torch.float64
        assert torch.allclose(got[b][name], c, rtol=1e-5, atol=1e-7), (b, name)
        assert torch.equal(got[b][name], got[b][name].T)
    for b in got:
        q, k, v = (got[b][n] for n in ("q_proj", "k_proj", "v_proj"))
        assert q is k and k is v  # one input, one tensor
        out_name = spec.matrix_names[3]  # o_proj / out_proj reads the attention context
        assert got[b][out_name] is not q and got[b][out_name].shape == q.shape
    if spec.family == "llama":
        assert got[0]["gate_proj"] is got[0]["up_proj"] and got[0]["down_proj"].shape == (128, 128)
    else:
        assert got[0]["fc1"] is not got[0]["q_proj"] and got[0]["fc1"].shape == (64, 64)  # its own pre-norm
        assert got[0]["fc2"].shape == (128, 128)


def test_blocks_subset_and_windows_object(tiny_model, tiny_tokenizer, tiny_text_file):
    from flexigpt.data import token_windows

    windows = token_windows(tiny_tokenizer, str(tiny_text_file), seq_len=16, max_windows=3)
    got = linear_input_moments(tiny_model, windows, blocks=[4, 1])
    full = linear_input_moments(tiny_model, windows.input_ids, batch_size=1)
    assert sorted(got) == [1, 4]
    assert torch.allclose(got[4]["down_proj"], full[4]["down_proj"], rtol=1e-6)


def test_collector_around_another_pass_sees_the_same_inputs(tiny_model):
    from flexigpt.scoring import score_blocks

    ids = torch.randint(0, 128, (4, 10))
    with MomentCollector(tiny_model, blocks=[2]) as collector:
        score_blocks(tiny_model, ids, batch_size=3)
    assert collector.tokens == 40
    assert collector.groups(2) == {"q_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                                   "gate_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
    ref = linear_input_moments(tiny_model, ids, blocks=[2])
    assert torch.allclose(collector.moment(2, "o_proj"), ref[2]["o_proj"], rtol=1e-6)
    for block in get_blocks(tiny_model):  # hooks are gone
        assert not block._forward_pre_hooks
        assert not block.self_attn.q_proj._forward_pre_hooks


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"windows": torch.zeros(0, 4, dtype=torch.long)}, "non-empty"),
        ({"windows": torch.zeros(2, 4)}, "int64"),
        ({"windows": [[1, 2]]}, "list"),
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"blocks": [6]}, r"blocks \[6\] are out of range 0..5"),
    ],
)
def test_bad_input_raises(tiny_model, kw, match):
    args = {"windows": torch.randint(0, 128, (2, 4))}
    args.update(kw)
    windows = args.pop("windows")
    with pytest.raises(ValueError, match=match):
        linear_input_moments(tiny_model, windows, **args)
