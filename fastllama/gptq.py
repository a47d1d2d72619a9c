"""Weight-only quantization onto `QuantLinear`: GPTQ (Frantar et al. 2022), round-to-nearest, int8 weight-only.

    quantize_(model, GPTQConfig(bits=4, group_size=128), calib)   GPTQ, layer by layer over the decoder
    quantize_(model, RTNConfig(bits=4, group_size=128))           round-to-nearest, the baseline
    quantize_(model, Int8WeightOnlyConfig())                      per-channel symmetric int8, round-to-nearest

GPTQ follows the reference `fasterquant`: H = 2XXᵀ/n from the calibration inputs of each linear, dampened by
`damp` times its mean diagonal, inverted through Cholesky (upper factor of H⁻¹), and the columns quantized one
by one with their error spread over the columns not yet quantized, in lazy blocks. The grid is the kernels'
own (see `nn.quant_grid`): 2-, 3- and 4-bit asymmetric min-max per group of input channels (all three on the int4
kernel, see `nn.int_range`), 8-bit symmetric with one scale per output channel; so the weights GPTQ settles on are
exactly the kernel's integers and scales. `grid="q4_0"` /
`"q8_0"` targets GGUF's grids instead (see `nn.grid_for`), which the same kernels compute with exactly.

With `act_order`, columns are visited by decreasing Hessian diagonal but groups stay in natural column order
(the kernels need that): each group's grid is fixed up front from the unquantized weights ("static groups").
Without it, a group's grid is taken from the error-updated weights when GPTQ reaches its first column.

The decoder is processed one layer at a time: the inputs of layer 0 are captured from the calibration tokens,
each layer's Hessians come from its float forward, its linears are quantized, and its quantized forward gives
the next layer's inputs, so only one layer's activations are held. The embedding stays float. The output head
stays float too unless `lm_head=True`: it is then untied from the embedding and quantized on the final
hidden states (it is the largest matmul of small models, so CPU decode speed needs it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import check_calib
from .nn import QuantLinear, check_quant_config, dequantize_values, grid_for, int4_group_for, quantize_values

log = logging.getLogger(__name__)


@dataclass
class RTNConfig:
    """Round-to-nearest onto the kernels' grid."""

    bits: int = 4  # 2, 3, 4 (int4 kernel, groups; see nn.int_range) or 8 (int8 kernel, one scale per output channel)
    group_size: int = 128  # input channels per 4-bit scale/zero; per layer, the largest kernel group dividing it
    lm_head: bool = False  # also quantize the output head (untied from the embedding, which stays float)

    def __post_init__(self):
        check_quant_config(self.bits, self.group_size)


@dataclass
class Int8WeightOnlyConfig(RTNConfig):
    """int8 weight-only: round-to-nearest, symmetric, one scale per output channel (`_weight_int8pack_mm`)."""

    bits: int = field(default=8, init=False)  # always 8


@dataclass
class GPTQConfig(RTNConfig):
    """GPTQ onto the kernels' grid (see the module docstring)."""

    act_order: bool = False  # visit columns by decreasing Hessian diagonal (groups stay static, in natural order)
    damp: float = 0.01  # added to the Hessian diagonal, as a fraction of its mean
    block_size: int = 128  # columns per lazy block (raised to the group size when that is larger)
    batch_size: int = 8  # calibration sequences per forward pass
    grid: str = "kernel"  # kernel (the int4/int8 kernels' own), q4_0 (bits=4, group=32) or q8_0 (bits=8): GGUF's

    def __post_init__(self):
        super().__post_init__()
        fits = {"kernel": True, "q4_0": (self.bits, self.group_size) == (4, 32), "q8_0": self.bits == 8}
        if not fits.get(self.grid, False):
            raise ValueError(f"grid={self.grid!r} with bits={self.bits}, group={self.group_size}; valid: kernel "
                             "(any), q4_0 (bits=4, group=32: GGUF Q4_0), q8_0 (bits=8: GGUF Q8_0)")
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
    return QuantLinear.from_float(linear, config.bits, _group(linear, config))


def quantize_head_(model: nn.Module, config: RTNConfig) -> nn.Module:
    """Round-to-nearest of the output head alone, untied from the embedding (which stays float); returns `model`."""
    _untie(model)
    model.lm_head = _rtn(model.lm_head, config)
    return model


