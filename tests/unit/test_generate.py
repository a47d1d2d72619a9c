"""fastllama.generate: the static-cache decoder is token-identical to Hugging Face `generate` (greedy) on float,
quantized, pruned, coupled-pruned and layer-dropped models, and rejects bad input clearly."""

from __future__ import annotations

import copy
import gc
import os
import re
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastllama.generate
import fastllama.nn
from fastllama.drop import drop_layers
from fastllama.generate import Decoder, generate
from fastllama.hardware import policy
from fastllama.gptq import Int8WeightOnlyConfig, RTNConfig, quantize_
from fastllama.models import load_model
from fastllama.nn import select
from fastllama.prune import prune_model
from fastllama.recipes import compress

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


@pytest.mark.parametrize("name", ["rtn4", "int8wo"])
def test_quantized_projections_run_fused(tiny_model, name):
    """A quantized model's q/k/v and gate/up decode as one kernel call each (`fastllama.nn.fuse`), and the
    tokens are still those of HF generate, which runs the parts, now views of the fused integers."""
    model = COMPRESSIONS[name](_sharp(tiny_model))
    decoder = Decoder(model, max_len=22, batch_size=2)
    assert all(qkv is not None and gate_up is not None for qkv, gate_up in decoder.fused)
    ids = torch.randint(0, 512, (2, 10))
    assert torch.equal(generate(model, ids, 12, decoder=decoder), _hf(model, ids, 12))


def _full_greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding without any cache: the whole sequence through the model for every token."""
    with torch.inference_mode():
        for _ in range(new):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_a_compiled_step_of_many_sequences_runs_the_kernel(tiny_model, monkeypatch):
    """A decode step of DEQUANT_ROWS sequences or more: eager, its quantized matmuls dequantize once
    (fastllama.nn.DEQUANT_ROWS); compiled, they stay on the kernel (the per-shape compiled dequantization cannot
    be traced into the step's graph), and decode as the eager step does on the kernel."""
    import fastllama.nn

    model = compress(copy.deepcopy(tiny_model), "rtn:bits=4,group=32")
    ids = torch.randint(0, 512, (fastllama.nn.DEQUANT_ROWS, 5), generator=torch.Generator().manual_seed(0))
    compiled = generate(model, ids, 3, compile=True)
    monkeypatch.setattr(fastllama.nn, "DEQUANT_ROWS", 10 ** 9)  # the kernel everywhere, eager
    assert torch.equal(compiled, generate(model, ids, 3, compile=False))


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
    """bf16 reorders roundings, so compare next-token logits, against how far transformers' own bf16 forward lies
    from float32: each bf16 path errs by rounding, so the two differ by at most the sum of their errors (ours is no
    larger than transformers': its attention runs in float32 on the CPU), 3x transformers' error with room. A wrong
    rotary or mask gives errors of the logits' own size."""
    model = _sharp(tiny_model)
    ids = torch.randint(0, 512, (1, 16))
    with torch.inference_mode():
        ref32 = model(ids).logits[:, -1].float()
        model = model.to(torch.bfloat16)
        ours = Decoder(model, max_len=16).forward(ids, torch.arange(16)).float()
        ref = model(ids).logits[:, -1].float()
    hf_error = (ref - ref32).abs().max().item()
    assert 0 < hf_error and (ours - ref).abs().max().item() <= 3 * hf_error


@pytest.mark.parametrize("onednn", [True, False])
def test_cpu_fast_path_agrees_with_hf_to_rounding(sharp, monkeypatch, onednn):
    """With float32 linears on oneDNN (AMD's policy) or MKL (elsewhere) the decoder's logits are transformers' up to
    rounding."""
    import fastllama.nn as fnn

    monkeypatch.setattr(fnn, "ONEDNN", onednn and torch.backends.mkldnn.is_available())
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


@settings(max_examples=20, deadline=None)
@given(groups=st.integers(1, 3), rep=st.integers(1, 4), T=st.integers(1, 6), batch=st.integers(1, 2),
       seed=st.integers(0, 1000))
def test_folded_attention_equals_grouped_attention(groups, rep, T, batch, seed):
    """CUDA's formulation (each KV group's q heads folded into its query rows, for the fused kernel) is the grouped
    attention the CPU runs (enable_gqa), under the decoder's causal mask: the same dot products and softmax per
    row, in another order of rows."""
    from fastllama.generate import _folded_attention

    g = torch.Generator().manual_seed(seed)
    L, D = 12, 16
    q = torch.randn(batch, groups * rep, T, D, generator=g)
    k, v = torch.randn(2, batch, groups, L, D, generator=g)
    start = int(torch.randint(0, L - T + 1, (), generator=g))
    mask = torch.zeros(L, L).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -torch.inf)[start:start + T]
    grouped = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(_folded_attention(q, k, v, mask, 0.3), grouped, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["float", "prune-heads", "rtn4", "drop"])
