"""Where do the blocks live? The one place that knows each supported architecture.

Every other module asks this one for a model's decoder blocks, their linear matrices and
their pre-norms, so adding an architecture means adding one ``ArchSpec`` here. We say
*block* for one decoder layer of the base model (Hugging Face calls it a "layer").

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

__all__ = [
    "ArchSpec",
    "SUPPORTED",
    "arch_of",
    "get_blocks",
    "set_blocks",
    "block_linears",
    "get_submodule",
    "set_submodule",
    "supported_names",
]


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture family lays out its decoder blocks.

    Attributes:
        family: short family name (``"llama"`` or ``"opt"``).
        model_types: the ``config.model_type`` values that belong to the family.
        blocks_path: dotted path from the ``*ForCausalLM`` to the ``nn.ModuleList`` of blocks.
        linears: dotted paths, inside one block, of every linear matrix, in a fixed order.
            The last path component is the matrix's short name (``q_proj``, ``down_proj``...).
        out_linears: the last linear of the attention and of the MLP sub-layer; their outputs
            are exactly the sub-layer outputs that FlexiGPT's output feature normalisation acts on.
        norms: dotted paths of the block's own pre-norms.
        attention: dotted path of the attention module (which carries ``layer_idx``).
        final_norm: dotted path (from the CausalLM) of the norm after the last block.
    """

    family: str
    model_types: tuple[str, ...]
    blocks_path: str
    linears: tuple[str, ...]
    out_linears: tuple[str, str]
    norms: tuple[str, ...]
    attention: str
    final_norm: str
    # How each matrix moves when MLP neurons or attention heads of a block are permuted
    # (a function-preserving relabelling): (matrix, "rows" | "cols", "mlp" | "q" | "kv").
    permutable: tuple[tuple[str, str, str], ...] = ()

    @property
    def matrix_names(self) -> tuple[str, ...]:
        """Short names of the linear matrices of a block, e.g. ``("q_proj", ..., "down_proj")``."""
        return tuple(p.rsplit(".", 1)[-1] for p in self.linears)

    def path_of(self, matrix: str) -> str:
        """Dotted path inside a block of the matrix with short name ``matrix``."""
        for p in self.linears:
            if p.rsplit(".", 1)[-1] == matrix:
                return p
        raise ValueError(f"unknown matrix {matrix!r} for {self.family}; valid: {', '.join(self.matrix_names)}")


LLAMA = ArchSpec(
    family="llama",
    # SmolLM2 is a LlamaForCausalLM; Mistral and Qwen2/Qwen3 share the same block layout.
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks_path="model.layers",
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    out_linears=("self_attn.o_proj", "mlp.down_proj"),
    norms=("input_layernorm", "post_attention_layernorm"),
    attention="self_attn",
    final_norm="model.norm",
    permutable=(
        ("q_proj", "rows", "q"), ("k_proj", "rows", "kv"), ("v_proj", "rows", "kv"), ("o_proj", "cols", "q"),
        ("gate_proj", "rows", "mlp"), ("up_proj", "rows", "mlp"), ("down_proj", "cols", "mlp"),
    ),
)

OPT = ArchSpec(
    family="opt",
    model_types=("opt",),
    blocks_path="model.decoder.layers",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    out_linears=("self_attn.out_proj", "fc2"),
    norms=("self_attn_layer_norm", "final_layer_norm"),
    attention="self_attn",
    final_norm="model.decoder.final_layer_norm",
    permutable=(
        ("q_proj", "rows", "q"), ("k_proj", "rows", "kv"), ("v_proj", "rows", "kv"), ("out_proj", "cols", "q"),
        ("fc1", "rows", "mlp"), ("fc2", "cols", "mlp"),
    ),
)

SUPPORTED: tuple[ArchSpec, ...] = (LLAMA, OPT)


def supported_names() -> str:
    """Comma-separated list of supported ``model_type`` values, for error messages."""
    return ", ".join(t for spec in SUPPORTED for t in spec.model_types)


def arch_of(model_or_config) -> ArchSpec:
    """Return the ``ArchSpec`` of a model or config.

    Raises:
        ValueError: ``unsupported architecture X; supported: ...``.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for spec in SUPPORTED:
        if model_type in spec.model_types:
            return spec
    raise ValueError(f"unsupported architecture {model_type!r}; supported: {supported_names()}")


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)`` with a clear error."""
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise ValueError(f"module {path!r} not found in {type(root).__name__}") from err


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (find the parent, then ``setattr``)."""
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(root, parent_path) if parent_path else root
    setattr(parent, name, module)


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's ``nn.ModuleList`` of decoder blocks."""
    return get_submodule(model, arch_of(model).blocks_path)


def block_linears(block: nn.Module, spec: ArchSpec) -> dict[str, nn.Module]:
    """Map short matrix name -> the linear module at that position of ``block``."""
    return {p.rsplit(".", 1)[-1]: get_submodule(block, p) for p in spec.linears}


def set_blocks(model: nn.Module, blocks: list[nn.Module]) -> None:
    """Install ``blocks`` as the model's block stack and fix the depth bookkeeping.

    Renumbers every attention ``layer_idx`` to its slot (the KV cache indexes by it),
    sets ``config.num_hidden_layers`` and re-slices per-layer config lists
    (``layer_types``) when the caller passes blocks that carry ``_flexigpt_source``.
    """
    spec = arch_of(model)
    if not blocks:
        raise ValueError("a model needs at least one block; got an empty block list")
    seen: set[int] = set()
    for slot, block in enumerate(blocks):
        if id(block) in seen:  # the KV cache would collide: one module object per slot
            raise ValueError(f"slot {slot} reuses a block object already placed in another slot")
        seen.add(id(block))
        attn = get_submodule(block, spec.attention)
        if hasattr(attn, "layer_idx"):
            attn.layer_idx = slot
        if hasattr(block, "layer_idx"):
            block.layer_idx = slot
    config = model.config
    old_types = getattr(config, "layer_types", None)
    if isinstance(old_types, (list, tuple)):
        sources = [getattr(b, "_flexigpt_source", None) for b in blocks]
        if all(s is not None and 0 <= s < len(old_types) for s in sources):
            config.layer_types = [old_types[s] for s in sources]
        else:
            config.layer_types = [old_types[0]] * len(blocks) if old_types else old_types
    set_submodule(model, spec.blocks_path, nn.ModuleList(blocks))
    config.num_hidden_layers = len(blocks)
