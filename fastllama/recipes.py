"""Recipes: a compression as a sequence of steps, written as text; `compress` applies them in order.

A recipe is steps joined by ` + `, each `name:key=value,key=value` (or a preset name):

    gptq:bits=4,group=128,act_order=true,clip=true,asym=true        GPTQ (calibration; asym: aim at the float
                                                                    model's outputs); also rotate=true (turn
                                                                    each input group by a Hadamard matrix; not
                                                                    exportable), damp=0.01,
                                                                    lm_head=false, grid=sym (symmetric, for
                                                                    compressed-tensors), q4_0 (with group=32) or
                                                                    q8_0 (bits=8): GGUF's grids
    rtn:bits=4,group=128,lm_head=false                              round-to-nearest, the baseline (grid=,
                                                                    rotate= too)
    int8wo:lm_head=false                                            int8 weight-only, per output channel
    prune:input=0.10,importance=l1                                  one of input/output/mlp/heads = the fraction
                                                                    pruned; importance l1 or act (calibration)
    drop:layers=4                                                   drop the 4 most redundant layers (calibration)
    head:bits=8                                                     round-to-nearest of the output head alone
    cast:dtype=bf16                                                 cast the float weights (bf16, fp16, fp32)
    bnb:type=int8                                                   bitsandbytes' int8 or nf4, as transformers'
                                                                    BitsAndBytesConfig loads (the last step; peers)

`auto` (in `head:bits=auto` and `cast:dtype=auto`) is decided by `fastllama.hardware.policy` for the device the
model is on when it is compressed: on a GPU the head stays float and float parts are bf16; on a CPU the head is
int8 and float parts are bf16 where the CPU computes bf16 natively, else float32.

Quantize-then-prune is one recipe, e.g. `gptq:bits=4,group=128 + prune:input=0.10`: the pruned linears stay
quantized (see fastllama.nn). Omitted keys take their defaults; presets (PRESETS) may be combined with steps.
GPTQ and round-to-nearest take bits=2, 3 or 4 (groups, on the int4 kernel: see fastllama.nn.int_range) or 8.
bitsandbytes quantizes at load, as transformers does: a checkpoint holds the model before a `bnb` step and applies
the step when loaded (see `Recipe.split_at_load`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .gptq import GPTQConfig, Int8WeightOnlyConfig, RTNConfig, quantize_, quantize_head_
from .hardware import policy
from .models import resolve_dtype
from .nn import check_amount
from .prune import DIMS, IMPORTANCE

# GPTQ spelled out, so a preset says how its models were made whatever the defaults (earlier: act_order=false).
# Clipping paid at 4 bits on the embedded model (held-out perplexity -3% to -6%), not at 8 (within 0.2%, +8% time).
# asym (GPTQ aimed at the float model's outputs) paid at 4 bits: ppl.txt 30.63 -> 29.11, held-out 12.12 -> 11.73
# (+8% time); gptq8 keeps it off (within 0.3% of the float model already). rotate (a Hadamard turn of each input
# group) paid at 4 bits: ppl.txt 28.38 -> 26.97, held-out 12.09 -> 11.49 calibrated on model samples (the default).
GPTQ4 = "gptq:bits=4,group=128,act_order=true,clip=true,asym=true,rotate=true"
GPTQ8 = "gptq:bits=8,act_order=true,clip=false"
AUTO = "head:bits=auto + cast:dtype=auto"
# The quantized presets finish by the hardware policy (fastllama.hardware.policy): on a GPU the float parts are bf16
# and the head stays float, as the reference study's fp16; on a CPU the head (the largest matmul of small models)
# is int8 and the float parts are bf16 where bf16 is native, else float32 (emulated bf16 cost 34 ms a token for the
# embedded model's head on an AVX2 EPYC against 4.7 in float32).
PRESETS = {  # the reference study's recipes, and a few more
    "bf16": "cast:dtype=bf16",
    "fp32": "cast:dtype=fp32",  # the CPU's natural base for plain generate
    "base": "cast:dtype=auto",  # the unquantized model in the policy's float dtype
    "gptq4": f"{GPTQ4} + {AUTO}",
    "gptq8": f"{GPTQ8} + {AUTO}",
    "gptq4-prune-in10": f"{GPTQ4} + {AUTO} + prune:input=0.10",
    "gptq8-prune-in35": f"{GPTQ8} + {AUTO} + prune:input=0.35",
    "prune-out01": "prune:output=0.01",
    "int8wo": f"int8wo + {AUTO}",
    "rtn4": f"rtn:bits=4,group=128 + {AUTO}",
    "rtn8": f"rtn:bits=8 + {AUTO}",
    # below 4 bits, on the int4 kernel: small groups, as the few levels make the group's range the error's scale.
    # Round-to-nearest on the embedded model's linears measured 8.1 / 6.7 / 6.4 dB weight SQNR at 2 bits in groups of
    # 32 / 64 / 128, and 15.8 / 14.2 / 13.9 dB at 3 bits; a group of 32 costs 1 bit a weight on disk (bfloat16 scale
    # and zero), 64 half a bit. 2-bit takes 32, its best (3 bits a weight in all); 3-bit takes 64 (3.5 bits a weight),
    # as 32 would store 4, hardly less than 4-bit in groups of 64 (4.5).
    # asym paid more the fewer the bits: ppl.txt 56.40 -> 51.57 at 3 bits, 339.8 -> 287.0 at 2; held-out 17.01 -> 15.71,
    # 68.71 -> 44.86 (+15%, +13% time). So did rotate, calibrated on model samples: ppl.txt 42.25 -> 35.16 at 3 bits,
    # 2.95e4 (collapsed) -> 82.8 at 2; held-out 17.35 -> 14.84, 1.91e4 -> 29.1
    "gptq3": f"gptq:bits=3,group=64,act_order=true,clip=true,asym=true,rotate=true + {AUTO}",
    "gptq2": f"gptq:bits=2,group=32,act_order=true,clip=true,asym=true,rotate=true + {AUTO}",
    # the layer-pruning study's dropping; `drop4+int8wo` (these two presets joined) adds its int8 weight-only
    "drop4": "drop:layers=4",
    # the peers a user would pick instead (the optional extra): bitsandbytes as transformers loads it, the float
    # parts in the policy's dtype and the head float, as transformers keeps it
    "bnb8": "cast:dtype=auto + bnb:type=int8",
    "nf4": "cast:dtype=auto + bnb:type=nf4",
    "prune-mlp25": "prune:mlp=0.25",
    # activation-aware (|W| x the calibration inputs' norm): keeps the channels that carry massive activations,
    # which L1 removes (tests/accuracy bound both on the embedded model)
    "gptq4-prune-in10-act": f"{GPTQ4} + {AUTO} + prune:input=0.10,importance=act",
    "prune-mlp25-act": "prune:mlp=0.25,importance=act",
}


@dataclass
class PruneStep:
    """Structured pruning (fastllama.prune.prune_model)."""

    dim: str  # input, output, mlp (coupled intermediate channels) or heads (coupled KV groups)
    amount: float  # the fraction of channels removed
    importance: str = "l1"  # l1 (weight norm) or act (weight times activation norm; needs calibration)

    def __post_init__(self):
        if self.dim not in DIMS:
            raise ValueError(f"unknown pruning dim {self.dim!r}; valid: {', '.join(DIMS)}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"unknown importance {self.importance!r}; valid: {', '.join(IMPORTANCE)}")
        check_amount(self.amount)


@dataclass
class DropStep:
    """Decoder-layer dropping (fastllama.drop.drop_layers)."""

    layers: int  # how many consecutive layers to drop

    def __post_init__(self):
        if self.layers < 0:
            raise ValueError(f"drop:layers={self.layers} must be 0 or more")


@dataclass
class CastStep:
    """Cast the model's float weights (quantized weights keep their integers and bfloat16 scales; rotary
    frequencies stay float32)."""

    dtype: str = "bf16"  # bf16, fp16, fp32, or auto (the hardware policy's float dtype for the model's device)

    def __post_init__(self):
        if self.dtype != "auto":
            resolve_dtype(self.dtype, "cpu")


@dataclass
class HeadStep:
    """Round-to-nearest of the output head alone (the body as it is), onto the kernels' grid."""

    bits: str = "auto"  # 4, 8, none (keep it float) or auto (the hardware policy's choice for the model's device)

    def __post_init__(self):
        if self.bits not in ("4", "8", "none", "auto"):
            raise ValueError(f"head:bits={self.bits!r}; valid: 4, 8, none, auto")


