"""The module swaps: linears that hold only what is kept (pruned) or only integers and scales (quantized).

Each swap replaces an `nn.Linear` in place and holds its own buffers. Each implements `spec()` (its
constructor arguments, JSON-serialisable, nested for `inner`) and `from_spec(spec)` (an empty module of the
right shapes, ready for `load_state_dict`); `to_spec` / `from_spec` at module level handle any of them and
plain `nn.Linear`, which is recorded by shape.

Pruning selects channels exactly as `torch.nn.utils.prune.ln_structured(..., n=1)` does: it prunes
`round(amount * n)` channels (Python's round, half to even) and keeps the top-k of the L1 norms by
`torch.topk`, so the kept count and the resolution of ties agree with it exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import kernels
from .hardware import own_code, policy, simd_bits

SWAPS: dict[str, type[nn.Module]] = {}


def swap(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: register a module swap by name, so `from_spec` can rebuild it."""
    SWAPS[cls.__name__] = cls
    return cls


def to_spec(module: nn.Module) -> dict:
    """The spec of an `nn.Linear` (its shape) or of a registered swap (its `spec()`), tagged with its type."""
    if type(module) is nn.Linear:
        return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    if type(module).__name__ not in SWAPS:
        raise ValueError(f"cannot describe a {type(module).__name__}; valid: Linear, {', '.join(SWAPS)}")
    return {"type": type(module).__name__, **module.spec()}


def foreign_linear(module: nn.Module) -> bool:
    """Whether `module` is another library's linear (bitsandbytes'): an `nn.Linear` subclass that is no swap of ours.
    Neither the fast decode path nor checkpoints hold those."""
    return isinstance(module, nn.Linear) and type(module) is not nn.Linear and type(module).__name__ not in SWAPS


def tied_head(model: nn.Module) -> bool:
    """Whether the output head is a float linear sharing its weight with the input embedding."""
    head = model.get_output_embeddings()
    return isinstance(head, nn.Linear) and head.weight is model.get_input_embeddings().weight


def from_spec(spec: dict) -> nn.Module:
    """An empty module (right shapes, uninitialised values) from a `to_spec` dict, ready for `load_state_dict`."""
    spec = dict(spec)
    kind = spec.pop("type")
    if kind == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], device="meta").to_empty(
            device="cpu")
    if kind not in SWAPS:
        raise ValueError(f"unknown module type {kind!r} in spec; valid: Linear, {', '.join(SWAPS)}")
    return SWAPS[kind].from_spec(spec)


# ------------------------------------------------------------------------------------------------ pruning
def check_amount(amount: float) -> None:
    """A pruning amount is a fraction in [0, 1); anything else is a ValueError that says so."""
    if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not 0 <= amount < 1:
        raise ValueError(f"pruning amount {amount!r} is outside [0, 1); pass the fraction of channels to remove, "
                         "e.g. 0.1 for 10%")


def n_keep(n: int, amount: float, what: str = "channels") -> int:
    """How many of `n` units survive pruning `amount`: `n - round(amount * n)`, as ln_structured counts."""
    check_amount(amount)
    keep = n - round(amount * n)
    if keep < 1:
        raise ValueError(f"pruning amount {amount} would remove all {n} {what}; use an amount below "
                         f"{(n - 0.5) / n:.4g}")
    return keep


def l1_importance(weight: Tensor, dim: int) -> Tensor:
    """The L1 norm of each input (dim=1) or output (dim=0) channel of a [out, in] weight, as ln_structured does."""
    return torch.norm(weight, p=1, dim=1 - dim)


def top_channels(score: Tensor, keep: int) -> Tensor:
    """The indices of the `keep` largest scores (torch.topk, as ln_structured), sorted ascending, as int64."""
    return torch.topk(score, k=keep, largest=True).indices.sort().values.to(torch.int64)


def top_blocks(score: Tensor, keep: int, block: int) -> Tensor:
    """Channel indices of the `keep` best whole blocks of `block` consecutive channels, a block scoring the sum
    of its channels' scores. With block == 1 this is `top_channels`."""
    kept = top_channels(score.reshape(-1, block).sum(1), keep)
    return (kept[:, None] * block + torch.arange(block, device=kept.device)).flatten()


def whole_blocks(index: Tensor, block: int) -> bool:
    """Whether the ascending channel `index` is a union of whole, aligned blocks of `block` channels."""
    if index.numel() % block:
        return False
    starts = index[::block]
    return not (starts % block).any() and torch.equal(index.view(-1, block),
                                                      starts[:, None] + torch.arange(block, device=index.device))


def is_prunable(module: nn.Module) -> bool:
    """Whether `module` is an `nn.Linear` or a `QuantLinear` (anything with `select` and `dequantize`)."""
    return isinstance(module, nn.Linear) or (hasattr(module, "select") and hasattr(module, "dequantize"))


def _check_prunable(linear: nn.Module) -> None:
    if not is_prunable(linear):
        raise ValueError(f"cannot prune a {type(linear).__name__}; valid: nn.Linear or QuantLinear")


def float_weight(linear: nn.Module) -> Tensor:
    """The [out, in] weight of an `nn.Linear` (detached, its dtype) or a `QuantLinear` (dequantized, float32)."""
    _check_prunable(linear)
    return linear.weight.detach() if isinstance(linear, nn.Linear) else linear.dequantize()


def select(linear: nn.Module, dim: int, index: Tensor) -> nn.Module:
    """A smaller copy of an `nn.Linear` or `QuantLinear` keeping rows (dim=0) or columns (dim=1) `index`.

    The bias follows the rows: selecting rows keeps `bias[index]`, selecting columns keeps the whole bias.
    """
    _check_prunable(linear)
    if isinstance(linear, nn.Linear):
        index = index.to(linear.weight.device)
        weight = linear.weight.detach().index_select(dim, index)
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device,
                        dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach().index_select(0, index))
        return new
    return linear.select(dim, index)


def _importance(linear: nn.Module, dim: int, importance: Tensor | None) -> Tensor:
    weight = float_weight(linear)
    score = l1_importance(weight, dim) if importance is None else importance.to(weight.device)
    if score.shape != (weight.shape[dim],):
        raise ValueError(f"importance has shape {tuple(score.shape)}; expected ({weight.shape[dim]},), "
                         f"one score per {'input' if dim else 'output'} channel")
    return score


