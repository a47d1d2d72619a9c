"""Weight-only quantization onto `QuantLinear`: GPTQ (Frantar et al. 2022), round-to-nearest, int8 weight-only.

    quantize_(model, GPTQConfig(bits=4, group_size=128), calib)   GPTQ, layer by layer over the decoder
    quantize_(model, RTNConfig(bits=4, group_size=128))           round-to-nearest, the baseline
    quantize_(model, Int8WeightOnlyConfig())                      per-channel symmetric int8, round-to-nearest

GPTQ follows the reference `fasterquant`: H = 2XXᵀ/n from the calibration inputs of each linear, dampened by
`damp` times its mean diagonal, inverted through Cholesky (upper factor of H⁻¹), and the columns quantized one
by one with their error spread over the columns not yet quantized, in lazy blocks. The grid is the kernels'
own (see `nn.quant_grid`): 2-, 3- and 4-bit asymmetric min-max per group of input channels (all three on the int4
kernel, see `nn.int_range`), 8-bit symmetric with one scale per output channel; so the weights GPTQ settles on are
exactly the kernel's integers and scales. `grid="sym"` (symmetric, zero 0, for compressed-tensors) and GGUF's
`"q4_0"` / `"q8_0"` target other grids instead (see `nn.grid_for`), which the same kernels compute with exactly;
round-to-nearest takes `grid` too.

With `act_order` (the default), columns are visited by decreasing Hessian diagonal but groups stay in natural
column order (the kernels need that): each group's grid is fixed up front from the unquantized weights ("static
groups"). Without it, a group's grid is taken from the error-updated weights when GPTQ reaches its first column.
With `clip` (the default), a grid's range is searched rather than taken from the min-max: the min and max shrunk
by the factor (of CLIP_SHRINKS) that rounds the group with the least error, weighted by the Hessian diagonal,
then rounded to bfloat16 like any grid (see `clip_grid`).

The decoder is processed one layer at a time, all the calibration sequences in one batch: the inputs of layer 0
are captured from the calibration tokens, then one forward through each layer quantizes its linears in the
order it reaches them (true-sequential, see `_gptq_layer`) and gives the next layer's quantized inputs, so only
one layer's activations are held. With `asym` (asymmetric calibration, as GPTAQ), the float model's hidden states
are carried beside them (on ASYM_SHARE of the sequences, in bfloat16 where the hardware policy computes it), one
float forward of each layer ahead of its quantization, and each linear's GPTQ aims at the float model's output on
its own inputs rather than at its float weights on the quantized inputs (see `float_target`): the linears then
also correct the error the layers before them left. The embedding stays float.
With `rotate` (in the gptq4 preset), each linear's inputs are turned group by group by a Hadamard matrix R (see
`nn.QuantLinear`): GPTQ quantizes V = W·R/g on the Hessian R·H·R of the turned inputs x·R, and the module turns its
inputs the same way when it runs. R is orthogonal up to g, so nothing changes in float; but it spreads the few large
weights of a group over all of it (and the inputs' large channels likewise), so the group's range narrows and its
grid gets finer. Measured on the embedded model it took gptq4 from 1.15x to 1.09x the float model's perplexity on
ppl.txt (see the README).
The output head stays float too unless `lm_head=True`: it is then untied from the embedding and quantized on the
final hidden states (it is the largest matmul of small models, so CPU decode speed needs it).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import check_calib
from .hardware import policy
from .nn import (QuantLinear, check_grid, check_quant_config, dequantize_values, grid_for, hadamard,
                 int4_group_for, quantize_values, rotate_groups, rotated_weight, tied_head)

log = logging.getLogger(__name__)

CLIP_SHRINKS = tuple(1 - k / 100 for k in range(25))  # the range factors the clipping search tries: 1.00 .. 0.76
ASYM_SHARE = 0.25  # the share of the calibration sequences the float stream of `asym` runs on (its time)
ASYM_DAMP = 3.0  # float_target's ridge over the mean Hessian diagonal: the best of 0.01 (GPTQ's) .. 10 measured


@dataclass
class RTNConfig:
    """Round-to-nearest onto the kernels' grid."""

    bits: int = 4  # 2, 3, 4 (int4 kernel, groups; see nn.int_range) or 8 (int8 kernel, one scale per output channel)
    group_size: int = 128  # input channels per 4-bit scale/zero; per layer, the largest kernel group dividing it
    lm_head: bool = False  # also quantize the output head (untied from the embedding, which stays float)
    grid: str = "kernel"  # kernel (the kernels' own), sym (zero 0, any group), q4_0 / q8_0 (GGUF's): nn.grid_for
    rotate: bool = False  # quantize W·R/g, each input group turned by a Hadamard matrix (nn.QuantLinear, rotate)

    def __post_init__(self):
        check_quant_config(self.bits, self.group_size, self.rotate)
        check_grid(self.grid, self.bits, self.group_size)


