"""Structured pruning of a Llama decoder: per-linear (input or output channels) and coupled (MLP channels, heads).

- `dim="input"` / `"output"` swap each target linear for a `PrunedInputLinear` / `PrunedOutputLinear` that
  holds only the kept weights (the reference study's semantics; see fastllama.nn). The MLP then folds, exactly:
  intermediate channels that the swaps left without effect leave gate, up and down (see `_fold_mlp`).
- `dim="mlp"` removes the same intermediate channels from gate and up (rows) and down (columns), and
  `dim="heads"` removes whole KV groups (a k/v head and the q heads that share it) from q, k, v (rows) and
  o (columns), keeping the GQA ratio. The linears are simply smaller `nn.Linear`s (or `QuantLinear`s): nothing
  is gathered or scattered, the matmuls shrink and the config is updated, so transformers' forward, `generate`
  and checkpoints just work. Kept MLP channels are rounded to a multiple of MLP_MULTIPLE (see `mlp_keep_count`).

Importance of a channel:
- `l1`: the L1 norm of its weights, exactly as `ln_structured` (for coupled pruning, summed over every weight
  the channel owns: its gate and up rows and down column; its group's q, k, v rows and o columns).
- `act`: Wanda-style, |W| times the L2 norm of the input activation it multiplies, gathered with forward
  hooks over `calib` token ids: input channel j scores ||W[:, j]||_1 * ||X_j||, output row i scores
  sum_j |W_ij| * ||X_j||; an MLP channel scores its down_proj column that way, a KV group its o_proj columns.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data import check_calib, run_calibration
from .nn import (PrunedInputLinear, PrunedOutputLinear, check_amount, float_weight, is_prunable, n_keep, select,
                 top_blocks, top_channels, whole_blocks)

log = logging.getLogger(__name__)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the decoder's linears
DIMS = ("input", "output", "mlp", "heads")
IMPORTANCE = ("l1", "act")
MLP_MULTIPLE = 64  # kept MLP channels are rounded to a multiple of this (when the width is one) for fast kernels


@torch.no_grad()
def activation_norms(model: nn.Module, calib: Tensor, names: list[str], batch_size: int = 8) -> dict[str, Tensor]:
    """The L2 norm over all calibration tokens of each input channel of the named linears: {name: [in_features]}."""
    modules = dict(model.named_modules())
    sq: dict[str, Tensor] = {}

    def hook(name):
        def accumulate(_module, args):
            x = args[0].detach().float().flatten(0, -2)
            sq[name] = sq.get(name, 0) + x.square().sum(0)
        return accumulate

    run_calibration(model, calib, [modules[n].register_forward_pre_hook(hook(n)) for n in names], "activations",
                    batch_size)
    return {n: v.sqrt() for n, v in sq.items()}


def _score(weight: Tensor, dim: int, norm: Tensor | None) -> Tensor:
    """Per-channel importance of a [out, in] weight along `dim` (1: input columns, 0: output rows)."""
    w = weight.abs().float() if norm is None else weight.abs().float() * norm.to(weight.device)
    return w.sum(1 - dim)


# ------------------------------------------------------------------------------------------ per-linear
def _prune_linears(model: nn.Module, amount: float, dim: str, norms: dict[str, Tensor] | None,
                   names: list[str]) -> None:
    swap = PrunedInputLinear if dim == "input" else PrunedOutputLinear
    axis = 1 if dim == "input" else 0
    modules = dict(model.named_modules())
    for name in tqdm(names, desc=f"prune {dim}", leave=False):
        linear = modules[name]
        importance = None if norms is None else _score(float_weight(linear), axis, norms[name])
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, swap.from_linear(linear, amount, importance))


def _positions(keep: Tensor, index: Tensor) -> Tensor:
    """Where each of `index` sits in the ascending `keep` (every one of `index` is in `keep`)."""
    return torch.searchsorted(keep, index.to(keep.device))


def _fold_mlp(mlp: nn.Module) -> int | None:
    """Drop the intermediate channels that per-linear pruning left without effect, exactly: those whose down_proj
    column is pruned (input pruning), and those whose up row, or gate row where act(0) = 0, is pruned (output
    pruning, without biases). gate/up then compute fewer rows and down reads them directly: no down input gather,
    no gate/up output scatter, and fewer bytes than the per-linear swaps hold. Returns the kept width, or None
    where nothing folds (biases, no channel left at all, or a 4-bit down_proj whose kept columns are not whole
    groups)."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    act = getattr(mlp, "act_fn", None)
    act_kills = act is not None and float(act(torch.zeros(1))) == 0.0  # then a pruned gate row zeroes its channel
    if any(getattr(m, "bias", None) is not None for m in (gate, up)) or (
            isinstance(gate, PrunedOutputLinear) and not act_kills):
        return None
    width = down.in_features
    keep = torch.ones(width, dtype=torch.bool)
    for proj, kept_by in ((down, PrunedInputLinear), (gate, PrunedOutputLinear), (up, PrunedOutputLinear)):
        if isinstance(proj, kept_by):
            keep &= torch.zeros(width, dtype=torch.bool).index_fill_(0, proj.keep.cpu(), True)
    kept = keep.nonzero().flatten()
    if kept.numel() in (0, width):  # nothing to fold, or every channel: the swaps already compute the zero MLP
        return None
    if isinstance(down, PrunedInputLinear):
        cols, down_core = _positions(down.keep, kept), down.inner
    else:
        cols, down_core = kept, down.inner if isinstance(down, PrunedOutputLinear) else down
    block = getattr(down_core, "in_granularity", 1)  # a 4-bit down_proj selects whole groups of columns only
    if block > 1 and not whole_blocks(cols, block):
        return None
    new_down = down_core if cols.numel() == down_core.in_features else select(down_core, 1, cols)
    if isinstance(down, PrunedOutputLinear):
        new_down = PrunedOutputLinear(new_down, down.keep, down.out_features, down.bias)
    for name, proj in (("gate_proj", gate), ("up_proj", up)):
        if isinstance(proj, PrunedOutputLinear):
            new = select(proj.inner, 0, _positions(proj.keep, kept))
        elif isinstance(proj, PrunedInputLinear):
            new = PrunedInputLinear(select(proj.inner, 0, kept), proj.keep, proj.in_features)
        else:
            new = select(proj, 0, kept)
        setattr(mlp, name, new)
    mlp.down_proj, mlp.intermediate_size = new_down, kept.numel()
    return kept.numel()


