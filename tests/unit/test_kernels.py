"""fastllama's CPU kernels: their arithmetic exactly, their error by SQNR, the int4 packing, bad input, a failed
build."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastllama import kernels
from fastllama.nn import sqnr_db

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not kernels.available(), reason="fastllama's kernels do not run here "
                                 "(no AVX2, or no C++ compiler: see the log)")]

# Measured for int4 over 200 seeds per case (groups of 64 to 256, 1 to 3 groups, 48 rows, N(0, 1) activations):
# 44.1 dB against x @ Ŵ.T, standard deviation at most 0.28 dB; the int8 rounding of N(0, 1) activations in blocks of 64
# alone predicts 45.3 dB (12·127² / E[max|x|²]), whatever the weight (int8 weights: 44.2-45.7 dB at the model's
# shapes). The bound sits 6 dB (over 20 standard deviations) under the measurement.
KERNEL_SQNR_DB = 38.0


def weight(n: int, k: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random integers q [n, k] in 0..15 and a random bfloat16 grid [n, k/group, 2] (scale, zero)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen)
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3
    zeros = torch.randn(n, k // group, generator=gen) * 0.02
    return q, torch.stack([scales, zeros], -1).to(torch.bfloat16)


def dequantize(q: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """Ŵ = (q - 8)·s + z in float64."""
    s, z = (sz[..., i].double().repeat_interleave(q.shape[1] // sz.shape[1], 1) for i in (0, 1))
    return (q - 8).double() * s + z


def quantized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] as the kernels round it: blocks [M, K/64, 64], their int8 values and scales [M, K/64, 1] (absmax / 127),
    in float64 from the kernels' own float32 steps (x · (127 / absmax), rounded half to even), so that no value
    rounds the other way."""
    blocks = x.float().unflatten(-1, (-1, 64))
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0).div(amax), 0)  # a true division (`127 / t` multiplies by 1 / t)
    xq = torch.round(blocks * inv)
    return blocks.double(), xq.double(), (amax / 127).double()


def kernel_formula(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """What the int4 kernel computes, in float64: x rounded to int8 in blocks of 64, multiplied by the integers q - 8
    exactly, each block's sum scaled by s·d, plus z times the block's exact float sum."""
    blocks, xq, d = quantized(x)
    group = q.shape[1] // sz.shape[1]
    s, z = (sz[..., i].double().repeat_interleave(group // 64, 1) for i in (0, 1))  # [n, blocks]
    qb = (q - 8).double().unflatten(-1, (-1, 64))  # [n, blocks, 64]
    dots = torch.einsum("mbk,nbk->mnb", xq, qb)  # exact: integers below 2^53
    return (dots * d[..., 0][:, None] * s + blocks.sum(-1)[:, None] * z).sum(-1)


def int8_formula(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What the int8 kernel computes, in float64: each 64-block's exact integer dot product times d, summed, times
    the row's scale."""
    _, xq, d = quantized(x)
    dots = torch.einsum("mbk,nbk->mnb", xq, w.double().unflatten(-1, (-1, 64)))
    return (dots * d[..., 0][:, None]).sum(-1) * scales.double()


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), n=st.sampled_from([4, 16, 96, 964]), groups=st.integers(1, 3),
       group=st.sampled_from([64, 128, 256]), seed=st.integers(0, 1000))
def test_the_kernel_computes_its_formula(rows, n, groups, group, seed):
    """The int4 kernel's output equals its formula computed in float64 (float32 accumulation only: 1e-5 of the
    norm), for any number of rows and row blocks, groups and group size."""
    k = group * groups
    q, sz = weight(n, k, group, seed)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 1))
    y = kernels.int4_matmul(x, kernels.pack(q), sz.contiguous(), group)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    exact = kernel_formula(x, q, sz)
    assert (y.double() - exact).norm() <= 1e-5 * exact.norm()


@pytest.mark.parametrize("group", [64, 128, 256])
@pytest.mark.parametrize("seed", range(3))
def test_the_error_is_the_activations_rounding(group, seed):
    """Against x @ Ŵ.T, on 64 rows and 48 outputs (as measured: see KERNEL_SQNR_DB), both kernels."""
    q, sz = weight(48, 2 * group, group, seed)
    x = torch.randn(64, 2 * group, generator=torch.Generator().manual_seed(seed + 1))
    y = kernels.int4_matmul(x, kernels.pack(q), sz, group)
    assert sqnr_db(x.double() @ dequantize(q, sz).T, y.double()) > KERNEL_SQNR_DB
    w, scales = (q - 8).to(torch.int8), sz[:, 0, 0].contiguous()
    y = kernels.int8_matmul(x, w, scales)
    assert sqnr_db(x.double() @ (w.double() * scales.double()[:, None]).T, y.double()) > KERNEL_SQNR_DB