CPU_POLICY = policy("cpu")  # this machine's, read once at import (it reads /proc/cpuinfo and looks for a compiler)
# float32 CPU linears on oneDNN where the hardware policy says so (AMD CPUs); False: F.linear (MKL), as transformers
ONEDNN = torch.backends.mkldnn.is_available() and CPU_POLICY.fp32_linear == "onednn"


def linear(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)`, where a float32 `nn.Linear` on the CPU (outside autograd) runs on oneDNN instead of the MKL
    sgemm behind F.linear when ONEDNN is set (see `hardware.policy`): at batch 1 it streams the weight 1.6x faster
    on the 2-core AMD EPYC we measured (25 vs 16 GB/s), on the same weight tensor, equal up to rounding.
    Not inside a compiled graph: inductor lowers oneDNN's linear only for weights frozen into the graph as
    constants, and failed on a decode step's (an AssertionError in `mkldnn_lowerings.linear_unary`)."""
    if (type(module) is nn.Linear and ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32
            and module.weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        return torch.ops.mkldnn._linear_pointwise(x, module.weight, module.bias, "none", [None], "")
    return module(x)


class _Pruned(nn.Module):
    """What the pruned linears share: `in_features`, `out_features` and a `keep` buffer, shown in the repr."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, kept={self.keep.numel()}, out_features={self.out_features}"


@swap
class PrunedInputLinear(_Pruned):
    """`y = x[..., keep] @ W[:, keep].T + b`: a linear that keeps only some input channels.

    Equals `ln_structured(linear, "weight", amount, n=1, dim=1)` up to float rounding, holding only the kept
    columns. A `QuantLinear` stays quantized: it keeps `n - round(amount * n)` of its n `in_granularity` blocks
    of columns, those with the largest summed importance (see `top_blocks`).
    """

    def __init__(self, inner: nn.Module, keep: Tensor, in_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, inner.out_features
        self.inner = inner  # an nn.Linear or QuantLinear of shape [out, len(keep)]
        self.register_buffer("keep", keep.to(torch.int64))  # the kept input channels, ascending

    @classmethod
    def from_linear(cls, linear: nn.Module, amount: float, importance: Tensor | None = None) -> PrunedInputLinear:
        """Prune `amount` of the input channels of `linear` with the lowest `importance` (default: L1 norm)."""
        score = _importance(linear, 1, importance)
        block = getattr(linear, "in_granularity", 1)  # a QuantLinear keeps whole groups of columns
        what = "input channels" if block == 1 else f"blocks of {block} input channels"
        keep = top_blocks(score, n_keep(score.numel() // block, amount, what), block)
        return cls(select(linear, 1, keep), keep, linear.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return linear(self.inner, x.index_select(-1, self.keep))

    def spec(self) -> dict:
        return {"in_features": self.in_features, "kept": self.keep.numel(), "inner": to_spec(self.inner)}

    @classmethod
    def from_spec(cls, spec: dict) -> PrunedInputLinear:
        return cls(from_spec(spec["inner"]), torch.zeros(spec["kept"], dtype=torch.int64), spec["in_features"])


@swap
class PrunedOutputLinear(_Pruned):
    """`y = zeros.index_copy(-1, keep, x @ W[keep].T) + b`: a linear that computes only some output channels.

    Equals `ln_structured(linear, "weight", amount, n=1, dim=0)` up to float rounding: that prunes the weight
    only, so a pruned output equals its bias, and is exactly zero without one (as in Llama's linears).
    """

    def __init__(self, inner: nn.Module, keep: Tensor, out_features: int, bias: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = inner.in_features, out_features
        self.inner = inner  # an nn.Linear or QuantLinear of shape [len(keep), in], without bias
        self.register_buffer("keep", keep.to(torch.int64))  # the kept output channels, ascending
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())  # the full-width bias

    @classmethod
    def from_linear(cls, linear: nn.Module, amount: float, importance: Tensor | None = None) -> PrunedOutputLinear:
        """Prune `amount` of the output channels of `linear` with the lowest `importance` (default: L1 norm)."""
        score = _importance(linear, 0, importance)
        keep = top_channels(score, n_keep(linear.out_features, amount, "output channels"))
        inner = select(linear, 0, keep)
        inner.bias = None  # the full-width bias lives here: pruned outputs equal it
        return cls(inner, keep, linear.out_features, getattr(linear, "bias", None))

    def forward(self, x: Tensor) -> Tensor:
        y = linear(self.inner, x)
        out = y.new_zeros(*y.shape[:-1], self.out_features).index_copy(-1, self.keep, y)
        return out if self.bias is None else out + self.bias

    def spec(self) -> dict:
        return {"out_features": self.out_features, "kept": self.keep.numel(), "bias": self.bias is not None,
                "inner": to_spec(self.inner)}

    @classmethod
    def from_spec(cls, spec: dict) -> PrunedOutputLinear:
        inner = from_spec(spec["inner"])
        bias = torch.zeros(spec["out_features"]) if spec["bias"] else None
        return cls(inner, torch.zeros(spec["kept"], dtype=torch.int64), spec["out_features"], bias)


def add_linear(x: Tensor, module: nn.Module, h: Tensor) -> Tensor:
    """`x + module(h)` (a residual add); a `PrunedOutputLinear` adds its kept outputs into `x` directly instead of
    scattering them into zeros first (exact without a bias, as in Llama; up to rounding with one)."""
    if isinstance(module, PrunedOutputLinear):
        y = x.index_add(-1, module.keep, linear(module.inner, h))
        return y if module.bias is None else y + module.bias
    return x + linear(module, h)


# ------------------------------------------------------------------------------------------------ quantization
# QuantLinear goes below (register it with @swap so checkpoints can rebuild it from its spec).

INT4_GROUPS = (32, 64, 128, 256)  # the group sizes the int4 kernels take
INT4_BITS = (2, 3, 4)  # the widths the int4 kernels compute: a 2- or 3-bit grid is a sub-range of their 16 levels
SCALE_DTYPE = torch.bfloat16  # the kernels' scale/zero dtype; activations are cast to it around the call
KERNEL_MULTIPLE = 16  # int4 kernels need out_features, the int8 kernel in_features, divisible by this: padded


def check_quant_config(bits: int, group_size: int, rotate: bool = False) -> None:
    """ValueError unless `bits` is 2, 3, 4 or 8 and, below 8 bits, `group_size` is one the int4 kernels take; and
    unless, with `rotate`, there are groups to turn (below 8 bits)."""
    if bits not in (*INT4_BITS, 8):
        raise ValueError(f"bits={bits!r} is not supported; valid: 2, 3, 4 (int4 kernel, groups) or 8 (int8 kernel, "
                         "one scale per output channel)")
    if bits != 8 and group_size not in INT4_GROUPS:
        raise ValueError(f"group_size={group_size!r} cannot be taken by the int4 kernel; valid: "
                         f"{', '.join(map(str, INT4_GROUPS))}")
    if rotate and bits == 8:
        raise ValueError("rotate=true needs bits below 8 (it turns each group of inputs; 8-bit has one scale per "
                         "row); use rotate=false with bits=8")


def check_grid(grid: str, bits: int, group_size: int | None = None) -> None:
    """ValueError unless `grid` is one of GRIDS and holds `bits`-wide values (and groups of `group_size`, when
    given): "kernel" and "sym" any, "q4_0" 4 bits in groups of 32, "q8_0" 8 bits."""
    if grid not in GRIDS or not {"q4_0": bits == 4 and group_size in (None, 32), "q8_0": bits == 8}.get(grid, True):
        raise ValueError(f"grid={grid!r} with bits={bits}" + ("" if group_size is None else f", group={group_size}")
                         + "; valid: kernel (any), sym (any: symmetric, zero 0), q4_0 (bits=4, group=32: GGUF Q4_0), "
                         "q8_0 (bits=8: GGUF Q8_0); use bits=4 with q4_0, bits=8 with q8_0 (or grid=sym with either)")


def check_quant_shape(in_features: int, bits: int, group_size: int, rotate: bool = False) -> None:
    """ValueError unless the config is valid and, below 8 bits, `group_size` divides `in_features`."""
    check_quant_config(bits, group_size, rotate)
    if bits != 8 and in_features % group_size:
        fits = [g for g in INT4_GROUPS if in_features % g == 0]
        raise ValueError(f"in_features={in_features} is not divisible by group_size={group_size}; "
                         f"valid for this layer: {', '.join(map(str, fits)) or 'none (needs a multiple of 32)'}")


def int4_group_for(in_features: int, group_size: int) -> int:
    """The largest int4 kernel group size <= `group_size` that divides `in_features` (ValueError if none)."""
    fits = [g for g in INT4_GROUPS if g <= group_size and in_features % g == 0]
    if not fits:
        raise ValueError(f"no int4 group size <= {group_size} divides in_features={in_features}; "
                         f"valid group sizes: {', '.join(map(str, INT4_GROUPS))}, and in_features must be a "
                         "multiple of 32")
    return fits[-1]


def int_range(bits: int) -> tuple[int, int]:
    """The integers (lo, hi) a `bits`-wide grid uses on its kernel: -128..127 for 8-bit; below 8 bits, the 2^bits
    values of the int4 kernels' 0..15 centred on their zero point 8, 8 - 2^(bits-1) .. 7 + 2^(bits-1): 0..15 (4-bit),
    4..11 (3-bit), 6..9 (2-bit). The kernel computes (q - 8)·scale + zero for any of them, so a 2- or 3-bit grid runs
    on the int4 kernel exactly."""
    if bits == 8:
        return -128, 127
    return 8 - 2 ** (bits - 1), 7 + 2 ** (bits - 1)


def quant_grid(w: Tensor, bits: int) -> tuple[Tensor, Tensor | None]:
    """The min-max grid of each row of `w` [..., g]: (scale, zero) [...], rounded to the kernels' bfloat16.

    Below 8 bits it is asymmetric, Ŵ = (q - 8)·scale + zero with q in `int_range(bits)`: L = 2^bits levels, so
    scale = (max - min) / (L - 1), and zero, the value at q = 8, is min + (L/2)·scale (the lowest level, 8 - L/2,
    lands on the min and the highest, 7 + L/2, on the max; zero as the int4 kernels store it). 8-bit is symmetric,
    Ŵ = q·scale with q in -128..127, and zero is None.
    """
    if bits != 8:
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8).to(SCALE_DTYPE).float()
        return scale, (lo + 2 ** (bits - 1) * scale).to(SCALE_DTYPE).float()
    return (w.abs().amax(-1) / 127).clamp_min(1e-8).to(SCALE_DTYPE).float(), None


GRIDS = ("kernel", "sym", "q4_0", "q8_0")  # the grids GPTQ/RTN can target: the kernels' own, or symmetric (zero 0)
GGUF_MIN_SCALE = 2.0 ** -14  # the smallest normal float16: a bfloat16 scale at or above it is exact in float16


def grid_for(w: Tensor, bits: int, grid: str = "kernel") -> tuple[Tensor, Tensor | None]:
    """The grid (scale, zero) of each row of `w` [..., g] for a target `grid` (see GRIDS), exact in bfloat16.

    "kernel" is `quant_grid`. "sym" is symmetric, zero = 0, for any group: 4-bit Ŵ = d·(q - 8), q in 0..15, with d
    the signed value of largest magnitude over -8 (it lands exactly on q = 0; 2- and 3-bit alike on their lowest
    level, over -2 and -4), i.e. the int4 kernel's layout with zero = 0 (compressed-tensors' symmetric int4, q - 8
    in -8..7); 8-bit Ŵ = d·q, d = max|w| / 127, the int8 kernel's per-channel grid. |d| is rounded to bfloat16 and
    raised to at least GGUF_MIN_SCALE, so d is exact in both bfloat16 (the kernels) and float16. "q4_0" (4-bit,
    groups of 32) and "q8_0" (8-bit) are "sym" under GGUF's names: its Q4_0 holds the 4-bit grid exactly, its Q8_0
    the 8-bit one by repeating d over every block of 32. Each grid reads only a row's min and max.
    """
    check_grid(grid, bits)
    if grid == "kernel":
        return quant_grid(w, bits)
    if bits == 8:
        d = w.abs().amax(-1) / 127
    else:  # the value of largest magnitude lands on the lowest level, q - 8 = -2^(bits-1)
        d = w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1) / -2 ** (bits - 1)
    d = d.to(SCALE_DTYPE).float()
    d = torch.where(d < 0, -1.0, 1.0) * d.abs().clamp_min(GGUF_MIN_SCALE)
    return d, (torch.zeros_like(d) if bits != 8 else None)


def quantize_values(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> Tensor:
    """The integer values of `w` on the `bits`-wide grid (scale, zero) broadcast against it (zero None for 8-bit),
    clamped to `int_range(bits)`."""
    q = torch.round(w / scale) if zero is None else torch.round((w - zero) / scale) + 8
    return q.clamp_(*int_range(bits))


def dequantize_values(q: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    """Ŵ from integer values `q` and the grid (scale, zero) broadcast against them."""
    return q * scale if zero is None else (q - 8) * scale + zero


def sqnr_db(ref: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio of `test` against `ref`, in dB: how quantization is judged."""
    return (10 * torch.log10(ref.float().pow(2).mean() / (ref.float() - test.float()).pow(2).mean())).item()


def hadamard(n: int, device: str | torch.device | None = None) -> Tensor:
    """The n x n Sylvester Hadamard matrix (n a power of 2), float32: entries ±1, symmetric, H·H = n·I. Its ±1 entries
    are exact in every float dtype, so a rotation by it rounds only its sums. One tensor per size and device, shared
    by every module built with it (so it is counted once in a model's bytes; a module moved to another device takes
    its own copy there): read it, never write it."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard matrix needs a power-of-2 size, got {n}")
    return _hadamard(n, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=None)
def _hadamard(n: int, device: torch.device) -> Tensor:
    h = torch.ones(1, 1, device=device)
    while len(h) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def rotated_weight(w: Tensor, group_size: int) -> Tensor:
    """V = W·R/g, float32: what a rotated QuantLinear quantizes and stores for the weight W [out, in] (see its
    docstring); V·R = W again."""
    return rotate_groups(w, hadamard(group_size, w.device)) / group_size


def rotate_groups(t: Tensor, h: Tensor) -> Tensor:
    """`t` [..., n] with each group of g consecutive columns multiplied by `h` = `hadamard(g)`: t·R, R block-diagonal
    (R·R = g·I), in float32. A quantized weight's groups and R's blocks coincide. In float32 for speed too: at batch 1
    a bfloat16 [9, 64] x [64, 64] matmul took 24 us on a 2-core Xeon (oneDNN), a float32 one 4 (MKL)."""
    return (t.float().unflatten(-1, (-1, len(h))) @ h).flatten(-2)


def _int4_mm(x: Tensor, packed: Tensor, group_size: int, scales_and_zeros: Tensor) -> Tensor:
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


def _int4_pack(q: Tensor) -> Tensor:
    """Integer values [out, in] in 0..15 packed for the int4 kernel of their device."""
    if q.device.type == "cuda":  # nibble pairs, then tinygemm tiles: inner_k_tiles as large as in_features allows
        tiles = next(t for t in (8, 4, 2) if q.shape[1] % (t * 16) == 0)
        q = q.to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(q[:, ::2] << 4 | q[:, 1::2], tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


def _nibbles(packed: Tensor) -> Tensor:
    """The 4-bit values held by a packed tensor, in storage order (low nibble first), as uint8."""
    b = packed.contiguous().view(torch.uint8).flatten()
    return torch.stack([b & 15, b >> 4], -1).flatten()


@functools.lru_cache(maxsize=None)
def _cpu_int4_layout(rows: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Where the CPU int4 packing of a [rows, K] weight puts value [n, k]: at nibble `start[n] * K + offset[n] +
    k * stride[n]` of its output, for every even K; None where it does not follow that form.

    `_convert_weight_to_int4pack_for_cpu` packs blocks of rows (64 on AVX512, 32 on AVX2), each block column by
    column, its rows in an order that depends on the CPU capability. That is measured rather than assumed: each
    value's own index is packed, one base-16 digit at a time, for K = 2 and K = 4, and the form is checked."""
    def where(cols: int) -> Tensor:  # [rows, cols]: the nibble that holds each value
        index = torch.arange(rows * cols)
        source = sum(_nibbles(_int4_pack((index.view(rows, cols) >> 4 * d) & 15)).long() << 4 * d
                     for d in range(((rows * cols - 1).bit_length() + 3) // 4))
        return torch.empty_like(index).index_put_((source,), index).view(rows, cols)

    two, four = where(2), where(4)
    start = (four[:, 0] - two[:, 0]) // 2  # the block's first row: where(K)[n, 0] = K * start + offset
    offset, stride = two[:, 0] - 2 * start, two[:, 1] - two[:, 0]
    if not torch.equal(four, (4 * start + offset)[:, None] + torch.arange(4) * stride[:, None]):
        return None
    return start, offset, stride


def _int4_unpack(packed: Tensor, cols: int) -> Tensor | None:
    """The integer values [rows, cols] (uint8, 0..15) of a CPU int4 packing, read from its nibbles in one gather
    (see `_cpu_int4_layout`); None where the layout is not the one read here."""
    layout = _cpu_int4_layout(packed.shape[0])
    if layout is None:
        return None
    start, offset, stride = (t.to(packed.device, torch.int32) for t in layout)
    cols_k = torch.arange(cols, device=packed.device, dtype=torch.int32)
    return _nibbles(packed)[(start * cols + offset)[:, None] + cols_k * stride[:, None]]


def pack_bits(v: Tensor, bits: int) -> Tensor:
    """Values v [rows, cols] in 0..2^bits - 1 (cols a multiple of 8) packed at their width, as uint8 [rows,
    cols·bits/8]: each 8 consecutive values fill `bits` bytes as one little-endian bit stream (value i at bits
    i·bits.., lowest byte first). So 2-bit is 4 values a byte, 3-bit 8 values in 3 bytes (no bit wasted: the int4
    kernels' groups are multiples of 32 columns), and 4-bit nibble pairs, low nibble first (the layout 4-bit
    checkpoints have always had). Works in int16, a value at a time, so a large head needs no int64 copies."""
    rows, cols = v.shape
    v = v.to(torch.int16).view(rows, cols // 8, 8)
    out = v.new_zeros(rows, cols // 8, bits)
    for i in range(8):  # value i starts at bit `shift` of byte `byte` and may spill into the next one
        byte, shift = divmod(i * bits, 8)
        x = v[..., i] << shift
        out[..., byte] |= x & 255
        if shift + bits > 8:
            out[..., byte + 1] |= x >> 8
    return out.to(torch.uint8).view(rows, cols * bits // 8)


def unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """The values [rows, cols] (int32) that `pack_bits` packed into `packed` [rows, cols·bits/8]."""
    rows, nbytes = packed.shape
    b = packed.to(torch.int16).view(rows, nbytes // bits, bits)
    out = b.new_empty(rows, nbytes // bits, 8)
    for i in range(8):
        byte, shift = divmod(i * bits, 8)
        x = b[..., byte] >> shift
        if shift + bits > 8:
            x |= b[..., byte + 1] << 8 - shift
        out[..., i] = x & 2 ** bits - 1
    return out.int().view(rows, -1)


# many rows: the int4/int8 kernels dequantize their weight again for every few rows they compute (4 on the CPU), so
# from `DEQUANT_ROWS` rows on (prefill, evaluation, calibration) the weight is dequantized once into the policy's
# float dtype and one GEMM runs (bf16 where native: AMX; float32 elsewhere). It is still only the integers that are
# held: the float copy lives for one call.
DEQUANT_ROWS = CPU_POLICY.dequant_rows or 0
DEQUANT_DTYPE = getattr(torch, CPU_POLICY.float_dtype)
DEQUANT_BYTES = 64 << 20  # the most of a dequantized weight held at once: a large head is dequantized in slices
OWN_KERNELS = CPU_POLICY.cpu_kernels == "fastllama"  # CPU int4/int8 weights run on fastllama.kernels (few rows)


@functools.lru_cache(maxsize=None)
def _int4_block(rows: int) -> int | None:
    """The block of rows B of the CPU int4 packing of `rows` rows where it is the form `_int4_weight_t` reads:
    whole blocks of B rows, each column by column, byte j of a block's column holding its rows j (low nibble) and
    j + B/2 (high). None where the packing is another (checked on its measured layout, `_cpu_int4_layout`)."""
    layout = _cpu_int4_layout(rows)
    if layout is None:
        return None
    block = int(layout[2][0])
    n = torch.arange(rows)
    form = (n // block * block, 2 * (n % (block // 2)) + (n % block >= block // 2), torch.full_like(n, block))
    return block if rows % block == 0 and all(torch.equal(a, b) for a, b in zip(layout, form)) else None


def _int4_weight_t(packed: Tensor, scales: Tensor, zeros: Tensor, block: int) -> Tensor:
    """Ŵᵀ [in, rows] of a CPU int4 packing in blocks of `block` rows (see `_int4_block`), in the dtype of
    `scales` and `zeros` [groups, rows] (contiguous: inductor vectorizes only unit-stride reads): one pass. `packed`
    holds the packing's bytes, as uint8 or widened to int32 (see `_int4_dequantizer`)."""
    rows = packed.shape[0]
    groups = scales.shape[0]
    b = packed.view(rows // block, -1, block // 2).transpose(0, 1)  # [in, blocks, B/2]
    if torch.compiler.is_compiling():  # one broadcast shift: inductor writes a stack's halves to buffers first
        b = (b[:, :, None] >> torch.arange(0, 8, 4, dtype=b.dtype, device=b.device)[:, None]) & 15
    else:  # eager, the stack is the faster
        b = torch.stack([b & 15, b >> 4], 2)
    q = b.reshape(groups, -1, rows).to(scales.dtype) - 8  # [groups, group, rows]
    return (q * scales[:, None] + zeros[:, None]).view(-1, rows)


def _int4_weight(packed: Tensor, scales: Tensor, zeros: Tensor, group: int) -> Tensor:
    """Ŵ [rows, in] of a `kernels.pack` packing, in the dtype of `scales` and `zeros` [rows, groups of `group`]: one
    pass (the counterpart of `_int4_weight_t` for fastllama's kernel)."""
    rows = packed.shape[0]
    if torch.compiler.is_compiling():  # one broadcast shift, as in `_int4_weight_t`
        b = packed.view(rows, -1, 1, kernels.BLOCK // 2)  # [rows, blocks, 1, 32]: values j (low) and j + 32 (high)
        b = (b >> torch.arange(0, 8, 4, dtype=b.dtype, device=b.device)[:, None]) & 15
    else:
        b = kernels.unpack(packed)
    q = b.reshape(rows, -1, group).to(scales.dtype) - 8  # [rows, groups, group]
    return (q * scales[..., None] + zeros[..., None]).view(rows, -1)


@functools.lru_cache(maxsize=None)
def _int4_dequantizer(shape: tuple[int, ...], own: bool = False) -> Callable[[Tensor, Tensor, Tensor, int], Tensor]:
    """`_int4_weight_t` of a packing (`_int4_weight` of fastllama's where `own`) for one shape of its inputs,
    compiled by inductor where the policy compiles (one fused, vectorized loop), eager elsewhere.

    Compiled per shape (a model has a handful) with a code object of its own: dynamic shapes compiled to index
    arithmetic that ran 4x slower, and one code object would hit dynamo's recompile limit across models. Compiled
    on first use, in a few seconds; inductor caches the code on disk across processes.

    Where inductor writes 256-bit code (AVX2) ATen first widens the bytes to int32: inductor loads 8 bytes
    through a stack buffer there (at::vec has no 8-byte load on AVX2), 4x the cost of a whole vector. Measured on
    a 2-core Xeon (AVX512, and run as AVX2), a 3072x576 weight: AVX2 0.41 ms widened first against 1.45 from bytes
    (0.76 for the earlier form, which stacked nibbles split in int32), AVX512 0.23 ms from bytes (0.41 earlier);
    eager 0.6-1.2 ms."""
    form = _int4_weight if own else _int4_weight_t
    if not policy("cpu").compile_step:
        return lambda packed, scales, zeros, block: form(packed.view(torch.uint8), scales, zeros, block)
    compiled = torch.compile(own_code(form), dynamic=False, options={"cpp.simdlen": simd_bits()})
    widen = torch.int32 if simd_bits() == 256 else torch.uint8
    return lambda packed, scales, zeros, block: compiled(packed.view(torch.uint8).to(widen), scales, zeros, block)


def _int8_linear(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    """`x @ (q·scales).T` as gpt-fast and torchao write int8 weight-only: `F.linear(x, q.to(x.dtype)) * scales`.

    Under torch.compile inductor fuses the cast into the matmul: one bandwidth-bound pass over the int8 weight.
    The CUDA build of `_weight_int8pack_mm` runs one thread per output with a serial loop over in_features (no
    tensor cores, uncoalesced reads), and only exists in recent torch; this is the form for every device but the
    CPU, whose `_weight_int8pack_mm` is the fast path there."""
    return nn.functional.linear(x, q.to(x.dtype)) * scales


def _int8_mm(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    """`x @ (q·scales).T` on the CPU's int8 kernel, or as `_int8_linear` on any other device."""
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int8pack_mm(x, q, scales)
    return _int8_linear(x, q, scales)


@swap
class QuantLinear(nn.Module):
    """`y = x @ Ŵ.T + b` on weight-only int4/int8 kernels, holding only integers and scales: on the CPU fastllama's
    own (`fastllama.kernels`, int8 activations; `own` is True) where they build and the shape allows (int4 groups of
    64 or more, rows a multiple of 4), PyTorch's elsewhere. `own` int4 weights hold the kernel's own packing
    (`kernels.pack`) and scales and zeros [out, groups, 2]; the rest is as below.

    4-bit: groups of `group_size` input channels, Ŵ = (q - 8)·scale + zero, q in 0..15: the layout of
    `_weight_int4pack_mm` (CUDA) and `_weight_int4pack_mm_for_cpu`. 2- and 3-bit: the same, q in the 4 or 8
    values around 8 of `int_range` (the same kernel, exactly). 8-bit: one scale per output channel,
    Ŵ = q·scale, q in -128..127 (`_weight_int8pack_mm` on the CPU, `_int8_linear` elsewhere). Scales and zeros
    are bfloat16, as the kernels take them; activations are cast to bfloat16 around PyTorch's kernel (its fast path on
    CPU) and the output back. Shapes the kernels cannot take (pruned to a count not divisible by
    KERNEL_MULTIPLE) are zero-padded inside.

    With `rotate` (below 8 bits), each group of the input is turned by a Hadamard matrix R_g (see `hadamard`) before
    the kernel: y = (x·R)·Vᵀ + b, R block-diagonal over the groups, and the integers and scales hold V = W·R/g, so
    Ŵ = V·R is the weight in the input's own basis (`dequantize`). R spreads a group's few large weights (and the
    inputs' large channels) over the whole group, so its grid gets finer (see `fastllama.gptq`); it costs one small
    float32 matmul per call (gptq4's decode step on the embedded model: 6.8 -> 7.4 ms on a 2-core Xeon), and exporters
    refuse it (GGUF and compressed-tensors have no place for R).

    The buffers are packed for the kernel of their device. `state_dict()` holds the portable form instead
    (`qweight`: the integer values, packed at their width below 8 bits; `scales`; `zeros`; `bias`),
    `load_state_dict` packs it for the module's device, and `.to(device)` repacks.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 bias: bool = False, device: str | torch.device | None = None, rotate: bool = False):
        super().__init__()
        group_size = in_features if bits == 8 else group_size
        check_quant_shape(in_features, bits, group_size, rotate)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        # with `rotate`: the inputs are turned by this Hadamard matrix per group (see the class docstring)
        self.register_buffer("hadamard", hadamard(group_size, device) if rotate else None, persistent=False)
        self.pad_out = -out_features % KERNEL_MULTIPLE if bits != 8 else 0  # zero rows the kernel computes
        # zero columns, and zeros padded to x: to whole blocks of fastllama's kernels where they run (e.g. an input-
        # pruned int8 linear), else to what PyTorch's int8 kernel needs
        self.pad_in = -in_features % (kernels.BLOCK if OWN_KERNELS else KERNEL_MULTIPLE) if bits == 8 else 0
        self.in_granularity = group_size if bits != 8 else 1  # the column block that input pruning keeps whole
        groups = in_features // group_size
        zeros = torch.zeros(out_features, groups, device=device) if bits != 8 else None
        self.set_values(torch.zeros(out_features, in_features, dtype=torch.int32, device=device),
                        torch.ones(out_features, groups, device=device), zeros,
                        torch.zeros(out_features, device=device) if bias else None)

    @property
    def rotate(self) -> bool:
        """Whether the inputs are turned by a Hadamard matrix per group (see the class docstring)."""
        return self.hadamard is not None

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, grid: str = "kernel",
                   rotate: bool = False) -> QuantLinear:
        """Round-to-nearest quantization of `linear` onto `grid` (see `grid_for`; "kernel": min-max grids); with
        `rotate`, of V = W·R/g (see the class docstring)."""
        group_size = linear.in_features if bits == 8 else group_size
        check_quant_shape(linear.in_features, bits, group_size, rotate)
        w = linear.weight.detach().float()
        w = (rotated_weight(w, group_size) if rotate else w).reshape(linear.out_features, -1, group_size)
        scale, zero = grid_for(w, bits, grid)
        q = quantize_values(w, scale[..., None], None if zero is None else zero[..., None], bits)
        return cls.from_values(q.flatten(1), scale, zero, linear.bias, bits, group_size, rotate)

    @classmethod
    def from_values(cls, q: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None, bits: int,
                    group_size: int, rotate: bool = False) -> QuantLinear:
        """A QuantLinear of integer values q [out, in] on the grid (scales, zeros) [out, in/group_size] (with
        `rotate`, the values of V: see the class docstring)."""
        module = cls(q.shape[1], q.shape[0], bits, group_size, bias is not None, q.device, rotate)
        module.set_values(q, scales, zeros, bias)
        return module

    def set_values(self, q: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None) -> None:
        """Pack integer values q [out, in], scales and zeros [out, in/group_size] (zeros None for 8-bit) for the
        kernel of q's device."""
        q = nn.functional.pad(q, (0, self.pad_in, 0, self.pad_out))
        scales = nn.functional.pad(scales, (0, 0, 0, self.pad_out), value=1.0)
        group = q.shape[1] if self.bits == 8 else self.group_size
        self.own = q.device.type == "cpu" and OWN_KERNELS and kernels.usable(group, *q.shape[::-1])
        if self.bits != 8:
            self.register_buffer("packed", kernels.pack(q) if self.own else _int4_pack(q.int()), persistent=False)
            zeros = nn.functional.pad(zeros, (0, 0, 0, self.pad_out))
            sz = torch.stack([scales, zeros], -1).to(SCALE_DTYPE)  # [out, groups, 2]; [groups, out, 2] for ATen
            self.register_buffer("scales_and_zeros", (sz if self.own else sz.transpose(0, 1)).contiguous(),
                                 persistent=False)
        else:
            self.register_buffer("packed", q.to(torch.int8).contiguous(), persistent=False)
            self.register_buffer("scales", scales.reshape(-1).to(SCALE_DTYPE).contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone().to(q.device), persistent=False)

    def _integers(self) -> Tensor:
        """The integer values [out, in]: int8 (8-bit) or uint8 in `int_range(bits)` (below 8 bits). A CPU int4
        packing is unpacked directly (`_int4_unpack`); CUDA's tinygemm tiles are read back through the kernel itself
        (an identity matrix through it: O(in² · out), cheap on a GPU only)."""
        out, cols = self.out_features, self.in_features
        if self.bits == 8:
            return self.packed[:, :cols]
        if self.own:  # 2 to 4 bits here (8-bit weights are PyTorch's layout)
            return kernels.unpack(self.packed)[:out, :cols]
        q = None if self.packed.device.type == "cuda" else _int4_unpack(self.packed, cols)
        if q is None:
            unit = torch.tensor([1.0, 8.0], dtype=SCALE_DTYPE, device=self.packed.device)
            unit = unit.expand(*self.scales_and_zeros.shape[:2], 2).contiguous()
            eye = torch.eye(cols, dtype=SCALE_DTYPE, device=self.packed.device)
            q = torch.cat([_int4_mm(rows, self.packed, self.group_size, unit)
                           for rows in eye.split(1024)]).T.round()  # (q - 8)·1 + 8 = q, exact in bfloat16
        return q[:out].to(torch.uint8)

    def _scales_zeros(self) -> tuple[Tensor, Tensor | None]:
        """Scales and zeros [out, in/group_size] in the kernels' bfloat16 (zeros None for 8-bit), unpadded."""
        out = self.out_features
        if self.bits == 8:
            return self.scales[:out, None], None
        sz = self.scales_and_zeros[:out] if self.own else self.scales_and_zeros[:, :out].transpose(0, 1)
        return sz[..., 0], sz[..., 1]

    def values(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The integer values q [out, in] (int32), scales and zeros [out, in/group_size] (float32; zeros None
        for 8-bit): with `rotate`, those of V (see the class docstring)."""
        scales, zeros = self._scales_zeros()
        return self._integers().int(), scales.float(), None if zeros is None else zeros.float()

    def dequantize(self) -> Tensor:
        """Ŵ [out, in] in float32: the weight the module computes with (with `rotate`, V·R: in the input's basis)."""
        q, scales, zeros = self.values()
        expand = lambda t: None if t is None else t.repeat_interleave(self.group_size, dim=1)  # noqa: E731
        w = dequantize_values(q.float(), expand(scales), expand(zeros))
        return rotate_groups(w, self.hadamard) if self.rotate else w

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.rotate:
            x2 = rotate_groups(x2, self.hadamard)
        # (not inside a compiled graph, e.g. a decode step of 96 sequences: the kernel serves it there)
        many = x2.shape[0] >= DEQUANT_ROWS and not torch.compiler.is_compiling()
        y = self._dequantized_matmul(x2) if many else None
        if y is None:
            x2 = x2 if self.own else x2.to(SCALE_DTYPE)
            x2 = nn.functional.pad(x2, (0, self.pad_in)) if self.pad_in else x2
            if self.own and self.bits != 8:
                y = kernels.int4_matmul(x2, self.packed, self.scales_and_zeros, self.group_size)
            elif self.own:
                y = kernels.int8_matmul(x2, self.packed, self.scales)
            elif self.bits != 8:
                y = _int4_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
            else:
                y = _int8_mm(x2, self.packed, self.scales)
        y = y[:, :self.out_features].reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _dequantized_matmul(self, x2: Tensor) -> Tensor | None:
        """`x2 @ Ŵᵀ` [rows, out (padded)] with Ŵ dequantized into DEQUANT_DTYPE, DEQUANT_BYTES of it at a time, each
        slice then one GEMM (see DEQUANT_ROWS); None where the kernel runs instead: off the CPU, or an int4 packing
        not in the form `_int4_weight_t` reads."""
        if self.packed.device.type != "cpu":
            return None
        block = 1 if self.bits == 8 or self.own else _int4_block(self.packed.shape[0])
        if block is None:
            return None
        rows = self.packed.shape[0]
        chunk = max(block, DEQUANT_BYTES // (self.in_features * DEQUANT_DTYPE.itemsize) // block * block)
        x2 = x2.to(DEQUANT_DTYPE)
        parts = [x2 @ self._dequantized_t(first, min(chunk, rows - first), block) for first in range(0, rows, chunk)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def _dequantized_t(self, first: int, rows: int, block: int) -> Tensor:
        """Ŵᵀ [in, rows] of the output rows `first`..`first + rows` (a whole number of packing blocks), in
        DEQUANT_DTYPE. An 8-bit weight's padded input columns are left out."""
        packed = self.packed[first:first + rows]
        if self.bits == 8:
            return packed[:, :self.in_features].to(DEQUANT_DTYPE).T * self.scales[first:first + rows].to(DEQUANT_DTYPE)
        sz = self.scales_and_zeros[first:first + rows] if self.own else self.scales_and_zeros[:, first:first + rows]
        scales, zeros = (sz[..., i].to(DEQUANT_DTYPE).contiguous() for i in (0, 1))
        if self.own:  # 2 to 4 bits here (8-bit returned above): Ŵ [rows, in], transposed
            return _int4_dequantizer((*packed.shape, *scales.shape, DEQUANT_DTYPE), True)(
                packed, scales, zeros, self.group_size).T
        return _int4_dequantizer((*packed.shape, *scales.shape, block, DEQUANT_DTYPE))(packed, scales, zeros, block)

    def select(self, dim: int, index: Tensor) -> QuantLinear:
        """A smaller QuantLinear keeping rows (dim=0, with their bias) or columns (dim=1) `index`, still
        quantized with the same values. Columns must come in whole groups (`in_granularity`), else ValueError."""
        q, scales, zeros = self.values()
        index = index.to(q.device, torch.int64)
        bias = self.bias
        if dim == 0:
            scales, zeros = scales[index], None if zeros is None else zeros[index]
            bias = None if bias is None else bias[index]
        elif self.bits != 8:
            if not whole_blocks(index, self.group_size):
                raise ValueError(f"{self.bits}-bit columns can only be selected in whole groups of {self.group_size} "
                                 "(see in_granularity); pass whole, aligned groups")
            groups = index[::self.group_size] // self.group_size
            scales, zeros = scales[:, groups], zeros[:, groups]
        return QuantLinear.from_values(q.index_select(dim, index), scales, zeros, bias, self.bits, self.group_size,
                                       self.rotate)

    def spec(self) -> dict:
        spec = {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "bias": self.bias is not None}
        return spec | {"rotate": True} if self.rotate else spec  # checkpoints from before `rotate` read as False

    @classmethod
    def from_spec(cls, spec: dict) -> QuantLinear:
        return cls(**spec)

    def portable(self) -> dict[str, Tensor]:
        """The device-independent form saved in checkpoints: qweight (below 8 bits packed at its width, see
        `pack_bits`), scales, zeros (below 8 bits), bias (if any)."""
        q, (scales, zeros) = self._integers(), self._scales_zeros()
        if self.bits != 8:
            q = pack_bits(q - int_range(self.bits)[0], self.bits)
        out = {"qweight": q, "scales": scales}
        out |= {} if zeros is None else {"zeros": zeros}
        return out if self.bias is None else out | {"bias": self.bias}

    def _set_portable(self, tensors: dict[str, Tensor], device: torch.device) -> None:
        q = tensors["qweight"].to(device)
        if self.bits != 8:
            q = unpack_bits(q, self.bits) + int_range(self.bits)[0]
        zeros = tensors["zeros"].to(device).float() if self.bits != 8 else None
        self.set_values(q.int(), tensors["scales"].to(device).float(), zeros,
                        tensors["bias"].to(device) if "bias" in tensors else None)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination.update({prefix + k: v for k, v in self.portable().items()})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        groups = self.in_features // self.group_size
        expected = {"qweight": (self.out_features, self.in_features * self.bits // 8),
                    "scales": (self.out_features, groups)}
        expected |= {"zeros": (self.out_features, groups)} if self.bits != 8 else {}
        expected |= {} if self.bias is None else {"bias": (self.out_features,)}
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        missing_keys.extend(prefix + k for k in expected if k not in mine)
        unexpected_keys.extend(prefix + k for k in mine if k not in expected)
        bad = [f"size mismatch for {prefix}{k}: the checkpoint has {tuple(mine[k].shape)}, the module expects "
               f"{tuple(shape)}" for k, shape in expected.items() if k in mine and tuple(mine[k].shape) != shape]
        error_msgs.extend(bad)
        if not bad and expected.keys() <= mine.keys():
            self._set_portable(mine, self.packed.device)

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.half()`...: the bias follows `fn`; the integers, bfloat16 scales and Hadamard
        matrix only follow a change of device, the integers unpacked (not read back through a kernel: see
        `_integers`) and repacked for the new device's kernel."""
        device = fn(torch.empty(0, device=self.packed.device)).device
        if device != self.packed.device:
            self._set_portable(self.portable(), device)
        if self.hadamard is not None:  # ±1: kept in float32, cast to the input's dtype where it is used (moved, not
            self.hadamard = self.hadamard.to(device)  # taken from hadamard()'s cache, which must not keep fake tensors)
        if self.bias is not None:
            self.bias = fn(self.bias)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, rotate={self.rotate}")


