"""GGUF exports run in llama.cpp (llama-cpp-python, the `peers` extra) as they run in fastllama."""

from __future__ import annotations

import pytest
import torch

from fastllama.data import PPL_TEXT
from fastllama.export import export
from fastllama.export.gguf import llama_cpp_logits

pytestmark = pytest.mark.accuracy

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install 'fastllama[peers]'")

TOKENS = 512
# fastllama's int4/int8 kernels take bfloat16 activations, llama.cpp quantizes them to Q8_0 blocks: the same
# weights, different activation rounding, so near-tied top logits may flip. The bar: 99% of positions.
MIN_AGREEMENT = 0.99


@pytest.mark.parametrize("recipe", ["gptq:bits=4,group=32,grid=q4_0", "gptq:bits=8,grid=q8_0"])
def test_gguf_logits_argmax_agrees_with_fastllama(embedded, compressed, tmp_path, recipe):
    model, tok = compressed(recipe), embedded[1]
    ids = tok(PPL_TEXT.read_text())["input_ids"][:TOKENS]
    path = export(model, tok, "gguf", tmp_path / "m.gguf", pre="smollm")
    theirs = llama_cpp_logits(path, ids).argmax(-1)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].float().argmax(-1).numpy()
    assert (theirs == ours).mean() >= MIN_AGREEMENT
