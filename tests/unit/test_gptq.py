"""GPTQ, round-to-nearest and int8 weight-only: reconstruction error, the model walk, the head flag, bad input."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fastllama.gptq import GPTQConfig, Int8WeightOnlyConfig, RTNConfig, gptq_quantize, quantize_
from fastllama.nn import QuantLinear, dequantize_values, quant_grid, quantize_values

pytestmark = pytest.mark.unit


def correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    """Activations with correlated channels and a few large ones, as in a transformer (what GPTQ exploits)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=gen) / features ** 0.5 + torch.eye(features)
    scale = torch.ones(features)
    scale[torch.randperm(features, generator=gen)[:3]] = 8.0
    return (torch.randn(n, features, generator=gen) @ mix) * scale


def rtn(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    w = weight.reshape(weight.shape[0], -1, group)
    scale, zero = quant_grid(w, bits)
    zero = None if zero is None else zero[..., None]
    return dequantize_values(quantize_values(w, scale[..., None], zero, bits), scale[..., None], zero).flatten(1)


def reconstruction(weight, q, scales, zeros, group, x) -> float:
    """‖WXᵀ − ŴXᵀ‖ of GPTQ's integers and grid on the inputs x."""
    expand = lambda t: None if t is None else t.repeat_interleave(group, 1)  # noqa: E731
    w_hat = dequantize_values(q.float(), expand(scales), expand(zeros))
    return torch.linalg.norm(x @ (weight - w_hat).T).item()


@settings(max_examples=12, deadline=None)
@given(bits=st.sampled_from([4, 8]), group=st.sampled_from([32, 64]), groups=st.integers(2, 4),
       out=st.sampled_from([16, 32, 64]), act_order=st.booleans(), seed=st.integers(0, 10_000))
def test_gptq_reconstructs_better_than_rtn(bits, group, groups, out, act_order, seed):
    features = group * groups
    torch.manual_seed(seed)
    weight = torch.randn(out, features) / features ** 0.5
    x = correlated_inputs(4 * features, features, seed)
    H = 2 * x.T @ x / len(x)
    g = group if bits == 4 else features
    q, scales, zeros = gptq_quantize(weight, H, bits, g, act_order=act_order)
    assert q.shape == weight.shape and scales.shape == (out, features // g)
    assert (zeros is None) == (bits == 8)
    lo, hi = (0, 15) if bits == 4 else (-128, 127)
    assert q.min() >= lo and q.max() <= hi
    gptq_err = reconstruction(weight, q, scales, zeros, g, x)
    rtn_err = torch.linalg.norm(x @ (weight - rtn(weight, bits, g)).T).item()
    assert gptq_err < rtn_err


def test_dead_inputs_are_quantized_to_their_zero():
    """A column whose input is always zero (H diagonal 0) is set to zero before quantization, as in the reference."""
    weight = torch.randn(16, 64)
    x = torch.randn(256, 64)
    x[:, 5] = 0
    q, scales, zeros = gptq_quantize(weight, 2 * x.T @ x, 4, 32)
    assert torch.isfinite(scales).all() and torch.isfinite(zeros).all()


def calib(n: int = 4, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, 512, (n, seqlen))


@pytest.mark.parametrize("config", [GPTQConfig(bits=4, group_size=64), GPTQConfig(bits=8, act_order=True),
                                    RTNConfig(bits=4, group_size=32), Int8WeightOnlyConfig()],
                         ids=["gptq4", "gptq8-act", "rtn4", "int8wo"])
def test_quantize_swaps_every_decoder_linear(tiny_model, config):
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        ref = tiny_model(ids).logits
    quantize_(tiny_model, config, calib())
    swapped = [m for m in tiny_model.model.layers.modules() if isinstance(m, QuantLinear)]
    assert len(swapped) == 7 * len(tiny_model.model.layers)
    assert not any(type(m) is nn.Linear for m in tiny_model.model.layers.modules())
    assert all(m.bits == config.bits for m in swapped)
    assert type(tiny_model.lm_head) is nn.Linear  # the head stays float (and tied) by default
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight
    with torch.no_grad():
        out = tiny_model(ids).logits
    assert torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9


@pytest.mark.parametrize("config", [GPTQConfig(bits=4, group_size=128, lm_head=True),
                                    Int8WeightOnlyConfig(lm_head=True)])
def test_lm_head_flag_unties_and_quantizes_the_head(tiny_model, config):
    embedding = tiny_model.model.embed_tokens.weight.detach().clone()
    quantize_(tiny_model, config, calib())
    assert isinstance(tiny_model.lm_head, QuantLinear) and tiny_model.lm_head.bits == config.bits
    assert tiny_model.config.tie_word_embeddings is False
    assert torch.equal(tiny_model.model.embed_tokens.weight, embedding)  # the embedding stays float, untouched


def test_group_falls_back_to_one_dividing_in_features(caplog):
    """576 (the embedded model's hidden size) is not divisible by 128: 64 is used, and logged."""
    layer = nn.Linear(576, 32)
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([nn.Sequential(layer)])
    with caplog.at_level(logging.INFO, logger="fastllama.gptq"):
        quantize_(model, RTNConfig(bits=4, group_size=128))
    assert model.model.layers[0][0].group_size == 64
    assert "in_features=576 is not divisible by group_size=128: used group_size=64 (1 linears)" in caplog.text


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=5), "bits=5 is not supported; valid: 2, 3, 4"),
    (dict(bits=4, group_size=100), "group_size=100 cannot be taken by the int4 kernel; valid: 32, 64, 128, 256"),
    (dict(damp=0.0), "damp=0.0 must lie in"),
])
def test_bad_configs_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTQConfig(**kwargs)