def test_cuda_attention_formulation_matches_hf_generate(tiny_model, name):
    """The whole decoder with the CUDA formulation of attention, run on the CPU: still token-identical to HF."""
    model = COMPRESSIONS.get(name, lambda m: m)(_sharp(tiny_model))
    decoder = Decoder(model, max_len=22, batch_size=2)
    assert not decoder.fold_gqa  # the CPU's own formulation is the grouped one
    decoder.fold_gqa = True
    ids = torch.randint(0, 512, (2, 10))
    assert torch.equal(generate(model, ids, 12, decoder=decoder), _hf(model, ids, 12))


def test_step_builds_no_tensor_from_host_data(sharp, monkeypatch):
    """A decode step writes its position into the decoder's own device tensor: it never builds one from Python
    data (on a GPU, torch.tensor([pos], device=cuda) copies from pageable memory and synchronizes)."""
    decoder = Decoder(sharp, max_len=16)
    token = decoder.prefill(torch.randint(0, 512, (1, 6)))
    seen = []

    def forward(d, tok, pos):
        seen.append((pos, int(pos)))
        return Decoder.forward(d, tok, pos)

    monkeypatch.setattr(decoder, "_step", forward)

    def from_host(*args, **kwargs):
        raise AssertionError("the decode step built a tensor from host data")

    monkeypatch.setattr(torch, "tensor", from_host)
    monkeypatch.setattr(torch, "as_tensor", from_host)
    for pos in (6, 7):
        token = decoder.step(token, pos)
    assert [p for _, p in seen] == [6, 7] and all(t is decoder.pos for t, _ in seen)


@pytest.mark.parametrize("compile", [False, True])
def test_decoder_is_freed_without_the_garbage_collector(tiny_model, compile):
    """No reference cycle (a decoder holding its own bound method, or a compiled wrapper of it): dropping the last
    reference frees the decoder, its KV cache and its hold on the model at once, so a benchmark that loads the
    next model does not count this one in its peak memory."""
    decoder = Decoder(tiny_model, max_len=8, compile=compile)
    ref = weakref.ref(decoder)
    gc.disable()
    try:
        del decoder
        assert ref() is None
    finally:
        gc.enable()


def test_the_cpu_step_compiles_where_a_cxx_compiler_is(tiny_model, monkeypatch):
    """Inductor needs a C++ compiler on the CPU: where CXX names none, the policy keeps the decode step eager and
    says why; with g++ there, the default decoder compiles (its tokens are checked against HF by the tests above)."""
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert not policy("cpu").compile_step and "needs a C++ compiler" in policy("cpu").why
    assert not Decoder(tiny_model, 8).compiled
    monkeypatch.setenv("CXX", "g++")
    assert Decoder(tiny_model, 8).compiled is (shutil.which("g++") is not None)


COMPILED_CHECK = """
import torch
from fastllama.generate import Decoder, generate
from fastllama.models import load_model
model, _ = load_model("random:tiny", dtype=torch.float32)
ids = torch.tensor([[172]])
decoder = Decoder(model, 7, compile=True)
for _ in range(20):  # enough steps for a kernel writing past its buffer to be caught by malloc's checks
    assert torch.equal(generate(model, ids, 6, decoder=decoder), generate(model, ids, 6, compile=False))
"""


