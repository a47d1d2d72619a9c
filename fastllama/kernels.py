"""fastllama's own CPU kernels: the decode step's int4 and int8 matmuls, int8 activations times integer weights.

    int4_matmul(x [M, K], packed [N, K/2] uint8, scales_and_zeros [N, K/G, 2] bfloat16, G) -> [M, N] float32
    int8_matmul(x [M, K], weight [N, K] int8, scales [N] bfloat16) -> [M, N] float32

PyTorch's CPU int4 and int8 kernels convert every weight to float and multiply in float; llama.cpp quantizes the
activations to int8 and multiplies in integer SIMD, 32 products an instruction (AVX2's maddubs). On AVX2 that is the
difference between its Q4_0 decode and ours. These kernels do the same (`csrc/matmul_avx2.cpp`): activations in blocks
of 64 with one float scale each (absmax / 127), int4 zeros applied to the activations' exact float sums. The int8
kernel reads PyTorch's own int8 layout; the int4 kernel its own (`pack`). Weights are prefetched 8 KB ahead: a decode
step streams every weight once, from memory, and without it the kernels streamed 10 GB/s there.

Measured on a 2-core Xeon (AVX512, and run as AVX2: ATEN_CPU_CAPABILITY=avx2), interleaved in one process, the
embedded model's decode (prompt 128, 64 new tokens): gptq4 at 146-165 tok/s against 85-91 on PyTorch's kernels as AVX2
(161-171 against 126-141 as AVX512), gptq8 at 117-128 against 64-65 as AVX2. Alone, at batch 1, a 3072x576 int4 matmul
takes 29 us against 83 in PyTorch's kernel as AVX2 (48 as AVX512), a 49152x576 int8 head 0.69 ms against 1.15. Their
error is the activations' rounding: 44 dB of SQNR for N(0, 1) activations (PyTorch's bfloat16 activations: 52.6 dB);
decoding on them moved the embedded model's perplexity by +0.05-0.18% (gptq4) and +0.4% (gptq8).

It is C++ with intrinsics, registered as the operators `torch.ops.fastllama.int4_matmul` and `int8_matmul` (a
compiled decode step calls each as one opaque node, at the cost of an ATen call). It is built on first use with the
C++ compiler inductor uses (`CXX`, else g++) against torch's own headers (about 5 s) and cached on disk
(FASTLLAMA_CACHE, ~/.cache/fastllama), keyed by its source, flags and torch version. Its threads are torch's
(`at::parallel_for`). Where it cannot be built, `available()` is False, the reason is logged once, and QuantLinear
keeps PyTorch's kernels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "matmul_avx2.cpp"
FLAGS = ("-O3", "-std=c++20", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-w")
CACHE = Path(os.environ.get("FASTLLAMA_CACHE", Path.home() / ".cache" / "fastllama")) / "kernels"
BLOCK = 64  # weights and activations are laid out and quantized in blocks of this many values
ROWS = 4  # the kernels compute this many weight rows at a time: a weight's row count must be a multiple of it


def supported(capability: str | None = None) -> bool:
    """Whether this CPU's capability (`torch.backends.cpu.get_cpu_capability()`) runs the AVX2 kernels."""
    return (capability or torch.backends.cpu.get_cpu_capability()) in ("AVX2", "AVX512")


def _build_command(out: Path) -> list[str]:
    root = Path(torch.__file__).parent
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    return [os.environ.get("CXX", "g++"), *FLAGS, abi, f"-I{root / 'include'}",
            f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", str(SOURCE), "-o", str(out),
            f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu"]


@functools.lru_cache(maxsize=None)
def _load() -> bool:
    """Load the operator (built first where the cache has none); False, logged, where it cannot be."""
    try:
        key = hashlib.sha256(SOURCE.read_bytes() + " ".join(_build_command(Path())).encode()
                             + torch.__version__.encode()).hexdigest()[:16]
        path = CACHE / f"matmul_avx2-{key}.so"
        if not path.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            subprocess.run(_build_command(tmp), check=True, capture_output=True, text=True)
            tmp.replace(path)  # atomic: processes building at once each write their own file
        torch.ops.load_library(path)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip()[-500:]
        log.warning("fastllama's CPU kernels could not be built (%s); PyTorch's int4 and int8 kernels are used "
                    "instead. Install g++ or set CXX to a C++ compiler.", detail)
        return False
    for name in ("int4_matmul", "int8_matmul"):  # for torch.compile: [M, N] float32, N the weight's rows
        torch.library.register_fake(f"fastllama::{name}")(_output_shape)
    return True


def _output_shape(x: Tensor, weight: Tensor, *grid) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


def available() -> bool:
    """Whether the kernels run here: an AVX2 or AVX512 CPU, and the kernels built (see the module docstring)."""
    return supported() and _load()


def usable(group_size: int, in_features: int, out_features: int) -> bool:
    """Whether a weight of this group size and shape (padded) can run on a kernel here (8-bit: its row is its
    group)."""
    return group_size % BLOCK == 0 and in_features % group_size == 0 and out_features % ROWS == 0 and available()


def pack(q: Tensor) -> Tensor:
    """Integer values q [N, K] in 0..15 as the kernel reads them: uint8 [N, K/2], each 64 values in 32 bytes,
    byte j holding value j (low nibble) and j + 32 (high)."""
    v = q.to(torch.uint8).view(q.shape[0], -1, 2, BLOCK // 2)
    return (v[:, :, 0] | v[:, :, 1] << 4).reshape(q.shape[0], -1)


def unpack(packed: Tensor) -> Tensor:
    """The values [N, K] (uint8, 0..15) of `pack`."""
    b = packed.view(packed.shape[0], -1, 1, BLOCK // 2)
    return torch.cat([b & 15, b >> 4], 2).reshape(packed.shape[0], -1)


def int4_matmul(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """`x @ Ŵᵀ` [M, N] in float32 for x [M, K], Ŵ = (q - 8)·s + z per group of `group_size` (a multiple of 64), q the
    values `pack` packed into `packed` [N, K/2], and (s, z) `scales_and_zeros` [N, K/group_size, 2] (bfloat16). N must
    be a multiple of 4. Only where `available()`."""
    return torch.ops.fastllama.int4_matmul(x, packed, scales_and_zeros, group_size)


def int8_matmul(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """`x @ (weight·scales)ᵀ` [M, N] in float32 for x [M, K] (K a multiple of 64), weight [N, K] int8 and one
    bfloat16 scale per row (PyTorch's int8 layout). N must be a multiple of 4. Only where `available()`."""
    return torch.ops.fastllama.int8_matmul(x, weight, scales)
