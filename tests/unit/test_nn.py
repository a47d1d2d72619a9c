"""The pruned linears against `torch.nn.utils.prune.ln_structured` on a copy (the masked nn.Linear)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from fastllama.nn import PrunedInputLinear, PrunedOutputLinear, add_linear, from_spec, linear, sqnr_db, to_spec

pytestmark = pytest.mark.unit

SWAPS = {1: PrunedInputLinear, 0: PrunedOutputLinear}  # ln_structured's dim -> the swap that equals it
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}


def sum_order_bound(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """How far two computations of `linear(x)` that differ only in summation order (and in exact zero terms) can
    lie apart, per output. With S = |x|·|W|ᵀ + |b|: a float32 dot product of n terms, bias add included, is within
    γ_n·S of the exact sum (γ_n = n·u / (1 - n·u), u = 2^-24, n = in + 1; Higham, Accuracy and Stability of
    Numerical Algorithms, 3.1), and both sides err, so 2·γ_n·S. Rounding the result to the dtype (u = 2^-8 for
    bfloat16, which accumulates in float32) happens at most three times between the two sides (the output pruned
    linear rounds its product, then its sum with the bias), each within u of a value no larger than S."""
    n, u32 = linear.in_features + 1, 2.0 ** -24
    bias = 0 if linear.bias is None else linear.bias.detach().float().abs()
    S = x.float().abs() @ linear.weight.detach().float().abs().T + bias
    return (2 * n * u32 / (1 - n * u32) + 3 * UNIT_ROUNDOFF[x.dtype]) * S


def _case(in_f, out_f, bias, dtype, ties, seed):
    """A linear (integer weights in -2..2 when `ties`, so many channels tie in L1) and its masked copy's maker."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear's init draws from the global generator: the example alone fixes the case
    linear = nn.Linear(in_f, out_f, bias=bias)
    if ties:
        with torch.no_grad():
            linear.weight.copy_(torch.randint(-2, 3, linear.weight.shape, generator=g).float())
    return linear.to(dtype), g


def _masked(linear, amount, dim):
    ref = copy.deepcopy(linear)
    prune.ln_structured(ref, "weight", amount, n=1, dim=dim)
    return ref


def _removes_all(linear, amount, dim):
    """Whether ln_structured's count (round(amount * n) pruned of n) leaves no channel along `dim`."""
    n = linear.weight.shape[dim]
    return n - round(amount * n) < 1


def _param_bytes(m):
    return sum(p.numel() * p.element_size() for p in m.parameters())


shapes = dict(in_f=st.integers(1, 300), out_f=st.integers(1, 300), batch=st.lists(st.integers(1, 3), max_size=3),
              amount=st.floats(0, 0.99), bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
              ties=st.booleans(), seed=st.integers(0, 2**16), dim=st.sampled_from([0, 1]))


@settings(max_examples=60, deadline=None)
@given(**shapes)
def test_equals_ln_structured(in_f, out_f, batch, amount, bias, dtype, ties, seed, dim):
    linear, g = _case(in_f, out_f, bias, dtype, ties, seed)
    if _removes_all(linear, amount, dim):
        with pytest.raises(ValueError, match="would remove all"):
            SWAPS[dim].from_linear(linear, amount)
        return
    pruned, ref = SWAPS[dim].from_linear(linear, amount), _masked(linear, amount, dim)
    # the same channels survive, ties included
    assert pruned.keep.tolist() == ref.weight_mask.any(dim=1 - dim).nonzero().flatten().tolist()
    x = torch.randn(*batch, in_f, generator=g).to(dtype)
    with torch.no_grad():
        y, y_ref = pruned(x), ref(x)
    assert y.shape == y_ref.shape and y.dtype == dtype
    excess = (y.float() - y_ref.float()).abs() - sum_order_bound(x, ref)
    assert excess.max() <= 0, f"off by {excess.max().item():.3g} beyond the summation-order bound"
    if dim == 0:  # pruned outputs are exactly the bias, or exactly zero
        dropped = torch.ones(out_f, dtype=torch.bool)
        dropped[pruned.keep] = False
        expect = linear.bias.detach()[dropped] if bias else torch.zeros(int(dropped.sum()), dtype=dtype)
        assert torch.equal(y[..., dropped], expect.expand_as(y[..., dropped]))


