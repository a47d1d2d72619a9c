"""Judging a (compressed) model: perplexity over a text, and RACE reading-comprehension accuracy.

    perplexity(model, tokenizer, text)        exp(mean NLL) in strided windows (Hugging Face's standard method)
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(model, tokenizer, text: str | torch.Tensor, window: int = 512, stride: int = 256) -> float:
    """Perplexity of `text` (a string, or 1-D token ids when `tokenizer` is None) in strided windows.

    Each step scores the next `stride` tokens, with the model seeing the `window` tokens that end there,
    so every token after the first is scored exactly once, with at least `window - stride` tokens of context.
    """
    if not 0 < stride < window:
        raise ValueError(f"perplexity needs 0 < stride < window (a window must keep some context), "
                         f"got window={window}, stride={stride}; e.g. window=512, stride=256")
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("perplexity of a string needs a tokenizer; this model has none: pass token ids instead")
        ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"])
    else:
        ids = torch.as_tensor(text).flatten()
    if len(ids) < 2:
        raise ValueError(f"perplexity needs a text of at least 2 tokens, got {len(ids)}; pass a longer text")
    ids = ids.to(_device(model))
    nll, done = 0.0, 1  # tokens before `done` are scored; the first token has no prediction
    for _ in tqdm(range(math.ceil((len(ids) - 1) / stride)), desc="perplexity", leave=False):
        end = min(done + stride, len(ids))
        begin = max(0, end - window)
        logits = model(ids[begin:end][None]).logits[0, done - begin - 1:-1]  # logits[i] predicts token i + 1
        nll += F.cross_entropy(logits.float(), ids[done:end], reduction="sum").item()
        done = end
    scored = len(ids) - 1
    ppl = math.exp(nll / scored)
    log.info("perplexity %.3f over %d tokens (window %d, stride %d)", ppl, scored, window, stride)
    return ppl
