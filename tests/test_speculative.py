"""Self-speculative decoding: the drop sub-network drafts, the full model verifies."""
from __future__ import annotations

import pytest
import torch

from flexigpt.arch import get_blocks
from flexigpt.speculative import draft_model, greedy_generate, speculative_generate


def test_draft_shares_every_tensor_and_leaves_model_alone(tiny_model):
    draft = draft_model(tiny_model, [1, 3])
    assert len(get_blocks(draft)) == 4 and draft.config.num_hidden_layers == 4
    assert tiny_model.config.num_hidden_layers == 6
    assert [b.self_attn.layer_idx for b in get_blocks(draft)] == [0, 1, 2, 3]
    assert [b.self_attn.layer_idx for b in get_blocks(tiny_model)] == list(range(6))
    model_ptrs = {p.data_ptr() for p in tiny_model.parameters()}
    assert all(p.data_ptr() in model_ptrs for p in draft.parameters())
    with pytest.raises(ValueError, match=r"slots \[9\] to skip are out of range 0..5"):
        draft_model(tiny_model, [9])


@pytest.mark.parametrize("draft_len", [1, 3, 5])
def test_greedy_output_identical_to_plain_greedy(tiny_model, draft_len):
    draft = draft_model(tiny_model, [2, 4])
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        prompt = torch.randint(4, 128, (1, int(torch.randint(1, 9, (1,), generator=g))), generator=g)
        plain = greedy_generate(tiny_model, prompt, 12)
        spec = speculative_generate(tiny_model, draft, prompt, 12, draft_len=draft_len)
        hf = tiny_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                 do_sample=False, pad_token_id=1, eos_token_id=None)
        assert torch.equal(spec.sequences, plain.sequences)
        assert torch.equal(plain.sequences, hf)
        assert spec.new_tokens == 12 and 0 <= spec.accepted <= spec.drafted


def test_perfect_draft_accepts_everything(tiny_model):
    prompt = torch.tensor([[5, 9, 17]])
    spec = speculative_generate(tiny_model, draft_model(tiny_model, []), prompt, 10, draft_len=4)
    assert spec.acceptance_rate == 1.0
    assert spec.target_calls < 10  # fewer full-model passes than tokens


def test_eos_stops_like_greedy(tiny_model):
    prompt = torch.tensor([[5, 6, 7]])
    plain = greedy_generate(tiny_model, prompt, 20)
    eos = int(plain.sequences[0, prompt.shape[1] + 4])  # the 5th generated token acts as EOS
    a = greedy_generate(tiny_model, prompt, 20, eos_token_id=eos)
    b = speculative_generate(tiny_model, draft_model(tiny_model, [0]), prompt, 20, eos_token_id=eos)
    assert torch.equal(a.sequences, b.sequences)


def test_sampling_runs_and_is_seeded(tiny_model):
    draft = draft_model(tiny_model, [1])
    prompt = torch.tensor([[5, 6]])
    a = speculative_generate(tiny_model, draft, prompt, 8, temperature=1.0, seed=3)
    b = speculative_generate(tiny_model, draft, prompt, 8, temperature=1.0, seed=3)
    assert torch.equal(a.sequences, b.sequences) and a.new_tokens == 8


def test_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match="draft_len must be a positive integer, got 0"):
        speculative_generate(tiny_model, tiny_model, torch.tensor([[5]]), 4, draft_len=0)
    with pytest.raises(ValueError, match=r"one prompt of shape \(1, T\)"):
        speculative_generate(tiny_model, tiny_model, torch.tensor([[5], [6]]), 4)


def test_speculative_reply_equals_plain_reply_on_a_flexigpt_build(tiny_model, tiny_tokenizer):
    from flexigpt.chat import reply
    from flexigpt.plan import Plan
    from flexigpt.speculative import draft_for, speculative_reply
    from flexigpt.surgery import apply_plan

    model = apply_plan(tiny_model, Plan("t", 6, (0, 1, 1, 3, 3, 5)))
    with torch.no_grad():  # make the slots matter, as after recovery: perturb what recovery trains
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    draft = draft_for(model)
    assert len(get_blocks(draft)) == 4
    for prompt in ("w1 w2 w3", "w7 w9", "w100 w5 w6 w7"):
        text, stats = speculative_reply(model, tiny_tokenizer, prompt, draft=draft, max_new_tokens=10)
        assert text == reply(model, tiny_tokenizer, prompt, max_new_tokens=10)
        assert stats.drafted > 0
    with pytest.raises(ValueError, match="needs a model with replacement slots"):
        draft_for(apply_plan(tiny_model, Plan("t", 6, (0, 1, 3, 5), method="drop")))


def test_cli_chat_speculative_same_stdout(tiny_model, tiny_tokenizer, tmp_path, capsys):
    from flexigpt.cli import main
    from flexigpt.export import save_compact
    from flexigpt.plan import Plan
    from flexigpt.surgery import apply_plan

    plan = Plan(str(tmp_path), 6, (0, 1, 1, 3, 3, 5))
    save_compact(apply_plan(tiny_model, plan), plan, tiny_tokenizer, tmp_path / "m")
    assert main(["chat", "--model", str(tmp_path / "m"), "--prompt", "w1 w2", "--max-new-tokens", "6"]) == 0
    plain = capsys.readouterr().out
    assert main(["chat", "--model", str(tmp_path / "m"), "--prompt", "w1 w2", "--max-new-tokens", "6", "--speculative"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "draft tokens accepted" in captured.err
    assert main(["chat", "--model", str(tmp_path / "m"), "--prompt", "w1", "--speculative", "--temperature", "0.7"]) == 2
