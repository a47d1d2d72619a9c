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

import torch
from torch import Tensor, nn

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
    """The L1 norm of each input (dim=1) or output (dim=0) channel of a [out, in] weight, as ln_structured computes it."""
    return torch.norm(weight, p=1, dim=1 - dim)


def top_channels(score: Tensor, keep: int) -> Tensor:
    """The indices of the `keep` largest scores (torch.topk, as ln_structured), sorted ascending, as int64."""
    return torch.topk(score, k=keep, largest=True).indices.sort().values.to(torch.int64)


def top_blocks(score: Tensor, amount: float, block: int) -> Tensor:
    """Channel indices that keep whole blocks of `block` channels: a block scores the sum of its channels'
    scores, and `n_blocks - round(amount * n_blocks)` blocks survive. With block == 1 this is `top_channels`."""
    blocks = score.numel() // block
    kept = top_channels(score.reshape(blocks, block).sum(1), n_keep(blocks, amount))
    return (kept[:, None] * block + torch.arange(block, device=kept.device)).flatten()


def _check_prunable(linear: nn.Module) -> None:
    if not isinstance(linear, nn.Linear) and not hasattr(linear, "select"):
        raise ValueError(f"cannot prune a {type(linear).__name__}; valid: nn.Linear or QuantLinear")


def select(linear: nn.Module, dim: int, index: Tensor) -> nn.Module:
    """A smaller copy of an `nn.Linear` or `QuantLinear` keeping rows (dim=0) or columns (dim=1) `index`.

    The copy of an `nn.Linear` keeps its bias only when columns are selected (rows' biases stay with the caller).
    """
    _check_prunable(linear)
    if isinstance(linear, nn.Linear):
        weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
        out, inp = weight.shape
        keep_bias = dim == 1 and linear.bias is not None
        new = nn.Linear(inp, out, bias=keep_bias, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
            if keep_bias:
                new.bias.copy_(linear.bias)
        return new
    return linear.select(dim, index)


def _importance(linear: nn.Module, dim: int, importance: Tensor | None) -> Tensor:
    _check_prunable(linear)
    weight = linear.weight.detach() if isinstance(linear, nn.Linear) else linear.dequantize()
    score = l1_importance(weight, dim) if importance is None else importance.to(weight.device)
    if score.shape != (weight.shape[dim],):
        raise ValueError(f"importance has shape {tuple(score.shape)}; expected ({weight.shape[dim]},), "
                         f"one score per {'input' if dim else 'output'} channel")
    return score


@swap
class PrunedInputLinear(nn.Module):
    """`y = x[..., keep] @ W[:, keep].T + b`: a linear that keeps only some input channels.

    Equals `ln_structured(linear, "weight", amount, n=1, dim=1)` up to float rounding, holding only the kept
    columns. A `QuantLinear` stays quantized: whole `in_granularity` blocks of columns are kept (see `top_blocks`).
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
        block = getattr(linear, "in_granularity", 1)
        keep = top_blocks(score, amount, block)
        return cls(select(linear, 1, keep), keep, linear.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.index_select(-1, self.keep))

    def spec(self) -> dict:
        return {"in_features": self.in_features, "kept": self.keep.numel(), "inner": to_spec(self.inner)}

    @classmethod
    def from_spec(cls, spec: dict) -> PrunedInputLinear:
        return cls(from_spec(spec["inner"]), torch.zeros(spec["kept"], dtype=torch.int64), spec["in_features"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, kept={self.keep.numel()}, out_features={self.out_features}"


@swap
class PrunedOutputLinear(nn.Module):
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
        keep = top_channels(score, n_keep(linear.out_features, amount))
        return cls(select(linear, 0, keep), keep, linear.out_features, getattr(linear, "bias", None))

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x)
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

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, kept={self.keep.numel()}, out_features={self.out_features}"


# ------------------------------------------------------------------------------------------------ quantization
# QuantLinear goes below (register it with @swap so checkpoints can rebuild it from its spec).
