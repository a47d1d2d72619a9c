"""Export a compressed model to the files other engines serve: GGUF for llama.cpp (`export.gguf`), a
compressed-tensors model directory for vLLM (`export.compressed_tensors`).

    export(model, tokenizer, "gguf", "model.gguf")
    export(model, tokenizer, "compressed-tensors", "model-dir", tp=2)

Engines are leaves: each format is one module here that reads a compressed model and writes files, and nothing
else in fastllama imports this package. Grids are a property of the quantizer, formats of the exporter: an
exporter packs the integers and scales the model holds (see `nn.grid_for`), and refuses a grid its format cannot
hold exactly instead of quantizing again. Per-linear pruning (`PrunedInputLinear`, `PrunedOutputLinear`) has no
form in a dense format: `dense_weight` writes the pruned channels back as zeros (a warning says so), while
coupled MLP/head pruning and dropped layers are a smaller dense model already. For formats with one MLP width
for every layer (both), `decoder_linears` pads narrower MLPs with zero channels to the widest (exact: silu(0)·0 = 0).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..nn import PrunedInputLinear, PrunedOutputLinear, QuantLinear

log = logging.getLogger(__name__)

FORMATS = {"gguf": "gguf", "compressed-tensors": "compressed_tensors"}  # format name -> module in this package
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")  # a Llama decoder layer's linears


@dataclass
class DenseWeight:
    """A linear's dense [out, in] weight: float (`weight`), or integers `q` on a grid (`scales`, `zeros`)."""

    weight: Tensor | None  # the float weight (float32), or None when quantized
    q: Tensor | None = None  # the integer values [out, in] (int32)
    scales: Tensor | None = None  # [out, in / group_size] (float32)
    zeros: Tensor | None = None  # [out, in / group_size], the value at q = 8 (below 8 bits)
    bits: int = 0  # 2, 3, 4 or 8 when quantized
    group_size: int = 0  # input channels per scale
    bias: Tensor | None = None  # [out] or None


def dense_weight(module: nn.Module, name: str = "") -> DenseWeight:
    """The dense weight of an `nn.Linear`, a `QuantLinear` or a per-linear pruned one (pruned channels written
    back as zeros by `widen`, with a warning naming `name`)."""
    if isinstance(module, nn.Linear):
        return DenseWeight(module.weight.detach().float(), bias=module.bias)
    if isinstance(module, QuantLinear):
        if module.rotate:
            raise ValueError(f"{name}: its inputs are rotated (a QuantLinear with rotate=True, from gptq rotate=true, "
                             "as in the gptq4 preset): GGUF and compressed-tensors have no place for the rotation; "
                             "quantize for export with rotate=false, e.g. gptq:bits=4,group=128,grid=sym")
        q, scales, zeros = module.values()
        return DenseWeight(None, q, scales, zeros, module.bits, module.group_size, module.bias)
    if not isinstance(module, (PrunedInputLinear, PrunedOutputLinear)):
        raise ValueError(f"{name}: cannot export a {type(module).__name__}; valid: Linear, QuantLinear, "
                         "PrunedInputLinear, PrunedOutputLinear")
    log.warning("%s: per-linear %s pruning has no dense form; exported with its pruned channels as zeros", name,
                "input" if isinstance(module, PrunedInputLinear) else "output")
    if isinstance(module, PrunedInputLinear):
        return widen(dense_weight(module.inner, name), 1, module.keep.cpu(), module.in_features)
    return replace(widen(dense_weight(module.inner, name), 0, module.keep.cpu(), module.out_features),
                   bias=module.bias)  # the full-width bias lives on the wrapper


def widen(w: DenseWeight, dim: int, keep: Tensor, size: int) -> DenseWeight:
    """`w` with its rows (dim=0) or columns (dim=1) placed at `keep` (ascending) among `size`, the others zero:
    0 as a float, q at the zero point with scale 0 when quantized (4-bit columns come in whole groups)."""
    scatter = lambda t, index=keep, n=size, fill=0: (  # noqa: E731
        None if t is None else _scatter(t, dim, index, n, fill))
    if w.weight is not None:
        return replace(w, weight=scatter(w.weight), bias=scatter(w.bias) if dim == 0 else w.bias)
    q = scatter(w.q, fill=8 if w.bits != 8 else 0)
    if dim == 0:
        return replace(w, q=q, scales=scatter(w.scales), zeros=scatter(w.zeros), bias=scatter(w.bias))
    if w.bits == 8:  # one scale per row, untouched
        return replace(w, q=q, group_size=size)
    groups, n = keep[::w.group_size] // w.group_size, size // w.group_size
    return replace(w, q=q, scales=scatter(w.scales, groups, n), zeros=scatter(w.zeros, groups, n))


def _scatter(t: Tensor, dim: int, index: Tensor, size: int, fill: float = 0) -> Tensor:
    shape = list(t.shape)
    shape[dim] = size
    return t.new_full(shape, fill).index_copy(dim, index.to(t.device), t)


def mlp_width(model: nn.Module) -> int:
    """The widest MLP (intermediate channels) of the decoder; a warning says when the layers' widths differ."""
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    if len(set(widths)) > 1:
        log.warning("MLP widths differ per layer (%d..%d): padded to %d with zero channels (exact: silu(0)·0 = 0)",
                    min(widths), max(widths), max(widths))
    return max(widths)


def decoder_linears(model: nn.Module, width: int) -> Iterator[tuple[int, str, DenseWeight]]:
    """(layer index, leaf in LINEARS, dense weight) of every decoder linear, MLPs padded to `width` channels."""
    for i, layer in enumerate(model.model.layers):
        for leaf in LINEARS:
            w = dense_weight(layer.get_submodule(leaf), f"layers.{i}.{leaf}")
            narrow = layer.mlp.down_proj.in_features
            if leaf.startswith("mlp.") and narrow < width:  # gate/up rows, down columns
                w = widen(w, int(leaf == "mlp.down_proj"), torch.arange(narrow), width)
            yield i, leaf, w


def export(model: nn.Module, tokenizer, format: str, out: str | Path, **options) -> Path:
    """Write `model` (compressed by fastllama, or float) and its `tokenizer` to `out` in `format` (see FORMATS);
    `options` go to the format's writer (e.g. `float_type`, `pre` for gguf; `tp`, `check` for compressed-tensors).
    Returns the path written."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    module = importlib.import_module(f".{FORMATS[format]}", __name__)
    with torch.no_grad():
        return module.write(model, tokenizer, Path(out), **options)
