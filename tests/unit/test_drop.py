"""drop_layers: angular distances, the block it removes, a consistent config and cache, generate afterwards."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from fastllama.drop import angular_distances, drop_layers
from fastllama.generate import generate

pytestmark = pytest.mark.unit

CALIB = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def deep(tiny_model):
    """random:tiny's shapes with 5 layers; layer 2 made an identity (no attention or MLP output)."""
    config = tiny_model.config
    config.num_hidden_layers = 5
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("n", [1, 2, 3])
def test_angular_distances_compare_last_token_states(deep, n):
    with torch.no_grad():
        states = deep(CALIB, output_hidden_states=True).hidden_states  # [i] enters layer i (the last is normed)
    h = torch.stack(states[:-1])[:, :, -1]
    cos = torch.nn.functional.cosine_similarity(h[:-n], h[n:], dim=-1)
    dist = angular_distances(deep, CALIB, n)
    assert dist.shape == (6 - n,) and ((0 <= dist) & (dist <= 1)).all()
    torch.testing.assert_close(dist[:-1], (torch.arccos(cos.clamp(-1, 1)) / torch.pi).mean(1), atol=1e-5, rtol=1e-4)


def test_drops_the_identity_layer_without_changing_the_output(deep):
    kept = [layer for i, layer in enumerate(deep.model.layers) if i != 2]
    before = _logits(deep)
    drop_layers(deep, 1, CALIB)
    assert list(deep.model.layers) == kept
    assert deep.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in deep.model.layers] == [0, 1, 2, 3]
    torch.testing.assert_close(_logits(deep), before, atol=1e-5, rtol=1e-5)


def test_layer_types_follow_the_layers(deep):
    deep.config.layer_types = [f"full_attention_{i}" for i in range(5)]
    drop_layers(deep, 2, CALIB)
    assert len(deep.config.layer_types) == 3 and len(deep.model.layers) == 3


@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_after_dropping(deep, cache):
    drop_layers(deep, 2, CALIB)
    out = deep.generate(IDS, max_new_tokens=6, do_sample=False, cache_implementation=cache, pad_token_id=0)
    assert out.shape == (1, 16)
    torch.testing.assert_close(out[0, 10:], _logits(deep, out[:, :-1])[0, 9:].argmax(-1))
    assert torch.equal(generate(deep, IDS, 6, compile=False), out)  # fastllama's static-cache decoder


def test_zero_layers_is_a_no_op(deep):
    layers = list(deep.model.layers)
    assert list(drop_layers(deep, 0, None).model.layers) == layers


@pytest.mark.parametrize("n", [5, 6, -1, 1.5, True])
def test_dropping_all_layers_or_a_bad_count_is_rejected(deep, n):
    with pytest.raises(ValueError, match=rf"cannot drop {n!r} layers of 5; valid: an integer from 0 to 4"):
        drop_layers(deep, n, CALIB)


def test_missing_calibration_is_rejected(deep):
    with pytest.raises(ValueError, match="drop_layers needs calib"):
        drop_layers(deep, 1, None)


def test_model_without_decoder_layers_is_rejected():
    with pytest.raises(ValueError, match="Linear has no decoder layers"):
        drop_layers(torch.nn.Linear(2, 2), 1, CALIB)


def test_cli_drop_reports_the_smaller_model(capsys):
    from fastllama.cli import main

    assert main(["drop", "--model", "random:tiny", "--layers", "1", "--nsamples", "2", "--seqlen", "8"]) == 0
    assert "drop:layers=1: 1.4 MB -> 0.9 MB" in capsys.readouterr().out


def test_cli_drop_all_layers_is_a_clean_error(capsys):
    from fastllama.cli import main

    assert main(["drop", "--model", "random:tiny", "--layers", "2", "--nsamples", "2", "--seqlen", "8"]) == 2
    assert "fastllama: error: cannot drop 2 layers of 2" in capsys.readouterr().err


def test_dropped_model_saves_and_loads_exactly(deep, tmp_path):
    from fastllama.checkpoint import load, save

    drop_layers(deep, 2, CALIB)
    save(deep, tmp_path, recipe="drop:layers=2")
    loaded, _ = load(tmp_path)
    assert len(loaded.model.layers) == loaded.config.num_hidden_layers == 3
    assert torch.equal(_logits(loaded), _logits(deep))
