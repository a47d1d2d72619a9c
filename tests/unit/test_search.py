"""fastllama.search: bisection on a stub accuracy with a known threshold, and the summary table."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastllama.data import load_race
from fastllama.prune import DIMS, max_amount, prune_model
from fastllama.search import SearchResult, bisect_max_amount, search, search_table

pytestmark = pytest.mark.unit


def _step(threshold: float):
    """Accuracy 0.7 up to `threshold`, 0.3 beyond: the search must land just below the threshold."""
    return lambda amount: 0.7 if amount <= threshold else 0.3


@settings(max_examples=50, deadline=None)
@given(threshold=st.floats(0.0, 0.94), tol=st.sampled_from([0.01, 0.02, 0.05]))
def test_bisection_finds_the_threshold_within_tol(threshold, tol):
    amount, acc, probes = bisect_max_amount(_step(threshold), floor=0.5, tol=tol)
    assert amount <= threshold < amount + tol + 1e-9
    assert acc == 0.7
    assert len(probes) <= 3 + 7  # lo, hi, then log2(0.95 / tol) halvings at most


def test_bisection_on_a_smooth_accuracy_curve():
    amount, acc, _ = bisect_max_amount(lambda a: 0.69 - 0.5 * a, floor=0.50, tol=0.001)
    assert abs(amount - 0.38) < 0.001 and acc >= 0.50


def test_parent_below_floor_gives_zero_and_everything_passing_gives_hi():
    assert bisect_max_amount(lambda a: 0.2, floor=0.5)[0] == 0.0
    assert bisect_max_amount(lambda a: 0.9, floor=0.5, hi=0.9)[:2] == (0.9, 0.9)


@pytest.mark.parametrize("lo,hi,tol", [(-0.1, 0.5, 0.01), (0.5, 0.5, 0.01), (0.0, 1.0, 0.01), (0.0, 0.5, 0.0)])
def test_bad_ranges_are_rejected(lo, hi, tol):
    with pytest.raises(ValueError, match="lo|tol"):
        bisect_max_amount(lambda a: 1.0, floor=0.5, lo=lo, hi=hi, tol=tol)


def test_search_table_is_quant_by_dim():
    rows = [SearchResult("gptq4", "input", 0.5, 0.62, 0.10, 0.53),
            SearchResult("gptq8", "input", 0.5, 0.62, 0.35, 0.52),
            SearchResult("gptq4", "output", 0.5, 0.62, 0.01, 0.55)]
    table = search_table(rows).splitlines()
    assert table[0] == "| quantization | max input pruning (acc) | max output pruning (acc) |"
    assert table[2] == "| gptq4 | 10.0% (53.0%) | 1.0% (55.0%) |"
    assert table[3] == "| gptq8 | 35.0% (52.0%) | — |"


@pytest.fixture(scope="module")
def small(embedded):
    """A 2-layer random Llama over the embedded model's tokenizer (RACE needs real text), with 3 KV groups."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = embedded[1]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, head_dim=32, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval(), tok


def test_search_covers_every_dim_and_saves_as_it_goes(small, tmp_path):
    """All four dimensions on top of a 4-bit parent built once: no probe removes every unit (3 KV groups; 2 whole
    4-bit groups of down_proj's 256 inputs; 96 k/v outputs), every pair is handed over as it finishes, and the
    parent is quantized once."""
    from fastllama import recipes

    model, tok = small
    race = load_race(limit=2)
    saved, compressions = [], []
    real = recipes.compress

    def counting(*args, **kwargs):
        compressions.append(1)
        return real(*args, **kwargs)

    recipes.compress = counting
    try:
        results = search(model, tok, ["gptq4"], list(DIMS), floor=0.0, race=race,
                         calib=torch.randint(0, len(tok), (2, 32)), tol=0.2, on_result=lambda r: saved.append(len(r)))
    finally:
        recipes.compress = real
    assert [r.dim for r in results] == list(DIMS) and saved == [1, 2, 3, 4] and len(compressions) == 1
    for r in results:  # a floor of 0 passes everywhere: the search ends at the last amount that keeps one unit
        units = {"input": 2, "output": 96, "mlp": 256, "heads": 3}[r.dim]
        assert r.max_amount == pytest.approx(min(0.95, (units - 1) / units)), r


def test_search_rejects_unknown_names(small):
    with pytest.raises(ValueError, match="'gptq3'.*'rows'"):
        search(*small, ["gptq3"], ["rows"])


@pytest.mark.parametrize("dim, expect", [("input", 127 / 128), ("output", 63 / 64), ("mlp", 255 / 256),
                                         ("heads", 1 / 2)])
def test_max_amount_leaves_one_unit(tiny_model, dim, expect):
    assert max_amount(tiny_model, dim) == pytest.approx(expect)
    prune_model(tiny_model, max_amount(tiny_model, dim), dim=dim)  # keeps exactly one unit: no error
    assert torch.isfinite(tiny_model(torch.arange(8)[None]).logits).all()


def test_an_mlp_folded_to_nothing_stays_unfolded(tiny_model):
    """Output pruning that keeps gate and up rows of different channels leaves no MLP channel: the swaps stay (they
    compute the zero MLP) instead of folding to a width no kernel takes; found by the search at its upper end."""
    from fastllama.gptq import RTNConfig, quantize_

    quantize_(tiny_model, RTNConfig(bits=4, group_size=32))
    prune_model(tiny_model, max_amount(tiny_model, "output"), dim="output")
    assert torch.isfinite(tiny_model(torch.arange(8)[None]).logits).all()