@settings(max_examples=40, deadline=None)
@given(**shapes)
def test_bytes_shrink_by_the_pruned_fraction(in_f, out_f, batch, amount, bias, dtype, ties, seed, dim):
    linear, _ = _case(in_f, out_f, bias, dtype, ties, seed)
    if _removes_all(linear, amount, dim):
        return
    pruned = SWAPS[dim].from_linear(linear, amount)
    w = linear.weight
    channel = w.numel() // w.shape[dim] * w.element_size()  # the bytes of one channel along dim
    bias_bytes = _param_bytes(linear) - w.numel() * w.element_size()
    expected = (1 - amount) * w.numel() * w.element_size() + bias_bytes
    assert abs(_param_bytes(pruned) - expected) <= channel


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_flow_like_the_mask(dim, bias):
    linear, g = _case(40, 24, bias, torch.float32, False, 0)
    pruned, ref = SWAPS[dim].from_linear(linear, 0.4), _masked(linear, 0.4, dim)
    x, x_ref = (torch.randn(3, 40, generator=g).requires_grad_() for _ in range(2))
    x_ref.data.copy_(x.data)
    pruned(x).square().sum().backward()
    ref(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(pruned.inner.weight.grad, ref.weight_orig.grad.index_select(dim, pruned.keep))
    if bias:
        b_grad = pruned.bias.grad if dim == 0 else pruned.inner.bias.grad
        torch.testing.assert_close(b_grad, ref.bias.grad)


@pytest.mark.parametrize("dim", [0, 1])
def test_spec_and_state_dict_round_trip(dim):
    linear, g = _case(64, 48, True, torch.float32, False, 1)
    pruned = SWAPS[dim].from_linear(linear, 0.25)
    rebuilt = from_spec(to_spec(pruned))
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.randn(2, 5, 64, generator=g)
    assert torch.equal(rebuilt(x), pruned(x))
    assert f"kept={pruned.keep.numel()}" in repr(pruned) and "in_features=64" in repr(pruned)


def test_importance_overrides_l1():
    linear = nn.Linear(8, 4, bias=False)
    score = torch.arange(8.0)  # keep the last channels, whatever their norms
    assert PrunedInputLinear.from_linear(linear, 0.5, importance=score).keep.tolist() == [4, 5, 6, 7]
    assert PrunedOutputLinear.from_linear(linear, 0.5, importance=-torch.arange(4.0)).keep.tolist() == [0, 1]


@pytest.mark.parametrize("amount", [-0.1, 1.0, 1.5, float("nan"), "0.1"])
def test_amount_outside_range_is_rejected(amount):
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        PrunedInputLinear.from_linear(nn.Linear(8, 4), amount)


def test_amount_that_removes_everything_is_rejected():
    with pytest.raises(ValueError, match="would remove all 3 output channels"):
        PrunedOutputLinear.from_linear(nn.Linear(8, 3), 0.9)


def test_importance_of_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"expected \(8,\)"):
        PrunedInputLinear.from_linear(nn.Linear(8, 4), 0.5, importance=torch.ones(4))


def test_non_linear_is_rejected():
    with pytest.raises(ValueError, match="cannot prune a Embedding"):
        PrunedInputLinear.from_linear(nn.Embedding(8, 4), 0.5)


# ------------------------------------------------------------------------------------------ a QuantLinear inside
@settings(max_examples=12, deadline=None)
@given(bits=st.sampled_from([4, 8]), group=st.sampled_from([32, 64]), groups=st.integers(1, 6),
       out_f=st.integers(1, 80), amount=st.floats(0, 0.9), dim=st.sampled_from([0, 1]), seed=st.integers(0, 99))
def test_pruning_a_quant_linear_keeps_it_quantized(bits, group, groups, out_f, amount, dim, seed):
    from fastllama.nn import QuantLinear

    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(group * groups, out_f, bias=False)
    q = QuantLinear.from_float(linear, bits, group)
    units = q.in_features // q.in_granularity if dim == 1 else out_f  # what pruning counts: blocks or rows
    if units - round(amount * units) < 1:
        with pytest.raises(ValueError, match="would remove all"):
            SWAPS[dim].from_linear(q, amount)
        return
    pruned = SWAPS[dim].from_linear(q, amount)
    assert isinstance(pruned.inner, QuantLinear) and pruned.inner.bits == bits
    block = q.in_granularity if dim == 1 else 1
    assert pruned.keep.numel() == (units - round(amount * units)) * block
    if dim == 1:  # whole, aligned groups (4-bit) or single columns (8-bit)
        assert (pruned.keep.view(-1, block) % block == torch.arange(block)).all()
    x = torch.randn(3, q.in_features, generator=g)
    mask = torch.zeros(q.in_features if dim == 1 else out_f, dtype=torch.bool)
    mask[pruned.keep] = True
    with torch.no_grad():
        y = pruned(x)
        ref = q(x * mask) if dim == 1 else q(x) * mask  # the parent with the pruned channels zeroed
    if dim == 0:
        assert not y[..., ~mask].any()
    if ref.abs().max() > 0:
        assert sqnr_db(ref, y) > 40  # same integers and scales: only the bf16 accumulation order differs
    if round(amount * units):  # the stored (portable) form shrinks
        assert _state_bytes(pruned.inner) < _state_bytes(q)


def _state_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("bias", [False, True])
def test_linear_on_the_cpu_fast_path_equals_the_module(bias, monkeypatch):
    import fastllama.nn as fnn

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(fnn, "ONEDNN", True)  # the oneDNN path, whatever this CPU's policy picks
    layer = nn.Linear(96, 40, bias=bias)
    x = torch.randn(2, 3, 96)
    with torch.no_grad():  # oneDNN: the same function up to rounding, not the module's own call
        y = linear(layer, x)
        torch.testing.assert_close(y, layer(x), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: pytest.fail("the module was called"))
    with torch.no_grad():
        assert torch.equal(linear(layer, x), y)  # it did not go through the module
    monkeypatch.undo()
    monkeypatch.setattr(fnn, "ONEDNN", True)
    assert torch.equal(linear(layer, x), layer(x))  # with autograd on, the module itself
    half = layer.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(linear(half, x.bfloat16()), half(x.bfloat16()))


@pytest.mark.parametrize("bias", [False, True])
def test_add_linear_adds_the_kept_outputs_into_the_residual(bias):
    layer = PrunedOutputLinear.from_linear(nn.Linear(64, 48, bias=bias), 0.25)
    x, h = torch.randn(2, 5, 48), torch.randn(2, 5, 64)
    with torch.no_grad():
        expect, got = x + layer(h), add_linear(x, layer, h)
    if bias:  # (x + y) + b instead of x + (y + b)
        torch.testing.assert_close(got, expect)
    else:  # the pruned outputs add exactly nothing, the kept ones the same values
        assert torch.equal(got, expect)
    plain = nn.Linear(64, 48)
    with torch.no_grad():
        torch.testing.assert_close(add_linear(x, plain, h), x + plain(h))
