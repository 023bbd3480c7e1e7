"""Tiny random models built in code for the tests: no download, a fraction of a second each."""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM


def tiny_llama(num_blocks: int = 6, hidden: int = 64, vocab: int = 128, kv_heads: int = 2, seed: int = 0) -> nn.Module:
    """A tiny random LLaMA (GQA)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_blocks,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
        tie_word_embeddings=False, pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_opt(num_blocks: int = 4, hidden: int = 64, vocab: int = 128, seed: int = 0) -> nn.Module:
    """A tiny random OPT (tied embeddings, biases, LayerNorm)."""
    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=vocab, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=num_blocks,
        num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=hidden,
        pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )
    return OPTForCausalLM(cfg).eval()