def _untie(model: nn.Module) -> None:
    """Give the head its own weight, so quantizing it leaves the (float) embedding alone."""
    if model.lm_head.weight is model.get_input_embeddings().weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False


# ---------------------------------------------------------------- GPTQ on one linear
class Hessian:
    """Running H = 2XXᵀ/n over the inputs of one linear (a forward hook)."""

    def __init__(self, linear: nn.Linear):
        self.H = torch.zeros(linear.in_features, linear.in_features, device=linear.weight.device)
        self.n = 0

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        x = args[0].reshape(-1, self.H.shape[0]).float()
        self.H *= self.n / (self.n + len(x))
        self.n += len(x)
        x = x * (2 / self.n) ** 0.5
        self.H += x.T @ x


def gptq_quantize(weight: Tensor, H: Tensor, bits: int, group_size: int, act_order: bool = False,
                  damp: float = 0.01, block_size: int = 128,
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
    ngroups = cols // group_size
    scales = torch.zeros(out, ngroups, device=W.device)
    zeros = torch.zeros(out, ngroups, device=W.device) if bits != 8 else None

    def set_grid(g: int, w: Tensor) -> None:
        scales[:, g], zero = grid_for(w, bits, grid)
        if zero is not None:
            zeros[:, g] = zero

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    if act_order or bits == 8:  # static grids from the unquantized weights (8-bit: one group, the whole row)
        for g in range(ngroups):
            set_grid(g, W[:, g * group_size:(g + 1) * group_size])
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W)
    block_size = max(block_size, group_size) if bits != 8 else block_size  # a lazy group then lies in one block
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if not act_order and bits != 8 and col % group_size == 0:
                set_grid(col // group_size, W1[:, i:i + group_size])
            g = col // group_size
            zero = None if zeros is None else zeros[:, g]
            q = quantize_values(W1[:, i], scales[:, g], zero, bits)
            Q[:, i1 + i] = q
            err = (W1[:, i] - dequantize_values(q, scales[:, g], zero)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].int(), scales, zeros


def _gptq(linear: nn.Linear, H: Tensor, config: GPTQConfig) -> QuantLinear:
    group = _group(linear, config)
    q, scales, zeros = gptq_quantize(linear.weight, H, config.bits, group, config.act_order, config.damp,
                                     config.block_size, config.grid)
    return QuantLinear.from_values(q, scales, zeros, linear.bias, config.bits, group)


# ---------------------------------------------------------------- GPTQ over the decoder
def _capture(model: nn.Module, calib: Tensor, batch_size: int) -> list[tuple[Tensor, dict]]:
    """Layer 0's (hidden states, keyword arguments) for each calibration batch; the model stops right there."""
    captured = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "past_key_values"}))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in calib.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _forward(layer: nn.Module, inputs: list[tuple[Tensor, dict]]) -> list[tuple[Tensor, dict]]:
    """The layer's outputs for each captured batch, paired with the same keyword arguments."""
    outs = []
    for hidden, kwargs in inputs:
        out = layer(hidden, **kwargs)
        outs.append((out[0] if isinstance(out, tuple) else out, kwargs))
    return outs


def _hessians(linears: list[tuple[nn.Module, str, nn.Linear]], run) -> list[Tensor]:
    """The Hessian of each linear's inputs while `run()` drives them."""
    hessians = [Hessian(linear) for _, _, linear in linears]
    handles = [linear.register_forward_hook(h) for (_, _, linear), h in zip(linears, hessians)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return [h.H for h in hessians]


@torch.no_grad()
def _gptq_model(model: nn.Module, config: GPTQConfig, calib: Tensor) -> None:
    inputs = _capture(model, calib, config.batch_size)
    for layer in tqdm(model.model.layers, desc=f"gptq{config.bits}", leave=False):
        linears = _linears(layer)
        hessians = _hessians(linears, lambda: _forward(layer, inputs))
        for (parent, name, linear), H in zip(linears, hessians):
            setattr(parent, name, _gptq(linear, H, config))
        inputs = _forward(layer, inputs)  # the next layer sees this layer's quantized outputs
    if config.lm_head:
        _untie(model)
        hessian = Hessian(model.lm_head)
        for hidden, _ in inputs:
            hessian(model.lm_head, (model.model.norm(hidden),), None)
        model.lm_head = _gptq(model.lm_head, hessian.H, config)
