"""How to heal: the recovery settings, validated, and the CLI flags made from them.

``RecoverSpec`` is the one description of a recovery run. Its fields carry their help text, so
``add_arguments`` makes the ``build`` command's and the accelerate entry's flags from the same
source (``--batch-size`` for ``batch_size`` ...) and ``from_args`` reads them back.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["CHAT_RATES", "HIDDEN_LAYERS", "OBJECTIVES", "RATE_FIELDS", "TEXT_RATES", "RecoverSpec", "add_arguments",
           "default_rates", "from_args", "rate_flags_help"]

OBJECTIVES = ("lm", "distill", "mix")
HIDDEN_LAYERS = ("last", "all")


def _bad(name: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"recover.{name} must be {valid}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _f(default: Any, help: str, **kw: Any):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class RecoverSpec:
    """How to heal: budget, optimiser and objective. Validated at construction.

    Attributes:
        steps: optimizer steps.
        lr: peak learning rate of AdamW for matrices (the LoRA factors).
        gate_lr_scale: the learning rate of vector parameters (output-norm gammas and scales,
            norms, biases) is ``lr * gate_lr_scale``, with no weight decay: a slot's output
            gate starts tiny and must open within a short run.
        batch_size: windows per micro-batch (per process under data parallelism).
        grad_accum: micro-batches accumulated into one optimizer step.
        seq_len: tokens per window; longer windows are cut to it, shorter ones are an error.
        warmup: linear warm-up, a fraction of ``steps`` when < 1, else a whole number of steps.
        objective: ``lm`` (next-token cross-entropy), ``distill`` (``kd_weight`` * KL +
            ``hidden_weight`` * hidden MSE against a teacher) or ``mix`` (cross-entropy plus both).
        kd_temperature: softmax temperature of the logit KL (scaled by T^2, Hinton et al.).
        kd_weight: weight of the logit KL term.
        hidden_weight: weight of the hidden-state term: squared error of block outputs (before
            the final norm) against the original's, made scale-free.
        hidden_layers: which block outputs that term matches: ``last`` (the last block's MSE
            divided by the teacher's mean square: tail distillation) or ``all`` (every block's,
            each token's error divided by its own norm, averaged; the model must have as many
            blocks as the original, as replacement slots keep it).
        clip: max global gradient norm, or ``None`` for no clipping.
        weight_decay: AdamW decay, applied to matrices only (never to norms or biases).
        betas: AdamW betas.
        seed: data order (one permutation of the windows per epoch).
        checkpoint_every: write a checkpoint every this many steps (0: only at the end and on cancel).

    The defaults are the measured best of bench/RESULTS.md ("Learning rate, local fitting and a
    hybrid budget"): at 100 steps lr 1e-3 beats 5e-4 for drop + LoRA (19.87 / 126.26 against
    24.10 / 134.44 in-domain / other text) and for FlexiGPT slots (19.31 / 136.66 against
    20.34 / 136.74), and in the chat recipe it cuts the looping replies from 6 to 2. The gate multiplier
    went from 30 to 15 with it, so gates learn at the same absolute rate as before. ``kd_weight``
    2 ("Local fitting and the distillation weight"): with `mix` on the text it trades a little
    in-domain perplexity for more on another text (FlexiGPT r8 with 200 fit steps: 18.33 / 135.83
    against 17.88 / 138.50 at weight 1; 3 gives 18.68 / 134.90). These are the chat recipe's rates;
    ``build`` recovers a model without a chat template at ``TEXT_RATES`` (lr 2e-3, gate x15, KL
    weight 0.5; ``default_rates``), which won on the text once local fitting and the budget split were in.
    """

    steps: int = _f(200, "recovery steps")
    lr: float = _f(1e-3, "peak learning rate of the adapter matrices")
    gate_lr_scale: float = _f(15.0, "learning-rate multiplier (and no weight decay) for output-norm scales, "
                                    "norms and biases")
    batch_size: int = _f(4, "windows per micro-batch (per process)")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    seq_len: int = _f(256, "tokens per window")
    warmup: float = _f(0.03, "warm-up: a fraction of the steps (<1) or a step count")
    objective: Literal["lm", "distill", "mix"] = _f(
        "lm", "recovery loss: language modelling, distillation from the original model, or both", choices=OBJECTIVES)
    kd_temperature: float = _f(1.0, "distillation temperature")
    kd_weight: float = _f(2.0, "weight of the logit distillation term")
    hidden_weight: float = _f(0.0, "weight of the hidden-state matching term (block outputs against the original's)")
    hidden_layers: Literal["last", "all"] = _f(
        "last", "which block outputs the hidden-state term matches: the last block's, or every block's (needs as many "
        "blocks as the original, as replacement slots keep)", choices=HIDDEN_LAYERS)
    clip: float | None = _f(1.0, "max global gradient norm (0 = no clipping)")
    weight_decay: float = _f(0.0, "AdamW weight decay of the adapter matrices")
    betas: tuple[float, float] = _f((0.9, 0.95), "AdamW betas", cli=False)
    seed: int = _f(0, "seed of the data order and adapters")
    checkpoint_every: int = _f(0, "write a checkpoint every K steps (0 = only at the end)")

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("seq_len", 2), ("seed", 0), ("checkpoint_every", 0)):
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                raise _bad(name, v, f"an integer >= {low}")
        if not _is_num(self.lr) or not 0 < self.lr <= 1:
            raise _bad("lr", self.lr, "a number in (0, 1]")
        if not _is_num(self.gate_lr_scale) or not 0 < self.gate_lr_scale <= 1000:
            raise _bad("gate_lr_scale", self.gate_lr_scale, "a number in (0, 1000]")
        w = self.warmup
        if not _is_num(w) or w < 0 or (w >= 1 and (w != int(w) or w > self.steps)):
            raise _bad("warmup", w, f"a fraction in [0, 1) or a whole number of steps in [1, {self.steps}]")
        if self.objective not in OBJECTIVES:
            raise _bad("objective", self.objective, "one of 'lm', 'distill', 'mix'")
        if self.hidden_layers not in HIDDEN_LAYERS:
            raise _bad("hidden_layers", self.hidden_layers, "one of 'last', 'all'")
        if not _is_num(self.kd_temperature) or self.kd_temperature <= 0:
            raise _bad("kd_temperature", self.kd_temperature, "a number > 0")
        for name in ("kd_weight", "hidden_weight", "weight_decay"):
            v = getattr(self, name)
            if not _is_num(v) or v < 0:
                raise _bad(name, v, "a number >= 0")
        if self.objective == "distill" and self.kd_weight == 0 and self.hidden_weight == 0:
            raise _bad("kd_weight", self.kd_weight, "> 0 (or hidden_weight > 0) for objective 'distill'")
        if self.clip is not None and (not _is_num(self.clip) or self.clip <= 0):
            raise _bad("clip", self.clip, "a number > 0 or None")
        b = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(b) != 2 or not all(_is_num(x) and 0 <= x < 1 for x in b):
            raise _bad("betas", self.betas, "two numbers in [0, 1)")
        object.__setattr__(self, "betas", (float(b[0]), float(b[1])))

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup) if self.warmup >= 1 else int(round(self.warmup * self.steps))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecoverSpec:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown recover fields {unknown}; valid: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**{k: tuple(v) if k == "betas" else v for k, v in data.items()})


# The optimiser rates of each recipe, where they differ from RecoverSpec's defaults: what `build` (no --lr,
# --gate-lr-scale or --kd-weight), the accelerate entry and the app recover with. Measured with 100 steps on
# the embedded model (bench/RESULTS.md, "The text recipe's gate and KL weight" and "A learning rate and KL
# weight per recipe"): for a text model, twice the learning rate gives `plan`'s default FlexiGPT build
# 15.99 / 124.96 (held-out / other text) at KL weight 1 and gate x7.5, against 17.94 / 126.27 at RecoverSpec's
# rates. Halving the KL weight and keeping the gate at x15 trade the other text for in-domain perplexity:
# 15.52 / 130.91, the one setting measured that closes 0.85 of the drop -> original + LoRA gap while staying
# below drop + LoRA on both texts (16.42 / 135.86 at this rate); weight 0.25 gives 15.48 / 133.59. A user who
# weighs the other text more: --kd-weight 1 --gate-lr-scale 7.5. The chat recipe keeps RecoverSpec's rates:
# at 2e-3 it answered 18 fidelity prompts of 73 with 4 looping replies, against 20 with 2.
RATE_FIELDS = ("lr", "gate_lr_scale", "kd_weight")
CHAT_RATES: dict[str, float] = {}
TEXT_RATES: dict[str, float] = {"lr": 2e-3, "gate_lr_scale": 15.0, "kd_weight": 0.5}


def default_rates(chat_model: bool) -> dict[str, float]:
    """The ``RecoverSpec`` rates (``RATE_FIELDS``) of the recipe ``build`` uses for the model when
    the user names none: ``TEXT_RATES`` or ``CHAT_RATES`` over RecoverSpec's defaults."""
    spec = RecoverSpec()
    return {**{f: getattr(spec, f) for f in RATE_FIELDS}, **(CHAT_RATES if chat_model else TEXT_RATES)}


