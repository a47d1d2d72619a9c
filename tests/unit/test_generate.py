"""fastllama.generate: the static-cache decoder is token-identical to Hugging Face `generate` (greedy) on float,
quantized, pruned, coupled-pruned and layer-dropped models, and rejects bad input clearly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastllama.drop import drop_layers
from fastllama.generate import Decoder, generate
from fastllama.gptq import Int8WeightOnlyConfig, RTNConfig, quantize_
from fastllama.models import load_model
from fastllama.nn import select
from fastllama.prune import prune_model

pytestmark = pytest.mark.unit


def _sharp(model):
    """random:tiny with larger weights, so greedy decoding wanders over the vocabulary instead of repeating a token."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def _hf(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Plain greedy `generate` for exactly `new` tokens, with no EOS (`eos_token_id=[]`): min_new_tokens would mask
    the EOS logit, so where EOS is the argmax (token 2 of random:tiny) transformers would pick the runner-up."""
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, eos_token_id=[],
                              do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def sharp():
    model, _ = load_model("random:tiny", dtype=torch.float32)
    return _sharp(model)


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 3), prompt=st.integers(1, 24), new=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_float_matches_hf_generate(sharp, batch, prompt, new, seed):
    ids = torch.randint(0, 512, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    out = generate(sharp, ids, new)
    assert out.shape == (batch, prompt + new)
    assert torch.equal(out, _hf(sharp, ids, new))


def test_output_is_not_degenerate(sharp):
    """Guards the comparisons above: the tokens vary, so agreement means something."""
    out = generate(sharp, torch.randint(0, 512, (1, 8)), 16)
    assert out[0, 8:].unique().numel() > 4


def _heads_in_layer0(model):
    """Keep one of two KV groups in layer 0 only: the layers' KV caches then differ in shape."""
    attn = model.model.layers[0].self_attn
    hd = attn.head_dim
    kv, q = torch.arange(hd), torch.arange(2 * hd)
    attn.q_proj, attn.o_proj = select(attn.q_proj, 0, q), select(attn.o_proj, 1, q)
    attn.k_proj, attn.v_proj = select(attn.k_proj, 0, kv), select(attn.v_proj, 0, kv)
    return model


COMPRESSIONS = {
    "rtn4": lambda m: quantize_(m, RTNConfig(bits=4, group_size=32)),
    "rtn4-head": lambda m: quantize_(m, RTNConfig(bits=4, group_size=32, lm_head=True)),
    "int8wo": lambda m: quantize_(m, Int8WeightOnlyConfig()),
    "prune-input": lambda m: prune_model(m, 0.25, "input"),
    "prune-output": lambda m: prune_model(m, 0.1, "output"),
    "prune-mlp": lambda m: prune_model(m, 0.5, "mlp"),
    "prune-heads": lambda m: prune_model(m, 0.5, "heads"),
    "rtn4+prune-input": lambda m: prune_model(quantize_(m, RTNConfig(bits=4, group_size=32)), 0.25, "input"),
    "drop": lambda m: drop_layers(m, 1, torch.randint(0, 512, (2, 16))),
}


@pytest.mark.parametrize("name", COMPRESSIONS)
def test_compressed_matches_hf_generate(tiny_model, name):
    model = COMPRESSIONS[name](_sharp(tiny_model))
    ids = torch.randint(0, 512, (2, 10))
    assert torch.equal(generate(model, ids, 12), _hf(model, ids, 12))


