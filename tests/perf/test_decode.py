"""Decode speed and memory budgets, one test per recipe of the device class's budget file (budgets/<class>.json).

With an H100 (or H200) the 3B shapes run against budgets/h100.json; without a GPU the embedded model runs
against budgets/cpu.json. Every metric of `fastllama.bench` goes into `benchmark.extra_info`, so
`pytest -m perf --benchmark-json out.json` carries them; pytest-benchmark itself times whole `generate` calls
(the figure `--benchmark-compare-fail=median:10%` gates on). Each budget is an assert whose message gives the
measured and the budget value. Pruned recipes are compared with their parent's result from earlier in the run.
FASTLLAMA_PERF_BUDGET=path/to/budget.json runs another budget file (same keys) instead. A recipe whose budget the
machine is measured to miss carries a `known_failure` note: it then xfails, with the measured values, when it
misses (and passes when it holds).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from fastllama.bench import bench, bench_hf, prompt_ids
from fastllama.generate import Decoder, generate
from fastllama.models import load_model
from fastllama.recipes import compress, parse_recipe

pytestmark = pytest.mark.perf

BUDGETS = Path(__file__).parent / "budgets"


def device_class() -> str:
    """"h100" on an H100 or H200, "cpu" without a GPU; other GPUs have no budgets yet."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    if "H100" in name or "H200" in name:
        return "h100"
    pytest.skip(f"no perf budgets for {name}: add tests/perf/budgets/<class>.json and map it in device_class()",
                allow_module_level=True)


CLASS = device_class()
DEVICE = "cpu" if CLASS == "cpu" else "cuda"
BUDGET = json.loads(Path(os.environ.get("FASTLLAMA_PERF_BUDGET") or BUDGETS / f"{CLASS}.json").read_text())
RESULTS: dict[str, dict] = {}  # recipe name -> metrics, for the pruned recipes' comparisons with their parents


@pytest.fixture(scope="module")
def base():
    """(model, tokenizer) of the budget's base model, loaded once: on the CPU it is copied per recipe; on a GPU
    each recipe loads its own (random weights build in seconds there), so peak memory holds one model only."""
    return load_model(BUDGET["model"], device=DEVICE, dtype=BUDGET["dtype"]) if DEVICE == "cpu" else (None, None)


def _compressed(base, recipe: str | None):
    model, tok = base
    if DEVICE == "cpu":
        model = copy.deepcopy(model)
    else:
        model, tok = load_model(BUDGET["model"], device=DEVICE, dtype=BUDGET["dtype"])
    if recipe:
        parsed = parse_recipe(recipe)
        calib = None  # speed does not depend on the calibration text: seeded random tokens will do
        if parsed.needs_calibration:
            calib = torch.randint(0, model.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
        compress(model, parsed, calib.to(DEVICE) if calib is not None else None, tok)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return model, tok


def _check(failures: list[str], ok: bool, what: str, measured: float, budget: float) -> None:
    if not ok:
        failures.append(f"{what}: measured {measured:.4g}, budget {budget:.4g}")


@pytest.mark.parametrize("name", list(BUDGET["recipes"]))
def test_decode_budget(benchmark, base, name):
    spec = BUDGET["recipes"][name]
    if "parent" in spec and spec["parent"] not in RESULTS:
        pytest.skip(f"{name} is judged against {spec['parent']}: run them together (no -k that drops the parent)")
    model, tok = _compressed(base, spec["recipe"])
    P, N, runs = BUDGET["prompt_len"], BUDGET["new_tokens"], BUDGET["runs"]
    ids = prompt_ids(model, P, tok)
    decoder = Decoder(model, P + N)
    metrics = bench(model, tok, P, N, runs, decoder=decoder)
    if BUDGET["compare"] == "speedup" or "min_speedup" in spec:  # plain generate on the base, right before
        hf = bench_hf(base[0] if DEVICE == "cpu" else model, ids, N, runs)
        metrics |= {f"hf_{k}": v for k, v in hf.items()} | {"speedup": metrics["tokens_per_s"] / hf["tokens_per_s"]}
    benchmark.extra_info.update({"recipe": name, "recipe_text": spec["recipe"], "model": BUDGET["model"], **metrics})
    benchmark.pedantic(generate, args=(model, ids, N), kwargs={"decoder": decoder}, rounds=runs, warmup_rounds=0)
    RESULTS[name] = metrics

    failures: list[str] = []
    if "min_speedup" in spec:
        _check(failures, metrics["speedup"] >= spec["min_speedup"], "speedup over plain generate",
               metrics["speedup"], spec["min_speedup"])
    if "min_tokens_per_s" in spec:
        _check(failures, metrics["tokens_per_s"] >= spec["min_tokens_per_s"], "tokens/s", metrics["tokens_per_s"],
               spec["min_tokens_per_s"])
    if "max_peak_mem_gb" in spec:
        _check(failures, metrics["peak_mem_gb"] <= spec["max_peak_mem_gb"], "peak allocated GB",
               metrics["peak_mem_gb"], spec["max_peak_mem_gb"])
    if "parent" in spec:
        parent, key = RESULTS[spec["parent"]], BUDGET["compare"]
        _check(failures, metrics["model_gb"] < parent["model_gb"], f"model GB (< {spec['parent']}'s)",
               metrics["model_gb"], parent["model_gb"])
        floor = parent[key] * BUDGET["parent_ratio"]
        _check(failures, metrics[key] > floor, f"{key} (> {BUDGET['parent_ratio']} x {spec['parent']}'s)",
               metrics[key], floor)
    message = f"{name} on {metrics['device']}: " + "; ".join(failures)
    if failures and "known_failure" in spec:  # a budget this machine is measured to miss: reported, not hidden
        pytest.xfail(f"{message} (known: {spec['known_failure']})")
    assert not failures, message
