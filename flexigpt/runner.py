"""How does a token pass through the blocks without the generic forward's overhead? A block runner.

``BlockRunner`` drives a LLaMA-family causal LM (LLaMA, Mistral, Qwen2/3: a pre-norm attention
sub-layer and a pre-norm MLP sub-layer per block) one sub-layer at a time, calling the model's
own modules, so replacement slots (LoRA, output norms) and any dense inference form run
unchanged. For one-token steps and for a prompt without a cache it feeds those modules exactly
the inputs that the model's own ``forward`` feeds them (no mask, the same rotary embeddings), so
the logits are bit-for-bit the same; for several tokens after a cache it passes an explicit
causal mask.

What it adds over ``model(...)``:

* any range of blocks can run on a hidden state, and any attention or MLP sub-layer can be
  skipped: the self-speculative draft is the model with some sub-layers skipped, and the blocks
  before the first skipped one are computed once for draft and verify;
* its own KV caches (``KVCache``), one length per layer, cut back to any length in place;
* the LM head over a subset of vocabulary rows (a cheap draft head).

Models of other families are not supported (``runner_support`` says why); callers fall back to
``model(...)``.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexigpt.arch import arch_of, get_blocks

log = logging.getLogger(__name__)

__all__ = ["BlockRunner", "KVCache", "runner_support"]

_FAMILY_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def runner_support(model: nn.Module) -> str | None:
    """``None`` when ``BlockRunner`` can drive ``model``, else the reason it cannot."""
    try:
        spec = arch_of(model)
    except ValueError as err:
        return str(err)
    config = model.config
    if spec.family != "llama" or config.model_type not in _FAMILY_TYPES:
        return f"the block runner drives {', '.join(_FAMILY_TYPES)} models, not {config.model_type!r}"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        return "sliding-window attention needs the model's own masks"
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return f"attention implementation {config._attn_implementation!r} is not supported by the block runner"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "embed_tokens"):
        return "the model has no rotary embedding or token embedding where LLaMA keeps them"
    for block in get_blocks(model):
        if not all(hasattr(block, n) for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")):
            return f"block {type(block).__name__} is not a pre-norm attention + MLP block"
    return None


class KVCache:
    """Keys and values for every layer, with one length per layer.

    The attention modules call ``update`` (the one method they use of a transformers cache);
    layers are addressed by their ``layer_idx``. ``static``: buffers preallocated for
    ``capacity`` positions, written in place, and ``crop`` only moves the length index, so a
    rejected draft costs no copy; otherwise every update concatenates (as transformers'
    ``DynamicCache`` does) and ``crop`` slices.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device, static: bool = True):
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 position, got {capacity}")
        self.capacity, self.static = capacity, static
        shape = (1, kv_heads, capacity if static else 0, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.lengths = [0] * layers

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        start, n = self.lengths[layer_idx], key.shape[2]
        end = start + n
        if end > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} positions; {end} were needed")
        self.lengths[layer_idx] = end
        if not self.static:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx][:, :, :start], key], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx][:, :, :start], value], dim=2)
            return self.keys[layer_idx], self.values[layer_idx]
        self.keys[layer_idx][:, :, start:end] = key
        self.values[layer_idx][:, :, start:end] = value
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def crop(self, length: int, layers: Iterable[int] | None = None) -> None:
        """Keep at most the first ``length`` positions of ``layers`` (default: all)."""
        for i in range(len(self.lengths)) if layers is None else layers:
            self.lengths[i] = min(self.lengths[i], length)


