"""Peers: the engines a user would pick instead of fastllama, measured the way fastllama is measured.

    peer = LlamaCpp.from_gguf(path, "q4_0")   # llama.cpp (llama-cpp-python): the GGUF requantized to Q4_0
    run = peer.run(ids, new_tokens)           # a callable -> [prefill ms, step ms, ...], as bench.fast_run

A peer's run decodes greedily from the same prompt token ids as fastllama's fast path and returns the same
per-token timings, so `bench.compare` interleaves it with fastllama in one process (A, B, A, B, ...) and the
perf suite and `fastllama bench --engine` judge both with one ruler. Peers are an optional extra
(`pip install -e ".[peers]"`), imported lazily with an error naming the extra when missing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# llama.cpp file types by the names llama.cpp's own quantize tool uses
LLAMA_CPP_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                   "f16": "LLAMA_FTYPE_MOSTLY_F16", "f32": "LLAMA_FTYPE_ALL_F32"}
CACHE = Path(os.environ.get("FASTLLAMA_CACHE", Path.home() / ".cache" / "fastllama"))


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError("llama.cpp is a peer of the optional extra: pip install -e '.[peers]' (llama-cpp-python; "
                          "it builds from source, about 8 minutes on 2 cores)") from e
    return llama_cpp


def requantize(src: str | Path, qtype: str, out: str | Path | None = None, threads: int | None = None) -> Path:
    """`src` (a GGUF) rewritten by llama.cpp's own quantizer as `qtype` (q4_0, q8_0, f16, f32); cached by name
    under FASTLLAMA_CACHE (~/.cache/fastllama) unless `out` is given."""
    if qtype not in LLAMA_CPP_TYPES:
        raise ValueError(f"unknown llama.cpp type {qtype!r}; valid: {', '.join(LLAMA_CPP_TYPES)}")
    llama_cpp = _llama_cpp()
    src = Path(src)
    out = Path(out) if out else CACHE / "peers" / f"{src.stem}.{qtype}.gguf"
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[qtype])
    params.allow_requantize = True  # the shipped model is already Q4_1
    params.nthread = threads or torch.get_num_threads()
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {qtype}")
    tmp.rename(out)
    log.info("llama.cpp quantized %s to %s: %s (%.1f MB)", src.name, qtype, out, out.stat().st_size / 1e6)
    return out


class LlamaCpp:
    """llama.cpp through llama-cpp-python, decoding greedily on the CPU with `threads` threads."""

    def __init__(self, path: str | Path, threads: int | None = None, n_ctx: int = 2048):
        self.path, self.threads = Path(path), threads or torch.get_num_threads()
        self.llm = _llama_cpp().Llama(str(path), n_ctx=n_ctx, n_threads=self.threads, n_threads_batch=self.threads,
                                      verbose=False)
        self.name = f"llama.cpp {self.path.stem.rpartition('.')[2]}"

    @classmethod
    def from_gguf(cls, src: str | Path, qtype: str, threads: int | None = None) -> LlamaCpp:
        """The peer of `src` requantized by llama.cpp to `qtype` (see `requantize`)."""
        return cls(requantize(src, qtype, threads=threads), threads)

    def file_gb(self) -> float:
        return self.path.stat().st_size / 1e9

    def _next(self) -> int:
        import numpy as np

        llama_cpp = _llama_cpp()
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))
        return int(logits.argmax())

    def _decode(self, prompt: list[int], new_tokens: int, mark: Callable[[], None] = lambda: None) -> list[int]:
        self.llm.reset()
        mark()
        self.llm.eval(prompt)
        out = [self._next()]
        mark()
        for _ in range(new_tokens - 1):
            self.llm.eval(out[-1:])
            out.append(self._next())
            mark()
        return out

    def generate(self, ids: list[int], new_tokens: int) -> list[int]:
        """The greedy continuation of the prompt token ids `ids`: `new_tokens` ids."""
        return self._decode(list(ids), new_tokens)

    def run(self, ids: torch.Tensor, new_tokens: int) -> Callable[[], list[float]]:
        """One greedy run from the (1, T) prompt `ids`, as a callable returning [prefill ms, step ms, ...]."""
        prompt = ids[0].tolist()

        def run() -> list[float]:
            marks: list[float] = []
            self._decode(prompt, new_tokens, lambda: marks.append(time.perf_counter()))
            return [(b - a) * 1000 for a, b in zip(marks, marks[1:])]

        return run
