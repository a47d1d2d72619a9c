"""Peers: the engines a user would pick instead of fastllama, measured the way fastllama is measured.

    peer = LlamaCpp.from_gguf(path, "q4_0")   # llama.cpp (llama-cpp-python): the GGUF requantized to Q4_0
    run = peer.run(ids, new_tokens)           # a callable -> [prefill ms, step ms, ...], as bench.fast_run
    bnb_quantize_(model, "nf4")               # bitsandbytes, as transformers' BitsAndBytesConfig loads a model

A peer's run decodes greedily from the same prompt token ids as fastllama's fast path and returns the same
per-token timings, so `bench.compare` interleaves it with fastllama in one process (A, B, A, B, ...) and the
perf suite and `fastllama bench --engine` judge both with one ruler. bitsandbytes is a peer of another kind: a
model whose linears are its modules, which the recipes `bnb8` and `nf4` make (the step `bnb:type=int8|nf4`), so
`fastllama report` measures it as a row like any other (decoding on plain `generate`, see `bench.decode_path`).
Peers are an optional extra (`pip install -e ".[peers]"`), imported lazily with an error naming the extra when
missing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# llama.cpp file types by the names llama.cpp's own quantize tool uses
LLAMA_CPP_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                   "f16": "LLAMA_FTYPE_MOSTLY_F16", "f32": "LLAMA_FTYPE_ALL_F32"}
CACHE = Path(os.environ.get("FASTLLAMA_CACHE", Path.home() / ".cache" / "fastllama"))
# bitsandbytes' types by the recipe's name: the arguments of transformers' BitsAndBytesConfig that load them
BNB_TYPES = {"int8": {"load_in_8bit": True}, "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}


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


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError("bitsandbytes is a peer of the optional extra: pip install -e '.[peers]' (bitsandbytes "
                          ">= 0.50, whose CPU backend runs these rows)") from e
    return bitsandbytes


def bnb_quantize_(model: nn.Module, kind: str) -> nn.Module:
    """Quantize the decoder's linears of `model` in place as transformers' `from_pretrained(...,
    quantization_config=BitsAndBytesConfig(**BNB_TYPES[kind]))` quantizes a checkpoint at load; returns `model`.

    transformers' own `replace_with_bnb_linear` swaps in bitsandbytes' Linear8bitLt (int8, per-row absmax, its
    outlier threshold 6) or Linear4bit (NF4 blocks), and each weight is quantized as its loader quantizes a
    checkpoint tensor: a bitsandbytes parameter of the float weight, moved to the weight's device. The head and
    the embedding stay float, as transformers keeps the output embedding float."""
    if kind not in BNB_TYPES:
        raise ValueError(f"unknown bitsandbytes type {kind!r}; valid: {', '.join(BNB_TYPES)}")
    bnb = _bitsandbytes()
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    floats = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    body = {name: m for name, m in floats.items() if name.startswith("model.layers.")}
    keep = [re.escape(name) for name in floats if name not in body]
    replace_with_bnb_linear(model, keep, BitsAndBytesConfig(**BNB_TYPES[kind]))
    param = bnb.nn.Int8Params if kind == "int8" else bnb.nn.Params4bit
    for name, linear in body.items():
        module = model.get_submodule(name).train(linear.training)  # built in training mode, which int8 reads
        kwargs = {k: v for k, v in module.weight.__dict__.items() if k != "SCB"}
        module.weight = param(linear.weight.data.to("cpu"), requires_grad=False, **kwargs).to(linear.weight.device)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    log.info("bitsandbytes %s: %d linears", kind, len(body))
    return model