# ------------------------------------------------------------------------------------------------ fusion
def fuse(parts: list[nn.Module]) -> QuantLinear | None:
    """One QuantLinear computing `torch.cat([p(x) for p in parts], -1)` in a single kernel call, holding the
    integers once: each part's `packed` becomes a view of its rows in the fused one (same values, nothing held
    twice), so the parts still compute alone, as before. None (the parts untouched) unless all are CPU
    QuantLinears of one width, group, rotation and input size, without bias or padded rows, whose packings
    concatenate by rows (checked on the packing's measured layout, not assumed: the CPU int4 packing works in blocks
    of 32 or 64 rows).

    A decode step at batch 1 pays a fixed cost per kernel call (about 15 us of the 24 a 576x576 int4 call takes on
    a 2-core Xeon): q/k/v as one call and gate/up as one cut the 7 calls of a Llama layer to 4."""
    first = parts[0]
    if len(parts) < 2 or any(
            type(p) is not QuantLinear or p.in_features != first.in_features or p.bits != first.bits
            or p.group_size != first.group_size or p.rotate != first.rotate or p.pad_out or p.bias is not None
            or p.packed.device.type != "cpu" or p.own != first.own for p in parts):
        return None
    if first.bits != 8 and not first.own and not _int4_rows_concatenate([p.out_features for p in parts]):
        return None  # a packing that interleaves rows across the parts' boundaries
    fused = QuantLinear(first.in_features, KERNEL_MULTIPLE, first.bits, first.group_size, device="meta",
                        rotate=first.rotate)
    fused.out_features, fused.hadamard, fused.own = sum(p.out_features for p in parts), first.hadamard, first.own
    fused.packed = torch.cat([p.packed for p in parts])
    if first.bits == 8:
        fused.scales = torch.cat([p.scales for p in parts])
    else:
        fused.scales_and_zeros = torch.cat([p.scales_and_zeros for p in parts], dim=0 if first.own else 1)
    for p, rows in zip(parts, fused.packed.split([p.packed.shape[0] for p in parts])):
        p.packed = rows
    return fused


def _int4_rows_concatenate(rows: list[int]) -> bool:
    """Whether CPU int4 packings of `rows` rows each, concatenated, are the packing of all the rows at once: in the
    layout of the whole (`_cpu_int4_layout`), each part's rows sit where its own layout puts them, shifted by the
    rows before it. Read from the layouts alone (their size is the row count), not from any weight."""
    whole = _cpu_int4_layout(sum(rows))
    if whole is None:
        return False
    first = 0
    for n in rows:
        part = _cpu_int4_layout(n)
        if part is None:
            return False
        start, offset, stride = (t[first:first + n] for t in whole)
        if not (torch.equal(start, part[0] + first) and torch.equal(offset, part[1]) and torch.equal(stride, part[2])):
            return False
        first += n
    return True
