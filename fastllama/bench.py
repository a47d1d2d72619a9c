"""Decode benchmarks: latency, time to first token, tokens/s, memory and bandwidth.

    tpot_ms        median decode step (batch 1, greedy, after a warm-up run), prefill excluded
    ttft_ms        median prefill: prompt in, first token out
    tokens_per_s   1000 / tpot_ms; e2e_tokens_per_s = new tokens / median whole run
    peak_mem_gb    torch.cuda.max_memory_allocated while decoding (GPU); nvml_mem_gb: the process as NVML sees it
    peak_rss_gb    peak resident memory while decoding (CPU; reset after loading where Linux allows)
    model_gb       bytes of all parameters and buffers (and bitsandbytes' statistics), shared storage counted once
    bandwidth_frac model_gb x tokens_per_s / the device's peak memory bandwidth (known GPUs only)

    bench(model, prompt_len=128, new_tokens=256, runs=3, baseline="hf") -> dict of metrics

The fast path is `fastllama.generate.Decoder`: each run times the prefill (`ttft_ms`) and every decode step
separately (a model with linears the fast path does not know, bitsandbytes', decodes on plain `generate` instead,
as its users run it: `decode_path`, recorded as `path`); `tpot_ms` is the median step over all runs, after a
warm-up run (which also compiles the decode step).
Timing is synchronized: CUDA events around every step on a GPU (read after the run, so no step waits on the
host), `time.perf_counter` on the CPU, whose ops are synchronous. `baseline="hf"` times plain Hugging Face
`generate` on the same model, token by token through a streamer, interleaved with the fast path in one process
(fast, plain, fast, plain, ... see `interleave`), so a drift in machine load hits both alike and every speedup is a
ratio of medians measured side by side (`hf_*` keys and `speedup`).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from .generate import Decoder
from .hardware import machine, policy

log = logging.getLogger(__name__)

# peak memory bandwidth by device name (TB/s), first match wins; bandwidth_frac is None for anything else
PEAK_BANDWIDTH_TBS = (("GH200", 4.0), ("H200", 4.8), ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35))


def device_name(device: torch.device) -> str:
    """The GPU's name (e.g. "NVIDIA H100 80GB HBM3"), or "cpu (N threads)"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def peak_bandwidth_tbs(name: str) -> float | None:
    """Peak memory bandwidth in TB/s from a device name (H100 SXM, H100 PCIe, H200, GH200); None if unknown."""
    return next((tbs for key, tbs in PEAK_BANDWIDTH_TBS if key in name), None)


def model_gb(model: nn.Module) -> float:
    """Bytes of all parameters and buffers (shared storage, e.g. tied embeddings, counted once), in GB, with the
    statistics bitsandbytes keeps on its parameters rather than in buffers (int8 row scales, NF4 block absmax)."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        tensors += [getattr(p, "SCB", None), *(state.as_dict(packed=True).values() if state is not None else ())]
    for t in (t for t in tensors if isinstance(t, torch.Tensor)):
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total / 1e9


def nvml_mem_gb(device: torch.device) -> float | None:
    """This process's GPU memory as NVML sees it (pynvml, from nvidia-ml-py), or None without one."""
    if device.type != "cuda":
        return None
    try:
        import os

        import pynvml
    except ImportError:
        log.info("pynvml is not installed (pip install nvidia-ml-py): nvml_mem_gb is None")
        return None
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        used = sum(p.usedGpuMemory or 0 for p in procs if p.pid == os.getpid())
        return used / 1e9 if used else None
    finally:
        pynvml.nvmlShutdown()


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: VmHWM, via /proc/self/clear_refs); False where that is not possible.

    Memory freed while loading stays resident in glibc's heap until trimmed, by a different amount each run
    (measured: 0.63-0.96 GB after loading the same 0.17 GB model), so it is handed back first."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _reset_peaks(device: torch.device) -> bool:
    """Start the peak-memory windows: collect garbage first (a previous model still held by reference cycles would
    count in this one's peak), wait for the GPU, then reset the CUDA allocator's peak and the peak RSS (returns
    whether that could be reset, see `_reset_peak_rss`)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    return _reset_peak_rss()


def _peak_rss_gb() -> float:
    """Peak RSS since the last `_reset_peak_rss` (or since the process started, where it cannot be reset)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e9
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


