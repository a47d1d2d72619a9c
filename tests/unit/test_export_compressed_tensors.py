"""compressed-tensors export: round trips read back through transformers' compressed-tensors integration (the
`compressed-tensors` library's own decompression), and vLLM's constraints. The grid it needs (grid=sym) is tested
with the grids (test_nn_quant.py, test_gptq.py)."""

import copy
import json

import pytest
import torch
from torch import nn

from fastllama.export import export
from fastllama.export.compressed_tensors import check_vllm
from fastllama.nn import PrunedInputLinear, PrunedOutputLinear, QuantLinear
from fastllama.recipes import compress

pytestmark = pytest.mark.unit

SYM4 = "gptq:bits=4,group=64,grid=sym"


def _load(path, dtype):
    """The export as transformers loads it (compressed-tensors' decompression on its first forward)."""
    pytest.importorskip("compressed_tensors", reason="needs compressed-tensors: pip install 'fastllama[export]'")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _dense(module: nn.Module) -> torch.Tensor:
    """fastllama's Ŵ of a linear as a dense [out, in] matrix: pruned channels are zero."""
    inner = module.inner if isinstance(module, (PrunedInputLinear, PrunedOutputLinear)) else module
    w = inner.dequantize() if isinstance(inner, QuantLinear) else inner.weight.detach().float()
    if isinstance(module, PrunedInputLinear):
        return torch.zeros(w.shape[0], module.in_features).index_copy(1, module.keep, w)
    if isinstance(module, PrunedOutputLinear):
        return torch.zeros(module.out_features, w.shape[1]).index_copy(0, module.keep, w)
    return w