@dataclass
class BnbStep:
    """bitsandbytes' quantization of the decoder's linears, as transformers' BitsAndBytesConfig loads a model
    (fastllama.peers.bnb_quantize_); the recipe's last step, as its linears are bitsandbytes' own."""

    type: str = "int8"  # int8 (LLM.int8(), load_in_8bit) or nf4 (load_in_4bit, bnb_4bit_quant_type="nf4")

    def __post_init__(self):
        from .peers import BNB_TYPES

        if self.type not in BNB_TYPES:
            raise ValueError(f"bnb:type={self.type!r}; valid: {', '.join(BNB_TYPES)}")


# step name -> (dataclass, {recipe key: field}); prune's amount is keyed by its dim (prune:input=0.1)
STEPS: dict[str, tuple[type, dict[str, str]]] = {
    "gptq": (GPTQConfig, {"bits": "bits", "group": "group_size", "act_order": "act_order", "damp": "damp",
                          "lm_head": "lm_head", "grid": "grid", "clip": "clip", "asym": "asym",
                          "rotate": "rotate"}),
    "rtn": (RTNConfig, {"bits": "bits", "group": "group_size", "lm_head": "lm_head", "grid": "grid",
                        "rotate": "rotate"}),
    "int8wo": (Int8WeightOnlyConfig, {"lm_head": "lm_head"}),
    "prune": (PruneStep, {"importance": "importance"}),
    "drop": (DropStep, {"layers": "layers"}),
    "head": (HeadStep, {"bits": "bits"}),
    "cast": (CastStep, {"dtype": "dtype"}),
    "bnb": (BnbStep, {"type": "type"}),
}
Step = GPTQConfig | RTNConfig | PruneStep | DropStep | HeadStep | CastStep | BnbStep


