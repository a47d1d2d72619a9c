"""Accuracy fixtures: the reference recipes applied to the embedded model, each built once per session."""

from __future__ import annotations

import copy

import pytest

from fastllama.data import calibration

CALIB_SAMPLES, CALIB_SEQLEN = 16, 256  # small: C4 when the hub is reachable, else text sampled from the model


@pytest.fixture(scope="session")
def calib(embedded):
    """Calibration token ids shared by every recipe."""
    model, tok = embedded
    return calibration(tok, model=model, nsamples=CALIB_SAMPLES, seqlen=CALIB_SEQLEN)


@pytest.fixture(scope="session")
def compressed(embedded, calib):
    """recipe -> the embedded model compressed by it, built on first use and kept.

    A recipe that extends a built one starts from a copy of it (gptq4-prune-in10 prunes the built gptq4),
    so each GPTQ runs once per session.
    """
    from fastllama.recipes import compress, parse_recipe

    model, tok = embedded
    built = {"": model}  # recipe text -> model

    def get(recipe: str):
        steps = str(parse_recipe(recipe)).split(" + ")
        done = max(k for k in range(len(steps) + 1) if " + ".join(steps[:k]) in built)
        for k in range(done + 1, len(steps) + 1):  # build and keep every prefix, e.g. gptq4 then gptq4 + prune
            parent = built[" + ".join(steps[:k - 1])]
            built[" + ".join(steps[:k])] = compress(copy.deepcopy(parent), steps[k - 1], calib, tok)
        return built[" + ".join(steps)]

    return get
