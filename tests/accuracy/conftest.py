"""Accuracy fixtures: the reference recipes applied to the embedded model, each built once per session, all
calibrated on the shipped perplexity text after the part the perplexity tests score."""

from __future__ import annotations

import copy

import pytest

from fastllama.data import PPL_TEXT, calibration

EVAL_TOKENS = 1280  # the start of ppl.txt the perplexity tests score: 5 windows of 512 at stride 256
# 16 x 256 windows of the rest of ppl.txt (4192 tokens): a shipped text keeps the calibration identical on every
# machine (text sampled from the model shifts with the float rounding of its logits) and costs no generation
CALIB_SAMPLES, CALIB_SEQLEN = 16, 256


@pytest.fixture(scope="session")
def ppl_ids(embedded):
    """ppl.txt as token ids, tokenized as `perplexity` tokenizes a string."""
    return embedded[1](PPL_TEXT.read_text(), return_tensors="pt")["input_ids"][0]


@pytest.fixture(scope="session")
def eval_ids(ppl_ids):
    """The tokens the perplexity tests score."""
    return ppl_ids[:EVAL_TOKENS]


@pytest.fixture(scope="session")
def calib(embedded, ppl_ids, tmp_path_factory):
    """Calibration token ids shared by every recipe, from the text after `eval_ids` (never the scored part)."""
    tok = embedded[1]
    path = tmp_path_factory.mktemp("calib") / "ppl_rest.txt"
    path.write_text(tok.decode(ppl_ids[EVAL_TOKENS:]), encoding="utf-8")
    return calibration(tok, source=path, nsamples=CALIB_SAMPLES, seqlen=CALIB_SEQLEN)


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
