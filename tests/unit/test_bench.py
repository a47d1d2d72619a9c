"""fastllama.bench: every DESIGN.md metric is reported and consistent, the HF baseline is timed side by side,
device bandwidths come from names, model bytes count shared storage once, and bad input is rejected."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastllama.bench import bench, model_gb, peak_bandwidth_tbs, prompt_ids, speed_recipe
from fastllama.gptq import GPTQConfig, RTNConfig, quantize_
from fastllama.models import load_model

pytestmark = pytest.mark.unit

METRICS = ("tpot_ms", "ttft_ms", "tokens_per_s", "e2e_tokens_per_s", "peak_mem_gb", "nvml_mem_gb", "peak_rss_gb",
           "model_gb", "bandwidth_frac")


def test_every_metric_is_reported(tiny_model):
    m = bench(tiny_model, prompt_len=8, new_tokens=6, runs=2)
    assert set(METRICS) <= set(m)
    assert m["ttft_ms"] > 0 and m["tpot_ms"] > 0 and m["e2e_tokens_per_s"] > 0
    assert m["peak_rss_gb"] > 0 and m["model_gb"] == pytest.approx(model_gb(tiny_model))
    # on the CPU there is no allocator peak, no NVML and no known peak bandwidth
    assert (m["peak_mem_gb"], m["nvml_mem_gb"], m["bandwidth_frac"]) == (None, None, None)
    assert m["device"].startswith("cpu") and m["path"] == "fast"
    assert m["compiled"] is m["policy"]["compile_step"]  # the decode step compiled as the hardware policy says


def test_hf_baseline_is_timed_interleaved(tiny_model, monkeypatch):
    """Plain generate and the fast path alternate after one warm-up each (the order is recorded)."""
    from fastllama import bench as b

    order, real_fast, real_hf = [], b.fast_run, b.hf_run
    monkeypatch.setattr(b, "fast_run", lambda *a: (lambda run: lambda: order.append("fast") or run())(real_fast(*a)))
    monkeypatch.setattr(b, "hf_run", lambda *a: (lambda run: lambda: order.append("hf") or run())(real_hf(*a)))
    m = bench(tiny_model, prompt_len=8, new_tokens=4, runs=2, baseline="hf")
    assert order == ["fast"] * 3 + ["fast", "hf"] * 3  # timing alone (warm-up + 2), then interleaved
    assert m["hf_tpot_ms"] > 0 and m["hf_ttft_ms"] > 0 and m["speedup"] > 0


class ForeignLinear(torch.nn.Linear):
    """A linear of another library (as bitsandbytes' layers subclass nn.Linear), which the fast path does not know."""


def test_a_model_with_foreign_linears_decodes_on_plain_generate(tiny_model, monkeypatch):
    from fastllama import bench as b
    from fastllama.bench import decode_path

    assert decode_path(tiny_model) == "fast" and decode_path(quantize_(tiny_model, RTNConfig(group_size=32))) == "fast"
    mlp = tiny_model.model.layers[1].mlp
    mlp.up_proj = ForeignLinear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=False)
    assert decode_path(tiny_model) == "plain generate"
    monkeypatch.setattr(b, "fast_run", lambda *a: pytest.fail("the fast path ran"))
    m = bench(tiny_model, prompt_len=8, new_tokens=4, runs=2)
    assert m["path"] == "plain generate" and m["compiled"] is False and m["tpot_ms"] > 0
    with pytest.raises(ValueError, match="decodes on plain generate already: baseline='hf' would time it against"):
        bench(tiny_model, prompt_len=8, new_tokens=4, runs=2, baseline="hf")


def test_plain_generate_gives_one_interval_per_new_token(tiny_model):
    """The streamer is called with the prompt, then with each new token: a prefill and new_tokens - 1 steps."""
    from fastllama.bench import hf_run

    assert len(hf_run(tiny_model, torch.arange(8)[None], 5)()) == 5


def test_peak_memory_is_reset_after_collecting_and_synchronizing(monkeypatch):
    """The CUDA peak is reset only after gc.collect() (a previous model held by reference cycles is freed first)
    and a synchronize (its pending frees are done): reset before them, the peak would include that model."""
    import gc

    import fastllama.bench as bench_module

    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("gc.collect") or 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: calls.append("reset_peak_memory_stats"))
    monkeypatch.setattr(bench_module, "_reset_peak_rss", lambda: calls.append("reset_peak_rss") or True)
    assert bench_module._reset_peaks(torch.device("cuda")) is True
    assert calls == ["gc.collect", "synchronize", "reset_peak_memory_stats", "reset_peak_rss"]
    calls.clear()
    bench_module._reset_peaks(torch.device("cpu"))
    assert calls == ["gc.collect", "reset_peak_rss"]


