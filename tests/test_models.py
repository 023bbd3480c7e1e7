"""Model loading and the architecture registry."""
from __future__ import annotations

import json

import pytest
import torch

from flexigpt.arch import arch_of, block_linears, get_blocks, set_blocks
from flexigpt.models import cache_dir, fingerprint, load_model, model_info, parameter_count


def test_arch_llama_and_opt(tiny_model, tiny_opt_model):
    spec = arch_of(tiny_model)
    assert spec.family == "llama"
    assert spec.matrix_names == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert len(get_blocks(tiny_model)) == 6
    lin = block_linears(get_blocks(tiny_model)[0], spec)
    assert lin["k_proj"].weight.shape == (32, 64)  # GQA: 2 KV heads x 16
    ospec = arch_of(tiny_opt_model)
    assert ospec.family == "opt"
    assert ospec.matrix_names == ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    assert len(get_blocks(tiny_opt_model)) == 4


def test_unsupported_architecture_names_it():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'; supported: llama"):
        arch_of(model)


def test_set_blocks_renumbers_and_generates(tiny_model):
    blocks = list(get_blocks(tiny_model))
    set_blocks(tiny_model, [blocks[0], blocks[2], blocks[5]])
    assert tiny_model.config.num_hidden_layers == 3
    assert [b.self_attn.layer_idx for b in get_blocks(tiny_model)] == [0, 1, 2]
    out = tiny_model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
    with pytest.raises(ValueError, match="reuses a block object"):
        set_blocks(tiny_model, [blocks[0], blocks[0]])
    with pytest.raises(ValueError, match="at least one block"):
        set_blocks(tiny_model, [])


def test_parameter_count_dedups_tied(tiny_opt_model):
    naive = sum(p.numel() for p in tiny_opt_model.parameters())  # parameters() already dedups objects
    assert parameter_count(tiny_opt_model) == naive
    emb = tiny_opt_model.get_input_embeddings().weight
    assert tiny_opt_model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    assert model_info(tiny_opt_model)["tied_embeddings"] is True


def test_fingerprint_changes_with_weights(tiny_model):
    a = fingerprint(tiny_model)
    assert a == fingerprint(tiny_model)
    with torch.no_grad():
        get_blocks(tiny_model)[3].mlp.down_proj.weight[0, 0] += 1.0
    assert fingerprint(tiny_model) != a


def test_local_folder_round_trip(tiny_model, tiny_tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.source == "folder"
    ids = torch.tensor([[4, 5, 6, 7]])
    torch.testing.assert_close(loaded.model(ids).logits, tiny_model(ids).logits)


@pytest.mark.parametrize(
    "ref, pattern",
    [
        ("", "non-empty"),
        ("https://example.com/model", "is a URL"),
        ("./no/such/folder", "does not exist"),
        ("not a model id!", "does not exist"),
    ],
)
def test_bad_references_name_the_value(ref, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_model(ref)


def test_garbled_and_unsupported_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(str(empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read config.json"):
        load_model(str(bad))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        load_model(str(gpt2))


def test_hub_id_offline_says_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"'someone/not-a-cached-model' is not in the local Hugging Face cache"):
        load_model("someone/not-a-cached-model")


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXIGPT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert (tmp_path / "c").is_dir()


@pytest.mark.slow
def test_embedded_default_model(smollm):
    info = model_info(smollm.model, smollm.tokenizer)
    assert info["num_blocks"] == 30
    assert info["num_parameters"] == 134_515_008
    assert info["tied_embeddings"] is True and info["chat_template"] is True
    assert info["hidden_size"] == 576
    # a second load reads the cached conversion and gives the same weights
    again = load_model("default")
    assert again.source == "embedded-cache"
    assert fingerprint(again.model) == fingerprint(smollm.model)


@pytest.mark.slow
def test_embedded_chat_template_and_paris(smollm):
    tok = smollm.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = smollm.model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