def rate_flags_help() -> dict[str, str]:
    """Help text of the ``RATE_FIELDS`` flags of a command that leaves them at ``None`` for the
    model's recipe to decide (``build``, the accelerate entry): each field's own help, plus both
    recipes' values (``add_arguments(..., help_overrides=rate_flags_help())``)."""
    text, chat = default_rates(False), default_rates(True)
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(RecoverSpec)}
    return {name: f"{helps[name]} (default: the measured best recipe for the model, flexigpt.pipeline.default_rates: "
                  + (f"{text[name]:g}" if text[name] == chat[name]
                     else f"{text[name]:g} without a chat template, else {chat[name]:g}") + ")"
            for name in RATE_FIELDS}


_TYPES = {"steps": int, "batch_size": int, "grad_accum": int, "seq_len": int, "seed": int, "checkpoint_every": int,
          "objective": str, "hidden_layers": str}


def add_arguments(parser: argparse.ArgumentParser, *, defaults: dict[str, Any] | None = None,
                  skip: tuple[str, ...] = (), help_overrides: dict[str, str] | None = None) -> None:
    """Add one ``--flag`` per ``RecoverSpec`` field (``batch_size`` -> ``--batch-size``).

    Args:
        parser: the parser to extend.
        defaults: per-field defaults that differ from the spec's (e.g. ``steps=0`` for ``build``).
        skip: fields the caller defines itself (or leaves out).
        help_overrides: per-field help text that differs from the spec's.
    """
    defaults, help_overrides = defaults or {}, help_overrides or {}
    for f in dataclasses.fields(RecoverSpec):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        default = defaults.get(f.name, f.default)
        kind = _TYPES.get(f.name, float)
        kw: dict[str, Any] = {"type": kind, "default": default, "dest": f.name,
                              "help": help_overrides.get(f.name, f.metadata['help'])
                              + ("" if default is None else f" (default {default})")}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the recovery-data flags that ``build`` and the accelerate entry share: ``--train-data``,
    ``--chat-share`` and ``--chat-loss`` (``None`` by default: the caller applies
    ``flexigpt.pipeline``'s measured defaults)."""
    parser.add_argument("--train-data", default=None,
                        help="recovery data: a text (train split), 'chat' (the original model's own greedy replies "
                             "to template prompts, through its chat template, generated once and cached) or 'mixed' "
                             "(--chat-share of the windows chat, the rest --data); default: the measured best for "
                             "the model (flexigpt.pipeline.default_recovery): mixed with a chat template, else --data")
    parser.add_argument("--chat-share", type=float, default=None,
                        help="share of chat windows in --train-data mixed, between 0 and 1 (default: "
                             "flexigpt.pipeline.CHAT_SHARE, the measured best)")
    parser.add_argument("--chat-loss", choices=("replies", "all"), default=None,
                        help="which tokens of the chat windows recovery learns: 'replies' (only the original's "
                             "replies; the chat template and the prompts are read, not learned) or 'all' (default: "
                             "flexigpt.pipeline.CHAT_LOSS, the measured best)")


def from_args(args: argparse.Namespace, *, recipe: Mapping[str, Any] | None = None, **changes: Any) -> RecoverSpec:
    """The ``RecoverSpec`` of the flags ``add_arguments`` added. A flag left at ``None`` takes its
    value from ``recipe`` (the model's measured recipe, e.g. ``default_rates(chat)``) when it has
    one, else the spec's default; fields not on ``args`` keep the spec's defaults. ``changes``
    override everything. ``--clip 0`` means no clipping."""
    recipe = recipe or {}
    values = {}
    for f in dataclasses.fields(RecoverSpec):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is not None or f.name == "clip":
            values[f.name] = value
        elif f.name in recipe:
            values[f.name] = recipe[f.name]
    values.update(changes)
    if values.get("clip") == 0:
        values["clip"] = None
    return RecoverSpec(**values)
