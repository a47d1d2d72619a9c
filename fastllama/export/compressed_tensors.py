"""compressed-tensors for vLLM: a Hugging Face model directory in the layout llm-compressor writes.

    fastllama export --model M --recipe "gptq:bits=4,group=128,grid=sym" --format compressed-tensors --tp 2 --out DIR
    vllm serve DIR --tensor-parallel-size 2 --dtype bfloat16

Quantized linears are packed as they are, never quantized again, in compressed-tensors' `pack-quantized` format
(the layout of compressed-tensors 0.20), weight-only and symmetric:

    W4A16  int4 in groups of input channels, Ŵ = scale·q, q in -8..7: a 4-bit QuantLinear whose zeros are all 0
           (q = fastllama's q - 8; GPTQ or RTN with grid=sym, see `nn.grid_for`)
    W8A16  int8, one scale per output channel (strategy "channel"), Ŵ = scale·q: an 8-bit QuantLinear as it is

Each linear is stored as `weight_packed` (int32 [out, in·bits/32]: value i of a row, plus 2^(bits-1), at bit
i·bits of the row's stream, 32/bits values a word, lowest first), `weight_scale` (bfloat16 [out, groups], the
kernels' own scales: exact) and `weight_shape` (int64 [out, in]); symmetric schemes have no zero point, so the
kernels' asymmetric 4-bit grid (a float zero per group) is refused. config.json carries a `quantization_config`
with one group per (bits, group size). Float tensors are written in the embedding's dtype, and config.json's
`dtype` says which; a float model is written as a plain Hugging Face checkpoint.

Dropped layers and coupled pruning are a smaller dense config already; MLPs of different widths are padded to the
widest (Llama's config has one `intermediate_size`) and per-linear pruning is densified (see `fastllama.export`).

vLLM runs these weights on its Marlin kernel (Machete on Hopper takes groups of 128 only and hands other groups
to Marlin). `check_vllm` lists what Marlin cannot run at tensor-parallel size `tp` (see MARLIN_*), and head and
MLP counts that `tp` does not divide; `write` refuses them (or, with check=False, warns).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from . import LINEARS, DenseWeight, decoder_linears, dense_weight, mlp_width
from ..nn import pack_bits, tied_head

log = logging.getLogger(__name__)

MARLIN_GROUPS = (32, 64, 128)  # the 4-bit groups vLLM's Marlin kernel takes (and channel-wise)
MARLIN_MIN_K = 128  # Marlin needs each tensor-parallel shard's input size to be a multiple of this...
MARLIN_MIN_N = 64  # ...and its output size (the fused q/k/v and gate/up outputs together) of this
COLUMN_PARALLEL = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
                   "mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up"}  # vLLM fuses these, splits their rows


def pack(w: DenseWeight, name: str) -> dict[str, Tensor]:
    """`weight_packed`, `weight_scale` and `weight_shape` of a quantized dense weight (pack-quantized)."""
    if w.bits not in (4, 8):
        raise ValueError(f"{name}: {w.bits}-bit weights have no form here (W4A16 and W8A16 only); quantize with "
                         "bits=4,grid=sym or bits=8")
    if w.bits == 4 and w.zeros.any():
        raise ValueError(f"{name}: the kernels' asymmetric 4-bit grid (a float zero per group) has no compressed-"
                         "tensors form (its zero points are integers); quantize with grid=sym, e.g. "
                         "gptq:bits=4,group=128,grid=sym")
    out, cols = w.q.shape
    # stored unsigned, offset by 2^(bits-1): fastllama's 4-bit q (0..15) is already q - 8 + 8; 8-bit q + 128.
    # The row's little-endian bit stream (`nn.pack_bits`, padded to whole bytes of 8 values) read as int32 words.
    u = w.q.cpu().int() + (0 if w.bits == 4 else 128)
    stream = pack_bits(nn.functional.pad(u, (0, -cols % 8)), w.bits)
    words = stream.view(torch.int32)[:, :math.ceil(cols * w.bits / 32)]  # the words the row's values fill
    return {"weight_packed": words, "weight_scale": w.scales.cpu().to(torch.bfloat16),
            "weight_shape": torch.tensor([out, cols], dtype=torch.int64)}


def _scheme(w: DenseWeight) -> tuple[int, int | None]:
    """(bits, group size) of a quantized weight; group None: one scale per output channel."""
    return w.bits, (w.group_size if w.bits == 4 else None)


def _targets(names: list[str], every: dict[str, list[str]]) -> list[str]:
    """compressed-tensors targets matching exactly `names`: `re:` on a leaf (e.g. mlp.down_proj) when `names`
    hold it in every layer (`every`: leaf -> all its names), else the names themselves."""
    leaves = [leaf for leaf, all_names in every.items() if set(all_names) <= set(names)]
    covered = {n for leaf in leaves for n in every[leaf]}
    return [f"re:.*\\.{re.escape(leaf)}$" for leaf in leaves] + [n for n in names if n not in covered]


def quantization_config(schemes: dict[str, tuple[int, int | None] | None]) -> dict:
    """config.json's `quantization_config` for linears named by their module path (model.layers.0.mlp.up_proj,
    lm_head) and their scheme (bits, group size), or None for a float linear (listed in `ignore`)."""
    every: dict[str, list[str]] = {}  # decoder leaf (mlp.up_proj) -> its module in every layer
    for name in schemes:
        if name.startswith("model.layers."):
            every.setdefault(name.split(".", 3)[-1], []).append(name)
    groups = {}
    for i, (bits, group) in enumerate(sorted({s for s in schemes.values() if s}, key=str)):
        names = [n for n, s in schemes.items() if s == (bits, group)]
        weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
                   "strategy": "group" if group else "channel", "group_size": group}
        groups[f"group_{i}"] = {"targets": _targets(names, every), "weights": weights, "input_activations": None,
                                "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": _targets([n for n, s in schemes.items() if s is None], every),
            "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {}}


def check_vllm(cfg, shapes: dict[str, tuple[int, int, tuple[int, int | None] | None]], tp: int) -> list[str]:
    """What vLLM cannot run at tensor-parallel size `tp`, once per linear of any layer (model.layers.*.):
    `shapes` maps each linear's module path to (out, in, scheme or None). Quantized linears are checked against
    Marlin's constraints per shard (vLLM splits q/k/v and gate/up by rows, fused; o and down by columns; the head
    by rows, padded)."""
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    problems = [f"{what}={n} is not divisible by tp={tp}" for what, n in
                (("num_attention_heads", heads), ("intermediate_size", cfg.intermediate_size)) if n % tp]
    if kv % tp and tp % kv:
        problems.append(f"num_key_value_heads={kv} neither divides nor is divisible by tp={tp}")
    fused: dict[str, list[int]] = {}  # fused column-parallel linear -> its shard's output rows, part by part
    for name, (out, cols, scheme) in shapes.items():
        if scheme is None:
            continue
        leaf = name.split(".", 3)[-1]
        group = scheme[1]
        if group is not None and group not in MARLIN_GROUPS:
            problems.append(f"{name}: group {group}; Marlin takes groups of {', '.join(map(str, MARLIN_GROUPS))}")
        if leaf in COLUMN_PARALLEL:  # rows split, the input whole; k/v heads are replicated past tp = kv
            parts = kv if leaf in ("self_attn.k_proj", "self_attn.v_proj") else tp
            fused.setdefault(name.replace(leaf, COLUMN_PARALLEL[leaf]), []).append(out // min(parts, tp))
            shard_in = cols
        elif name == "lm_head":  # rows split and padded by vLLM, the input whole
            shard_in = cols
        else:  # o_proj, down_proj: columns split
            shard_in = cols // tp
            if out % MARLIN_MIN_N:
                problems.append(f"{name}: output size {out} is not a multiple of {MARLIN_MIN_N} (Marlin)")
        for multiple in (MARLIN_MIN_K, group if group is not None and group < cols else 1):
            if shard_in % multiple:
                problems.append(f"{name}: each of the {tp} shards' input size, {shard_in}, is not a multiple of "
                                f"{multiple}" + (" (Marlin)" if multiple == MARLIN_MIN_K else " (its group)"))
    problems += [f"{name}: each of the {tp} shards' output size, {sum(rows)}, is not a multiple of {MARLIN_MIN_N} "
                 "(Marlin)" for name, rows in fused.items() if sum(rows) % MARLIN_MIN_N]
    return list(dict.fromkeys(re.sub(r"^model\.layers\.\d+\.", "model.layers.*.", p) for p in problems))


def write(model: nn.Module, tokenizer, out: Path, tp: int = 1, check: bool = True) -> Path:
    """Write a Llama-family `model` (float, quantized on a symmetric grid, pruned, with dropped layers) and its
    `tokenizer` as a compressed-tensors model directory `out` for vLLM at tensor-parallel size `tp`. What vLLM
    cannot run at `tp` (see `check_vllm`) is a ValueError, or with `check=False` a warning."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp={tp!r}; pass the tensor-parallel size vLLM will run with, a positive integer")
    cfg = copy.deepcopy(model.config)
    dtype = model.get_input_embeddings().weight.dtype
    cfg.intermediate_size = mlp_width(model)  # Llama's config has one width for every layer
    tensors = {"model.embed_tokens.weight": model.get_input_embeddings().weight,
               "model.norm.weight": model.model.norm.weight}
    for i, layer in enumerate(model.model.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = layer.get_submodule(norm).weight
    schemes, shapes = {}, {}  # module path -> (bits, group) or None (float); -> (out, in, scheme)

    def add(name: str, w: DenseWeight) -> None:  # one linear at a time: only the packed form stays
        schemes[name] = None if w.weight is not None else _scheme(w)
        shapes[name] = (*(w.q if w.weight is None else w.weight).shape, schemes[name])
        tensors.update({f"{name}.weight": w.weight.to(dtype)} if w.weight is not None else
                       {f"{name}.{k}": v for k, v in pack(w, name).items()})
        if w.bias is not None:
            tensors[f"{name}.bias"] = w.bias.to(dtype)

    for i, leaf, w in decoder_linears(model, cfg.intermediate_size):
        add(f"model.layers.{i}.{leaf}", w)
    cfg.tie_word_embeddings = tied_head(model)
    if not cfg.tie_word_embeddings:
        add("lm_head", dense_weight(model.get_output_embeddings(), "lm_head"))
    for i in range(len(model.model.layers)):  # vLLM fuses these: one scheme for all their parts
        for parts in (LINEARS[:3], LINEARS[4:6]):
            if len({schemes[f"model.layers.{i}.{leaf}"] for leaf in parts}) > 1:
                raise ValueError(f"layer {i}: {', '.join(parts)} are quantized differently; vLLM fuses them, so "
                                 "they need one scheme (quantize them with the same recipe step)")
    problems = check_vllm(cfg, shapes, tp)
    if problems and check:
        raise ValueError(f"vLLM cannot run this export at --tensor-parallel-size {tp}:\n  " + "\n  ".join(problems)
                         + "\nuse a smaller tp, prune to widths that are multiples of 128 per shard, or pass "
                         "check=False (--no-vllm-check) to write it anyway")
    for problem in problems:
        log.warning("vLLM at tp=%d: %s", tp, problem)

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg.architectures, cfg.dtype = [type(model).__name__], dtype
    config = cfg.to_dict()
    config.pop("quantization_config", None)
    if any(schemes.values()):
        config["quantization_config"] = quantization_config({"lm_head": None} | schemes)  # a tied head: ignored
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is None:
        log.warning("no tokenizer: %s has none (vLLM then needs --tokenizer, or --skip-tokenizer-init and token "
                    "ids)", out)
    else:
        tokenizer.save_pretrained(out)
    log.info("wrote %s (%d linears: %s)", out, len(schemes),
             {str(s): list(schemes.values()).count(s) for s in set(schemes.values())})
    return out