def _full_greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding without any cache: the whole sequence through the model for every token."""
    with torch.inference_mode():
        for _ in range(new):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_cache_is_sized_per_layer(tiny_model):
    """Layer 0 keeps 1 of 2 KV heads: its cache has 1 head, layer 1's has 2 (StaticCache would give both 2).

    The reference is cache-free greedy decoding: HF `generate` itself mis-decodes this model in a batch.
    """
    model = _heads_in_layer0(_sharp(tiny_model))
    decoder = Decoder(model, max_len=22, batch_size=2)
    assert [tuple(k.shape) for k, _ in decoder.cache] == [(2, 1, 22, 32), (2, 2, 22, 32)]
    assert all(k.shape == v.shape for k, v in decoder.cache)
    ids = torch.randint(0, 512, (2, 10))
    assert torch.equal(generate(model, ids, 12, decoder=decoder), _full_greedy(model, ids, 12))


def test_bf16_agrees_with_hf_logits(tiny_model):
    """bf16 reorders roundings, so compare next-token logits rather than whole greedy runs."""
    model = _sharp(tiny_model).to(torch.bfloat16)
    ids = torch.randint(0, 512, (1, 16))
    decoder = Decoder(model, max_len=16)
    with torch.inference_mode():
        ours = decoder.forward(ids, torch.arange(16)).float()
        ref = model(ids).logits[:, -1].float()
    assert torch.allclose(ours, ref, atol=0.05 * ref.abs().max().item())


def test_cpu_fast_path_agrees_with_hf_to_rounding(sharp):
    """With float32 linears on oneDNN (the CPU default) the decoder's logits are transformers' up to rounding."""
    ids = torch.randint(0, 512, (2, 16))
    decoder = Decoder(sharp, max_len=16, batch_size=2)
    with torch.inference_mode():
        ours, ref = decoder.forward(ids, torch.arange(16)), sharp(ids).logits[:, -1]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_decoder_is_reusable(sharp):
    ids = torch.randint(0, 512, (1, 6))
    decoder = Decoder(sharp, max_len=30)
    first = generate(sharp, ids, 10, decoder=decoder)
    other = torch.randint(0, 512, (1, 9))
    assert torch.equal(generate(sharp, other, 20, decoder=decoder), generate(sharp, other, 20))  # a longer run
    assert torch.equal(generate(sharp, ids, 10, decoder=decoder), first)  # stale cache entries stay masked


def test_embedded_matches_hf_generate(embedded):
    model, tok = embedded
    ids = tok("The capital of France is a city where", return_tensors="pt").input_ids
    assert torch.equal(generate(model, ids, 16), _hf(model, ids, 16))


def test_cuda_compiled_step_matches_eager(cuda):
    """CUDA graphs replay the compiled step; inductor may fuse roundings differently, so compare logits."""
    model = _sharp(load_model("random:tiny", device=cuda, dtype=torch.float32)[0])
    ids = torch.randint(0, 512, (1, 8), device=cuda)
    eager, compiled = Decoder(model, 16, compile=False), Decoder(model, 16, compile=True)
    assert compiled.compiled and not eager.compiled
    tokens = generate(model, ids, 8, decoder=eager)
    for d in (eager, compiled):
        d.prefill(ids)
    for pos in range(8, 15):
        for _ in range(3):  # the first calls record the CUDA graph, later ones replay it
            expect = eager.forward(tokens[:, pos:pos + 1], torch.tensor([pos], device=cuda))
            got = compiled._step(tokens[:, pos:pos + 1], torch.tensor([pos], device=cuda))
        assert torch.allclose(got, expect, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("shape, new, match", [((5,), 4, "add a batch dimension"), ((1, 5), 0, "at least 1")])
def test_bad_input(tiny_model, shape, new, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model, torch.zeros(shape, dtype=torch.long), new)


def test_not_a_llama():
    with pytest.raises(ValueError, match="Llama-family causal LM"):
        Decoder(torch.nn.Linear(4, 4), max_len=8)


@pytest.mark.parametrize("batch, length", [(2, 4), (1, 30)])
def test_input_that_does_not_fit_the_decoder(tiny_model, batch, length):
    decoder = Decoder(tiny_model, max_len=16, batch_size=1)
    with pytest.raises(ValueError, match="build a Decoder with that batch size"):
        generate(tiny_model, torch.zeros(batch, length, dtype=torch.long), 4, decoder=decoder)
