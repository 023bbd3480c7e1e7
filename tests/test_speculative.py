"""Self-speculative decoding: the drop sub-network drafts, the full model verifies."""
from __future__ import annotations

import copy

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


# --- self-speculative decoding through the block runner: the draft chosen by measured speed ---

def _hf_greedy(model, prompt, n, eos=None):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                          pad_token_id=1, eos_token_id=eos)


@pytest.mark.parametrize("precision", ["float32", "float16", "int8"])
def test_self_speculative_output_identical_to_plain_greedy(tiny_model, precision):
    import random

    from flexigpt.inference import fast_view, inference_form, int8_available
    from flexigpt.runner import BlockRunner
    from flexigpt.self_speculative import DraftConfig, self_speculative_generate

    if precision == "int8" and not int8_available():
        pytest.skip("no int8 kernel in this torch")
    runner, verifier = BlockRunner(tiny_model), BlockRunner(fast_view(tiny_model))
    drafter = runner if precision == "float32" else BlockRunner(inference_form(tiny_model, precision))
    rng = random.Random(precision)
    for trial in range(12):
        skip_attn = rng.sample(range(6), rng.randint(0, 2))
        skip_mlp = rng.sample(range(6), rng.randint(0 if skip_attn or precision != "float32" else 1, 1))
        config = DraftConfig(skip_attn, skip_mlp, draft_vocab=rng.choice([0, 40]), precision=precision,
                             max_draft=rng.randint(1, 6), threshold=rng.choice([0.0, 0.05]))
        prompt = torch.randint(4, 128, (1, rng.randint(1, 9)))
        n = rng.randint(1, 16)
        eos = rng.choice([None, 7, [3, 9]])
        result = self_speculative_generate(runner, config, prompt, n, eos_token_id=eos, draft_runner=drafter,
                                           verify_runner=verifier, static_cache=trial % 2 == 0)
        assert torch.equal(result.sequences, _hf_greedy(tiny_model, prompt, n, eos)), config
        assert 0 <= result.accepted <= result.drafted


def test_self_speculative_near_perfect_draft_is_accepted(tiny_model):
    from flexigpt.runner import BlockRunner
    from flexigpt.self_speculative import DraftConfig, self_speculative_generate

    with torch.no_grad():  # block 4's MLP barely matters: skipping it leaves the argmax unchanged
        get_blocks(tiny_model)[4].mlp.down_proj.weight.mul_(1e-4)
    prompt = torch.tensor([[5, 9, 17]])
    result = self_speculative_generate(BlockRunner(tiny_model), DraftConfig((), (4,), threshold=0.0, max_draft=4),
                                       prompt, 20)
    assert torch.equal(result.sequences, _hf_greedy(tiny_model, prompt, 20))
    assert result.acceptance_rate == 1.0 and result.target_calls <= 5  # 4 drafts + 1 own token per pass


def test_adaptive_threshold_follows_the_acceptance_rate():
    from flexigpt.self_speculative import AdaptiveThreshold

    rule = AdaptiveThreshold(0.5, target=0.8)
    rule.update(4, 0)
    assert rule.value > 0.5  # rejected drafts: demand more confidence
    high = rule.value
    for _ in range(5):
        rule.update(4, 4)
    assert rule.value < high  # accepted drafts: draft more
    before = rule.value
    rule.update(0, 0)
    assert rule.value < before  # no draft at all: a little bolder


def test_draft_config_is_validated():
    from flexigpt.self_speculative import DraftConfig

    with pytest.raises(ValueError, match="must skip at least one sub-layer"):
        DraftConfig()
    with pytest.raises(ValueError, match="precision must be 'float32', 'float16' or 'int8', got 'int4'"):
        DraftConfig((1,), precision="int4")
    with pytest.raises(ValueError, match="max_draft must be an integer in 1..32, got 0"):
        DraftConfig((1,), max_draft=0)
    with pytest.raises(ValueError, match=r"skipped blocks \[7\] are out of range 0..5"):
        DraftConfig((7,)).check(6)
    config = DraftConfig((3, 1), (2,), draft_vocab=64, precision="float16")
    assert DraftConfig.from_dict(config.to_dict()) == config and config.first_skipped == 1


@pytest.fixture
def flexigpt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXIGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_draft_search_chooses_caches_and_replies_exactly(tiny_model, tiny_tokenizer, flexigpt_cache):
    from flexigpt.chat import reply
    from flexigpt.draft_search import choose_draft, self_draft
    from flexigpt.speculative import speculative_reply

    options = dict(prompts=("w1 w2 w3", "w9 w8"), new_tokens=8, finalists=2)
    choice = choose_draft(tiny_model, tiny_tokenizer, **options)
    assert choice.source == "searched" and choice.plain_tokens_per_s > 0 and choice.draft_tokens_per_s > 0
    assert len(choice.candidates) == 2
    assert len(list((flexigpt_cache / "drafts").glob("*.json"))) == 1
    assert choose_draft(tiny_model, tiny_tokenizer, **options).source == "memory"
    assert choose_draft(copy.deepcopy(tiny_model), tiny_tokenizer, **options).source == "disk"
    draft = self_draft(tiny_model, tiny_tokenizer, **options)
    for prompt in ("w1 w2 w3", "w7 w9", "w100 w5 w6 w7"):  # the original model, no plan needed
        text, stats = speculative_reply(tiny_model, tiny_tokenizer, prompt, draft=draft, max_new_tokens=10)
        assert text == reply(tiny_model, tiny_tokenizer, prompt, max_new_tokens=10)
        assert stats.new_tokens >= 1


def test_cli_chat_speculative_json_same_reply(tiny_model, tiny_tokenizer, tmp_path, capsys, flexigpt_cache):
    import json

    from flexigpt.cli import main
    from flexigpt.export import save_compact
    from flexigpt.plan import Plan
    from flexigpt.surgery import apply_plan

    plan = Plan(str(tmp_path), 6, (0, 1, 1, 3, 3, 5))
    save_compact(apply_plan(tiny_model, plan), plan, tiny_tokenizer, tmp_path / "m")
    tiny_model.save_pretrained(tmp_path / "orig")
    tiny_tokenizer.save_pretrained(tmp_path / "orig")
    for folder in ("m", "orig"):
        base = ["chat", "--model", str(tmp_path / folder), "--prompt", "w1 w2", "--max-new-tokens", "6", "--json"]
        assert main(base) == 0
        plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert main(base + ["--speculative"]) == 0
        spec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert spec["reply"] == plain["reply"] and spec["speculative"] is True
        assert {"seconds", "acceptance_rate", "draft_len", "precision", "skip_attention", "skip_mlp"} <= set(spec)
