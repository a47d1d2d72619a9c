"""Accuracy fixtures: the reference recipes applied to the embedded model, each once per session."""

from __future__ import annotations

import copy

import pytest

from fastllama.data import calibration

CALIB_SAMPLES, CALIB_SEQLEN = 32, 256  # small: C4 when the hub is reachable, else text sampled from the model


@pytest.fixture(scope="session")
def calib(embedded):
    """Calibration token ids shared by every recipe."""
    model, tok = embedded
    return calibration(tok, model=model, nsamples=CALIB_SAMPLES, seqlen=CALIB_SEQLEN)


@pytest.fixture(scope="session")
def compressed(embedded, calib):
    """recipe -> the embedded model compressed by it (a copy; built on first use, then reused)."""
    from fastllama.recipes import compress

    model, tok = embedded
    models = {}

    def get(recipe: str):
        if recipe not in models:
            models[recipe] = compress(copy.deepcopy(model), recipe, calib, tok)
        return models[recipe]

    return get
