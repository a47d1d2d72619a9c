"""fastllama.evaluate: perplexity and RACE scoring."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastllama.evaluate import perplexity

pytestmark = pytest.mark.unit


def test_perplexity_uniform_logits_is_vocab_size(tiny_model):
    torch.nn.init.zeros_(tiny_model.lm_head.weight)  # tied: the embeddings are zero too, so every logit is 0
    ids = torch.randint(0, tiny_model.config.vocab_size, (100,))
    assert perplexity(tiny_model, None, ids, window=32, stride=16) == pytest.approx(tiny_model.config.vocab_size)


def test_perplexity_with_one_window_equals_one_pass(tiny_model):
    ids = torch.randint(0, 512, (50,))
    with torch.inference_mode():
        logits = tiny_model(ids[None]).logits[0, :-1]
    expected = math.exp(torch.nn.functional.cross_entropy(logits, ids[1:]).item())
    assert perplexity(tiny_model, None, ids, window=50, stride=49) == pytest.approx(expected, rel=1e-5)
    assert perplexity(tiny_model, None, ids, window=64, stride=16) == pytest.approx(expected, rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 90), window=st.integers(2, 40), data=st.data())
def test_perplexity_scores_each_token_once(n, window, data):
    """Whatever the window and stride, the n - 1 predictable tokens are each scored exactly once."""
    from unittest import mock

    import torch.nn.functional as F

    stride = data.draw(st.integers(1, window - 1))
    model = _ZeroModel()
    targets = []
    real = F.cross_entropy
    with mock.patch.object(F, "cross_entropy", lambda lg, t, **kw: (targets.append(t), real(lg, t, **kw))[1]):
        ppl = perplexity(model, None, torch.arange(n), window=window, stride=stride)
    assert torch.cat(targets).tolist() == list(range(1, n))
    assert ppl == pytest.approx(_ZeroModel.vocab)


class _ZeroModel(torch.nn.Module):
    """Uniform logits over `vocab` tokens for any input: a model with a known perplexity (= vocab)."""

    vocab = 128

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        return type("Out", (), {"logits": torch.zeros(*ids.shape, self.vocab)})


def test_perplexity_errors(tiny_model):
    for window, stride in [(4, 8), (4, 4), (4, 0)]:
        with pytest.raises(ValueError, match="0 < stride < window"):
            perplexity(tiny_model, None, torch.arange(10), window=window, stride=stride)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        perplexity(tiny_model, None, "some text")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(tiny_model, None, torch.tensor([3]))
