"""Ship it and reload it: compact (storage-true) and merged (plain Hugging Face) exports.

* **compact** (``save_compact``/``load_compact``): every stored tensor written once under a
  canonical name (safetensors refuses aliased tensors, so shared donor weights are
  de-duplicated explicitly and their other names listed as aliases), plus ``plan.json``, the
  base config, the tokenizer and a manifest ``flexigpt-export.json``. Loading rebuilds the
  skeleton from config + plan (it never needs the pruned blocks' weights, which are not stored)
  and gives bit-identical logits. ``flexigpt.models.load_model`` dispatches here for a folder
  with both ``plan.json`` and ``flexigpt-export.json``.
* **merged** (``save_merged``): every slot materialised (``W_donor + B A``, cloned; the ``scale``
  output norm folded into the out linears) into a plain checkpoint that
  ``AutoModelForCausalLM.from_pretrained`` loads without flexigpt. Larger on disk. The
  ``layernorm`` output norm is nonlinear and cannot be merged: use the compact export.
* **peft adapters** (``save_peft_adapters``): ``adapter_model.safetensors`` + ``adapter_config.json``
  in peft's naming, for inspection with the usual tools.

Every write is atomic (``flexigpt.atomic``): a killed writer leaves the previous export or the new one.

Paper: FlexiGPT (Smith et al., NAACL 2025), https://arxiv.org/abs/2501.14713
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from flexigpt.adapters import ADAPTER, OutputNorm, lora_config
from flexigpt.atomic import atomic_dir as _atomic_dir
from flexigpt.atomic import export_path  # noqa: F401 (re-exported)
from flexigpt.arch import arch_of, get_blocks, get_submodule
from flexigpt.loaded import LoadedModel
from flexigpt.params import measure_params
from flexigpt.plan import Plan
from flexigpt.surgery import apply_plan, build_info
from flexigpt.trainable import attach_kept_lora

log = logging.getLogger(__name__)

__all__ = ["EXPORT_FORMAT", "export_path", "load_compact", "save_compact", "save_merged", "save_peft_adapters"]

EXPORT_FORMAT = 1
MANIFEST = "flexigpt-export.json"
MERGED_MANIFEST = "flexigpt-merged.json"
WEIGHTS = "flexigpt-weights.safetensors"
BASE_CONFIG = "base-config.json"


def _check(model: nn.Module, plan: Plan) -> None:
    info = build_info(model)
    if info.plan != plan:
        raise ValueError("the plan passed to the export differs from the plan the model was built with")


def _slot_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _canonical(model: nn.Module, plan: Plan) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Unique tensors under canonical names, and ``{alias: canonical}`` for the other names.

    The canonical name of a shared tensor is its name in the donor's own slot (not in a slot
    that shares it: a replacement, a copy or a FoldGPT group member), so the file reads like the
    kept blocks of the base model.
    """
    prefix = arch_of(model).blocks_path + "."
    replaced = set(plan.shared_slots)
    groups: dict[tuple, list[str]] = {}
    state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        groups.setdefault((t.data_ptr(), tuple(t.shape), t.dtype), []).append(name)
    order = {n: i for i, n in enumerate(state)}
    tensors, aliases = {}, {}
    for names in groups.values():
        names.sort(key=lambda n: (_slot_of(n, prefix) in replaced, order[n]))
        tensors[names[0]] = state[names[0]].detach().contiguous()
        aliases.update({n: names[0] for n in names[1:]})
    return tensors, aliases


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def save_compact(model: nn.Module, plan: Plan, tokenizer: Any, path: str | os.PathLike, *,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write the storage-true export of a built model (see the module docstring).

    Returns:
        The manifest (also written as ``flexigpt-export.json``), with ``path`` added.
    """
    # safetensors is heavy: imported on first use
    from safetensors.torch import save_file

    _check(model, plan)
    info = build_info(model)
    tensors, aliases = _canonical(model, plan)
    counts = measure_params(model)
    with _atomic_dir(path, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "flexigpt": str(EXPORT_FORMAT)})
        (tmp / "plan.json").write_text(plan.to_json())
        (tmp / BASE_CONFIG).write_text(json.dumps(info.base_config, indent=2, default=str))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        _save_tokenizer(tokenizer, tmp)
        manifest = {
            "format_version": EXPORT_FORMAT, "kind": "compact", "method": plan.method,
            "methods": [plan.method] + (["kept_lora"] if info.kept_lora else []),
            "base_model": plan.base_model, "num_slots": plan.num_slots,
            "tensors": len(tensors), "aliases": aliases,
            "stored_parameters": counts.stored, "run_parameters": counts.run,
            "weights_file": WEIGHTS, "weights_bytes": (tmp / WEIGHTS).stat().st_size,
            "ranks": info.ranks, "kept_lora": info.kept_lora,
            "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # written last
    log.info("compact export: %d tensors, %d stored parameters, %d bytes -> %s", len(tensors), counts.stored,
             manifest["weights_bytes"], path)
    return {**manifest, "path": str(path)}


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON ({err.msg})") from err


def _empty_model(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A CPU model of ``config`` whose values are about to be overwritten: skip random init."""
    # transformers is heavy: imported on first use
    from transformers import AutoModelForCausalLM

    try:
        # transformers is heavy: imported on first use
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext
    with torch.device("cpu"), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights also skips the tie
    return model


def _skeleton_base(config_dict: dict[str, Any]) -> nn.Module:
    # transformers is heavy: imported on first use
    from transformers import AutoConfig

    cfg = dict(config_dict)
    for key in ("_name_or_path", "transformers_version", "quantization_config", "architectures"):
        cfg.pop(key, None)
    return _empty_model(AutoConfig.for_model(cfg.pop("model_type"), **cfg))


def load_compact(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Rebuild a compact export; returns a ``flexigpt.models.LoadedModel`` (source ``compact``).

    Raises:
        ValueError: a missing or garbled file, an unknown format version, or weights that do not
            match the plan.
    """
    # safetensors is heavy: imported on first use
    from safetensors.torch import load_file

    start = time.perf_counter()
    folder = Path(path).expanduser()
    manifest = _read_json(folder / MANIFEST, "export manifest")
    if not isinstance(manifest, dict) or manifest.get("format_version") != EXPORT_FORMAT:
        raise ValueError(f"unknown export format_version {manifest.get('format_version')!r} in {str(folder)!r}; expected {EXPORT_FORMAT}")
    plan = Plan.from_json((folder / "plan.json").read_text())
    base = _skeleton_base(_read_json(folder / BASE_CONFIG, "base config"))
    model = apply_plan(base, plan, init_adapters=False)
    del base
    kept = manifest.get("kept_lora")
    if kept and plan.kept_lora_rank is None:  # an export whose kept LoRA was not part of its plan
        attach_kept_lora(model, int(kept["rank"]), tuple(kept["targets"]))
    stored = load_file(str(folder / WEIGHTS))
    aliases: dict[str, str] = manifest.get("aliases", {})
    expected = model.state_dict(keep_vars=True)
    missing = [n for n in expected if aliases.get(n, n) not in stored]
    unused = sorted(set(stored) - {aliases.get(n, n) for n in expected})
    if missing or unused:
        raise ValueError(f"export {str(folder)!r} does not match its plan: missing {missing[:5]}, unexpected {unused[:5]}")
    for name, target in expected.items():
        canonical = aliases.get(name, name)
        if name != canonical and target.data_ptr() != expected[canonical].data_ptr():
            raise ValueError(f"export {str(folder)!r}: {name} should share storage with {canonical} but the plan does not")
    model.load_state_dict({n: stored[aliases.get(n, n)] for n in expected}, strict=True)
    gen = folder / "generation_config.json"
    if gen.is_file():
        # transformers is heavy: imported on first use
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file():
        # transformers is heavy: imported on first use
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, ref=str(path), source="compact",
                       load_seconds=time.perf_counter() - start, extra={"plan": plan, "manifest": manifest})


@torch.no_grad()
def _effective_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias a slot's linear applies, with LoRA and a ``scale`` out-norm folded in."""
    scale = None
    if isinstance(module, OutputNorm):
        if module.kind != "scale":
            raise ValueError(
                "out_norm 'layernorm' cannot be merged into plain weights (LayerNorm is nonlinear); "
                "use save_compact, or build with out_norm='scale' for an exact merged export"
            )
        scale, module = module.scale, module.inner
    base = getattr(module, "base_layer", module)
    w = base.weight.detach().float().clone()
    b = None if base.bias is None else base.bias.detach().float().clone()
    if hasattr(module, "lora_A") and ADAPTER in module.lora_A:
        A, B = module.lora_A[ADAPTER].weight.float(), module.lora_B[ADAPTER].weight.float()
        w += module.scaling[ADAPTER] * (B @ A)
    if scale is not None:
        s = scale.detach().float()
        w = s[:, None] * w
        b = None if b is None else s * b
    dtype = base.weight.dtype
    return w.to(dtype), None if b is None else b.to(dtype)


def save_merged(model: nn.Module, plan: Plan, tokenizer: Any, path: str | os.PathLike, *,
                overwrite: bool = False) -> dict[str, Any]:
    """Write a plain Hugging Face checkpoint with every slot materialised (no sharing).

    Exact for drop plans, drop + kept LoRA, and ``out_norm="scale"``.

    Raises:
        ValueError: for ``out_norm="layernorm"`` replacement slots (see the module docstring).
    """
    _check(model, plan)
    problem = plan.method_spec.merge_problem(plan)
    if problem:
        raise ValueError(f"a merged export of this {plan.method} plan cannot be exact: {problem}")
    spec = arch_of(model)
    blocks = get_blocks(model)
    plain = _empty_model(model.config, next(model.parameters()).dtype)
    prefix = spec.blocks_path + "."
    state: dict[str, torch.Tensor] = {}
    outside = model.state_dict(keep_vars=True)  # lists tied tensors under every name
    for name in plain.state_dict():
        slot = _slot_of(name, prefix)
        if slot is None:
            state[name] = outside[name]
            continue
        rest = name[len(prefix) + len(str(slot)) + 1:]
        path_, _, kind = rest.rpartition(".")
        if path_ in spec.linears:
            w, b = _effective_linear(get_submodule(blocks[slot], path_))
            state[name] = w if kind == "weight" else b
        else:
            state[name] = blocks[slot].get_parameter(rest)
    plain.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    with _atomic_dir(path, overwrite) as tmp:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        _save_tokenizer(tokenizer, tmp)
        (tmp / "plan.json").write_text(plan.to_json())
        size = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        manifest = {"format_version": EXPORT_FORMAT, "kind": "merged", "method": plan.method,
                    "parameters": sum(p.numel() for p in plain.parameters()), "weights_bytes": size}
        (tmp / MERGED_MANIFEST).write_text(json.dumps(manifest, indent=2))
    log.info("merged export: %d bytes of weights -> %s", size, path)
    return {**manifest, "path": str(path)}


def save_peft_adapters(model: nn.Module, path: str | os.PathLike, *, which: str = "auto",
                       overwrite: bool = False) -> dict[str, Any]:
    """Write LoRA factors in peft's format (``adapter_model.safetensors`` + ``adapter_config.json``).

    Args:
        which: ``kept`` (the kept-block LoRA of a ShortGPT + LoRA build: loads onto the plain
            drop model with ``PeftModel.from_pretrained``), ``slots`` (the replacement slots'
            adapters, ``layers_to_transform`` = those slots; the shared weights and output norms
            live only in the compact export), or ``auto`` (kept if present, else slots).
    """
    # safetensors is heavy: imported on first use
    from safetensors.torch import save_file

    info = build_info(model)
    if which == "auto":
        which = "kept" if info.kept_lora else "slots"
    if which not in ("kept", "slots"):
        raise ValueError(f"which must be 'kept', 'slots' or 'auto', got {which!r}")
    replaced = set(info.plan.replaced_slots)
    if which == "kept" and not info.kept_lora:
        raise ValueError("this model has no kept-block LoRA; call attach_kept_lora first")
    if which == "slots" and not replaced:
        raise ValueError(f"a {info.plan.method!r} plan has no replacement slots with adapters")
    slots = sorted(replaced) if which == "slots" else [s for s in range(info.plan.num_slots) if s not in replaced]
    ranks = info.ranks if which == "slots" else info.kept_lora["ranks"]
    prefix = arch_of(model).blocks_path + "."
    tensors = {}
    for name, p in model.named_parameters():
        if (".lora_A." in name or ".lora_B." in name) and _slot_of(name, prefix) in slots:
            clean = name.replace(f".{ADAPTER}.", ".").replace(".inner.", ".")
            tensors[f"base_model.model.{clean}"] = p.detach().contiguous().clone()
    config = lora_config(ranks)
    config.layers_to_transform = slots
    config.base_model_name_or_path = info.plan.base_model
    config.task_type = "CAUSAL_LM"
    with _atomic_dir(path, overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
    return {"kind": "peft", "which": which, "tensors": len(tensors), "layers_to_transform": slots, "path": str(path)}