def test_zero_and_bfloat16_activations():
    """An all-zero block quantizes to zeros (no division by zero); bfloat16 activations are read as float32."""
    q, sz = weight(16, 128, 64, 0)
    x = torch.randn(2, 128)
    x[0, :64] = 0
    y = kernels.int4_matmul(x, kernels.pack(q), sz, 64)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), kernel_formula(x, q, sz), rtol=0, atol=1e-5 * y.abs().max().item())
    xb, packed = x.to(torch.bfloat16), kernels.pack(q)
    assert torch.equal(kernels.int4_matmul(xb, packed, sz, 64), kernels.int4_matmul(xb.float(), packed, sz, 64))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5), n=st.sampled_from([4, 16, 96, 964]), blocks=st.integers(1, 24),
       seed=st.integers(0, 1000))
def test_the_int8_kernel_computes_its_formula(rows, n, blocks, seed):
    """PyTorch's int8 layout (int8 rows, a bfloat16 scale each, -128 included) through the int8 kernel: its formula
    in float64 up to float32 accumulation."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (n, 64 * blocks), generator=gen, dtype=torch.int8)
    scales = (torch.rand(n, generator=gen) * 0.02 + 1e-3).to(torch.bfloat16)
    x = torch.randn(rows, 64 * blocks, generator=gen)
    y = kernels.int8_matmul(x, w, scales)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    exact = int8_formula(x, w, scales)
    assert (y.double() - exact).norm() <= 1e-5 * exact.norm()


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40), blocks=st.integers(1, 6), seed=st.integers(0, 1000))
def test_pack_round_trips(n, blocks, seed):
    """Each 64 values in 32 bytes, byte j holding value j (low nibble) and value j + 32 (high)."""
    q = torch.randint(0, 16, (n, 64 * blocks), generator=torch.Generator().manual_seed(seed))
    packed = kernels.pack(q)
    assert packed.dtype == torch.uint8 and packed.shape == (n, 32 * blocks)
    assert torch.equal(packed[:, 5] & 15, q[:, 5].to(torch.uint8))
    assert torch.equal(packed[:, 5] >> 4, q[:, 37].to(torch.uint8))
    assert torch.equal(kernels.unpack(packed), q.to(torch.uint8))


def test_compiled_call_equals_eager():
    """A compiled function calls the operator as one opaque node (its shape from the registered fake): same result."""
    q, sz = weight(32, 128, 64, 1)
    packed, x = kernels.pack(q), torch.randn(1, 128)
    f = lambda x: kernels.int4_matmul(x * 2, packed, sz, 64) + 1  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x), rtol=0, atol=0)


@pytest.mark.parametrize("call, message", [
    (lambda q, sz, x: kernels.int4_matmul(x, kernels.pack(q)[:, :-32], sz, 64), "packed must be contiguous uint8"),
    (lambda q, sz, x: kernels.int4_matmul(x, kernels.pack(q), sz.float(), 64), "scales_and_zeros must be bfloat16"),
    (lambda q, sz, x: kernels.int4_matmul(x, kernels.pack(q), sz, 96), "needs G % 64 == 0"),
    (lambda q, sz, x: kernels.int4_matmul(x, kernels.pack(q[:6]), sz[:6], 64), "N % 4 == 0"),
    (lambda q, sz, x: kernels.int4_matmul(x[:, :96], kernels.pack(q), sz, 64), "K a multiple of 64"),
    (lambda q, sz, x: kernels.int8_matmul(x, q.to(torch.int8), sz[:, 0, 0].float()), "scales must be bfloat16 \\[N\\]"),
    (lambda q, sz, x: kernels.int8_matmul(x, q.to(torch.int8).T, sz[:, 0, 0]), "weight must be contiguous int8"),
])
def test_bad_input_is_a_clear_error(call, message):
    q, sz = weight(8, 128, 64, 2)
    with pytest.raises(RuntimeError, match=message):
        call(q, sz, torch.randn(1, 128))


def test_a_failed_build_falls_back_to_aten(tmp_path):
    """Where the build fails (CXX a command that fails) and the cache is empty, the kernel is unavailable, a warning
    says why and how to fix it, the policy records PyTorch's kernel, and a 4-bit layer runs on it."""
    script = ("import logging; logging.basicConfig(); import torch; from fastllama import kernels\n"
              "from fastllama.hardware import policy; from fastllama.nn import QuantLinear\n"
              "q = QuantLinear.from_float(torch.nn.Linear(128, 16, bias=False), 4, 64)\n"
              "print(kernels.available(), policy('cpu').cpu_kernels, q.own, tuple(q(torch.randn(1, 128)).shape))")
    env = os.environ | {"CXX": "false", "FASTLLAMA_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "aten", "False", "(1,", "16)"]
    assert "CPU kernels could not be built" in out.stderr and "set CXX to a C++ compiler" in out.stderr