class _Clock:
    """Marks on a timeline: CUDA events on a GPU (read once at the end), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """The milliseconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1000 for a, b in zip(self.marks, self.marks[1:])]


def decode_path(model: nn.Module) -> str:
    """"fast" (`Decoder`) where every linear is a plain `nn.Linear` or one of fastllama's swaps, else "plain
    generate": a linear of another library (bitsandbytes') runs as its users run it."""
    from .nn import foreign_linear

    return "plain generate" if any(map(foreign_linear, model.modules())) else "fast"


def fast_run(decoder: Decoder, ids: torch.Tensor, new_tokens: int) -> Callable[[], list[float]]:
    """One greedy run on the fast path, as a callable returning [prefill ms, step ms, step ms, ...]."""
    def run() -> list[float]:
        clock = _Clock(decoder.device)
        clock.mark()
        token = decoder.prefill(ids)
        clock.mark()
        for pos in range(ids.shape[1], ids.shape[1] + new_tokens - 1):
            token = decoder.step(token, pos)
            clock.mark()
        return clock.intervals_ms()

    return run


def hf_run(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> Callable[[], list[float]]:
    """One plain `generate` run (greedy, exactly `new_tokens`), as a callable returning [prefill ms, step ms, ...]
    from a streamer: it is called with the prompt, then once per new token."""
    from transformers.generation.streamers import BaseStreamer

    def run() -> list[float]:
        clock = _Clock(ids.device)

        class Stamp(BaseStreamer):
            def put(self, value):
                clock.mark()

            def end(self):
                pass

        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=Stamp())
        return clock.intervals_ms()

    return run


def summarize(runs: list[list[float]], new_tokens: int) -> dict[str, float]:
    """ttft/tpot medians and tokens/s from per-run [prefill, step, ...] timings: tpot is the median decode step
    over all runs (prefill excluded), ttft the median prefill."""
    tpot = statistics.median(t for run in runs for t in run[1:]) if new_tokens > 1 else float("nan")
    e2e = statistics.median(sum(run) for run in runs)
    return {"ttft_ms": statistics.median(run[0] for run in runs), "tpot_ms": tpot, "tokens_per_s": 1000 / tpot,
            "e2e_tokens_per_s": new_tokens * 1000 / e2e}


def interleave(runs: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, list[list[float]]]:
    """Each of `runs` once to warm up (and compile), then `rounds` rounds running each in turn (A, B, A, B, ...), so
    that a drift in machine load hits all of them alike. Returns each one's timings, a list per round."""
    for run in runs.values():
        run()
    timings: dict[str, list[list[float]]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            timings[name].append(run())
    return timings


def compare(runs: dict[str, Callable[[], list[float]]], new_tokens: int, rounds: int) -> dict[str, dict[str, float]]:
    """`summarize` of each of `runs`, measured interleaved (see `interleave`)."""
    return {name: summarize(t, new_tokens) for name, t in interleave(runs, rounds).items()}


def prompt_ids(model: nn.Module, prompt_len: int, tokenizer=None, seed: int = 0) -> torch.LongTensor:
    """A (1, prompt_len) prompt: real text through `tokenizer` when given, else seeded random token ids."""
    device = model.get_input_embeddings().weight.device
    if tokenizer is not None:
        text = ("The river crossing grew into a market town, and the town into a city of bridges and mills. " * 64)
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :prompt_len]
        if ids.shape[1] == prompt_len:
            return ids.to(device)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=generator).to(device)


