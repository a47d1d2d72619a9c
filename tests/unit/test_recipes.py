"""Recipe text: presets, steps, round trips through str(), clear errors; compress applies the steps in order."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fastllama.gptq import GPTQConfig, Int8WeightOnlyConfig, RTNConfig
from fastllama.nn import PrunedInputLinear, QuantLinear
from fastllama.recipes import (PRESETS, BnbStep, CastStep, DropStep, HeadStep, PruneStep, Recipe, compress,
                               parse_recipe)

pytestmark = pytest.mark.unit


def test_presets_of_the_reference_study():
    auto = [HeadStep("auto"), CastStep("auto")]  # quantized presets finish by the hardware policy
    gptq4 = GPTQConfig(bits=4, group_size=128, act_order=True, clip=True, asym=True, rotate=True)  # spelled out
    gptq8 = GPTQConfig(bits=8, act_order=True, clip=False)
    assert parse_recipe("gptq4").steps == [gptq4, *auto]
    assert parse_recipe("gptq8").steps == [gptq8, *auto]
    assert parse_recipe("gptq4-prune-in10").steps == [gptq4, *auto, PruneStep("input", 0.10)]
    assert parse_recipe("gptq8-prune-in35").steps == [gptq8, *auto, PruneStep("input", 0.35)]
    assert parse_recipe("prune-out01").steps == [PruneStep("output", 0.01)]
    assert parse_recipe("int8wo").steps == [Int8WeightOnlyConfig(), *auto]
    assert parse_recipe("bf16").steps == [CastStep("bf16")]
    assert parse_recipe("drop:layers=3").steps == [DropStep(3)]
    assert parse_recipe("rtn4").steps == [RTNConfig(bits=4, group_size=128), *auto]


def test_older_gptq4_text_keeps_its_meaning():
    """gptq4 before asym and rotate was spelled without them: that text still makes the model it made (both off)."""
    older = parse_recipe("gptq:bits=4,group=128,act_order=true,clip=true").steps[0]
    assert older == GPTQConfig(bits=4, group_size=128, act_order=True, clip=True, asym=False, rotate=False)
    assert parse_recipe("gptq4").steps[0] == GPTQConfig(**{**vars(older), "asym": True, "rotate": True})


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_steps_follow_the_hardware_policy(tiny_model, monkeypatch, native, dtype):
    """On the CPU the head becomes int8 and the float parts bf16 only where bf16 is native; an explicit value wins."""
    from dataclasses import replace

    from fastllama import hardware

    real = hardware.machine
    monkeypatch.setattr(hardware, "machine", lambda device="cpu": replace(real(device), bf16_native=native,
                                                                           cpu_capability="AVX512"))
    compress(tiny_model, "rtn4")
    assert isinstance(tiny_model.lm_head, QuantLinear) and tiny_model.lm_head.bits == 8
    assert tiny_model.model.embed_tokens.weight.dtype == dtype
    assert tiny_model.model.layers[0].input_layernorm.weight.dtype == dtype
    compress(tiny_model, "cast:dtype=fp16")
    assert tiny_model.model.embed_tokens.weight.dtype == torch.float16


def test_avx2_dispatch_emulates_bf16_whatever_the_flags():
    """ATEN_CPU_CAPABILITY=avx2 on an AVX512-BF16 machine runs the AVX2 kernels: the policy then keeps float32."""
    from dataclasses import replace

    from fastllama.hardware import DEQUANT_ROWS, machine, policy

    m = replace(machine("cpu"), bf16_native=True, cpu_capability="AVX2")
    assert policy("cpu", m).float_dtype == "float32" and policy("cpu", replace(m, cpu_capability="AVX512")
                                                               ).float_dtype == "bfloat16"
    assert policy("cpu", m).head_bits == 8 and policy("cuda", replace(m, device="cuda:0")).head_bits is None
    # many-row int4/int8 matmuls dequantize once on every CPU, never on a GPU (its kernels do it well)
    assert policy("cpu", m).dequant_rows == DEQUANT_ROWS
    assert policy("cuda", replace(m, device="cuda:0")).dequant_rows is None
    # a decoder layer compiled once and reused on a CPU that compiles; every layer unrolled on a GPU (not measured)
    assert policy("cpu", m).compile_layers == policy("cpu", m).compile_step
    assert not policy("cuda", replace(m, device="cuda:0")).compile_layers


def test_steps_with_keys_and_presets_combined():
    recipe = parse_recipe("gptq:bits=4, group=64, act_order=true, lm_head=1 + prune:heads=0.25,importance=act + bf16")
    assert recipe.steps == [GPTQConfig(bits=4, group_size=64, act_order=True, lm_head=True),
                            PruneStep("heads", 0.25, "act"), CastStep("bf16")]
    assert recipe.needs_calibration
    assert not parse_recipe("rtn4 + prune:input=0.1").needs_calibration
    assert parse_recipe("drop:layers=1").needs_calibration


steps = st.one_of(
    st.builds(GPTQConfig, bits=st.sampled_from([2, 3, 4, 8]), group_size=st.sampled_from([32, 64, 128, 256]),
              act_order=st.booleans(), damp=st.floats(0.001, 0.5), lm_head=st.booleans(),
              grid=st.sampled_from(["kernel", "sym"]), clip=st.booleans(), asym=st.booleans()),
    st.builds(RTNConfig, bits=st.sampled_from([4, 8]), group_size=st.sampled_from([32, 256]), lm_head=st.booleans(),
              grid=st.sampled_from(["kernel", "sym"])),
    st.builds(Int8WeightOnlyConfig, lm_head=st.booleans()),
    st.builds(PruneStep, dim=st.sampled_from(["input", "output", "mlp", "heads"]), amount=st.floats(0, 0.99),
              importance=st.sampled_from(["l1", "act"])),
    st.builds(DropStep, layers=st.integers(0, 40)),
    st.builds(HeadStep, bits=st.sampled_from(["4", "8", "none", "auto"])),
    st.builds(CastStep, dtype=st.sampled_from(["bf16", "fp16", "fp32", "auto"])),
)
last_steps = st.lists(st.builds(BnbStep, type=st.sampled_from(["int8", "nf4"])), max_size=1)  # a bnb step comes last


@settings(max_examples=60, deadline=None)
@given(st.lists(steps, min_size=1, max_size=4), last_steps)
def test_text_round_trips(step_list, last):
    """str(recipe) is the full recipe text and parses back to the same steps (8-bit ignores its group)."""
    recipe = Recipe(step_list + last)
    again = parse_recipe(str(recipe))
    assert str(again) == str(recipe)
    for a, b in zip(again.steps, recipe.steps):
        if getattr(b, "bits", 4) == 8:
            a.group_size = b.group_size
        assert a == b


@pytest.mark.parametrize("text, message", [
    ("gptq5", "unknown recipe step 'gptq5'.*valid steps: gptq, rtn, int8wo, prune, drop, head, cast, bnb; "
              "presets: bf16, fp32, base, gptq4"),
    ("gptq:bits=5", "bits=5 is not supported; valid: 2, 3, 4"),
    ("gptq:group=100", "group_size=100 cannot be taken by the int4 kernel; valid: 32, 64, 128, 256"),
    ("gptq:bitz=4", "bad gptq argument 'bitz=4'; valid keys: bits=, group=, act_order=, damp=, lm_head="),
    ("gptq:bits", "bad gptq argument 'bits'"),
    ("gptq:bits=four", "gptq:bits: 'four' is not a valid int"),
    ("gptq:act_order=maybe", "not a valid bool; valid: true, false"),
    ("gptq:damp=0", "damp=0.0 must lie in"),
    ("prune:importance=act", "prune needs exactly one of input=AMOUNT, output=AMOUNT, mlp=AMOUNT, heads=AMOUNT"),
    ("prune:input=0.1,output=0.1", "prune needs exactly one of"),
    ("prune:input=1.5", r"outside \[0, 1\)"),
    ("prune:input=0.1,importance=wanda", "unknown importance 'wanda'; valid: l1, act"),
    ("drop", "'drop' is missing a value; valid keys: layers="),
    ("drop:layers=-1", "must be 0 or more"),
    ("cast:dtype=int3", "unknown dtype 'int3'; valid:"),
    ("", "empty recipe"),
    ("gptq4 + ", "unknown recipe step ''"),
])
def test_bad_recipes_are_clear_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_recipe(text)


def test_presets_below_4_bits_use_small_groups():
    auto = [HeadStep("auto"), CastStep("auto")]
    assert parse_recipe("gptq3").steps == [GPTQConfig(bits=3, group_size=64, asym=True, rotate=True), *auto]
    assert parse_recipe("gptq2").steps == [GPTQConfig(bits=2, group_size=32, asym=True, rotate=True), *auto]
    assert parse_recipe("rtn:bits=2,group=256").steps == [RTNConfig(bits=2, group_size=256)]


def test_peer_presets_load_through_bitsandbytes_last():
    auto = CastStep("auto")
    assert parse_recipe("bnb8").steps == [auto, BnbStep("int8")]
    assert parse_recipe("nf4").steps == [auto, BnbStep("nf4")]
    assert parse_recipe("drop4 + bnb:type=nf4").steps == [DropStep(4), BnbStep("nf4")]
    with pytest.raises(ValueError, match="a bnb step must come last"):
        parse_recipe("nf4 + prune:input=0.1")
    with pytest.raises(ValueError, match="bnb:type='int4'; valid: int8, nf4"):
        parse_recipe("bnb:type=int4")


def test_every_preset_parses():
    for name in PRESETS:
        assert parse_recipe(name).steps


def test_compress_quantizes_then_prunes(tiny_model):
    compress(tiny_model, "rtn:bits=4,group=32 + prune:input=0.25")
    q = tiny_model.model.layers[0].self_attn.q_proj
    assert isinstance(q, PrunedInputLinear) and isinstance(q.inner, QuantLinear)
    assert q.inner.in_features == 96  # three of four groups of 32 kept whole
    assert torch.isfinite(tiny_model(torch.randint(0, 512, (1, 8))).logits).all()


def test_compress_draws_calibration_when_needed(tiny_model, monkeypatch):
    """Without calib, a step that needs it gets fastllama.data.calibration(tokenizer, model=model)."""
    import fastllama.data

    calls = []

    def fake_calibration(tokenizer, model=None):
        calls.append((tokenizer, model))
        return torch.randint(0, 512, (2, 16))

    monkeypatch.setattr(fastllama.data, "calibration", fake_calibration)
    compress(tiny_model, "rtn4")
    assert not calls
    compress(tiny_model, "drop:layers=1", tokenizer="TOKENIZER")
    assert calls == [("TOKENIZER", tiny_model)]
    assert len(tiny_model.model.layers) == 1 and tiny_model.config.num_hidden_layers == 1


def test_compress_gptq8_then_drop(tiny_model):
    compress(tiny_model, "gptq:bits=8 + drop:layers=1", torch.randint(0, 512, (2, 16)))
    assert len(tiny_model.model.layers) == 1
    assert all(type(m) is not nn.Linear for m in tiny_model.model.layers.modules())


def test_drop4_int8wo_drops_the_closest_block_then_quantizes_the_rest(tiny_model):
    """The layer-pruning study's recipe: the 4 layers dropping removes are those of the float model, and every
    linear left is int8 weight-only on its float weight (within half a step), the head by the policy (int8 on a
    CPU, float on a GPU), the float parts in the policy's dtype."""
    from fastllama.drop import angular_distances
    from fastllama.hardware import policy
    from transformers import LlamaForCausalLM

    assert parse_recipe("drop4+int8wo").steps == [DropStep(4), Int8WeightOnlyConfig(), HeadStep("auto"),
                                                  CastStep("auto")]
    config = tiny_model.config
    config.num_hidden_layers = 6
    model = LlamaForCausalLM(config).eval()
    calib = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    start = int(angular_distances(model, calib, 4).argmin())
    kept = [layer for i, layer in enumerate(model.model.layers) if not start <= i < start + 4]
    floats = [{n: m.weight.detach().clone() for n, m in layer.named_modules() if type(m) is nn.Linear}
              for layer in kept]
    compress(model, "drop4+int8wo", calib)
    assert list(model.model.layers) == kept and model.config.num_hidden_layers == 2
    for layer, weights in zip(model.model.layers, floats):
        for name, w in weights.items():
            q = layer.get_submodule(name)
            assert isinstance(q, QuantLinear) and q.bits == 8
            assert ((q.dequantize() - w).abs() <= q.values()[1] / 2 * (1 + 2 ** -7)).all()  # half a bf16 step
    rule = policy(torch.device("cpu"))
    assert isinstance(model.lm_head, QuantLinear) == (rule.head_bits is not None)
    assert model.model.embed_tokens.weight.dtype == getattr(torch, rule.float_dtype)
    assert torch.isfinite(model(torch.randint(0, 512, (1, 8))).logits).all()


