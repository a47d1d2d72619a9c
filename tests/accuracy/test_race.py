"""RACE accuracy: the embedded model on the shipped sample (base vs each reference recipe), and the real gate.

The embedded SmolLM2-135M answers letter prompts at chance (it picks "A" for almost every question), so the
sample is scored in `lm-eval` mode (each option's text as a continuation), where it is clearly above chance.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from fastllama.data import RACE_SAMPLE, calibration, load_race
from fastllama.evaluate import evaluate_race
from fastllama.report import REFERENCE_RECIPES

pytestmark = pytest.mark.accuracy

REFERENCE = list(REFERENCE_RECIPES[1:])  # the compressed ones (the first is the float base)

MODE = "lm-eval"
CHANCE = 0.25
# recipe -> (the most accuracy may fall below the base, the least share of answers that must match the base's).
# With n = 100 a paired difference is only resolved to a few questions, so the bounds are the measured
# values (see the issue note) with room for a different calibration set.
BOUNDS = {
    "gptq4": (0.10, 0.65),
    "gptq8": (0.05, 0.90),
    "gptq4-prune-in10": (0.10, 0.65),
    "gptq8-prune-in35": (0.10, 0.65),
    "gptq4-prune-in10-act": (0.10, 0.65),
    "prune-mlp25-act": (0.12, 0.60),  # measured 0.340 vs base 0.420, agreement 0.72
}
# Plain L1 input pruning removes the channels that carry SmolLM2's massive activations: measured perplexity
# 28.9 -> 1.7e4 (in10) and 3.9e6 (in35), RACE-sample accuracy below chance. The reference study's 3B model
# survives these recipes; the 135M one does not. Strict: if pruning improves, these start passing and say so.
COLLAPSES = pytest.mark.xfail(strict=True, raises=AssertionError,  # a crash is a failure, not the collapse
                              reason="L1 input pruning destroys the 135M embedded model")
# Activation-aware input pruning at 4 bits keeps the model far better than L1 (perplexity 9.9x the base's against
# 1780x, tests/accuracy/test_perplexity.py) but not well enough to read: 0.07-0.08 on the sample, below chance
ACT_COLLAPSES = pytest.mark.xfail(strict=True, raises=AssertionError,
                                  reason="11% of every linear's inputs is too much for the 135M model, even by act")
RECIPES = [pytest.param(r, marks=COLLAPSES) if "prune" in r else r for r in REFERENCE] + [
    pytest.param("gptq4-prune-in10-act", marks=ACT_COLLAPSES), "prune-mlp25-act"]
GATE_FLOOR = 0.50  # the reference study's floor on RACE-H for every reference recipe
BF16_FLOOR = 0.66  # bf16 Llama-3.2-3B scored 0.690 in the reference study; 0.66 allows twice the 95% half-width


@pytest.fixture(scope="module")
def sample():
    return load_race(RACE_SAMPLE)  # the shipped sample even when the hub is reachable


@pytest.fixture(scope="module")
def base(embedded, sample):
    model, tok = embedded
    return evaluate_race(model, tok, sample, mode=MODE)


def test_base_is_above_chance(base):
    # the whole 95% interval lies above chance: the model reads the articles, it does not guess
    assert base.n >= 100
    assert base.ci_low > CHANCE, f"base {base.acc:.3f} [{base.ci_low:.3f}, {base.ci_high:.3f}] is not above chance"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_keeps_accuracy_and_answers(embedded, compressed, sample, base, recipe):
    max_drop, min_agree = BOUNDS[recipe]
    result = evaluate_race(compressed(recipe), embedded[1], sample, mode=MODE)
    agree = result.agreement(base)
    summary = f"{recipe}: {result.acc:.3f} vs base {base.acc:.3f}, agreement {agree:.2f}"
    assert result.acc >= base.acc - max_drop, summary
    assert agree >= min_agree, summary


# ---------------------------------------------------------------- the real gate
@pytest.fixture(scope="module")
def real():
    spec, race = os.environ.get("FASTLLAMA_MODEL"), os.environ.get("FASTLLAMA_RACE")
    if not (spec and race):
        pytest.skip("the real RACE-H gate needs FASTLLAMA_MODEL (a model spec, e.g. meta-llama/Llama-3.2-3B or a "
                    "local directory) and FASTLLAMA_RACE (a RACE-H test .jsonl/.parquet, or ehovy/race for the hub); "
                    "FASTLLAMA_RACE_MODE (letter, the default, or lm-eval) and FASTLLAMA_RACE_LIMIT are optional")
    from fastllama.models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(spec, device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    limit = int(os.environ["FASTLLAMA_RACE_LIMIT"]) if os.environ.get("FASTLLAMA_RACE_LIMIT") else None
    data = load_race(race, limit=limit)
    calib = calibration(tok, model=model, nsamples=128, seqlen=512)
    return model, tok, data, calib, os.environ.get("FASTLLAMA_RACE_MODE", "letter")


@pytest.mark.parametrize("recipe", ["bf16", *REFERENCE])
def test_real_race_h_gate(real, recipe):
    from fastllama.recipes import compress

    model, tok, data, calib, mode = real
    floor = BF16_FLOOR if recipe == "bf16" else GATE_FLOOR
    result = evaluate_race(compress(copy.deepcopy(model), recipe, calib, tok), tok, data, mode=mode)
    assert result.acc >= floor, \
        f"{recipe}: RACE-H {result.acc:.3f} [{result.ci_low:.3f}, {result.ci_high:.3f}] < {floor}"