def speed_recipe(recipe: str, lm_head: bool | None = None):
    """`recipe` with each GPTQ step run as round-to-nearest on the same grid (bits, groups, head): the same
    kernels, layout and bytes, so the same speed, without calibration. `lm_head` overrides the steps' head flag.
    Returns (Recipe, whether anything was swapped)."""
    from .gptq import GPTQConfig, RTNConfig
    from .recipes import parse_recipe

    parsed, swapped = parse_recipe(recipe), False
    for i, step in enumerate(parsed.steps):
        if isinstance(step, GPTQConfig):
            parsed.steps[i], swapped = RTNConfig(step.bits, step.group_size, step.lm_head, step.grid), True
        if isinstance(parsed.steps[i], RTNConfig) and lm_head is not None:
            parsed.steps[i].lm_head = lm_head
    return parsed, swapped


def bench(model: nn.Module, tokenizer=None, prompt_len: int = 128, new_tokens: int = 256, runs: int = 3,
          baseline: str | None = None, compile: bool | None = None, decoder: Decoder | None = None) -> dict:
    """Every metric of greedy batch-1 decoding on the fast path, or on plain `generate` for a model the fast path
    does not know (`decode_path`, recorded as `path`; see the module docstring).

    `compile` as in `Decoder` (None: as the hardware policy says); pass a `decoder` to reuse one (its cache and
    compiled step).
    `baseline="hf"` (fast path only) adds `hf_ttft_ms`, `hf_tpot_ms`, `hf_tokens_per_s`, `hf_e2e_tokens_per_s` and
    `speedup` (tokens/s over plain generate's), both measured again interleaved in this process on the same model.
    """
    if baseline not in (None, "hf"):
        raise ValueError(f"unknown baseline {baseline!r}; valid: 'hf' (plain transformers generate) or None")
    if prompt_len < 1 or new_tokens < 2 or runs < 1:
        raise ValueError(f"need prompt_len >= 1, new_tokens >= 2 and runs >= 1; got prompt_len={prompt_len}, "
                         f"new_tokens={new_tokens}, runs={runs}")
    ids = prompt_ids(model, prompt_len, tokenizer)
    device, path = ids.device, decode_path(model)
    if path == "fast":
        decoder = decoder or Decoder(model, prompt_len + new_tokens, compile=compile)
        if decoder.max_len < prompt_len + new_tokens:
            raise ValueError(f"the decoder holds {decoder.max_len} positions, fewer than prompt_len + new_tokens = "
                             f"{prompt_len + new_tokens}; build it with a larger max_len")
        run = fast_run(decoder, ids, new_tokens)
    elif baseline == "hf":
        raise ValueError("this model's linears are another library's (bitsandbytes'), so it decodes on plain "
                         "generate already: baseline='hf' would time it against itself; pass baseline=None")
    else:
        log.info("linears the fast path does not know (bitsandbytes'): decoding on plain generate")
        run = hf_run(model, ids, new_tokens)
    rss_reset = _reset_peaks(device)  # so the peaks are this model's while decoding, not while loading
    metrics = compare({path: run}, new_tokens, runs)[path]
    name = device_name(device)
    size, peak_tbs = model_gb(model), peak_bandwidth_tbs(name)
    metrics |= {
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "nvml_mem_gb": nvml_mem_gb(device),
        "peak_rss_gb": _peak_rss_gb(), "peak_rss_scope": "decode" if rss_reset else "process",
        "model_gb": size,
        "bandwidth_frac": size * metrics["tokens_per_s"] / (peak_tbs * 1000) if peak_tbs else None,
        "device": name,
        "machine": asdict(machine(device)),  # read right after timing, so its load average is the timing's
        "policy": asdict(policy(device)),
        "prompt_len": prompt_len, "new_tokens": new_tokens, "runs": runs, "path": path,
        "compiled": path == "fast" and decoder.compiled,
    }
    if baseline == "hf":  # after the memory reading, which should see the fast path alone
        both = compare({"fast": fast_run(decoder, ids, new_tokens), "hf": hf_run(model, ids, new_tokens)},
                       new_tokens, runs)
        metrics |= {f"hf_{k}": v for k, v in both["hf"].items()}
        metrics["speedup"] = both["fast"]["tokens_per_s"] / both["hf"]["tokens_per_s"]
    return metrics
