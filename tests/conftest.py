"""Shared fixtures: seeding, the device, a tiny random Llama, and the embedded model (loaded once)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import register_random, settings

from fastllama.models import load_model

# Hypothesis profiles. "explore" (local default): new random examples every run, where a failure is a finding
# (turn it into an @example). "ci" (selected by .ci/run through HYPOTHESIS_PROFILE): the same examples every run,
# derandomized and without an example database, so a CI verdict does not depend on chance.
settings.register_profile("explore", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "explore"))


class _TorchGlobalRandom:
    """torch's global generator in the shape Hypothesis manages (seed / getstate / setstate), so it is seeded
    before every example and restored after it, as Python's `random` is: an example alone fixes whatever a test
    draws with torch.randn or an nn.Linear's init (without this, a replayed failure can draw other numbers)."""

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def getstate(self) -> torch.Tensor:
        return torch.random.get_rng_state()

    def setstate(self, state: torch.Tensor) -> None:
        torch.random.set_rng_state(state)


TORCH_RANDOM = _TorchGlobalRandom()  # Hypothesis holds registered generators by weak reference
register_random(TORCH_RANDOM)


def pytest_configure(config):
    torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    """The accelerator when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def cuda() -> str:
    """For tests that only make sense on a GPU: they skip cleanly without CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return "cuda"


@pytest.fixture
def tiny_model():
    """random:tiny (2 layers, hidden 128, GQA 4:2), fp32 on CPU, eval mode. A fresh copy per test."""
    model, _ = load_model("random:tiny", device="cpu", dtype=torch.float32)
    return model


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct in fp32 on CPU, loaded once per session.

    Tests must not modify it: deep-copy it first (copy.deepcopy) when compressing.
    """
    return load_model("smollm2-135m", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def train_tokenizer():
    """`train_tokenizer(texts, bos)`: a small byte-level BPE trained offline on the texts (see `_train_tokenizer`)."""
    return _train_tokenizer


def _train_tokenizer(texts: list[str], bos: bool, vocab_size: int = 400):
    """A small byte-level BPE trained offline on `texts` (a fast tokenizer, as Hugging Face models have); with `bos`,
    every encoding starts with <s> (as Llama-3's does), else nothing is added (as SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