def _dequantized(model: nn.Module) -> nn.Module:
    """A copy of `model` whose QuantLinears are float linears holding Ŵ: fastllama's model without the kernels'
    bfloat16 activations."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, QuantLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=False)
                linear.weight.data, linear.bias = child.dequantize(), child.bias
                setattr(parent, name, linear)
    return model.float()


RECIPES = {  # recipe -> (bits, group) of the decoder's linears (None: float)
    "fp32": None,
    SYM4: (4, 64),
    "rtn:bits=4,group=128,grid=sym": (4, 128),
    "gptq:bits=8": (8, None),
    "rtn:bits=8": (8, None),
    "int8wo": (8, None),
    f"{SYM4} + prune:input=0.25": (4, 64),  # the MLPs fold to 192 channels: down_proj under Marlin's 128s
    "gptq:bits=8 + prune:input=0.25": (8, None),  # the same
    "prune:output=0.25": None,  # MLPs folded to different widths: padded to the widest
    "prune:mlp=0.5": None,
    "gptq:bits=8 + prune:heads=0.5": (8, None),  # o_proj keeps 64 input channels, under Marlin's 128
    "drop:layers=1": None,
    f"{SYM4},lm_head=true": (4, 64),
    f"{SYM4} + head:bits=8 + cast:dtype=bf16": (4, 64),  # two schemes; bfloat16 float parts
}
UNCHECKED = [r for r in RECIPES if "prune:input" in r or "prune:heads" in r]  # Marlin cannot run them: check=False


@pytest.mark.parametrize("recipe", RECIPES)
def test_round_trip_equals_fastllamas_model(tiny_model, tmp_path, recipe):
    """Decompressed weights EQUAL fastllama's Ŵ; logits agree with fastllama's model up to rounding.

    The export runs in float32 through transformers; fastllama's model with Ŵ in float32 linears (`_dequantized`)
    computes the same function in another summation order, so the two differ by at most the sum of their
    rounding errors. fastllama's is measured (against the same model in float64), the export's is of the same
    size (the same operations, in float32): 3x the measured error bounds their distance with room. A weight off
    by one quantization step, a permuted row or a lost pruned channel moves the logits by 1e-3 or more, 100x
    that bound."""
    model = compress(tiny_model, recipe, torch.randint(0, 512, (4, 64)))
    path = export(model, None, "compressed-tensors", tmp_path / "m", check=recipe not in UNCHECKED)
    config = json.loads((path / "config.json").read_text())
    ids = torch.randint(0, 512, (2, 48))
    theirs = _load(path, torch.float32)
    with torch.no_grad():
        got = theirs(ids).logits  # decompresses the weights first
        ref = _dequantized(model)
        ref32 = ref(ids).logits
        ref64 = ref.double()(ids).logits
    error = (ref32 - ref64).abs().max().item()
    assert 0 < error and (got - ref32).abs().max().item() <= 3 * error

    width = max(layer.mlp.down_proj.in_features for layer in model.model.layers)
    assert config["intermediate_size"] == width and config["num_hidden_layers"] == len(model.model.layers)
    assert config["num_key_value_heads"] == model.config.num_key_value_heads
    for i, layer in enumerate(model.model.layers):
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            want = _dense(layer.get_submodule(leaf))
            want = nn.functional.pad(want, (0, width - want.shape[1], 0, 0) if leaf == "mlp.down_proj" else
                                     (0, 0, 0, width - want.shape[0]) if leaf.startswith("mlp.") else (0, 0))
            assert torch.equal(theirs.model.layers[i].get_submodule(leaf).weight, want), f"{i}.{leaf}"
    assert torch.equal(theirs.model.embed_tokens.weight, model.model.embed_tokens.weight.float())
    assert torch.equal(theirs.lm_head.weight, _dense(model.lm_head))
    groups = config.get("quantization_config", {}).get("config_groups", {})
    if RECIPES[recipe] is None:
        assert not groups
    else:
        bits, group = RECIPES[recipe]
        assert {(g["weights"]["num_bits"], g["weights"]["group_size"]) for g in groups.values()} >= {(bits, group)}
        assert config["tie_word_embeddings"] == (type(model.lm_head) is nn.Linear
                                                 and model.lm_head.weight is model.model.embed_tokens.weight)


def test_bfloat16_scales_decompress_as_the_library_stores_them(tiny_model, tmp_path):
    """Loaded in bfloat16 (vLLM's dtype), compressed-tensors multiplies q by the bfloat16 scale in bfloat16: Ŵ
    rounded to bfloat16, exactly."""
    model = compress(tiny_model, SYM4, torch.randint(0, 512, (4, 64)))
    theirs = _load(export(model, None, "compressed-tensors", tmp_path / "m"), torch.bfloat16)
    with torch.no_grad():
        theirs(torch.zeros(1, 1, dtype=torch.long))
    want = model.model.layers[1].mlp.down_proj.dequantize().bfloat16()
    assert torch.equal(theirs.model.layers[1].mlp.down_proj.weight, want)


# ------------------------------------------------------------------------------------------------ refusals
def test_kernel_4bit_grid_is_refused(tiny_model, tmp_path):
    model = compress(tiny_model, "rtn:bits=4,group=64")
    with pytest.raises(ValueError, match="grid=sym"):
        export(model, None, "compressed-tensors", tmp_path / "m")


def test_rotated_linears_are_refused(tiny_model, tmp_path):
    """GPTQ with rotate=true (the gptq4 preset) turns each group of inputs by a Hadamard matrix, which the export
    does not write (compressed-tensors' transforms are left for later): refused, nothing written."""
    model = compress(tiny_model, "gptq:bits=4,group=128,grid=sym,rotate=true", torch.randint(0, 512, (4, 64)))
    with pytest.raises(ValueError, match="rotate=false"):
        export(model, None, "compressed-tensors", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_widths_below_4_bits_are_refused(tiny_model, tmp_path):
    model = compress(tiny_model, "rtn:bits=3,group=64,grid=sym")
    with pytest.raises(ValueError, match="3-bit weights have no form here"):
        export(model, None, "compressed-tensors", tmp_path / "m")


def test_fused_linears_need_one_scheme(tiny_model, tmp_path):
    attn = tiny_model.model.layers[0].self_attn
    attn.q_proj = QuantLinear.from_float(attn.q_proj, 4, 64, "sym")
    with pytest.raises(ValueError, match="layer 0: self_attn.q_proj, self_attn.k_proj, self_attn.v_proj"):
        export(tiny_model, None, "compressed-tensors", tmp_path / "m")


@pytest.mark.parametrize("tp,match", [
    (3, "num_attention_heads=4 is not divisible by tp=3"),
    # tp=4: q/k/v give each shard 32 + 32 + 32 rows (the 2 KV heads replicated), o_proj 128 / 4 input channels
    (4, "qkv: each of the 4 shards' output size, 96, is not a multiple of 64"),
    (4, "o_proj: each of the 4 shards' input size, 32, is not a multiple of 128"),
])
def test_what_vllm_cannot_run_at_tp_is_refused(tiny_model, tmp_path, tp, match):
    model = compress(tiny_model, "rtn:bits=4,group=64,grid=sym")
    with pytest.raises(ValueError, match=match):
        export(model, None, "compressed-tensors", tmp_path / "m", tp=tp)


def test_groups_marlin_does_not_take_are_refused(tiny_model, tmp_path):
    model = compress(tiny_model, "rtn:bits=4,group=256,grid=sym")  # down_proj (256 wide) gets 256, the rest 128
    with pytest.raises(ValueError, match="down_proj: group 256; Marlin takes groups of 32, 64, 128"):
        export(model, None, "compressed-tensors", tmp_path / "m")


def test_unchecked_export_warns_what_vllm_cannot_run(tiny_model, tmp_path, caplog):
    model = compress(tiny_model, "rtn:bits=8,grid=sym")
    path = export(model, None, "compressed-tensors", tmp_path / "m", tp=4, check=False)
    assert "vLLM at tp=4" in caplog.text and "o_proj: each of the 4 shards' input size, 32" in caplog.text
    assert json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]


def test_check_vllm_replicates_kv_heads_past_their_count(tiny_model):
    """At tp=4 each shard holds 1 of 4 query heads and a replica of 1 of the 2 KV heads (32 rows each): 96 rows;
    at tp=2, 2 query heads and 1 KV head each: 128 rows, a multiple of 64."""
    shapes = {f"model.layers.0.self_attn.{p}": (n, 128, (8, None)) for p, n in (("q_proj", 128), ("k_proj", 64),
                                                                                 ("v_proj", 64))}
    assert check_vllm(tiny_model.config, shapes, 2) == []
    assert check_vllm(tiny_model.config, shapes, 4) == [
        "model.layers.*.qkv: each of the 4 shards' output size, 96, is not a multiple of 64 (Marlin)"]


def test_cli_export_writes_a_compressed_tensors_directory(tmp_path):
    from fastllama.cli import main

    out = tmp_path / "tiny"
    args = ["export", "--model", "random:tiny", "--recipe", "rtn:bits=4,group=128,grid=sym", "--format",
            "compressed-tensors", "--out", str(out)]
    assert main(args + ["--tp", "4"]) == 2 and not out.exists()  # refused before anything is written
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 128