# ------------------------------------------------------------------------------------------ coupled
def mlp_keep_count(width: int, amount: float) -> int:
    """Kept MLP channels: `width - round(amount * width)`, rounded to the nearest multiple of MLP_MULTIPLE
    (at least one multiple) when `width` is a multiple of it; else unrounded."""
    keep = n_keep(width, amount, "MLP channels")
    if width % MLP_MULTIPLE == 0:
        keep = max(MLP_MULTIPLE, round(keep / MLP_MULTIPLE) * MLP_MULTIPLE)
    return keep


def _prune_mlp(mlp: nn.Module, amount: float, norm: Tensor | None) -> int:
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    score = _score(float_weight(down), 1, norm)
    if norm is None:
        score = score + _score(float_weight(gate), 0, None) + _score(float_weight(up), 0, None)
    block = getattr(down, "in_granularity", 1)  # a quantized down_proj keeps whole groups of columns
    keep = top_blocks(score, max(1, mlp_keep_count(score.numel(), amount) // block), block)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = select(gate, 0, keep), select(up, 0, keep), select(down, 1, keep)
    mlp.intermediate_size = keep.numel()
    return keep.numel()


def _prune_heads(attn: nn.Module, amount: float, norm: Tensor | None, n_kv: int, head_dim: int) -> int:
    rep = attn.q_proj.out_features // head_dim // n_kv  # q heads per KV head
    score = _score(float_weight(attn.o_proj), 1, norm).view(n_kv, -1).sum(1)
    if norm is None:
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            score = score + _score(float_weight(proj), 0, None).view(n_kv, -1).sum(1)
    groups = top_channels(score, n_keep(n_kv, amount, "KV head groups"))
    kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim, device=groups.device)).flatten()
    q_rows = (groups[:, None] * rep * head_dim + torch.arange(rep * head_dim, device=groups.device)).flatten()
    attn.q_proj, attn.o_proj = select(attn.q_proj, 0, q_rows), select(attn.o_proj, 1, q_rows)
    attn.k_proj, attn.v_proj = select(attn.k_proj, 0, kv_rows), select(attn.v_proj, 0, kv_rows)
    return groups.numel()


