"""Shared fixtures: seeding, the device, a tiny random Llama, and the embedded model (loaded once)."""

from __future__ import annotations

import pytest
import torch

from fastllama.models import load_model


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
