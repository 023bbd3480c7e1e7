"""What was loaded? A model with its tokenizer and provenance, and its content fingerprint."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

__all__ = ["LoadedModel", "fingerprint"]


@dataclass
class LoadedModel:
    """A loaded causal LM with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    ref: str
    source: str  # "embedded-cache", "embedded-gguf", "folder", "hub", "compact"
    load_seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        if "fingerprint" not in self.extra:
            self.extra["fingerprint"] = fingerprint(self.model)
        return self.extra["fingerprint"]


def fingerprint(model: nn.Module) -> str:
    """A content hash of the model: config, parameter names/shapes, and a strided sample of values.

    Cheap (tens of ms on a 135M model) and stable across processes, so analysis caches
    can be keyed by it.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
        h.update(json.dumps({k: getattr(config, k, None) for k in keys}, sort_keys=True).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            sample = flat[::step][:64].to(torch.float64)
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(sample.cpu().numpy().tobytes())
            h.update(repr(round(float(flat.to(torch.float64).sum()), 6)).encode())
    return h.hexdigest()[:16]
