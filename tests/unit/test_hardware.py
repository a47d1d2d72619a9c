"""fastllama.hardware: the machine description, from /proc/cpuinfo, torch and the load average."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest
import torch

from fastllama import hardware
from fastllama.hardware import Machine, load_average, machine

pytestmark = pytest.mark.unit

CPUINFO = """processor	: 0
model name	: Test Xeon
flags		: fpu sse2 avx2 avx512f {extra}

processor	: 1
model name	: Another CPU
flags		: fpu avx512_bf16
"""


@pytest.mark.parametrize("extra, native", [("", False), ("avx512_bf16", True), ("amx_bf16 amx_tile", True),
                                           ("avx512_bf16x", False)])  # a flag only when the whole word matches
def test_cpu_bf16_is_native_only_with_its_flags(tmp_path, monkeypatch, extra, native):
    (tmp_path / "cpuinfo").write_text(CPUINFO.format(extra=extra))
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "cpuinfo")
    m = machine("cpu")
    assert m.name == "Test Xeon" and m.bf16_native is native  # the first processor's fields only
    assert m.device == "cpu" and m.cpu_capability == torch.backends.cpu.get_cpu_capability()


def test_without_cpuinfo_the_name_comes_from_platform(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(hardware.platform, "processor", lambda: "arm")
    m = machine("cpu")
    assert m.name == "arm" and m.bf16_native is False


def test_load_average_is_the_one_minute_figure(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 2.0, 1.0))
    assert load_average() == 3.5 and machine("cpu").load == 3.5

    def unavailable():
        raise OSError("no load average")
    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert load_average() is None and machine("cpu").load is None


def test_threads_follow_torch(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert machine("cpu").threads == 7


def test_machine_round_trips_through_json():
    m = machine(torch.device("cpu"))
    assert Machine(**json.loads(json.dumps(asdict(m)))) == m


def test_describe():
    cpu = Machine(device="cpu", name="Test Xeon", cpu_capability="AVX2", bf16_native=False, threads=2, load=0.5)
    assert cpu.describe() == "cpu, AVX2, no native bf16, 2 threads"
    gpu = Machine(device="cuda:0", name="NVIDIA H100 80GB HBM3", cpu_capability="AVX512", bf16_native=True,
                  threads=16, load=1.0)
    assert gpu.describe() == "NVIDIA H100 80GB HBM3, AVX512, native bf16, 16 threads"


def test_bench_results_carry_the_machine(tiny_model, monkeypatch):
    from fastllama.bench import bench

    monkeypatch.setattr(os, "getloadavg", lambda: (1.25, 0.0, 0.0))
    m = bench(tiny_model, prompt_len=4, new_tokens=2, runs=1)
    assert Machine(**json.loads(json.dumps(m["machine"]))) == machine("cpu")  # the load read after timing included