def test_int8wo_is_always_8_bit():
    assert Int8WeightOnlyConfig().bits == 8
    with pytest.raises(TypeError):
        Int8WeightOnlyConfig(bits=4)


@pytest.mark.parametrize("bad", [None, torch.zeros(0, 8, dtype=torch.long), torch.zeros(8, dtype=torch.long)])
def test_gptq_without_calibration_is_a_clear_error(tiny_model, bad):
    with pytest.raises(ValueError, match="GPTQ needs calibration token ids"):
        quantize_(tiny_model, GPTQConfig(), bad)


def test_unknown_config_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="valid: GPTQConfig, RTNConfig, Int8WeightOnlyConfig"):
        quantize_(tiny_model, {"bits": 4})


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_below_4_bits_stays_within_its_levels_and_beats_rtn(bits, act_order):
    """At 2 and 3 bits GPTQ rounds onto the 2^bits levels around 8 of the int4 kernel's grid (6..9, 4..11) and, on
    correlated inputs, reconstructs the layer's outputs better than round-to-nearest on the same groups."""
    features, group, out = 128, 32, 32
    for seed in range(4):
        torch.manual_seed(seed)
        weight = torch.randn(out, features) / features ** 0.5
        x = correlated_inputs(4 * features, features, seed)
        H = 2 * x.T @ x / len(x)
        q, scales, zeros = gptq_quantize(weight, H, bits, group, act_order=act_order)
        lo, hi = {2: (6, 9), 3: (4, 11)}[bits]
        assert q.min() >= lo and q.max() <= hi
        gptq_err = reconstruction(weight, q, scales, zeros, group, x)
        assert gptq_err < torch.linalg.norm(x @ (weight - rtn(weight, bits, group)).T).item()


def test_gptq3_on_a_model_holds_3_bit_linears(tiny_model):
    quantize_(tiny_model, GPTQConfig(bits=3, group_size=32), calib())
    swapped = [m for m in tiny_model.model.layers.modules() if isinstance(m, QuantLinear)]
    assert len(swapped) == 7 * len(tiny_model.model.layers) and all(m.bits == 3 for m in swapped)
    assert all(4 <= m.values()[0].min() and m.values()[0].max() <= 11 for m in swapped)
