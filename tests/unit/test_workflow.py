"""The GPU perf workflow: its YAML parses, it runs on the self-hosted GPU runner after installing Triton's build
prerequisites, runs the unit suite and then the perf suite, keeps the benchmark JSON, and gates on budgets and on
median regressions against the baseline stored for its machine id: that path runs here for real, with
pytest-benchmark on a generated benchmark of known duration."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "perf-gpu.yml"


@pytest.fixture(scope="module")
def job() -> dict:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert workflow.get("on", workflow.get(True))  # YAML 1.1 reads the key `on` as True
    return workflow["jobs"]["perf"]


def _step(job: dict, name: str) -> dict:
    return next(step for step in job["steps"] if step.get("name") == name)


def _index(job: dict, name: str) -> int:
    return job["steps"].index(_step(job, name))


def test_runs_on_the_gpu_runner(job):
    assert job["runs-on"] == ["self-hosted", "gpu"]
    assert any(step.get("uses", "").startswith("actions/checkout@") for step in job["steps"])
    assert "pip install -e" in _step(job, "Install")["run"]


def test_installs_the_build_prerequisites_of_triton_first(job):
    """A C compiler and Python's headers, before anything compiles a kernel."""
    script = _step(job, "Build prerequisites")["run"]
    assert "command -v cc" in script and "Python.h" in script
    assert "build-essential" in script and "python3-dev" in script
    assert _index(job, "Build prerequisites") < _index(job, "Install")


def test_runs_the_unit_suite_then_the_perf_suite(job):
    """The CUDA unit tests run only here: the unit suite runs on the runner, before the budgets."""
    unit, perf = _step(job, "Unit tests (the CUDA ones included)")["run"], _step(job, "Perf budgets")["run"]
    assert "python -m pytest -m unit" in unit
    assert 'python -m pytest -m perf "$PERF_TESTS"' in perf and "--benchmark-json out.json" in perf
    assert _index(job, "Install") < _index(job, "Unit tests (the CUDA ones included)") < _index(job, "Perf budgets")
    upload = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["with"]["path"] == "out.json" and upload["if"] == "always()"


def _perf_line(job: dict) -> str:
    script = _step(job, "Perf budgets")["run"]
    return next(line.strip() for line in script.splitlines() if line.strip().startswith("python -m pytest"))