@dataclass
class Recipe:
    """Steps applied in order by `compress`; `str()` gives the full recipe text, which parses back to it."""

    steps: list[Step]  # quantization configs, PruneStep, DropStep, HeadStep, CastStep, BnbStep (last)

    def __post_init__(self):
        if any(isinstance(s, BnbStep) for s in self.steps[:-1]):
            raise ValueError(f"{self}: a bnb step must come last (its linears are bitsandbytes' own, which no other "
                             "step takes); move it to the end")

    @property
    def needs_calibration(self) -> bool:
        """Whether a step needs calibration tokens (GPTQ, activation-aware pruning, layer dropping)."""
        return any(isinstance(s, (GPTQConfig, DropStep)) or getattr(s, "importance", None) == "act"
                   for s in self.steps)

    def __str__(self) -> str:
        return " + ".join(_format_step(s) for s in self.steps)

    def split_at_load(self) -> tuple[Recipe, Recipe]:
        """(the steps a checkpoint holds the result of, the steps it applies when loaded): a trailing bnb step is
        applied at load, as transformers quantizes with bitsandbytes when it loads a model (see checkpoint.save)."""
        cut = len(self.steps) - bool(self.steps and isinstance(self.steps[-1], BnbStep))
        return Recipe(self.steps[:cut]), Recipe(self.steps[cut:])


def _parse_value(text: str, kind: str, where: str):
    """A recipe value as the field's type (int, float, bool or str)."""
    try:
        if kind == "bool":
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        return {"int": int, "float": float, "str": str}[kind](text)
    except (KeyError, ValueError):
        raise ValueError(f"{where}: {text!r} is not a valid {kind}"
                         + ("; valid: true, false" if kind == "bool" else "")) from None


