"""QuantLinear on PyTorch's int4/int8 kernels: accuracy by SQNR, the portable state dict, select, bad shapes."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import fastllama.nn
from fastllama.nn import (DEQUANT_ROWS, GGUF_MIN_SCALE, INT4_GROUPS, PrunedInputLinear, QuantLinear, from_spec, fuse,
                          grid_for, hadamard, int4_group_for, quantize_values, rotate_groups, rotated_weight, sqnr_db,
                          to_spec)

pytestmark = pytest.mark.unit

# SQNR bounds, derived. A min-max grid of L steps over a range R rounds each weight with an error uniform over a step
# Δ = R / L, of variance Δ²/12; for N(0, σ²) weights the SQNR is 12 L² σ² / E[R²]. 2-, 3- and 4-bit are asymmetric per
# group of g inputs (R = max - min of the group, L = 2^bits - 1: 3, 7, 15); 8-bit symmetric per row of n inputs
# (R = 2 max|w|, L = 254). The kernel adds the bfloat16 rounding of its activations and output: measured 52.6 ± 0.3 dB
# against x @ Ŵ.T (400 seeds), whatever the grid. `expected_sqnr_db` combines both noises; over 1001 seeds per case the
# test's own estimate had means within 0.3 dB of it (4-bit g=32..256: 22.2, 21.0, 20.0, 19.2 dB; 8-bit 44.6 to 41.9 dB)
# and, with 64 activation rows, a standard deviation of at most 0.45 dB (16 outputs, the fewest). The uniform error
# holds with as few as 4 levels: over 150 seeds per case, 2-bit (g=32..256: 8.1, 6.9, 6.0, 5.2 dB) and 3-bit (15.5,
# 14.3, 13.4, 12.6 dB) means were within 0.3 dB of it too, standard deviations at most 0.27 dB. A bound 3 dB under the
# expectation is more than 6 standard deviations away: chance cannot break it, a grid off by one step does. The
# kernel's bound sits 6.6 dB (25 standard deviations) under its measured 52.6 dB.
# fastllama's own int4 kernel (groups of 64 or more, where it runs: `QuantLinear.own`) rounds the activations to int8
# instead: 44.1 dB against x @ Ŵ.T, its bound 38 dB (measured and derived in tests/unit/test_kernels.py).
MARGIN_DB = 3.0
KERNEL_NOISE = {False: 10 ** -5.26, True: 10 ** -4.41}  # each kernel's rounding as a noise-to-signal power ratio
KERNEL_SQNR_DB = 46.0


def kernel_sqnr_db(q: QuantLinear) -> float:
    """The bound on the SQNR of `q`'s kernel against x @ Ŵ.T: PyTorch's, or fastllama's where `q.own`."""
    return 38.0 if q.own else KERNEL_SQNR_DB


def expected_sqnr_db(bits: int, n: int, draws: int = 8192, own: bool = False) -> float:
    """Expected SQNR (dB) of the kernel's output for N(0, 1) weights on a min-max grid over `n` of them (a 2- to 4-bit
    group, or an 8-bit row): 12 L² / E[R²] from `draws` seeded samples of the range R, plus the kernel's rounding
    (fastllama's where `own`)."""
    w = torch.randn(draws, n, generator=torch.Generator().manual_seed(0))
    steps, width = (2 ** bits - 1, w.amax(1) - w.amin(1)) if bits != 8 else (254, 2 * w.abs().amax(1))
    noise = (width ** 2).mean().item() / (12 * steps ** 2)
    return -10 * math.log10(noise + KERNEL_NOISE[own])


def make_linear(in_features: int, out_features: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight, std=in_features ** -0.5)
    return linear


LEVELS = {2: (6, 9), 3: (4, 11), 4: (0, 15), 8: (-128, 127)}  # each width's integers on its kernel (see int_range)