@dataclass
class Int8WeightOnlyConfig(RTNConfig):
    """int8 weight-only: round-to-nearest, symmetric, one scale per output channel (`_weight_int8pack_mm`)."""

    bits: int = field(default=8, init=False)  # always 8
    grid: str = field(default="kernel", init=False)  # the int8 kernel's own (symmetric already)
    rotate: bool = field(default=False, init=False)  # one scale per row: no groups to turn


@dataclass
class GPTQConfig(RTNConfig):
    """GPTQ onto the kernels' grid (see the module docstring)."""

    act_order: bool = True  # visit columns by decreasing Hessian diagonal (groups stay static, in natural order)
    damp: float = 0.01  # added to the Hessian diagonal, as a fraction of its mean
    clip: bool = True  # search each group's clipping range (see clip_grid) instead of taking its min-max
    asym: bool = False  # aim each linear at the float model's output, not its own on quantized inputs (float_target)
    block_size: int = 128  # columns per lazy block (raised to the group size when that is larger)

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.damp < 1:
            raise ValueError(f"damp={self.damp!r} must lie in (0, 1), e.g. 0.01 (1% of the mean Hessian diagonal)")


class _Stop(Exception):
    """Raised by the capture hook once layer 0's inputs are recorded."""


def quantize_(model: nn.Module, config: RTNConfig, calib: Tensor | None = None) -> nn.Module:
    """Quantize the decoder's linears (and the head with `config.lm_head`) of `model` in place; returns it.

    `calib` (token ids [n, seqlen]) is required by GPTQConfig and ignored by round-to-nearest.
    """
    if not isinstance(config, RTNConfig):
        raise ValueError(f"unknown quantization config {type(config).__name__}; valid: GPTQConfig, RTNConfig, "
                         "Int8WeightOnlyConfig")
    start = time.perf_counter()
    if isinstance(config, GPTQConfig):
        check_calib(calib, "GPTQ")
        _gptq_model(model, config, calib)
    else:
        for layer in tqdm(model.model.layers, desc=f"rtn{config.bits}", leave=False):
            for parent, name, linear in _linears(layer):
                setattr(parent, name, _rtn(linear, config))
        if config.lm_head:
            quantize_head_(model, config)
    if config.bits != 8:
        _log_group_fallbacks(model, config)
    log.info("quantized to %d bits (%s) in %.1f s", config.bits, type(config).__name__, time.perf_counter() - start)
    return model