def test_bench_resets_the_peaks_before_decoding(tiny_model, monkeypatch):
    import fastllama.bench as bench_module

    calls, reset, fast_run = [], bench_module._reset_peaks, bench_module.fast_run
    monkeypatch.setattr(bench_module, "_reset_peaks", lambda device: calls.append("reset") or reset(device))
    monkeypatch.setattr(bench_module, "fast_run",
                        lambda *a: (lambda run: lambda: calls.append("run") or run())(fast_run(*a)))
    bench(tiny_model, prompt_len=4, new_tokens=2, runs=1)
    assert calls == ["reset", "run", "run"]  # once, before the warm-up run and the timed one


@pytest.mark.parametrize("name, tbs", [("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0),
                                       ("NVIDIA H100 NVL", 3.9), ("NVIDIA H200", 4.8), ("NVIDIA GH200 480GB", 4.0),
                                       ("NVIDIA A100-SXM4-80GB", None), ("cpu (2 threads)", None)])
def test_peak_bandwidth_from_name(name, tbs):
    assert peak_bandwidth_tbs(name) == tbs


def test_model_gb_counts_tied_weights_once(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight
    params = sum(p.numel() * p.element_size() for p in tiny_model.parameters())  # parameters() dedupes too
    buffers = sum(b.numel() * b.element_size() for b in tiny_model.buffers())
    assert model_gb(tiny_model) == pytest.approx((params + buffers) / 1e9)


def test_quantized_model_is_smaller(tiny_model):
    before = model_gb(tiny_model)
    assert model_gb(quantize_(tiny_model, RTNConfig(bits=4, group_size=32))) < 0.5 * before


@pytest.mark.parametrize("text, lm_head, expect, swapped", [
    ("gptq4", None, "rtn:bits=4,group=128,lm_head=false + head:bits=auto + cast:dtype=auto", True),
    ("gptq:bits=4,group=64,lm_head=true + prune:input=0.1", None,
     "rtn:bits=4,group=64,lm_head=true + prune:input=0.1,importance=l1", True),
    ("gptq8", True, "rtn:bits=8,lm_head=true + head:bits=auto + cast:dtype=auto", True),
    ("int8wo", True, "int8wo:lm_head=true + head:bits=auto + cast:dtype=auto", False),
    ("prune-mlp25", True, "prune:mlp=0.25,importance=l1", False)])
def test_speed_recipe_runs_gptq_as_rtn_on_the_same_grid(text, lm_head, expect, swapped):
    recipe, did = speed_recipe(text, lm_head)
    assert (str(recipe), did) == (expect, swapped)
    assert not any(isinstance(step, GPTQConfig) for step in recipe.steps) and not recipe.needs_calibration


@pytest.fixture(scope="module")
def tiny():
    return load_model("random:tiny", dtype=torch.float32)[0]


@given(length=st.integers(1, 64), seed=st.integers(0, 100))
def test_prompt_ids(tiny, length, seed):
    ids = prompt_ids(tiny, length, seed=seed)
    assert ids.shape == (1, length) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < tiny.config.vocab_size
    assert torch.equal(ids, prompt_ids(tiny, length, seed=seed))


def test_prompt_ids_from_tokenizer(embedded):
    model, tok = embedded
    ids = prompt_ids(model, 32, tok)
    assert ids.shape == (1, 32) and "river" in tok.decode(ids[0])


@pytest.mark.parametrize("kwargs, match", [(dict(baseline="vllm"), "valid: 'hf'"),
                                           (dict(new_tokens=1), "new_tokens >= 2"),
                                           (dict(prompt_len=0), "prompt_len >= 1"),
                                           (dict(runs=0), "runs >= 1")])
def test_bad_input(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench(tiny_model, **kwargs)


def test_cli_bench_writes_every_metric(tmp_path, capsys):
    from fastllama.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "random:tiny", "--recipe", "gptq4", "--prompt-len", "8", "--new-tokens", "4",
                 "--runs", "1", "--baseline", "hf", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "round-to-nearest with the same layout" in printed  # random weights: GPTQ runs as RTN, and says so
    metrics = json.loads(out.read_text())
    assert set(METRICS) <= set(metrics) and metrics["speedup"] > 0
    assert metrics["recipe"].startswith("rtn:bits=4")


@pytest.mark.parametrize("argv, match", [(["--recipe", "gptq5"], "unknown recipe step"),
                                         (["--new-tokens", "1"], "new_tokens >= 2")])
def test_cli_bench_bad_input(argv, match, capsys):
    from fastllama.cli import main

    assert main(["bench", "--model", "random:tiny", *argv]) == 2
    assert match in capsys.readouterr().err