class BlockRunner:
    """Runs one LLaMA-family model block by block; see the module docstring.

    Args:
        model: the causal LM (its modules are used, never copied).

    Raises:
        ValueError: the model is not supported (the message says why).
    """

    def __init__(self, model: nn.Module):
        reason = runner_support(model)
        if reason:
            raise ValueError(reason)
        self.model = model
        self.blocks = list(get_blocks(model))
        inner = model.model
        self.embed_tokens = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.head = model.get_output_embeddings()
        config = model.config
        self.num_layers = len(self.blocks)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.layer_ids = [int(getattr(b.self_attn, "layer_idx", i)) for i, b in enumerate(self.blocks)]
        if sorted(self.layer_ids) != list(range(self.num_layers)):
            raise ValueError(f"attention layer_idx values {self.layer_ids} are not 0..{self.num_layers - 1}")
        self.weight = self.head.weight
        self.dtype = self.weight.dtype
        self.device = self.weight.device

    def new_cache(self, capacity: int, static: bool = True) -> KVCache:
        """An empty cache for ``capacity`` positions of every layer (see ``KVCache``)."""
        return KVCache(self.num_layers, self.kv_heads, self.head_dim, capacity, self.dtype, self.device, static)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``(1, n)`` token ids -> ``(1, n, hidden)`` input hidden states."""
        return self.embed_tokens(ids)

    def rotary_for(self, hidden: torch.Tensor, start: int):
        """Rotary embeddings for positions ``start .. start + n - 1`` of ``hidden`` ``(1, n, H)``."""
        positions = torch.arange(start, start + hidden.shape[1], device=hidden.device).unsqueeze(0)
        return self.rotary(hidden, positions)

    @staticmethod
    def mask_for(n: int, start: int, device: torch.device) -> torch.Tensor | None:
        """Causal boolean mask for ``n`` new tokens after ``start`` cached ones (``None`` when the
        model's own forward passes none: one token, or a prompt with an empty cache)."""
        if n == 1 or start == 0:
            return None
        q = torch.arange(start, start + n, device=device)[:, None]
        k = torch.arange(start + n, device=device)[None, :]
        return (k <= q).view(1, 1, n, start + n)

    def run(self, hidden: torch.Tensor, lo: int, hi: int, cache: KVCache, start: int, *,
            skip_attn: frozenset[int] | set[int] = frozenset(), skip_mlp: frozenset[int] | set[int] = frozenset(),
            rotary=None, mask=None, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Blocks ``lo .. hi - 1`` on ``hidden`` ``(1, n, H)`` at positions ``start ..``, writing ``cache``.

        Args:
            skip_attn / skip_mlp: block indices whose attention / MLP sub-layer is skipped (the
                residual stream passes unchanged; a skipped attention writes no cache entry).
            rotary / mask: precomputed ``rotary_for`` / ``mask_for`` values (computed if omitted).
            keep: when given, the input hidden state of every block run is appended to it.
        """
        n = hidden.shape[1]
        if rotary is None:
            rotary = self.rotary_for(hidden, start)
        if mask is None and n > 1 and start > 0:
            mask = self.mask_for(n, start, hidden.device)
        for i in range(lo, hi):
            block = self.blocks[i]
            if keep is not None:
                keep.append(hidden)
            if i not in skip_attn:
                out = block.self_attn(hidden_states=block.input_layernorm(hidden), position_embeddings=rotary,
                                      attention_mask=mask, past_key_values=cache)[0]
                hidden = hidden + out
            if i not in skip_mlp:
                hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        return hidden

    def logits(self, hidden: torch.Tensor, head=None) -> torch.Tensor:
        """Final norm + LM head over ``hidden`` ``(1, n, H)`` -> ``(n, V)``.

        ``head``: another head applied to the normed ``(n, H)`` states instead (a draft head).
        """
        h = self.norm(hidden)[0]  # (n, H)
        if head is not None:
            return head(h)
        if h.shape[0] > 1 and type(self.head) is nn.Linear and self.head.bias is None and h.device.type == "cpu":
            # several positions: the (V, H) x (H, n) product runs much faster than (n, H) x (H, V)
            # on CPUs for small n, and gives the same values up to float rounding
            return torch.mm(self.weight, h.T).T
        return self.head(h)
