"""The GPU perf workflow: its YAML parses, it runs on the self-hosted GPU runner, keeps the benchmark JSON, gates
on budgets and median regressions, and the pytest command it runs works here on the CPU (collection only)."""

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


def _pytest_line(job: dict) -> tuple[str, str]:
    script = next(step["run"] for step in job["steps"] if "pytest" in step.get("run", ""))
    return script, next(line.strip() for line in script.splitlines() if line.strip().startswith("python -m pytest"))


def test_runs_on_the_gpu_runner(job):
    assert job["runs-on"] == ["self-hosted", "gpu"]
    assert any(step.get("uses", "").startswith("actions/checkout@") for step in job["steps"])
    assert any("pip install -e" in step.get("run", "") for step in job["steps"])


def test_gates_on_budgets_and_regressions(job):
    script, line = _pytest_line(job)
    assert "-m perf" in line and "--benchmark-json out.json" in line
    assert "--benchmark-compare-fail=median:10%" in script  # against the stored baseline, when there is one
    upload = next(step for step in job["steps"] if step.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["with"]["path"] == "out.json" and upload["if"] == "always()"


def test_its_pytest_command_works_on_cpu(job, tmp_path):
    _, line = _pytest_line(job)
    line = line.replace("$compare", "--benchmark-compare=0001 --benchmark-compare-fail=median:10%")
    line = line.replace("file://tests/perf/baseline", f"file://{tmp_path / 'baseline'}")
    argv = [sys.executable, *shlex.split(line)[1:]]  # "python" -> this interpreter
    argv = [a.replace("out.json", str(tmp_path / "out.json")) for a in argv]
    done = subprocess.run([*argv, "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test_decode_budget[" in done.stdout


def _tiny_budget(tmp_path: Path, min_speedup: float, **base) -> Path:
    budget = {"model": "random:tiny", "dtype": "float32", "prompt_len": 8, "new_tokens": 4, "runs": 1,
              "compare": "speedup", "parent_ratio": 0.0,
              "recipes": {"base": {"recipe": None, "min_speedup": min_speedup, **base},
                          "rtn4": {"recipe": "rtn:bits=4,group=32", "parent": "base"}}}
    path = tmp_path / "budget.json"
    path.write_text(json.dumps(budget))
    return path


def _run_perf(tmp_path: Path, budget: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTLLAMA_PERF_BUDGET": str(budget)}
    return subprocess.run([sys.executable, "-m", "pytest", "-m", "perf", "tests/perf", "-q", "-p", "no:cacheprovider",
                           "--benchmark-json", str(tmp_path / "out.json")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_perf_suite_records_every_metric(tmp_path):
    """The suite itself on a tiny budget: parents before children, every metric in the benchmark JSON."""
    done = _run_perf(tmp_path, _tiny_budget(tmp_path, min_speedup=0.0))
    assert done.returncode == 0, done.stdout + done.stderr
    runs = {b["extra_info"]["recipe"]: b for b in json.loads((tmp_path / "out.json").read_text())["benchmarks"]}
    assert set(runs) == {"base", "rtn4"}
    for name in ("tpot_ms", "ttft_ms", "tokens_per_s", "e2e_tokens_per_s", "peak_mem_gb", "nvml_mem_gb",
                 "peak_rss_gb", "model_gb", "bandwidth_frac", "speedup"):
        assert all(name in b["extra_info"] for b in runs.values()), name
    assert runs["rtn4"]["extra_info"]["model_gb"] < runs["base"]["extra_info"]["model_gb"]
    assert runs["base"]["stats"]["rounds"] == 1


@pytest.mark.parametrize("known, rc, outcome", [(None, 1, "1 failed"), ("measured too slow", 0, "1 xfailed")])
def test_perf_suite_fails_a_broken_budget_with_both_values(tmp_path, known, rc, outcome):
    """A broken budget fails with the measured and the budget value; one marked as a known failure xfails."""
    extra = {"known_failure": known} if known else {}
    done = _run_perf(tmp_path, _tiny_budget(tmp_path, min_speedup=1e6, **extra))
    assert done.returncode == rc and outcome in done.stdout, done.stdout
    assert "speedup over plain generate: measured" in done.stdout and "budget 1e+06" in done.stdout