def _linears(module: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every float nn.Linear under `module` (also inside pruned wrappers)."""
    return [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear]


def _group(linear: nn.Linear, config: RTNConfig) -> int:
    """The group size for `linear`: the config's, or the largest kernel group dividing in_features."""
    return linear.in_features if config.bits == 8 else int4_group_for(linear.in_features, config.group_size)


def _log_group_fallbacks(model: nn.Module, config: RTNConfig) -> None:
    """Say once per width which linears got a smaller group than asked (it is recorded in their spec)."""
    fallbacks: dict[tuple[int, int], int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.bits != 8 and m.group_size != config.group_size:
            fallbacks[m.in_features, m.group_size] = fallbacks.get((m.in_features, m.group_size), 0) + 1
    for (in_features, group), count in fallbacks.items():
        log.info("in_features=%d is not divisible by group_size=%d: used group_size=%d (%d linears)", in_features,
                 config.group_size, group, count)


def _rtn(linear: nn.Linear, config: RTNConfig) -> QuantLinear:
    return QuantLinear.from_float(linear, config.bits, _group(linear, config), config.grid, config.rotate)


def quantize_head_(model: nn.Module, config: RTNConfig) -> nn.Module:
    """Round-to-nearest of the output head alone, untied from the embedding (which stays float); returns `model`."""
    _untie(model)
    model.lm_head = _rtn(model.lm_head, config)
    return model


def _untie(model: nn.Module) -> None:
    """Give the head its own weight, so quantizing it leaves the (float) embedding alone."""
    if tied_head(model):
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False


# ---------------------------------------------------------------- GPTQ on one linear
def hessian(x: Tensor, parts: int = 4) -> Tensor:
    """H = 2XXᵀ/n of a linear's inputs x [..., in_features] (n rows), in float32: `parts` block rows, each only
    from the diagonal on, mirrored below it (XᵀX is symmetric), so H is exactly symmetric and 10 of the 16 blocks
    of 4 parts are computed."""
    x = x.reshape(-1, x.shape[-1]).float()
    cols = x.shape[1]
    step = -(-cols // parts)
    H = x.new_empty(cols, cols)
    for i in range(0, cols, step):
        row = x[:, i:i + step].T @ x[:, i:]
        H[i:i + step, i:], H[i:, i:i + step] = row, row.T
    return H.mul_(2 / len(x))


def float_target(x: Tensor, x_float: Tensor, H: Tensor, damp: float = ASYM_DAMP) -> Tensor:
    """The map P [in, in] such that W + WP, on a linear's inputs x [..., in] from the quantized model, gives the
    closest outputs (least squares) to W's on the float model's inputs x_float (same shape): P = 2ΔᵀX(H + λI)⁻¹/n
    with Δ = x_float - x over the n rows, H = `hessian(x)` (= 2XᵀX/n) and λ `damp` times its mean diagonal: a
    ridge, as P has in² entries to fit from the calibration tokens.

    Asymmetric calibration (GPTAQ): ||QXᵀ - WX̃ᵀ||² = ||(Q - W')Xᵀ||² + a constant in Q when W' = W + WP (undamped),
    so GPTQ of W' on H aims at the float model's output instead of W's on inputs that carry the quantization
    error of every linear before it. P is 0 when the two streams agree.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    delta = x_float.reshape(-1, x.shape[-1]).float() - x
    damped = H + damp * torch.diag(H).mean() * torch.eye(len(H), device=H.device)
    return torch.cholesky_solve((2 / len(x)) * (x.T @ delta), torch.linalg.cholesky(damped)).T


def clip_grid(w: Tensor, bits: int, importance: Tensor, grid: str = "kernel") -> tuple[Tensor, Tensor | None]:
    """The `grid` of each row of `w` [..., g] (see `nn.grid_for`) whose range, its min and max times one of
    CLIP_SHRINKS, rounds the row with the least error Σ importance·(ŵ - w)², `importance` [g] weighing each column
    (GPTQ's Hessian diagonal): clipping a few extreme weights buys a finer step for all the others."""
    ends = torch.stack([w.amin(-1), w.amax(-1)], -1)  # a row's min-max grid depends only on these two
    best_err = torch.full(ends.shape[:-1], torch.inf, device=w.device)
    best_scale, best_zero = torch.empty_like(best_err), None if bits == 8 else torch.empty_like(best_err)
    for shrink in CLIP_SHRINKS:
        scale, zero = grid_for(ends * shrink, bits, grid)  # each grid reads only a row's min and max
        s, z = scale[..., None], None if zero is None else zero[..., None]
        err = ((dequantize_values(quantize_values(w, s, z, bits), s, z) - w).square() * importance).sum(-1)
        better = err < best_err
        best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
        best_zero = None if zero is None else torch.where(better, zero, best_zero)
    return best_scale, best_zero


def gptq_quantize(weight: Tensor, H: Tensor, bits: int, group_size: int, act_order: bool = True, damp: float = 0.01,
                  block_size: int = 128, clip: bool = True,
                  grid: str = "kernel") -> tuple[Tensor, Tensor, Tensor | None]:
    """GPTQ of a weight [out, in] given its inputs' Hessian [in, in].

    Returns the integer values q [out, in] and the grid: scales and zeros [out, in/group_size] (zeros None for
    8-bit, whose group is the whole row), ready for `QuantLinear.from_values`.
    """
    W = weight.detach().float().clone()
    H = H.float().clone()
    out, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = act_order or bits == 8  # grids fixed up front from the unquantized weights (8-bit: one group, the row)
    diag = torch.diag(H).reshape(-1, group_size)  # each column's weight in the clipping search, per group
    fit = (lambda w, g: clip_grid(w, bits, diag[g], grid)) if clip else (lambda w, g: grid_for(w, bits, grid))
    if static:
        scales, zeros = fit(W.reshape(out, -1, group_size), slice(None))
    else:  # each group's grid is set from the error-updated weights when GPTQ reaches its first column
        scales, zeros = W.new_zeros(out, cols // group_size), W.new_zeros(out, cols // group_size)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    if act_order:
        W, H = W.index_select(1, perm), H.index_select(0, perm).index_select(1, perm)
    H.diagonal().add_(damp * torch.diag(H).mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    # W and Q are held transposed, [in, out], so that each column GPTQ visits is one contiguous row
    W, Q = W.T.contiguous(), torch.empty(cols, out, device=W.device)
    group = perm // group_size  # the group of each visited column
    block_size = max(block_size, group_size) if bits != 8 else block_size  # a lazy group then lies in one block
    span = block_size if static else group_size  # columns that share one gather of their grids
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Hinv1, Err1 = W[i1:i2].clone(), Hinv[i1:i2, i1:i2], torch.empty(i2 - i1, out, device=W.device)
        for j1 in range(0, i2 - i1, span):  # block-local columns j1..j2
            j2 = min(j1 + span, i2 - i1)
            if not static:  # natural order, below 8 bits: the span is one group, whose grid is set now
                g = (i1 + j1) // group_size
                scales[:, g], zeros[:, g] = fit(W1[j1:j2].T, g)
            S = scales.T[group[i1 + j1:i1 + j2]]  # [span, out]: each column's scales (and zeros) as rows
            Z = [None] * (j2 - j1) if zeros is None else zeros.T[group[i1 + j1:i1 + j2]]
            for i, s, z in zip(range(j1, j2), S, Z):
                w = W1[i]
                Q[i1 + i] = q = quantize_values(w, s, z, bits)
                torch.div(w - dequantize_values(q, s, z), Hinv1[i, i], out=Err1[i])
                W1[i:].sub_(Hinv1[i, i:, None] * Err1[i])
        W[i2:].sub_((Err1.T.contiguous() @ Hinv[i1:i2, i2:]).T)  # the lazy update, as an [out, in] matmul
    Q = Q.T
    return (Q.index_select(1, torch.argsort(perm)) if act_order else Q).int(), scales, zeros


def _gptq(linear: nn.Linear, H: Tensor, config: GPTQConfig, P: Tensor | None = None) -> QuantLinear:
    """GPTQ of `linear` on the Hessian `H` of its inputs; of W + WP with `P` (see `float_target`). With
    `config.rotate`, of V = W·R/g on the Hessian R·H·R of the turned inputs x·R (R: `nn.rotate_groups`)."""
    group = _group(linear, config)
    weight = linear.weight if P is None else linear.weight + linear.weight.float() @ P
    if config.rotate:
        h = hadamard(group, H.device)
        weight, H = rotated_weight(weight, group), rotate_groups(rotate_groups(H, h).T, h)
    q, scales, zeros = gptq_quantize(weight, H, config.bits, group, config.act_order, config.damp,
                                     config.block_size, config.clip, config.grid)
    return QuantLinear.from_values(q, scales, zeros, linear.bias, config.bits, group, config.rotate)


# ---------------------------------------------------------------- GPTQ over the decoder
def _capture(model: nn.Module, calib: Tensor) -> tuple[Tensor, dict]:
    """Layer 0's hidden states and keyword arguments for all the calibration sequences; the model stops there."""
    captured = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "past_key_values"}))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(calib.to(next(model.parameters()).device), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def _gptq_layer(layer: nn.Module, hidden: Tensor, kwargs: dict, config: GPTQConfig,
                floats: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Quantize the layer's linears in one forward over all the calibration tokens; returns its output (and, with
    `config.asym`, the float layer's output on `floats`, the float model's hidden states).

    Each linear is quantized on the Hessian of its inputs when the forward reaches it, and the forward goes on
    with its quantized weights (dequantized into the float linear: the same weights, faster than the kernels on a
    CPU). So every linear sees the quantized outputs of those before it (true-sequential: o after q/k/v, gate/up
    after the attention, down after gate/up), and the output is the next layer's quantized input. Linears fed
    the very same tensor (q/k/v, gate/up) share one Hessian. With `config.asym` a float forward on `floats` first
    records each linear's float inputs, and GPTQ aims at the float outputs (see `float_target`).
    """
    inputs: dict[nn.Linear, Tensor] = {}  # each linear's inputs in the float model (config.asym)
    quantized: dict[nn.Linear, QuantLinear] = {}
    last: list = [None, None, None]  # the latest input tensor, its Hessian and its float_target

    def record(linear: nn.Linear, args: tuple) -> None:
        inputs[linear] = args[0]

    def quantize(linear: nn.Linear, args: tuple) -> None:
        if linear not in quantized:
            if args[0] is not last[0]:
                H = hessian(args[0])
                x = args[0][:len(inputs[linear])] if inputs else None  # the sequences the float stream runs on
                last[:] = args[0], H, None if x is None else float_target(x, inputs[linear], H)
            quantized[linear] = _gptq(linear, last[1], config, last[2])
            linear.weight.copy_(quantized[linear].dequantize())

    linears = _linears(layer)
    modules = [linear for _, _, linear in linears]
    if config.asym:  # in bfloat16 where it is native: a target 0.4% off float32's, for a third of its time
        native = policy(hidden.device).float_dtype == "bfloat16"
        with torch.autocast(hidden.device.type, torch.bfloat16, enabled=native):
            floats = _forward(layer, floats, kwargs, modules, record)
    out = _forward(layer, hidden, kwargs, modules, quantize)
    for parent, name, linear in linears:
        setattr(parent, name, quantized[linear])
    return out, floats


def _forward(layer: nn.Module, hidden: Tensor, kwargs: dict, linears: list[nn.Linear], hook) -> Tensor:
    """The layer's output on `hidden`, with `hook` as a forward pre-hook on each of `linears`."""
    handles = [linear.register_forward_pre_hook(hook) for linear in linears]
    try:
        out = layer(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _gptq_model(model: nn.Module, config: GPTQConfig, calib: Tensor) -> None:
    hidden, kwargs = _capture(model, calib)
    # the float model's hidden states, the target of config.asym, on the first ASYM_SHARE of the sequences
    floats = hidden[:math.ceil(ASYM_SHARE * len(hidden))] if config.asym else None
    for layer in tqdm(model.model.layers, desc=f"gptq{config.bits}", leave=False):
        hidden, floats = _gptq_layer(layer, hidden, kwargs, config, floats)
    if config.lm_head:
        _untie(model)
        x = model.model.norm(hidden)
        H = hessian(x)
        P = float_target(x[:len(floats)], model.model.norm(floats), H) if config.asym else None
        model.lm_head = _gptq(model.lm_head, H, config, P)
