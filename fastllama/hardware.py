"""The machine a measurement ran on: device, CPU capability or GPU name, native bf16, threads, load.

    machine("cpu") -> Machine(device="cpu", name="Intel(R) Xeon(R) Processor", cpu_capability="AVX512", ...)

Every result that holds a speed carries one (`dataclasses.asdict(machine(device))`), so a number is never read
without the machine that produced it, nor without how busy that machine was.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU flags of native bf16 arithmetic (AVX512-BF16, AMX)


@dataclass
class Machine:
    device: str            # the device measured on: "cpu" or "cuda:0"
    name: str              # the GPU's name on a GPU, else the CPU's model name
    cpu_capability: str    # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", "DEFAULT", ...
    bf16_native: bool      # the device computes in bf16 natively (CPU: avx512_bf16 or amx_bf16; GPU: sm_80 or later)
    threads: int           # torch.get_num_threads()
    load: float | None     # the 1-minute load average when this was taken (None where the OS has none)

    def describe(self) -> str:
        """One line for titles: "cpu, AVX512, native bf16, 2 threads" or "NVIDIA H100 80GB HBM3, native bf16, ..."."""
        where = "cpu" if self.device == "cpu" else self.name
        bf16 = "native bf16" if self.bf16_native else "no native bf16"
        return f"{where}, {self.cpu_capability}, {bf16}, {self.threads} threads"


def load_average() -> float | None:
    """The 1-minute load average (runnable tasks, all cores together), or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ({} where there is none: macOS, Windows)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return {}
    fields = (line.partition(":") for line in text.split("\n\n")[0].splitlines())
    return {k.strip(): v.strip() for k, _, v in fields}


def machine(device: str | torch.device = "cpu") -> Machine:
    """Describe the machine for measurements on `device`, with the load average right now."""
    device = torch.device(device)
    info = _cpuinfo()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bf16 = torch.cuda.get_device_capability(device)[0] >= 8
    else:
        name = info.get("model name") or platform.processor() or platform.machine()
        bf16 = any(flag in info.get("flags", "").split() for flag in BF16_FLAGS)
    return Machine(device=str(device), name=name, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   bf16_native=bf16, threads=torch.get_num_threads(), load=load_average())