# ------------------------------------------------------------------------------------------ entry point
def prune_model(model: nn.Module, amount: float, dim: str = "input", importance: str = "l1",
                calib: Tensor | None = None, targets: list[str] | tuple[str, ...] | None = None) -> nn.Module:
    """Prune `amount` of the channels of `model` in place and return it.

    dim: "input" / "output" (each target linear, see fastllama.nn), "mlp" (coupled intermediate channels) or
    "heads" (coupled KV groups). importance: "l1" or "act" (needs `calib`, LongTensor token ids [n, seqlen]).
    targets: leaf names of the linears for "input"/"output" (default TARGETS; add "lm_head" to prune it too).
    """
    check_amount(amount)
    if dim not in DIMS:
        raise ValueError(f"unknown pruning dim {dim!r}; valid: {', '.join(DIMS)}")
    if importance not in IMPORTANCE:
        raise ValueError(f"unknown importance {importance!r}; valid: {', '.join(IMPORTANCE)}")
    if importance == "act":
        check_calib(calib, "importance='act'")
    targets = tuple(TARGETS if targets is None else targets)
    leaf = {"input": targets, "output": targets, "mlp": ("down_proj",), "heads": ("o_proj",)}[dim]
    names = [n for n, m in model.named_modules() if n.rpartition(".")[2] in leaf and is_prunable(m)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layers named {', '.join(leaf)} to prune; "
                         f"pass targets= with the names of its linears")
    widths = _units(model, dim, targets)
    kept = [mlp_keep_count(n, amount) if dim == "mlp" else n - round(amount * n) for n in widths]
    if kept == widths:
        log.warning("prune:%s=%g removes nothing: every layer keeps all its units (%s of them; round(amount x n) "
                    "is 0, or the kernel rounding restores it); the smallest amount that removes one unit of the "
                    "widest layer is %.2g", dim, amount, "/".join(map(str, sorted(set(widths)))), 0.5 / max(widths))
    norms = activation_norms(model, calib, names) if importance == "act" else None
    modules, config = dict(model.named_modules()), getattr(model, "config", None)
    blocks = {name: modules[name.rpartition(".")[0]] for name in names}  # down_proj -> its mlp, o_proj -> attn
    if dim in ("input", "output"):
        _prune_linears(model, amount, dim, norms, names)
        mlps = [m for m in model.modules() if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj"))]
        widths = {_fold_mlp(mlp) for mlp in mlps}
        if len(widths) == 1 and None not in widths and config is not None:
            config.intermediate_size = widths.pop()
    elif dim == "mlp":
        kept = {_prune_mlp(mlp, amount, None if norms is None else norms[name]) for name, mlp in blocks.items()}
        config.intermediate_size = kept.pop()
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        n_kv, rep = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
        kept = {_prune_heads(attn, amount, None if norms is None else norms[name], n_kv, head_dim)
                for name, attn in blocks.items()}
        config.head_dim, config.num_key_value_heads = head_dim, kept.pop()
        config.num_attention_heads = config.num_key_value_heads * rep
    log.info("pruned %s by %.3g (%s importance)", dim, amount, importance)
    return model


def _units(model: nn.Module, dim: str, targets: tuple[str, ...]) -> list[int]:
    """What pruning along `dim` counts in each layer it prunes: input channels (whole groups of a 4-bit linear),
    output channels, MLP channels, or KV groups (of `config`)."""
    if dim == "heads":
        return [model.config.num_key_value_heads]
    leaf = ("down_proj",) if dim == "mlp" else targets
    linears = [m for n, m in model.named_modules() if n.rpartition(".")[2] in leaf and is_prunable(m)]
    return [m.out_features if dim == "output" else
            m.in_features // (getattr(m, "in_granularity", 1) if dim == "input" else 1) for m in linears]


def max_amount(model: nn.Module, dim: str, targets: list[str] | tuple[str, ...] | None = None) -> float:
    """The largest pruning amount along `dim` that leaves one unit of every layer it prunes (see `_units`)."""
    if dim not in DIMS:
        raise ValueError(f"unknown pruning dim {dim!r}; valid: {', '.join(DIMS)}")
    units = _units(model, dim, tuple(TARGETS if targets is None else targets))
    if not units:
        raise ValueError(f"{type(model).__name__} has no linear layers to prune along {dim}")
    n = min(units)
    return (n - 1) / n


def pruned_fraction(model: nn.Module) -> dict[str, dict[int, float]]:
    """The share of channels that per-linear pruning removed, by side and full width, from the kept counts of the
    PrunedInputLinear / PrunedOutputLinear modules: e.g. {"input": {576: 0.111}, "output": {}} for
    gptq4-prune-in10 on SmolLM2 (a 4-bit linear drops whole groups: 1 of 9, not 10%). An MLP whose pruned channels
    were folded away (see `_fold_mlp`) shows as a narrower `config.intermediate_size` instead."""
    counts: dict[str, dict[int, tuple[int, int]]] = {"input": {}, "output": {}}
    for m in model.modules():
        if isinstance(m, (PrunedInputLinear, PrunedOutputLinear)):
            side, width = ("input", m.in_features) if isinstance(m, PrunedInputLinear) else ("output", m.out_features)
            kept, total = counts[side].get(width, (0, 0))
            counts[side][width] = (kept + m.keep.numel(), total + width)
    return {side: {w: 1 - kept / total for w, (kept, total) in by.items()} for side, by in counts.items()}