def test_a_step_compiled_under_another_cpu_capability_is_not_reused(tmp_path):
    """Inductor writes CPU code for the capability's vector width and caches it on disk: compiled under AVX2
    first, then natively on an AVX512 machine, each must decode as eager does. Were the cached AVX2 code reused
    there, it would run with AVX512 vectors and write past its buffers (it did: malloc aborted the process)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("needs an AVX512 machine (which can also run the AVX2 kernels)")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parents[2])}
    for capability in ("avx2", "avx512"):
        done = subprocess.run([sys.executable, "-c", COMPILED_CHECK], env=env | {"ATEN_CPU_CAPABILITY": capability},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{capability}: {done.stderr[-2000:]}"


def _compiled_step(model) -> tuple[torch.Tensor, list[str]]:
    """The tokens of a short greedy run on a freshly compiled step (checked against the eager step), and the code
    inductor generated for it (not read from its cache), the step's last."""
    from torch._inductor.utils import run_and_get_code

    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch._inductor.config.patch(fx_graph_cache=False):
        tokens, code = run_and_get_code(generate, model, ids, 3, decoder=Decoder(model, 8, compile=True))
    assert torch.equal(tokens, generate(model, ids, 3, compile=False))
    return tokens, code


def test_the_compiled_cpu_step_asserts_nothing_of_its_inputs(tiny_model):
    """Inductor's wrapper would re-check the size, stride and alignment of every graph input (each weight, scale and
    cache) on every call, 0.35-0.38 ms of a gptq4 step (generate._INPUT_ASSERTS_OFF): the CPU step's code has none
    of those checks, and still decodes as the eager step does."""
    code = _compiled_step(compress(copy.deepcopy(tiny_model), "rtn:bits=4,group=32"))[1]
    assert code and not any("assert_size_stride(" in c or "assert_alignment(" in c for c in code)


def _deep(recipe: str | None = None):
    """A random 12-layer model (random:tiny has 2), compressed by `recipe` where one is given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    return compress(model, recipe) if recipe else model


def test_the_compiled_cpu_step_tries_fewer_fusions_for_the_same_code(monkeypatch):
    """The CPU step has inductor try fusing nodes that read one buffer only 8 nodes apart (generate._FUSION_TRIES,
    4-5 s of a 29 s compile, every layer unrolled): a 12-layer model's unrolled step (int4 on PyTorch's kernel, see
    `_reusable_layers`), whose layers all read the rotary tables, compiles to the very code of inductor's default
    64 (only the graph's id and the constants' addresses differ)."""
    assert fastllama.generate._FUSION_TRIES or not hasattr(torch._inductor.config,
                                                           "max_fusion_buffer_group_pairwise_attempts")
    model = _deep("rtn:bits=4,group=32")
    codes = []
    for tries in (fastllama.generate._FUSION_TRIES, {}):
        monkeypatch.setattr(fastllama.generate, "_FUSION_TRIES", tries)
        codes.append(re.sub(r"# AOT ID: .*|[0-9a-f]{12,}", "", _compiled_step(model)[1][-1]))
    assert codes[0] == codes[1]


def _narrow_first_mlp(model):
    """`model` with its first layer's MLP cut to half its channels: a layer of shapes of its own."""
    mlp, keep = model.model.layers[0].mlp, torch.arange(model.config.intermediate_size // 2)
    mlp.gate_proj, mlp.up_proj = select(mlp.gate_proj, 0, keep), select(mlp.up_proj, 0, keep)
    mlp.down_proj = select(mlp.down_proj, 1, keep)
    return model


@pytest.mark.skipif(not policy("cpu").compile_layers, reason="the policy compiles no layer apart here (no g++)")
@pytest.mark.parametrize("build, reused", [(lambda: _deep(), 12), (lambda: _deep("rtn:bits=8"), 12),
                                           (lambda: _narrow_first_mlp(_deep("rtn:bits=8")), 11),
                                           (lambda: _deep("rtn:bits=4,group=32"), 0)])
def test_the_cpu_step_compiles_a_layer_once_for_every_layer_of_its_shapes(build, reused):
    """`Policy.compile_layers`: a 12-layer step's code holds one compiled layer, called for each of the 12 (the
    unrolled step compiled 12; gptq4's cold compile took 6-7 s against 20 on the embedded model). A layer of shapes
    of its own is compiled apart (inlined, as a layer called once is), the other 11 still share one. int4 on
    PyTorch's CPU kernel (groups of 32) stays unrolled: inductor leaves its group-size constant unbound inside a
    reused layer. Every form decodes as the eager step does."""
    code = _compiled_step(build())[1][-1]
    names = re.findall(r"def (\w*subgraph_\d+)\(", code)
    assert len(names) == (1 if reused else 0)
    assert sum(len(re.findall(rf"= {name}\(", code)) for name in names) == reused


def test_the_compiled_cpu_step_runs_float_linears_where_onednn_is_picked(tiny_model, monkeypatch):
    """The policy runs float32 linears on oneDNN on AMD CPUs (`fastllama.nn.ONEDNN`). Inductor lowers oneDNN's
    linear only for weights frozen into the graph, and compiling a step on it failed (a LoweringException, the
    float32 base as an AVX2 EPYC decodes it): inside a compiled graph they are F.linear, and the step decodes as
    the eager one, which stays on oneDNN."""
    monkeypatch.setattr(fastllama.nn, "ONEDNN", True)
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate(_sharp(tiny_model), ids, 4, compile=True), generate(tiny_model, ids, 4, compile=False))