def _parse_step(text: str) -> Step:
    name, _, args = text.strip().partition(":")
    if name not in STEPS:
        raise ValueError(f"unknown recipe step {name!r} in {text.strip()!r}; valid steps: {', '.join(STEPS)}; "
                         f"presets: {', '.join(PRESETS)}")
    cls, keys = STEPS[name]
    if name == "prune":
        keys = {**keys, **{d: "amount" for d in DIMS}}
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    values, dims = {}, []
    for pair in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = (t.strip() for t in pair.partition("="))
        if key not in keys or not eq:
            raise ValueError(f"bad {name} argument {pair!r}; valid keys: {', '.join(k + '=' for k in keys)}")
        dims += [key] if key in DIMS else []
        values[keys[key]] = _parse_value(value, types[keys[key]], f"{name}:{key}")
    if name == "prune":
        if len(dims) != 1:
            raise ValueError(f"prune needs exactly one of {', '.join(d + '=AMOUNT' for d in DIMS)}, e.g. "
                             f"prune:input=0.10; got {text.strip()!r}")
        values["dim"] = dims[0]
    try:
        return cls(**values)
    except TypeError as e:  # a required key is missing
        raise ValueError(f"{text.strip()!r} is missing a value; valid keys: "
                         f"{', '.join(k + '=' for k in keys)}") from e


def _format_step(step: Step) -> str:
    name = next(n for n, (cls, _) in STEPS.items() if type(step) is cls)
    keys = dict(STEPS[name][1])
    if name == "prune":
        keys = {step.dim: "amount", **keys}
    if getattr(step, "bits", None) == 8:  # one scale per output channel: no group
        keys.pop("group", None)
    if getattr(step, "grid", None) == "kernel":  # the default grid: older recipe texts stay as they were
        keys.pop("grid", None)
    if getattr(step, "rotate", None) is False:  # likewise without rotation
        keys.pop("rotate", None)
    value = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
    return f"{name}:" + ",".join(f"{k}={value(getattr(step, f))}" for k, f in keys.items())


def parse_recipe(text: str) -> Recipe:
    """A Recipe from its text: steps and presets joined by ` + ` (see the module docstring)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty recipe {text!r}; pass steps such as 'gptq:bits=4,group=128' or a preset: "
                         f"{', '.join(PRESETS)}")
    steps = []
    for part in text.split("+"):
        part = part.strip()
        steps += [_parse_step(p) for p in PRESETS[part].split("+")] if part in PRESETS else [_parse_step(part)]
    return Recipe(steps)


def compress(model: nn.Module, recipe: str | Recipe, calib: Tensor | None = None, tokenizer=None) -> nn.Module:
    """Apply `recipe` (text or Recipe) to `model` in place, step by step; returns it.

    `calib` (token ids [n, seqlen]) feeds the steps that need it; when it is None and one does, it is drawn
    with `fastllama.data.calibration(tokenizer, model=model)` (C4, else text sampled from the model).
    """
    from .drop import drop_layers
    from .prune import prune_model

    recipe = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    if calib is None and recipe.needs_calibration:
        from .data import calibration

        calib = calibration(tokenizer, model=model)
    for step in recipe.steps:
        if isinstance(step, RTNConfig):
            quantize_(model, step, calib)
        elif isinstance(step, PruneStep):
            prune_model(model, step.amount, step.dim, step.importance, calib)
        elif isinstance(step, DropStep):
            drop_layers(model, step.layers, calib)
        elif isinstance(step, BnbStep):
            from .peers import bnb_quantize_

            bnb_quantize_(model, step.type)
        elif isinstance(step, HeadStep):
            bits = policy(_device(model)).head_bits if step.bits == "auto" else step.bits
            if bits not in (None, "none") and type(model.lm_head) is nn.Linear:  # a quantized head stays as it is
                quantize_head_(model, RTNConfig(bits=int(bits), group_size=128, lm_head=True))
        else:
            dtype = policy(_device(model)).float_dtype if step.dtype == "auto" else step.dtype
            _cast(model, resolve_dtype(dtype, "cpu"))
    return model


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """`model.to(dtype)`, except the rotary embeddings' buffers (inv_freq and the like), which stay float32 as in a
    model loaded in `dtype`: in bfloat16 the frequencies alone move cos by up to 0.36 within 2048 positions."""
    rotary = [(m, dict(m.named_buffers(recurse=False))) for m in model.modules() if "Rotary" in type(m).__name__]
    model.to(dtype)
    for module, buffers in rotary:
        for name, buffer in buffers.items():
            setattr(module, name, buffer)