def test_its_perf_command_collects_the_suite_on_cpu(job, tmp_path):
    line = _perf_line(job).replace('"${compare[@]}"', "")
    line = line.replace("$PERF_TESTS", "tests/perf").replace("$BASELINE", str(tmp_path / "baseline"))
    argv = [sys.executable, *shlex.split(line)[1:]]  # "python" -> this interpreter
    argv = [a.replace("out.json", str(tmp_path / "out.json")) for a in argv]
    env = {**os.environ, "FASTLLAMA_PERF_BUDGET": str(ROOT / "tests/perf/budgets/h100.json")}  # the runner's file
    done = subprocess.run([*argv, "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test_tokens_per_s[gptq4]" in done.stdout and "test_not_slower_than_parent[prune-mlp25]" in done.stdout


# ------------------------------------------------------------------------------------ the stored-baseline path
# A benchmark of known duration: pytest-benchmark reads time from `fakeclock.now` (--benchmark-timer), which the
# benchmarked function advances by WORK_SECONDS, so every round measures exactly that.
FAKE_CLOCK = """
import os
now = 0.0
def timer():
    return now
def work():
    global now
    now += float(os.environ["WORK_SECONDS"])
"""
FAKE_BENCH = """
import pytest
import fakeclock
pytestmark = pytest.mark.perf
def test_generate(benchmark):
    benchmark.pedantic(fakeclock.work, rounds=5, iterations=1)
"""


@pytest.fixture
def perf_run(job, tmp_path):
    """Runs the workflow's own "Perf budgets" script in bash, on the generated benchmark, in `tmp_path` (its
    `.venv/bin/activate` puts this interpreter first on PATH); returns a function of the benchmark's duration."""
    (tmp_path / "fakeclock.py").write_text(FAKE_CLOCK)
    (tmp_path / "test_fake.py").write_text(FAKE_BENCH)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text(f'export PATH="{tmp_path / "bin"}:$PATH"\n')
    step = _step(job, "Perf budgets")
    env = {**os.environ, **step["env"], "PERF_TESTS": "test_fake.py", "PYTHONPATH": str(tmp_path),
           "PYTEST_ADDOPTS": "--benchmark-timer=fakeclock.timer -p no:cacheprovider"}

    def run(seconds: float, script: str = step["run"]) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env={**env, "WORK_SECONDS": str(seconds)})

    return run


def _store_baseline(tmp_path: Path, seconds: float) -> Path:
    """The README's refresh command, on the generated benchmark: the baseline under this machine's id."""
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "WORK_SECONDS": str(seconds)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "perf", "test_fake.py", "-p", "no:cacheprovider",
                           "--benchmark-timer=fakeclock.timer", "--benchmark-storage=file://tests/perf/baseline",
                           "--benchmark-save=0001"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (stored,) = (tmp_path / "tests" / "perf" / "baseline").glob("*/0001_*.json")
    assert json.loads(stored.read_text())["benchmarks"][0]["stats"]["median"] == pytest.approx(seconds)
    return stored


@pytest.mark.parametrize("baseline, current, passes", [(0.8, 1.0, False), (0.96, 1.0, True), (1.0, 1.0, True)])
def test_a_regression_against_this_machines_baseline_fails(perf_run, tmp_path, baseline, current, passes):
    """--benchmark-compare-fail=median:10% against a baseline 25% faster (0.8x the time) fails the job; one within 5%
    (0.96x), or equal, passes."""
    _store_baseline(tmp_path, baseline)
    done = perf_run(current)
    assert (done.returncode == 0) == passes, done.stdout + done.stderr
    assert "Comparing against benchmarks from" in done.stdout + done.stderr
    assert passes or "Performance has regressed" in done.stdout + done.stderr
    assert json.loads((tmp_path / "out.json").read_text())["benchmarks"][0]["stats"]["median"] == pytest.approx(current)


def test_a_baseline_from_another_machine_is_not_compared(perf_run, job, tmp_path):
    """A baseline stored under another machine id: the job gates on the budgets only and says so, where passing
    pytest-benchmark the compare flags regardless ends in a UsageError after the whole run."""
    stored = _store_baseline(tmp_path, 0.5)
    other = stored.parent.with_name("Other-CPython-3.0-64bit")
    stored.parent.rename(other)
    done = perf_run(1.0)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no stored baseline for machine" in done.stdout
    forced = _step(job, "Perf budgets")["run"].replace('"${compare[@]}"',
                                                       "--benchmark-compare=0001 --benchmark-compare-fail=median:10%")
    done = perf_run(1.0, forced)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "--benchmark-compare-fail requires valid --benchmark-compare" in out


def test_no_baseline_gates_on_the_budgets_only(perf_run, tmp_path):
    done = perf_run(1.0)
    assert done.returncode == 0 and "no stored baseline for machine" in done.stdout, done.stdout + done.stderr


def _tiny_budget(tmp_path: Path, floor: float, **entry) -> Path:
    budget = {"device_class": "cpu", "capability": "TINY", "note": "a smoke budget", "model": "random:tiny",
              "dtype": "float32", "prompt_len": 8, "new_tokens": 4, "rounds": 1,
              "recipes": {"base": None, "rtn4": "rtn:bits=4,group=32"},
              "memory": {"rtn4": {"max_model_gb": 1.0, "unmeasured": "smoke"}},
              "speedup": {"base": {"floor": floor, "unmeasured": "smoke", **entry}},
              "vs_parent": {"rtn4": {"parent": "base", "floor": 0.0, "unmeasured": "smoke"}}}
    path = tmp_path / "budget.json"
    path.write_text(json.dumps(budget))
    return path


def _run_perf(tmp_path: Path, budget: Path) -> subprocess.CompletedProcess:
    """The perf suite on `budget`, without the gate's self-test (a tiny model's steps are too short to resolve)."""
    env = {**os.environ, "FASTLLAMA_PERF_BUDGET": str(budget)}
    return subprocess.run([sys.executable, "-m", "pytest", "-m", "perf", "tests/perf", "-q", "-p", "no:cacheprovider",
                           "-k", "not gate_resolves", "--benchmark-json", str(tmp_path / "out.json")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_perf_suite_records_every_metric(tmp_path):
    """The suite itself on a tiny budget: one test per check, every metric in the benchmark JSON."""
    done = _run_perf(tmp_path, _tiny_budget(tmp_path, floor=0.0))
    assert done.returncode == 0 and "4 passed" in done.stdout, done.stdout + done.stderr
    runs = {b["name"].partition("[")[0]: b for b in json.loads((tmp_path / "out.json").read_text())["benchmarks"]}
    assert set(runs) == {"test_memory", "test_speedup_over_plain_generate", "test_not_slower_than_parent"}
    for name in ("tpot_ms", "ttft_ms", "tokens_per_s", "e2e_tokens_per_s", "peak_mem_gb", "nvml_mem_gb",
                 "peak_rss_gb", "model_gb", "bandwidth_frac", "machine", "policy"):
        assert name in runs["test_memory"]["extra_info"], name
    assert runs["test_speedup_over_plain_generate"]["extra_info"]["speedup"] > 0
    assert runs["test_not_slower_than_parent"]["extra_info"]["parent_ratio"] > 0
    assert runs["test_memory"]["stats"]["rounds"] == 1


@pytest.mark.parametrize("known, rc, outcome", [(None, 1, "1 failed"), ("measured too slow", 0, "1 xfailed")])
def test_perf_suite_fails_a_broken_budget_with_both_values(tmp_path, known, rc, outcome):
    """A broken budget fails with the measured and the budget value; one marked as a known failure xfails."""
    extra = {"known_failure": known} if known else {}
    done = _run_perf(tmp_path, _tiny_budget(tmp_path, floor=1e6, **extra))
    assert done.returncode == rc and outcome in done.stdout, done.stdout
    assert "base speedup over plain generate: measured" in done.stdout and "floor 1e+06" in done.stdout
