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
MIN_AGREEMENT = 0.99  # the bar: llama.cpp's argmax equals fastllama's at 99% of positions
# Measured on the shared CPU (calibration: matplotlib's and scipy's LICENSE texts, 32 x 256 tokens): 97.5% for
# q4_0 and 97.9% for q8_0, while the float export agrees at 100% and every tiny-model export too. The weights are
# equal (tests/unit/test_export_gguf.py reads them back); the activations are not: fastllama's kernels take
# bfloat16 ones, llama.cpp quantizes them to Q8_0 blocks of 32, which SmolLM2's massive activations make coarse.
ACTIVATIONS_DIFFER = pytest.mark.xfail(strict=True, raises=AssertionError,
                                       reason="bf16 vs Q8_0 activations: 97.5-97.9% measured")


def _agreement(model, tok, path) -> float:
    ids = tok(PPL_TEXT.read_text())["input_ids"][:TOKENS]
    theirs = llama_cpp_logits(path, ids).argmax(-1)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].float().argmax(-1).numpy()
    return float((theirs == ours).mean())


def test_float_gguf_agrees_with_fastllama(embedded, tmp_path):
    model, tok = embedded
    assert _agreement(model, tok, export(model, tok, "gguf", tmp_path / "m.gguf", pre="smollm")) >= MIN_AGREEMENT


@ACTIVATIONS_DIFFER
@pytest.mark.parametrize("recipe", ["gptq:bits=4,group=32,grid=q4_0", "gptq:bits=8,grid=q8_0"])
def test_gptq_gguf_agrees_with_fastllama(embedded, compressed, tmp_path, recipe):
    model, tok = compressed(recipe), embedded[1]
    path = export(model, tok, "gguf", tmp_path / "m.gguf", pre="smollm")
    assert _agreement(model, tok, path) >= MIN_AGREEMENT