def test_cast_step(tiny_model):
    compress(tiny_model, "bf16")
    assert tiny_model.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("recipe", ["bf16", "gptq4", "fp32 + cast:dtype=fp16"])
def test_cast_keeps_the_rotary_frequencies_in_float32(tiny_model, recipe):
    """As in a model loaded in bfloat16: inv_freq (and every other rotary buffer) stays float32, so cos and sin are
    the float32 model's, rounded once to the model's dtype."""
    positions = torch.arange(2048)[None]
    ref_cos, _ = tiny_model.model.rotary_emb(torch.empty(0), positions)
    compress(tiny_model, recipe, torch.randint(0, 512, (2, 16)))
    rotary = tiny_model.model.rotary_emb
    assert {name: b.dtype for name, b in rotary.named_buffers()} == {"inv_freq": torch.float32,
                                                                     "original_inv_freq": torch.float32}
    dtype = tiny_model.model.embed_tokens.weight.dtype
    cos, _ = rotary(torch.empty(0, dtype=dtype), positions)
    assert torch.equal(cos, ref_cos.to(dtype))


# ---------------------------------------------------------------- the `fastllama compress` subcommand
def test_cli_compress_saves_a_loadable_model(tmp_path, capsys):
    from fastllama.checkpoint import load
    from fastllama.cli import main

    out = tmp_path / "m"
    assert main(["compress", "--model", "random:tiny", "--recipe", "rtn:bits=4,group=32 + prune:input=0.25",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rtn:bits=4,group=32,lm_head=false + prune:input=0.25,importance=l1:" in printed and "MB ->" in printed
    model, _ = load(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj.inner, QuantLinear)


def test_cli_compress_saves_a_bnb_recipe_to_quantize_at_load(tmp_path, capsys):
    bnb = pytest.importorskip("bitsandbytes", reason="needs bitsandbytes: pip install -e '.[peers]'")
    from fastllama.checkpoint import load, read_meta
    from fastllama.cli import main

    out = tmp_path / "m"
    assert main(["compress", "--model", "random:tiny", "--recipe", "nf4", "--out", str(out)]) == 0
    assert "cast:dtype=auto + bnb:type=nf4:" in capsys.readouterr().out
    assert read_meta(out)["at_load"] == "bnb:type=nf4"
    assert isinstance(load(out)[0].model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


def test_cli_compress_says_where_calibration_came_from(tmp_path, capsys, monkeypatch):
    """No hub and no --calib: the silent fallback to the model's own samples is printed and recorded."""
    from fastllama import data
    from fastllama.checkpoint import read_meta
    from fastllama.cli import main

    monkeypatch.setattr(data, "hub_reachable", lambda timeout=2.0: False)
    assert main(["compress", "--model", "random:tiny", "--recipe", "gptq:bits=8", "--nsamples", "2", "--seqlen", "8",
                 "--out", str(tmp_path / "m")]) == 0
    assert "calibration: 2 x 8 tokens from model samples" in capsys.readouterr().out
    assert read_meta(tmp_path / "m")["calibration"] == "model samples"


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "gptq:bits=5"], "bits=5 is not supported"),
    (["--recipe", "nonsense"], "unknown recipe step 'nonsense'"),
    (["--recipe", "gptq4", "--calib", "MISSING"], "needs a tokenizer"),
])
def test_cli_compress_bad_input_is_a_clean_error(tmp_path, capsys, argv, message):
    from fastllama.cli import main

    argv = [a.replace("MISSING", str(tmp_path / "missing.txt")) for a in argv]
    assert main(["compress", "--model", "random:tiny", "--out", str(tmp_path / "m"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastllama: error:") and message in err
    assert not (tmp_path / "m").exists()
