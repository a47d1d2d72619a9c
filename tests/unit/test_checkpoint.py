"""save -> load is bit-identical for every kind of compressed model; bad directories are clear errors; no pickle."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

from fastllama.checkpoint import META_FILE, WEIGHTS_FILE, load, save
from fastllama.gptq import RTNConfig, quantize_
from fastllama.models import load_model
from fastllama.nn import QuantLinear
from fastllama.recipes import compress, parse_recipe

pytestmark = pytest.mark.unit

IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS.to(model.device)).logits


@pytest.mark.parametrize("recipe", [
    "rtn:bits=4,group=32",
    "int8wo",
    "gptq:bits=4,group=64,act_order=true,lm_head=true",
    "prune:input=0.3",
    "prune:output=0.1",
    "rtn:bits=4,group=32 + prune:input=0.25",
    "gptq:bits=8 + prune:input=0.35",
    "rtn:bits=4,group=64 + prune:output=0.2",
    "prune:mlp=0.25",
    "prune:heads=0.5",
    "drop:layers=1",
    "rtn4 + prune:mlp=0.5 + bf16",
    "gptq:bits=2,group=32",
    "rtn:bits=3,group=64 + prune:input=0.25",
])
def test_round_trip_is_bit_identical(tiny_model, tmp_path, recipe):
    compress(tiny_model, recipe, torch.randint(0, 512, (2, 16)))
    expected = logits(tiny_model)
    save(tiny_model, tmp_path, recipe=recipe)
    model, tokenizer = load(tmp_path)
    assert tokenizer is None
    assert torch.equal(logits(model), expected)
    assert str(model) == str(tiny_model)
    assert json.loads((tmp_path / META_FILE).read_text())["recipe"] == recipe


def test_2_and_3_bit_weights_are_stored_at_their_width(tiny_model, tmp_path):
    """Below 4 bits the integers are stored packed at their width (2-bit 4 a byte, 3-bit 8 in 3 bytes), so the file
    is smaller than the 4-bit one's by (4 - bits)/8 bytes a quantized weight, the grids being the same size."""
    from safetensors import safe_open

    sizes, weights = {}, 0
    for bits in (2, 3, 4):
        model = compress(copy.deepcopy(tiny_model), f"rtn:bits={bits},group=32")
        save(model, tmp_path / str(bits))
        quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        with safe_open(tmp_path / str(bits) / WEIGHTS_FILE, "pt") as f:
            for name, m in quantized.items():
                assert f.get_slice(f"{name}.qweight").get_shape() == [m.out_features, m.in_features * bits // 8]
        weights = sum(m.in_features * m.out_features for m in quantized.values())
        sizes[bits] = (tmp_path / str(bits) / WEIGHTS_FILE).stat().st_size
        assert torch.equal(logits(load(tmp_path / str(bits))[0]), logits(model))
    assert sizes[2] < sizes[3] < sizes[4]
    for bits in (2, 3):  # the safetensors headers differ only in a few digits of shapes and offsets
        assert abs(sizes[4] - sizes[bits] - weights * (4 - bits) // 8) < 1024


def test_steps_saved_at_load_are_applied_when_loading(tiny_model, tmp_path):
    """A checkpoint holds the model before its `at_load` steps (a bnb step: bitsandbytes quantizes at load) and
    applies them when loaded; `Recipe.split_at_load` splits a recipe so."""
    body, at_load = parse_recipe("rtn:bits=4,group=32 + bnb:type=nf4").split_at_load()
    assert str(body) == "rtn:bits=4,group=32,lm_head=false" and str(at_load) == "bnb:type=nf4"
    assert parse_recipe("gptq4").split_at_load()[1].steps == []
    save(tiny_model, tmp_path, recipe="int8wo:lm_head=false", at_load="int8wo:lm_head=false")  # any steps apply
    assert json.loads((tmp_path / META_FILE).read_text())["at_load"] == "int8wo:lm_head=false"
    model, _ = load(tmp_path)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    assert torch.equal(logits(model), logits(compress(tiny_model, "int8wo:lm_head=false")))


def test_a_linear_of_another_library_is_not_saved(tiny_model, tmp_path):
    class ForeignLinear(torch.nn.Linear):  # as bitsandbytes' layers subclass nn.Linear
        pass

    tiny_model.model.layers[0].mlp.up_proj = ForeignLinear(128, 256, bias=False)
    with pytest.raises(ValueError, match="cannot save model.layers.0.mlp.up_proj, a ForeignLinear: bitsandbytes "
                                         "quantizes at load, so save the model before its bnb step"):
        save(tiny_model, tmp_path)


def test_the_model_spec_of_a_saved_directory_loads_it(tiny_model, tmp_path):
    compress(tiny_model, "rtn4")
    save(tiny_model, tmp_path)
    model, _ = load_model(str(tmp_path))
    assert torch.equal(logits(model), logits(tiny_model))


def test_metadata_records_versions_and_per_layer_groups(tmp_path):
    """576 in_features with group 128: the fallback group (64) is recorded per layer."""
    model, _ = load_model("random:tiny")
    model.model.layers[0].mlp.up_proj = torch.nn.Linear(576, 256, bias=False)  # a 576-wide input, like SmolLM2's
    quantize_(model, RTNConfig(bits=4, group_size=128))
    save(model, tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert set(meta["versions"]) == {"fastllama", "torch", "transformers"}
    assert meta["modules"]["model.layers.0.mlp.up_proj"]["group_size"] == 64
    assert meta["modules"]["model.layers.0.mlp.gate_proj"]["group_size"] == 128


def test_tied_weights_are_stored_once_and_stay_tied(tiny_model, tmp_path):
    save(tiny_model, tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    model, _ = load(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tokenizer_is_saved_beside(tiny_model, tmp_path, embedded):
    _, tok = embedded
    save(tiny_model, tmp_path, tokenizer=tok)
    _, loaded = load(tmp_path)
    text = "The quick brown fox."
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]


def test_loading_never_unpickles(tiny_model, tmp_path, monkeypatch):
    compress(tiny_model, "rtn4 + prune:input=0.25")
    save(tiny_model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [META_FILE, WEIGHTS_FILE]

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(module, name, refuse)
    model, _ = load(tmp_path)
    assert torch.equal(logits(model), logits(tiny_model))


def test_missing_directory_and_files_are_named(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load(tmp_path / "nope")
    save(tiny_model, tmp_path)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_FILE} is missing"):
        load(tmp_path)
    (tmp_path / META_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{META_FILE} is missing"):
        load(tmp_path)


@pytest.mark.parametrize("file", [WEIGHTS_FILE, META_FILE])
def test_truncated_files_are_named(tiny_model, tmp_path, file):
    save(tiny_model, tmp_path)
    data = (tmp_path / file).read_bytes()
    (tmp_path / file).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{file}.*truncated"):
        load(tmp_path)


def test_mismatched_files_are_named(tmp_path):
    a, _ = load_model("random:tiny")
    b, _ = load_model("random:tiny")
    compress(a, "rtn4")
    compress(b, "prune:mlp=0.5")
    save(a, tmp_path / "a")
    save(b, tmp_path / "b")
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes((tmp_path / "b" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE} does not match .*{META_FILE}: .*Missing key"):
        load(tmp_path / "a")


def test_a_spec_it_cannot_build_says_so_not_different_saves(tiny_model, tmp_path):
    """A module type this version does not know is reported as that, with the failing name and both versions,
    not as the weights and the metadata coming from different saves."""
    save(tiny_model, tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    name = next(iter(meta["modules"]))
    meta["modules"][name] = {"type": "SparseLinear", "in_features": 1}
    meta["versions"]["fastllama"] = "9.9"
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    cause = r"saved by 9\.9\) cannot build: ValueError: unknown module type 'SparseLinear'"
    with pytest.raises(ValueError, match=cause) as e:
        load(tmp_path)
    assert "different saves" not in str(e.value)


def test_unknown_format_is_a_clear_error(tiny_model, tmp_path):
    save(tiny_model, tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    (tmp_path / META_FILE).write_text(json.dumps(meta | {"format": 99}))
    with pytest.raises(ValueError, match="format 99, this fastllama reads format 1"):
        load(tmp_path)


def test_load_onto_cuda_repacks(tiny_model, tmp_path, cuda):
    compress(tiny_model, "rtn:bits=4,group=32 + prune:input=0.25")
    save(tiny_model, tmp_path)
    model, _ = load(tmp_path, device=cuda)
    assert model.model.layers[0].self_attn.q_proj.inner.packed.is_cuda
    torch.testing.assert_close(logits(model).cpu(), logits(tiny_model), atol=0.05, rtol=0.05)
