"""The machine a measurement ran on: device, CPU capability or GPU name, native bf16, threads, load.

    machine("cpu") -> Machine(device="cpu", name="Intel(R) Xeon(R) Processor", cpu_capability="AVX512", ...)

Every result that holds a speed carries one (`dataclasses.asdict(machine(device))`), so a number is never read
without the machine that produced it, nor without how busy that machine was. `policy` decides from it which dtype
and kernel each part of a model uses, and `simd_bits`/`own_code` how inductor compiles for this CPU.
"""

from __future__ import annotations

import os
import platform
import shutil
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from . import kernels

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU flags of native bf16 arithmetic (AVX512-BF16, AMX)
DEQUANT_ROWS = 96  # from this many rows, CPU int4/int8 matmuls dequantize once and run one GEMM (measured: see policy)
KERNELS_ENV = "FASTLLAMA_CPU_KERNELS"  # "aten" keeps PyTorch's int4/int8 kernels where fastllama's would run
SIMD_BITS = {"AVX512": 512, "AVX2": 256}  # the vector width inductor's CPU code is written for, by capability


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


# ---------------------------------------------------------------- the dtype and kernel policy
@dataclass
class Policy:
    """Which dtype and kernel each part of a compressed model uses on a device, decided in one place (`policy`)
    from the detected machine and recorded beside every result."""

    float_dtype: str        # the float parts (embeddings, norms, float linears) for `cast:dtype=auto`
    head_bits: int | None   # `head:bits=auto` quantizes the output head to this many bits; None keeps it float
    kernel_act_dtype: str   # activations into the int4/int8 kernels (their scales' dtype)
    cpu_kernels: str        # int4/int8 matmuls of few rows: "fastllama" (int8 activations: fastllama.kernels) or "aten"
    fp32_linear: str        # float32 linears at batch 1 on the CPU: "onednn" or "mkl" (F.linear's sgemm)
    attn_dtype: str         # attention and the KV cache of the fast path ("model": the model's own dtype)
    compile_step: bool      # torch.compile the fast path's decode step (inductor; CUDA graphs on a GPU)
    compile_layers: bool    # compile one decoder layer, reused for every layer of its shapes (nested_compile_region)
    dequant_rows: int | None  # int4/int8 matmuls of this many rows or more dequantize once, then one float GEMM
    why: str                # the measurements behind it, in one line


def bf16_compute(m: Machine) -> bool:
    """Whether bf16 arithmetic is native where the kernels run: the flags, and ATen dispatching past AVX2 (with
    ATEN_CPU_CAPABILITY=avx2 an AVX512 machine runs the AVX2 kernels, which emulate bf16)."""
    return m.bf16_native and (m.device != "cpu" or m.cpu_capability not in ("AVX2", "DEFAULT"))


def policy(device: str | torch.device = "cpu", m: Machine | None = None) -> Policy:
    """The policy for `device` on this machine (or on `m`, to decide for another machine, e.g. in tests)."""
    if (m.device != "cpu") if m else torch.device(device).type != "cpu":  # nothing about the GPU is read
        return Policy("bfloat16", None, "bfloat16", "aten", "mkl", "model", True, False, None,
                      "GPU: bf16 tensor cores; the head stays bf16 as in the reference study; "
                      "int8 and int4 weights dequantize inside their matmul; the decode step compiled with CUDA "
                      "graphs, every layer unrolled (a layer compiled once and reused is not measured on a GPU)")
    m = m or machine(device)
    native, amd, cxx = bf16_compute(m), "AMD" in m.name, shutil.which(os.environ.get("CXX", "g++")) is not None
    own = os.environ.get(KERNELS_ENV, "fastllama") != "aten" and cxx and kernels.supported(m.cpu_capability)
    own = own and kernels.available()  # built here, once (cached on disk): the policy says what really runs
    return Policy(
        "bfloat16" if native else "float32", 8, "bfloat16", "fastllama" if own else "aten",
        "onednn" if amd else "mkl", "float32", cxx, cxx and hasattr(torch.compiler, "nested_compile_region"),
        DEQUANT_ROWS,
        ("CPU with native bf16: float parts in bf16 (half the bytes)" if native else
         "CPU without native bf16 (emulated: a bf16 49152x576 head took 34 ms/token against 4.7 ms in float32 on an "
         "AVX2 EPYC): float parts in float32")
        + "; the head quantized to int8 (the largest matmul of small models; llama.cpp keeps its own head at 6-8 "
        "bits too); int4/int8 kernels fed bf16 activations (their fast path: float32 activations took 79-129 ms a "
        "token against 8-11 ms on AVX2); "
        + ("int4 and int8 matmuls of few rows on fastllama's kernels, int8 activations in integer SIMD as llama.cpp "
           "computes (a 3072x576 int4 matmul at batch 1: 29 us against 83 in PyTorch's kernel run as AVX2, 48 as "
           "AVX512)" if own else
           f"int4 and int8 matmuls on PyTorch's kernels ({KERNELS_ENV}=aten, no C++ compiler, or no AVX2)")
        + "; attention in float32 (a bf16 SDPA decode call took 100 us against 18 us); "
        "float32 linears on oneDNN on AMD CPUs (MKL's sgemm streamed 16 GB/s where oneDNN streamed 25 on an EPYC), "
        "on MKL elsewhere (a Xeon with AMX decoded float32 in 29.8 ms/token through MKL, 42.3 through oneDNN); "
        + ("the decode step compiled by inductor (it fuses the norms, rotary and residual ops between the kernels: "
           "9.8 against 14.4 ms/token for gptq4 on a 2-core Xeon), cached on disk across processes; one layer compiled "
           "and reused for every layer of its shapes (gptq4's cold compile 6 s against 20 s unrolled, the same step "
           "time, on a 2-core Xeon run as AVX2)" if cxx else
           "the decode step eager: inductor needs a C++ compiler and none was found (install g++, or set CXX)")
        + f"; int4/int8 matmuls of {DEQUANT_ROWS} rows or more (prefill, evaluation, calibration) dequantize the "
        "weight once and run one GEMM in the float dtype (the kernels redo their dequantization for every 4 rows: "
        "a 128x576x1536 int4 matmul took 1.42 ms in the kernel, 0.61 dequantized, on a 2-core AVX512 Xeon)")


def simd_bits() -> int | None:
    """The CPU vector width for inductor to compile for, named so that it is part of the compiled code's cache key
    (None: inductor's own pick). Inductor picks the width from ATEN_CPU_CAPABILITY but its on-disk cache key omits
    it: a step compiled under AVX2 (8 floats a vector) was reused under AVX512, built with 16-float vectors, and its
    full-width stores wrote past their buffers (heap corruption, seen while emulating AVX2 on an AVX512 machine)."""
    return SIMD_BITS.get(torch.backends.cpu.get_cpu_capability())


def own_code(fn: types.FunctionType) -> types.FunctionType:
    """A copy of `fn` with a code object of its own, to compile apart. Dynamo keeps compiled code, guards and the
    recompile count per code object: shared by every decoder, Decoder.forward would recompile for each new model and
    fail hard (fullgraph) at the 9th in one process, and hold every earlier model's compiled code; a decoder's own
    copy is compiled once and freed with it (and each shape of `fastllama.nn`'s int4 dequantization has its own)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
