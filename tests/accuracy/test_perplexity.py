"""Perplexity retention: each reference recipe on the embedded model, over the start of the shipped text."""

from __future__ import annotations

import pytest

from fastllama.data import PPL_TEXT
from fastllama.evaluate import perplexity
from fastllama.report import REFERENCE_RECIPES

pytestmark = pytest.mark.accuracy

REFERENCE = [r for r in REFERENCE_RECIPES if r != "bf16"]  # the compressed ones

TOKENS = 1280  # the first 1280 tokens of ppl.txt: 5 windows of 512 at stride 256, seconds per model
# recipe -> the largest allowed ratio of its perplexity to the base's (measured 1.51 and 1.004, see the issue note)
MAX_RATIO = {"gptq4": 2.0, "gptq8": 1.03, "gptq4-prune-in10": 2.5, "gptq8-prune-in35": 2.5}
# L1 input pruning removes SmolLM2's massive-activation channels: measured ratios of 600 (in10) and 1e5 (in35)
COLLAPSES = pytest.mark.xfail(strict=True, raises=AssertionError,  # a crash is a failure, not the collapse
                              reason="L1 input pruning destroys the 135M embedded model")


@pytest.fixture(scope="module")
def ids(embedded):
    return embedded[1](PPL_TEXT.read_text(), return_tensors="pt")["input_ids"][0, :TOKENS]


@pytest.fixture(scope="module")
def base_ppl(embedded, ids):
    return perplexity(embedded[0], None, ids)


def test_base_perplexity_is_that_of_a_language_model(base_ppl):
    # far below the vocabulary size (49152, a uniform guess): the text is ordinary English prose
    assert 5 < base_ppl < 60


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=COLLAPSES) if "prune" in r else r for r in REFERENCE])
def test_recipe_keeps_perplexity(compressed, ids, base_ppl, recipe):
    ppl = perplexity(compressed(recipe), None, ids)
    assert ppl <= MAX_RATIO[recipe] * base_ppl, f"{recipe}: perplexity {ppl:.2f} vs base {base_ppl:.2f}"
