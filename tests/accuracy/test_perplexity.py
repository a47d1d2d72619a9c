"""Perplexity retention: each reference recipe on the embedded model, over the start of the shipped text, and
GPTQ against round-to-nearest on the same calibration (conftest: the rest of the shipped text)."""

from __future__ import annotations

import pytest

from fastllama.evaluate import perplexity
from fastllama.report import REFERENCE_RECIPES

pytestmark = pytest.mark.accuracy

REFERENCE = list(REFERENCE_RECIPES[1:])  # the compressed ones (the first is the float base)
ACT_PRUNED = ["gptq4-prune-in10-act", "prune-mlp25-act"]  # activation-aware pruning, where L1 collapses

# recipe -> the largest allowed ratio of its perplexity to the base's. Measured in this setting (conftest: 1280
# tokens scored, 16 x 256 calibration tokens from the rest of ppl.txt) on a Xeon under both hardware policies,
# AVX512 (bf16 float parts) / AVX2 (ATEN_CPU_CAPABILITY=avx2: float32 float parts), 2 threads: gptq4 1.079 / 1.075
# (1.075 at 1 thread; without rotate 1.099 / 1.106, without asym too 1.163 / 1.131; rtn4 1.556), gptq8 1.005 /
# 1.001, gptq4-prune-in10-act 8.96 / 8.90 (without rotate 9.61 / 9.60; L1: 1780), prune-mlp25-act 1.78 / 1.78.
MAX_RATIO = {"gptq4": 1.10, "gptq8": 1.01, "gptq4-prune-in10": 2.5, "gptq8-prune-in35": 2.5,
             # act keeps the massive-activation channels that L1 removes, but 11% of every linear's inputs in
             # whole groups of 64 still costs the 135M model most of its perplexity: the bound guards the 180x
             # that act wins over L1, not a working model
             "gptq4-prune-in10-act": 15.0, "prune-mlp25-act": 2.2}
# L1 input pruning removes SmolLM2's massive-activation channels: measured ratios of 600 to 1780 (in10), 1e5 (in35)
COLLAPSES = pytest.mark.xfail(strict=True, raises=AssertionError,  # a crash is a failure, not the collapse
                              reason="L1 input pruning destroys the 135M embedded model")
# The least share of rtn4's perplexity loss that gptq4 must win back, (rtn4 - gptq4) / (rtn4 - base). Measured:
# today's gptq4 (act-order, clipping, asym and rotate) 0.858 (AVX512 policy, 2 threads), 0.866 (1 thread), 0.865
# (AVX2, 2 threads); without rotate 0.823 (AVX512, 2 threads), 0.805 (1 thread), 0.810 (AVX2, 2 threads), 0.775
# (AVX2, 1 thread); without asym too 0.707 (AVX512), 0.730 (2 threads), 0.764 (AVX2); with act-order and clipping
# off too, the earlier default, 0.576, 0.496, 0.557 (the thread count changes GPTQ's sums, and the earlier
# default's lazily set grids amplify that); round-to-nearest 0 by definition. Act-order alone is not resolved here:
# with clipping kept and act-order off, 0.688 / 0.717 (without clipping it is: see the README's GPTQ table).
MIN_RECOVERED = 0.83


@pytest.fixture(scope="module")
def base_ppl(embedded, eval_ids):
    return perplexity(embedded[0], None, eval_ids)


def test_base_perplexity_is_that_of_a_language_model(base_ppl):
    # far below the vocabulary size (49152, a uniform guess): the text is ordinary English prose
    assert 5 < base_ppl < 60


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=COLLAPSES) if "prune" in r else r for r in REFERENCE]
                         + ACT_PRUNED)
def test_recipe_keeps_perplexity(compressed, eval_ids, base_ppl, recipe):
    ppl = perplexity(compressed(recipe), None, eval_ids)
    assert ppl <= MAX_RATIO[recipe] * base_ppl, f"{recipe}: perplexity {ppl:.2f} vs base {base_ppl:.2f}"


def test_gptq4_wins_back_most_of_what_rtn4_loses(compressed, eval_ids, base_ppl):
    """Fails if GPTQ is replaced by round-to-nearest (0 won back), loses rotate or asym, or falls back to the earlier
    default without act-order and clipping (see MIN_RECOVERED)."""
    rtn, gptq = (perplexity(compressed(r), None, eval_ids) for r in ("rtn4", "gptq4"))
    recovered = (rtn - gptq) / (rtn - base_ppl)
    assert recovered >= MIN_RECOVERED, (f"gptq4 {gptq:.2f} wins back {recovered:.0%} of rtn4's loss "
                                        f"({rtn:.2f} vs base {base_ppl:.2f}); at least {MIN_RECOVERED:.0%} expected")


# The decode kernels round activations that evaluation (prefill: many rows, dequantized weights) never rounds: the
# model as it decodes, every matmul on the kernels, must score as the model evaluated. Measured in this setting on a
# Xeon, fastllama's kernels (int8 activations, one scale per 64 values) against the dequantized model: gptq4 +0.05%
# (AVX512 policy) / +0.18% (AVX2), gptq8 +0.41% / +0.39%; PyTorch's kernels (bfloat16 activations, AVX512) -0.24% and
# -0.04%. One int8 scale per row instead: gptq8 +2.7% / +4.9% (gptq4 +0.97% / +0.13%: its 4-bit weights' own error
# hides the activations').
KERNEL_MAX_RATIO = 1.01


@pytest.mark.parametrize("recipe", ["gptq4", "gptq8"])
def test_the_decode_kernels_keep_perplexity(compressed, eval_ids, recipe, monkeypatch):
    """Every quantized matmul on its few-rows kernel (DEQUANT_ROWS out of reach): the perplexity within 1% of the
    dequantized one. gptq8's fails for a kernel whose activations are rounded more coarsely (one scale per row)."""
    import fastllama.nn

    model = compressed(recipe)
    dequantized = perplexity(model, None, eval_ids)
    monkeypatch.setattr(fastllama.nn, "DEQUANT_ROWS", 10 ** 9)
    on_kernels = perplexity(model, None, eval_ids)
    assert abs(on_kernels / dequantized - 1) < KERNEL_MAX_RATIO - 1, f"{on_kernels:.3f} vs {dequantized:.3f}"