def test_each_compiled_decoder_compiles_its_own_step(sharp):
    """Dynamo caches compiled code per code object: were every decoder's step Decoder.forward itself, each new
    model would recompile it, and fullgraph fails hard at the recompile limit (8: the 9th recipe of a perf run).
    With the limit at 1 here, three decoders of different shapes each still compile once and agree with eager."""
    ids = torch.randint(0, 512, (1, 6))
    with torch._dynamo.config.patch(recompile_limit=1):
        for max_len in (9, 10, 11):
            decoder = Decoder(sharp, max_len, compile=True)
            decoder._step = torch.compile(decoder._step._torchdynamo_orig_callable, backend="eager", fullgraph=True,
                                          dynamic=False)  # its own step, traced by dynamo without inductor
            assert torch.equal(generate(sharp, ids, 3, decoder=decoder), generate(sharp, ids, 3, compile=False))


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-3), (torch.bfloat16, 0.1)])
def test_cuda_compiled_step_matches_eager(cuda, dtype, atol):
    """The compiled step as `Decoder.step` runs it (inference mode, the decoder's position tensor, CUDA graphs
    recorded then replayed), against the eager step; inductor may fuse roundings differently, so logits are
    compared to the dtype's precision, and the step's token is the argmax of the compared logits."""
    model = _sharp(load_model("random:tiny", device=cuda, dtype=dtype)[0])
    ids = torch.randint(0, 512, (1, 8), device=cuda)
    eager, compiled = Decoder(model, 16, compile=False), Decoder(model, 16, compile=True)
    assert compiled.compiled and not eager.compiled and compiled.fold_gqa
    tokens = generate(model, ids, 8, decoder=eager)
    for d in (eager, compiled):
        d.prefill(ids)
    for pos in range(8, 15):
        token = tokens[:, pos:pos + 1]
        for _ in range(3):  # the first calls record the CUDA graph, later ones replay it
            with torch.inference_mode():
                expect = eager._step(eager, token, eager.pos.fill_(pos)).float()
                got = compiled._step(compiled, token, compiled.pos.fill_(pos)).float()
        torch.testing.assert_close(got, expect, atol=atol, rtol=0)
        assert torch.equal(compiled.step(token, pos), got.argmax(-1, keepdim=True))


def test_cuda_attention_runs_the_fused_kernel(cuda):
    """On CUDA the decode step's attention is the memory-efficient kernel, never the math fallback."""
    from torch.profiler import ProfilerActivity, profile

    model = _sharp(load_model("random:tiny", device=cuda, dtype=torch.bfloat16)[0])
    decoder = Decoder(model, 16, compile=False)
    token = decoder.prefill(torch.randint(0, 512, (1, 8), device=cuda))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decoder.step(token, 8)
    ops = {event.name for event in prof.events()}
    assert "aten::_scaled_dot_product_efficient_attention" in ops, sorted(ops)
    assert "aten::_scaled_dot_product_attention_math" not in ops


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