def unpack_bitstream(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The values a row of bytes holds as one little-endian bit stream, `bits` bits each, read bit by bit."""
    stream = (packed.long()[..., None] >> torch.arange(8) & 1).flatten(1)  # bit k of a row is bit k % 8 of byte k // 8
    return (stream.view(packed.shape[0], -1, bits) << torch.arange(bits)).sum(-1)


layers = st.fixed_dictionaries({
    "bits": st.sampled_from([2, 3, 4, 8]),
    "group": st.sampled_from(INT4_GROUPS),
    "groups": st.integers(1, 3),
    "out": st.sampled_from([16, 48, 96]),
    "bias": st.booleans(),
    "seed": st.integers(0, 1000),
})


@settings(max_examples=20, deadline=None)
@given(layers)
# found by exploration (17.99 dB against the old, guessed bound of 18 dB; expected 19.2): 4-bit min-max in groups of
# 256 lands near 19 dB by its nature, so the bound is now derived (see expected_sqnr_db)
@example({"bits": 4, "group": 256, "groups": 1, "out": 16, "bias": False, "seed": 930})
def test_sqnr_against_float_and_dequantized(p):
    linear = make_linear(p["group"] * p["groups"], p["out"], p["bias"], p["seed"])
    q = QuantLinear.from_float(linear, p["bits"], p["group"])
    x = torch.randn(64, linear.in_features)
    with torch.no_grad():
        y, ref = q(x), linear(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    n = p["group"] if p["bits"] != 8 else linear.in_features  # the weights one grid spans
    assert sqnr_db(ref, y) > expected_sqnr_db(p["bits"], n, own=q.own) - MARGIN_DB  # a bias only adds signal
    assert sqnr_db(nn.functional.linear(x, q.dequantize(), linear.bias), y) > kernel_sqnr_db(q)


@pytest.mark.parametrize("bits", [4, 8])
def test_holds_only_integers_and_scales(bits):
    linear = make_linear(256, 64)
    q = QuantLinear.from_float(linear, bits, 64)
    assert not list(q.parameters())
    nbytes = sum(b.numel() * b.element_size() for b in q.buffers())
    float_bytes = linear.weight.numel() * 4
    assert nbytes < float_bytes * (0.16 if bits == 4 else 0.27)


@pytest.mark.parametrize("group", INT4_GROUPS)
def test_sym_grid_is_exact_for_the_int4_kernel_at_any_group(group):
    """The symmetric grid (zero 0, the largest magnitude on q = 0 unless the scale is raised to float16's floor)
    survives the int4 kernel's packing at every group it takes, scales exact in bfloat16 and float16, negative
    ones included."""
    w = torch.randn(32, 256) * torch.logspace(-6, 1, 32)[:, None]  # scales from below the fp16 normals to large
    d, zero = grid_for(w.view(32, -1, group), 4, "sym")
    assert torch.equal(d.bfloat16().float(), d) and torch.equal(d.half().float(), d)
    assert (d.abs() >= GGUF_MIN_SCALE).all()
    q = quantize_values(w.view(32, -1, group), d[..., None], zero[..., None], 4).flatten(1)
    top = w.view(32, -1, group).abs().argmax(-1, keepdim=True)
    free = d.abs() > GGUF_MIN_SCALE  # not raised to the float16 floor: the largest magnitude sits on q = 0
    assert free.any() and (q.view(32, -1, group).gather(-1, top).squeeze(-1)[free] == 0).all()
    q2, d2, zero2 = QuantLinear.from_values(q, d, zero, None, 4, group).values()
    assert torch.equal(q2, q.int()) and torch.equal(d2, d) and not zero2.any() and (d < 0).any()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grid_is_the_kernel_layout(bits):
    """dequantize() is (q - 8)·scale + zero per group (2 to 4 bits) or q·scale per row (8-bit), from the portable
    form: below 8 bits, `bits` bits a value in one bit stream per row (2-bit 4 a byte, 3-bit 8 in 3 bytes, 4-bit
    nibble pairs), holding q minus the lowest of its 2^bits levels around 8; a min-max grid uses every level."""
    q = QuantLinear.from_float(make_linear(128, 32), bits, 32)
    state = q.state_dict()
    scales = state["scales"].float().repeat_interleave(q.group_size, 1)
    lo, hi = LEVELS[bits]
    if bits != 8:
        assert state["qweight"].dtype == torch.uint8 and state["qweight"].shape == (32, 128 * bits // 8)
        values = unpack_bitstream(state["qweight"], bits).float() + lo
        expected = (values - 8) * scales + state["zeros"].float().repeat_interleave(q.group_size, 1)
        assert torch.equal(values, q.values()[0].float())
    else:
        values = state["qweight"].float()
        expected = values * scales
    torch.testing.assert_close(q.dequantize(), expected, rtol=0, atol=0)
    if bits != 8:  # each group's min and max land on its lowest and highest level
        groups = values.view(32, -1, q.group_size)
        assert (groups.amin(-1) == lo).all() and (groups.amax(-1) == hi).all()
    else:  # each row's largest magnitude lands on ±127
        assert (values.abs().amax(1) == hi).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_state_dict_round_trip_is_bit_identical(bits):
    q = QuantLinear.from_float(make_linear(128, 48, bias=True), bits, 64)
    fresh = from_spec(to_spec(q))
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), q(x))
    assert fresh.spec() == q.spec()


def test_load_state_dict_rejects_wrong_shapes():
    q = QuantLinear.from_float(make_linear(128, 48), 4, 64)
    other = QuantLinear.from_float(make_linear(128, 32), 4, 64)
    with pytest.raises(RuntimeError, match="size mismatch for qweight"):
        q.load_state_dict(other.state_dict())
    with pytest.raises(RuntimeError, match="Missing key"):
        q.load_state_dict({})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_activations_of_any_float_dtype(dtype):
    linear = make_linear(128, 32, bias=True)
    q = QuantLinear.from_float(linear, 4, 32).to(dtype)
    x = torch.randn(4, 128)
    y = q(x.to(dtype))
    assert y.dtype == dtype and q.bias.dtype == dtype
    assert sqnr_db(linear(x).detach(), y.float()) > expected_sqnr_db(4, 32) - MARGIN_DB - 3  # + the dtype's rounding


@settings(max_examples=10, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), seed=st.integers(0, 100))
def test_select_rows_and_whole_groups(bits, seed):
    linear = make_linear(256, 64, bias=True, seed=seed)
    q = QuantLinear.from_float(linear, bits, 64)
    w = q.dequantize()
    rows = torch.randperm(64)[:32].sort().values
    cols = torch.tensor([64 * g + i for g in (0, 2) for i in range(64)]) if bits != 8 else torch.arange(16, 53)
    by_rows, by_cols = q.select(0, rows), q.select(1, cols)
    assert torch.equal(by_rows.dequantize(), w[rows])
    assert torch.equal(by_cols.dequantize(), w[:, cols])
    assert torch.equal(by_rows.bias, q.bias[rows]) and torch.equal(by_cols.bias, q.bias)
    x = torch.randn(3, 256)
    assert torch.equal(by_rows(x), q(x)[:, rows])
    assert (by_cols.bits, by_cols.group_size) == (bits, 64 if bits != 8 else 37)  # 8-bit: one group, the row


def test_select_columns_rejects_partial_groups():
    q = QuantLinear.from_float(make_linear(128, 32), 4, 32)
    assert q.in_granularity == 32
    with pytest.raises(ValueError, match="whole groups of 32"):
        q.select(1, torch.arange(1, 33))
    with pytest.raises(ValueError, match="whole groups of 32"):
        q.select(1, torch.arange(16))


def test_int8_in_granularity_is_one_column():
    q = QuantLinear.from_float(make_linear(128, 32), 8)
    assert (q.in_granularity, q.group_size) == (1, 128)
    cols = torch.randperm(128)[:37].sort().values
    assert torch.equal(q.select(1, cols).dequantize(), q.dequantize()[:, cols])


@pytest.mark.parametrize("bits, shape", [(4, (64, 40)), (4, (96, 1)), (2, (64, 40)), (3, (96, 1)), (8, (100, 32)),
                                         (8, (37, 5))])
def test_shapes_the_kernels_cannot_take_are_padded(bits, shape):
    """int4 kernels need out_features, the int8 kernel in_features, divisible by 16: padded inside, invisibly."""
    linear = make_linear(*shape, bias=True)
    q = QuantLinear.from_float(linear, bits, 32)
    x = torch.randn(64, shape[0])
    assert q.dequantize().shape == linear.weight.shape
    assert sqnr_db(nn.functional.linear(x, q.dequantize(), linear.bias), q(x)) > kernel_sqnr_db(q)
    fresh = from_spec(to_spec(q))
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))


@pytest.mark.parametrize("bits, group, shape, message", [
    (5, 128, (128, 32), "bits=5 is not supported; valid: 2, 3, 4"),
    (16, 128, (128, 32), "valid: 2, 3, 4"),
    (4, 100, (128, 32), "group_size=100 cannot be taken by the int4 kernel; valid: 32, 64, 128, 256"),
    (4, 16, (128, 32), "valid: 32, 64, 128, 256"),
    (4, 128, (192, 32), "in_features=192 is not divisible by group_size=128; valid for this layer: 32, 64"),
])
def test_bad_configurations_are_clear_errors(bits, group, shape, message):
    with pytest.raises(ValueError, match=message):
        QuantLinear.from_float(make_linear(*shape), bits, group)


def test_group_fallback_picks_the_largest_dividing_group():
    assert int4_group_for(576, 128) == 64
    assert int4_group_for(1536, 128) == 128
    assert int4_group_for(4096, 32) == 32
    with pytest.raises(ValueError, match="multiple of 32"):
        int4_group_for(100, 128)


def test_cuda_int8_formulation_matches_the_cpu_kernel():
    """The 8-bit form every device but the CPU runs (`F.linear(x, q) * scales`, fused by inductor), run here on CPU
    tensors, equals the CPU's `_weight_int8pack_mm` up to bfloat16 rounding: both accumulate in float32, the linear
    form rounds twice (the dot product, then its product with the scale), so each output is within 2 ulps (2^-7)."""
    from fastllama.nn import _int8_linear

    q = QuantLinear.from_float(make_linear(576, 96, seed=3), bits=8)
    x = torch.randn(5, 576).to(torch.bfloat16)
    kernel = torch.ops.aten._weight_int8pack_mm(x, q.packed, q.scales)
    linear = _int8_linear(x, q.packed, q.scales)
    assert linear.dtype == kernel.dtype == torch.bfloat16
    torch.testing.assert_close(linear.float(), kernel.float(), rtol=2 ** -7, atol=0)
    assert sqnr_db(nn.functional.linear(x.float(), q.dequantize()), linear.float()) > KERNEL_SQNR_DB


UNPACK_CHECK = """
import sys
import torch
import fastllama.nn
from fastllama.nn import QuantLinear
if torch.backends.cpu.get_cpu_capability() != sys.argv[1]:
    sys.exit(3)  # this CPU cannot run that capability
for out in (16, 48, 80, 112, 144, 208):  # full and partial row blocks (64 rows on AVX512, 32 on AVX2)
    for cols in (32, 64, 96, 192, 256):
        q = torch.randint(0, 16, (out, cols), generator=torch.Generator().manual_seed(out * cols))
        module = QuantLinear.from_values(q, torch.rand(out, cols // 32), torch.rand(out, cols // 32), None, 4, 32)
        assert torch.equal(module.values()[0], q), (out, cols)
x = torch.randn(3, 576)
for bits in (4, 8):  # a Llama layer's q/k/v (576, 192, 192 rows: whole blocks) fuse on every capability
    parts = [QuantLinear.from_float(torch.nn.Linear(576, out, bias=False), bits, 64) for out in (576, 192, 192)]
    alone = torch.cat([p(x) for p in parts], -1)
    fused = fastllama.nn.fuse(parts)
    assert fused is not None and torch.equal(fused(x), alone), bits
block = fastllama.nn._int4_block(192)  # many rows: the int4 weight dequantized from this capability's packing
if block is not None:
    q = torch.randint(0, 16, (192, 128), generator=torch.Generator().manual_seed(0))
    module = QuantLinear.from_values(q, torch.rand(192, 4), torch.rand(192, 4), None, 4, 32)
    scales, zeros = (module.scales_and_zeros[..., i].float().contiguous() for i in (0, 1))
    dequantizer = fastllama.nn._int4_dequantizer((*module.packed.shape, *scales.shape, block, torch.float32))
    for bytes_ in (module.packed, module.packed.to(torch.int32)):  # eager, from the bytes or widened
        assert torch.equal(fastllama.nn._int4_weight_t(bytes_, scales, zeros, block), module.dequantize().T)
    assert torch.equal(dequantizer(module.packed, scales, zeros, block), module.dequantize().T)  # compiled
print(block)
"""
CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")


@pytest.mark.parametrize("capability", [c for c in CAPABILITIES if c != torch.backends.cpu.get_cpu_capability()])
def test_cpu_int4_packing_unpacks_exactly_on_other_cpu_capabilities(capability):
    """The CPU int4 layout differs by capability (ATEN_CPU_CAPABILITY picks it; this process's own is checked by
    the tests above): the unpacked integers are the packed ones, for full and partial row blocks, and a Llama
    layer's q/k/v fuse into one module that computes what they did."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower(), "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run([sys.executable, "-c", UNPACK_CHECK, capability], env=env, capture_output=True, text=True,
                          timeout=120)
    if done.returncode == 3:
        pytest.skip(f"this CPU cannot run {capability}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == {"AVX2": "32", "AVX512": "64"}.get(capability, done.stdout.split()[-1])


def _parts(bits: int, rows: list[int], seed: int) -> list[QuantLinear]:
    torch.manual_seed(seed)
    return [QuantLinear.from_float(nn.Linear(64, out, bias=False), bits, 32) for out in rows]


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.lists(st.sampled_from([16, 32, 48, 64, 128, 192]), min_size=2,
                                                          max_size=3), seed=st.integers(0, 1000))
def test_fused_parts_compute_what_they_did_alone(bits, rows, seed):
    """fuse: one kernel call gives every part's output side by side, bit for bit; each part still gives its own,
    now from a view of the fused integers (nothing held twice). Parts of whole 64-row blocks always fuse (the
    CPU int4 packing's largest block); others fuse only where the check on the integers allows, else stay as
    they were."""
    parts = _parts(bits, rows, seed)
    x = torch.randn(5, 64)
    alone, packed = [p(x) for p in parts], [p.packed for p in parts]
    fused = fuse(parts)
    assert fused is not None or (bits != 8 and any(r % 64 for r in rows[:-1]))
    if fused is None:
        assert all(p.packed is t for p, t in zip(parts, packed))
        return
    assert fused.out_features == sum(rows) and torch.equal(fused(x), torch.cat(alone, -1))
    assert all(torch.equal(p(x), y) for p, y in zip(parts, alone))
    assert all(p.packed.untyped_storage().data_ptr() == fused.packed.untyped_storage().data_ptr() for p in parts)


@pytest.mark.parametrize("why, parts", [
    ("one part", lambda: _parts(4, [64], 0)),
    ("widths differ", lambda: _parts(4, [64], 0) + _parts(8, [64], 0)),
    ("groups differ", lambda: _parts(4, [64], 0) + [QuantLinear.from_float(nn.Linear(64, 64, bias=False), 4, 64)]),
    ("inputs differ", lambda: _parts(4, [64], 0) + [QuantLinear.from_float(nn.Linear(96, 64, bias=False), 4, 32)]),
    ("a bias", lambda: _parts(4, [64], 0) + [QuantLinear.from_float(nn.Linear(64, 64), 4, 32)]),
    ("rotations differ", lambda: _parts(4, [64], 0) + [_rotated(64, 64, 4, 32, 0)]),
    ("padded rows", lambda: [QuantLinear.from_float(nn.Linear(64, 40, bias=False), 4, 32)] + _parts(4, [64], 0)),
    ("float", lambda: [nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)]),
    ("pruned", lambda: [PrunedInputLinear.from_linear(p, 0.5) for p in _parts(4, [64, 64], 0)]),
])
def test_what_cannot_fuse_is_left_alone(why, parts):
    parts = parts()
    held = lambda: [(name, id(t)) for p in parts for name, t in [*p.named_buffers(), *p.named_parameters()]]  # noqa: E731
    before = held()
    assert fuse(parts) is None, why
    assert held() == before


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([32, 64]), groups=st.integers(1, 3),
       out=st.sampled_from([16, 48, 64, 80, 128, 192]), extra=st.integers(0, 40), bias=st.booleans(),
       seed=st.integers(0, 1000))
def test_many_rows_dequantize_the_weight_once(bits, group, groups, out, extra, bias, seed):
    """From DEQUANT_ROWS rows on, the CPU dequantizes the weight once and runs one GEMM instead of the kernel: the
    result is x @ Ŵ.T up to the kernel's own rounding (the same bound), for every width, padded rows and a bias. A
    PyTorch int4 packing whose rows are not whole blocks (16, 48, 80 rows: the packing's blocks are 64 rows on
    AVX512, 32 on AVX2, with a last partial block in another form) goes to the kernel; fastllama's packing (groups of
    64, where its kernels run) is row by row and always dequantizes."""
    linear = make_linear(group * groups, out, bias, seed)
    q = QuantLinear.from_float(linear, bits, group)
    x = torch.randn(DEQUANT_ROWS + extra, linear.in_features)
    with torch.no_grad():
        y, ref = q(x), nn.functional.linear(x, q.dequantize(), linear.bias)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert sqnr_db(ref, y) > kernel_sqnr_db(q)
    assert (q._dequantized_matmul(x) is not None) == (bits == 8 or q.own or out % 64 == 0)


def test_a_large_weight_is_dequantized_a_slice_at_a_time(monkeypatch):
    """A weight larger than DEQUANT_BYTES (a large vocabulary's head) is dequantized in slices of whole blocks of
    rows, never whole; the result is the one-slice one."""
    linear = make_linear(64, 448)
    x = torch.randn(DEQUANT_ROWS, 64)
    for bits in (4, 8):
        q = QuantLinear.from_float(linear, bits, 32)
        whole, slices = q._dequantized_matmul(x), []
        dequantized_t = QuantLinear._dequantized_t

        def record(self, first, rows, block):
            slices.append(rows)
            return dequantized_t(self, first, rows, block)

        with monkeypatch.context() as patch:
            patch.setattr(QuantLinear, "_dequantized_t", record)
            patch.setattr(fastllama.nn, "DEQUANT_BYTES", 64 * 64 * fastllama.nn.DEQUANT_DTYPE.itemsize)
            torch.testing.assert_close(q._dequantized_matmul(x), whole)
        assert slices == [64] * 7, bits  # 64 rows of 64 inputs a slice: whole blocks of 64 (AVX512) or 32 (AVX2)


@settings(max_examples=20, deadline=None)
@given(blocks=st.integers(1, 14), groups=st.integers(1, 8), seed=st.integers(0, 1000))
def test_cpu_int4_packing_unpacks_exactly(blocks, groups, seed):
    """values() reads the CPU int4 packing back directly, for full and partial blocks of rows (multiples of 16)."""
    out, cols = 16 * blocks, 32 * groups
    q = torch.randint(0, 16, (out, cols), generator=torch.Generator().manual_seed(seed))
    module = QuantLinear.from_values(q, torch.rand(out, groups), torch.rand(out, groups), None, 4, 32)
    assert torch.equal(module.values()[0], q)
    assert torch.equal(module.state_dict()["qweight"], (q[:, ::2] | q[:, 1::2] << 4).to(torch.uint8))


def test_moving_a_loaded_4bit_model_never_reads_back_through_the_kernel(tiny_model, tmp_path, monkeypatch):
    """The load path onto a GPU (checkpoint.load on the CPU, then .to(device)) unpacks the CPU packing directly:
    neither values() nor the int4 kernel (reading an identity matrix back through it, O(in² · out)) runs.
    'meta' stands in for the GPU, as the repacking does not depend on the target."""
    from fastllama.checkpoint import load, save
    from fastllama.gptq import RTNConfig, quantize_

    save(quantize_(tiny_model, RTNConfig(bits=4, group_size=32)), tmp_path / "m")
    expect = {k: v.clone() for k, v in tiny_model.state_dict().items()}

    def forbidden(*args, **kwargs):
        raise AssertionError("the int4 values were read back through the kernel")

    monkeypatch.setattr(QuantLinear, "values", forbidden)
    monkeypatch.setattr(fastllama.nn, "_int4_mm", forbidden)
    model, _ = load(tmp_path / "m")
    moved = copy.deepcopy(model).to("meta")
    q = moved.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.packed.device.type == "meta"
    state = model.state_dict()  # the portable form, unpacked on the CPU: what .to() repacks
    assert all(torch.equal(state[k], v) for k, v in expect.items())


def test_cuda_kernel_matches_cpu(cuda):
    """`.to("cuda")` repacks for tinygemm (2 to 4 bits) and the fused linear form (8-bit): the same integers and
    scales, the same outputs up to the kernels' bfloat16 rounding, compared with a CPU copy made before the move
    (Module.to moves in place and returns the module itself)."""
    for bits in (2, 3, 4, 8):
        on_cpu = QuantLinear.from_float(make_linear(576, 64, bias=True), bits, 64)
        state = on_cpu.state_dict()
        on_gpu = copy.deepcopy(on_cpu).to(cuda)
        assert on_gpu.packed.is_cuda and not on_cpu.packed.is_cuda
        x = torch.randn(5, 576)
        assert sqnr_db(on_cpu(x), on_gpu(x.to(cuda)).cpu()) > kernel_sqnr_db(on_cpu)
        for k, v in on_gpu.state_dict().items():
            assert torch.equal(v.cpu(), state[k])
        back = copy.deepcopy(on_gpu).to("cpu")
        assert torch.equal(back(x), on_cpu(x))


# ------------------------------------------------------------ rotate: inputs turned by a Hadamard matrix per group
def _rotated(cols: int, out: int, bits: int, group: int, seed: int, bias: bool = False) -> QuantLinear:
    """A rotated QuantLinear of random integers on a random grid (V; its weight in the inputs' basis is V·R)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = LEVELS[bits]
    q = torch.randint(lo, hi + 1, (out, cols), generator=gen)
    scales, zeros = torch.rand(out, cols // group, generator=gen) + 0.1, torch.randn(out, cols // group, generator=gen)
    return QuantLinear.from_values(q, scales, zeros, torch.randn(out, generator=gen) if bias else None, bits, group,
                                   rotate=True)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_hadamard_is_symmetric_orthogonal_up_to_n_and_plus_minus_one(n):
    h = hadamard(n)
    assert torch.equal(h, h.T) and torch.equal(h @ h, n * torch.eye(n)) and torch.equal(h.abs(), torch.ones(n, n))


@pytest.mark.parametrize("n", [0, 3, 96])
def test_hadamard_of_a_size_not_a_power_of_2_is_refused(n):
    with pytest.raises(ValueError, match="power-of-2"):
        hadamard(n)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), group=st.sampled_from([32, 64, 128]), groups=st.integers(1, 3),
       out=st.sampled_from([16, 64, 128]), rows=st.sampled_from([1, 5, DEQUANT_ROWS + 3]), bias=st.booleans(),
       seed=st.integers(0, 1000))
# found by exploration (45.94 dB against 46): one call of one row gave 16 outputs, too few for the bound, derived on
# 64 rows (see KERNEL_SQNR_DB); calls of `rows` rows now add up to 64 rows or more
@example(bits=2, group=32, groups=2, out=16, rows=1, bias=True, seed=499)
def test_a_rotated_linear_computes_with_its_weight_in_the_inputs_basis(bits, group, groups, out, rows, bias, seed):
    """y = (x·R)·Vᵀ + b = x·Ŵᵀ + b with Ŵ = V·R (`dequantize`), on the kernel (calls of few rows) and dequantized
    (many), up to the kernel's own rounding; Ŵ is V turned group by group (R·R = g·I undoes it)."""
    q = _rotated(group * groups, out, bits, group, seed, bias)
    plain = QuantLinear.from_values(*q.values(), q.bias, bits, group)  # V itself, on the inputs as they come
    v, w = plain.dequantize(), q.dequantize()
    torch.testing.assert_close(w, rotate_groups(v, hadamard(group)))
    torch.testing.assert_close(rotated_weight(w, group), v)
    x = torch.randn(-(-64 // rows) * rows, group * groups)
    with torch.no_grad():
        y = torch.cat([q(part) for part in x.split(rows)])
    assert sqnr_db(nn.functional.linear(x, w, q.bias), y) > kernel_sqnr_db(q)


def test_a_rotated_linear_round_trips_selects_and_fuses():
    """The rotation is part of the spec (checkpoints rebuild it; specs from before it read as unrotated), survives
    `select` of rows and of whole groups, and fuses only with rotated parts, bit for bit."""
    q = _rotated(128, 64, 4, 32, 0)
    x = torch.randn(3, 128)
    assert to_spec(q)["rotate"] is True and "rotate" not in to_spec(QuantLinear(128, 64, 4, 32))
    loaded = from_spec(to_spec(q))
    loaded.load_state_dict(q.state_dict())
    assert loaded.rotate and torch.equal(loaded(x), q(x))
    rows, cols = torch.arange(0, 64, 2), torch.arange(32, 96)
    torch.testing.assert_close(q.select(0, rows)(x), q(x)[:, rows])
    assert sqnr_db(x[:, cols] @ q.dequantize()[:, cols].T, q.select(1, cols)(x[:, cols])) > kernel_sqnr_db(q)
    parts = [_rotated(128, 64, 4, 32, seed) for seed in (1, 2)]
    alone = [p(x) for p in parts]
    fused = fuse(parts)
    assert fused.rotate and torch.equal(fused(x), torch.cat(alone, -1))
    assert len({p.hadamard.data_ptr() for p in (q, loaded, *parts, fused)}) == 1  # one matrix, counted once


def test_rotate_needs_groups():
    with pytest.raises(ValueError, match="rotate=true needs bits below 8"):
        QuantLinear(64, 16, bits=8, rotate=True)
