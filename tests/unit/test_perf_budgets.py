"""The perf gate without timing: every budget file keeps the rules (floors set from measurements, at most 15% under
them; names that resolve), and the gate's pieces do what the suite relies on, checked on stub runs with known times."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from fastllama.bench import compare, interleave, summarize
from fastllama.recipes import parse_recipe

pytestmark = pytest.mark.unit

PERF = Path(__file__).resolve().parents[1] / "perf"
_spec = importlib.util.spec_from_file_location("gate", PERF / "gate.py")
gate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gate)
BUDGET_FILES = sorted((PERF / "budgets").glob("*.json"))


@pytest.mark.parametrize("path", BUDGET_FILES, ids=lambda p: p.name)
def test_budget_files_keep_the_rules(path):
    budget = json.loads(path.read_text())
    assert gate.budget_problems(budget) == []
    for recipe in filter(None, budget["recipes"].values()):
        parse_recipe(recipe)  # every recipe text is valid
    if budget["device_class"] == "cpu":
        assert path.stem == f"cpu-{budget['capability'].lower()}"  # the file the suite picks on that CPU


def test_measure_sets_floors_from_runs_or_appends_them(tmp_path):
    """measure.py: the floors at 90% of the runs' median (86% against llama.cpp), ceilings at median / 0.9; with
    --append the runs join the measurements already in the file."""
    spec = importlib.util.spec_from_file_location("measure", PERF / "budgets" / "measure.py")
    measure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(measure)
    budget = tmp_path / "b.json"
    budget.write_text(json.dumps({"speedup": {"a": {"floor": 1.0, "measured": [3.0]}},
                                  "peers": {"a": {"floor": 0.5, "measured": [1.0], "peer": "q4_0"}},
                                  "memory": {"a": {"max_model_gb": 1.0, "measured_model_gb": [0.5]}}}))
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"benchmarks": [
        {"name": "test_speedup_over_plain_generate[a]", "extra_info": {"speedup": 2.0}},
        {"name": "test_against_llama_cpp[a]", "extra_info": {"peer_ratio": 0.8}},
        {"name": "test_memory[a]", "extra_info": {"model_gb": 0.45}}]}))
    measure.main(str(budget), str(run), str(run))
    b = json.loads(budget.read_text())
    assert b["speedup"]["a"] == {"floor": 1.8, "measured": [2.0, 2.0]}
    assert b["peers"]["a"] == {"floor": 0.688, "measured": [0.8, 0.8], "peer": "q4_0"}
    assert b["memory"]["a"] == {"max_model_gb": 0.5, "measured_model_gb": [0.45, 0.45]}
    faster = tmp_path / "faster.json"
    faster.write_text(json.dumps({"benchmarks": [
        {"name": "test_speedup_over_plain_generate[a]", "extra_info": {"speedup": 5.0}}]}))
    measure.main(str(budget), "--append", str(faster), str(faster))
    b = json.loads(budget.read_text())
    assert b["speedup"]["a"] == {"floor": 3.15, "measured": [2.0, 2.0, 5.0, 5.0]}  # median 3.5
    assert b["memory"]["a"]["measured_model_gb"] == [0.45, 0.45]  # not in these runs: as it was


def test_budget_rules_catch_a_loose_or_unfounded_floor():
    budget = {"device_class": "cpu", "capability": "AVX2", "note": "", "model": "m", "dtype": "float32",
              "prompt_len": 8, "new_tokens": 8, "rounds": 3, "recipes": {"a": None, "b": "rtn:bits=8"},
              "speedup": {"a": {"floor": 1.5, "measured": [1.8, 1.9]}},
              "vs_parent": {"b": {"parent": "c", "floor": 0.9}},
              "memory": {"b": {"max_model_gb": 1.0, "measured_model_gb": [0.5]}}}
    problems = gate.budget_problems(budget)
    assert any("speedup.a: floor 1.5 sits more than 15% under the measured median 1.85" in p for p in problems)
    assert any("vs_parent.b: parent 'c'" in p for p in problems)
    assert any("vs_parent.b: floor needs its measurements" in p for p in problems)
    assert any("memory.b: max_model_gb 1.0 sits more than 18% over" in p for p in problems)
    budget["speedup"]["a"]["floor"] = 1.6
    budget["vs_parent"]["b"] |= {"parent": "a", "unmeasured": "no such machine here"}
    budget["memory"]["b"]["max_model_gb"] = 0.55
    assert gate.budget_problems(budget) == []


def _stub(step_ms: float, prefill_ms: float, log: list, name: str, new_tokens: int):
    """A run that sleeps through a prefill and `new_tokens - 1` steps of known length, recording when it ran."""
    def run() -> list[float]:
        log.append(name)
        times = [prefill_ms] + [step_ms] * (new_tokens - 1)
        for ms in times:
            time.sleep(ms / 1000)
        return times

    return run


def test_interleave_alternates_after_one_warm_up_each():
    log: list[str] = []
    timings = interleave({"a": _stub(0, 0, log, "a", 2), "b": _stub(0, 0, log, "b", 2)}, rounds=3)
    assert log == ["a", "b"] + ["a", "b"] * 3 and len(timings["a"]) == len(timings["b"]) == 3


def test_tpot_is_the_median_step_without_prefill():
    m = summarize([[50.0, 10.0, 12.0, 11.0], [40.0, 9.0, 30.0, 10.0]], new_tokens=4)
    assert m["tpot_ms"] == 10.5 and m["ttft_ms"] == 45.0 and m["tokens_per_s"] == pytest.approx(1000 / 10.5)
    assert m["e2e_tokens_per_s"] == pytest.approx(4 * 1000 / 86.0)  # median whole run, prefill included


def test_a_20pc_slowdown_fails_a_floor_set_from_the_median():
    """The suite's own pieces on runs of known length: a step made 20% slower by `gate.slowed` measures under
    FLOOR_FRACTION of the unslowed one, which passes; `check_floor` fails the first with both values."""
    log: list[str] = []
    fast = _stub(4, 1, log, "fast", 6)
    slow_step = gate.slowed(lambda: time.sleep(0.004), 0.2)

    def slow() -> list[float]:
        out = [1.0]
        time.sleep(0.001)
        for _ in range(5):
            start = time.perf_counter()
            slow_step()
            out.append((time.perf_counter() - start) * 1000)
        return out

    res = compare({"fast": fast, "slow": slow}, new_tokens=6, rounds=3)
    ratio = res["slow"]["tokens_per_s"] / res["fast"]["tokens_per_s"]
    assert ratio < gate.FLOOR_FRACTION < 1.0
    gate.check_floor("same", 1.0, gate.FLOOR_FRACTION, {}, "test")  # passes: no exception
    with pytest.raises(pytest.fail.Exception, match=r"slowed: measured 0\.\d+, floor 0\.85 \(test\)"):
        gate.check_floor("slowed", ratio, gate.FLOOR_FRACTION, {}, "test")


def test_known_failure_excuses_only_its_own_check():
    with pytest.raises(pytest.xfail.Exception, match="known: int4 kernel"):
        gate.check_floor("ratio", 0.8, 0.9, {"known_failure": "int4 kernel"}, "test")
    gate.check_floor("ratio", 0.95, 0.9, {"known_failure": "int4 kernel"}, "test")  # a pass stays a pass
