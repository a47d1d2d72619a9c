"""GGUF for llama.cpp: the llama architecture's tensor names and metadata (gguf's `GGUFWriter`, `TensorNameMap`).

Quantized linears are packed as they are, never quantized again:

    Q4_0   blocks of 32 input channels, Ŵ = d·(q - 8), fp16 d: a 4-bit QuantLinear with group 32 and zero 0
           (GPTQ with grid=q4_0, see `nn.grid_for`)
    Q8_0   blocks of 32, Ŵ = d·q, fp16 d: an 8-bit QuantLinear (one scale per row, repeated over its blocks)

A scale must be exact in float16 (grid_for makes it so); the kernels' asymmetric 4-bit grid has no GGUF type
and is refused. Float linears and the embedding are written as F16 (or F32), norms as F32. Query and key rows
are permuted from the Hugging Face rotary layout (halves) to llama.cpp's (pairs), whole rows at a time, so the
blocks stay as they are. MLPs of different widths per layer are padded with zero channels to the widest
(llama.cpp reads a per-layer feed_forward_length but shapes every layer's MLP as layer 0's). The tokenizer is a
byte-level BPE one (`tokenizer.ggml.model = gpt2`); a model without one (random presets) is written with
llama.cpp's "none" vocabulary, to be fed token ids.
"""

from __future__ import annotations

import ctypes
import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import DenseWeight, decoder_linears, dense_weight, mlp_width
from ..nn import tied_head

log = logging.getLogger(__name__)

FLOAT_TYPES = ("f16", "f32")  # how float tensors of 2 or more dimensions are written (norms are always F32)
BLOCK = 32  # input channels per Q4_0 / Q8_0 block


def _gguf():
    import gguf

    return gguf


def _rotary_rows(n_heads: int, head_dim: int) -> Tensor:
    """The row order that turns a Hugging Face query/key projection (rotary halves) into llama.cpp's (pairs)."""
    return torch.arange(n_heads * head_dim).view(n_heads, 2, head_dim // 2).transpose(1, 2).flatten()


def _fp16_exact(scales: Tensor, name: str) -> np.ndarray:
    half = scales.half()
    if not torch.equal(half.float(), scales):
        raise ValueError(f"{name}: {int((half.float() != scales).sum())} scales are not exact in float16, so GGUF "
                         "cannot hold this grid; quantize with grid=q4_0 (gptq:bits=4,group=32,grid=q4_0) or "
                         "grid=q8_0 (gptq:bits=8,grid=q8_0)")
    return half.contiguous().numpy().view(np.uint8).reshape(*scales.shape, 2)


def pack(w: DenseWeight, name: str):
    """(bytes [out, blocks·block bytes] uint8, GGMLQuantizationType) of a quantized dense weight."""
    gguf = _gguf()
    out, cols = w.q.shape
    if cols % BLOCK:
        raise ValueError(f"{name}: in_features={cols} is not a multiple of {BLOCK}, GGUF's block; it cannot be "
                         "written quantized")
    if w.bits == 8:
        d = _fp16_exact(w.scales.expand(out, cols // BLOCK).contiguous(), name)
        qs = w.q.to(torch.int8).numpy().view(np.uint8).reshape(out, -1, BLOCK)
        return np.concatenate([d, qs], -1).reshape(out, -1), gguf.GGMLQuantizationType.Q8_0
    if w.group_size != BLOCK or w.zeros.any():
        raise ValueError(f"{name}: the kernels' asymmetric 4-bit grid (group {w.group_size}, a float zero) is not "
                         "GGUF's Q4_0; quantize with gptq:bits=4,group=32,grid=q4_0")
    d = _fp16_exact(w.scales, name)
    q = w.q.to(torch.uint8).view(out, -1, 2, BLOCK // 2)
    qs = (q[:, :, 0] | q[:, :, 1] << 4).contiguous().numpy()  # byte j holds q[j] (low nibble) and q[j + 16] (high)
    return np.concatenate([d, qs], -1).reshape(out, -1), gguf.GGMLQuantizationType.Q4_0


def _add_linear(writer, name: str, w: DenseWeight, float_type: str, rows: Tensor | None) -> str:
    """Write one linear (and its bias); `rows` reorders its output rows. Returns the GGML type's name."""
    gguf = _gguf()
    if rows is not None:
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        w = replace(w, weight=pick(w.weight), q=pick(w.q), scales=pick(w.scales), zeros=pick(w.zeros),
                    bias=pick(w.bias))
    if w.weight is None:
        data, qtype = pack(w, name)
        writer.add_tensor(f"{name}.weight", data, raw_dtype=qtype)
    else:
        qtype = gguf.GGMLQuantizationType.F16 if float_type == "f16" else gguf.GGMLQuantizationType.F32
        writer.add_tensor(f"{name}.weight", w.weight.numpy().astype(np.float16 if float_type == "f16" else
                                                                    np.float32))
    if w.bias is not None:
        writer.add_tensor(f"{name}.bias", w.bias.detach().float().numpy())
    return qtype.name


def _add_tokenizer(writer, tokenizer, vocab_size: int, pre: str | None) -> None:
    gguf = _gguf()
    if tokenizer is None:
        log.warning("no tokenizer: the GGUF gets llama.cpp's 'none' vocabulary; feed it token ids")
        writer.add_tokenizer_model("none")
        return
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if backend["type"] != "BPE":
        raise ValueError(f"the tokenizer is a {backend['type']} one; only byte-level BPE tokenizers (Llama 3, "
                         "SmolLM) are exported to GGUF here")
    ids = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    T = gguf.TokenType
    tokens = [ids.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [T.UNUSED if i not in ids else (T.CONTROL if added[i].special else T.USER_DEFINED) if i in added
             else T.NORMAL for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    if pre is None:
        log.warning("no pre-tokenizer name given: llama.cpp splits text with its default BPE rule; pass pre= "
                    "(e.g. smollm, llama-bpe) for this tokenizer's own")
    else:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:  # SpecialVocab reads merges and special ids from the saved files
        tokenizer.save_pretrained(tmp)
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def write(model: nn.Module, tokenizer, out: Path, float_type: str = "f16", pre: str | None = None) -> Path:
    """Write a Llama-family `model` (float, quantized, pruned, with dropped layers) and `tokenizer` as a GGUF
    file at `out` for llama.cpp; `pre` names llama.cpp's pre-tokenizer for the tokenizer (e.g. smollm)."""
    gguf = _gguf()
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type={float_type!r}; valid: {', '.join(FLOAT_TYPES)}")
    cfg, layers = model.config, model.model.layers
    rope = getattr(cfg, "rope_parameters", None) or {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={rope['rope_type']!r}: only the default rotary embedding is exported to GGUF "
                         "here (llama3 frequency scaling needs a rope_freqs tensor, not written yet)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    width = mlp_width(model)  # llama.cpp (0.3.36) reads per-layer widths but shapes every layer's MLP as layer 0's
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(str(getattr(cfg, "_name_or_path", "") or "fastllama export"))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(len(layers))
    writer.add_feed_forward_length(width)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    _add_tokenizer(writer, tokenizer, cfg.vocab_size, pre)

    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, len(layers))
    gguf_name = lambda hf: names.get_name(hf)  # noqa: E731
    emb = model.get_input_embeddings().weight.detach().float()
    writer.add_tensor("token_embd.weight", emb.numpy().astype(np.float16 if float_type == "f16" else np.float32))
    writer.add_tensor("output_norm.weight", model.model.norm.weight.detach().float().numpy())
    types = {}
    rows = {"self_attn.q_proj": _rotary_rows(cfg.num_attention_heads, head_dim),
            "self_attn.k_proj": _rotary_rows(cfg.num_key_value_heads, head_dim)}
    for i, layer in enumerate(layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weight = layer.get_submodule(norm).weight.detach().float().numpy()
            writer.add_tensor(gguf_name(f"model.layers.{i}.{norm}") + ".weight", weight)
    for i, leaf, w in decoder_linears(model, width):
        qtype = _add_linear(writer, gguf_name(f"model.layers.{i}.{leaf}"), w, float_type, rows.get(leaf))
        types[qtype] = types.get(qtype, 0) + 1
    if not tied_head(model):
        _add_linear(writer, "output", dense_weight(model.get_output_embeddings(), "lm_head"), float_type, None)
    file_type = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "F16": gguf.LlamaFileType.MOSTLY_F16}.get(max(types, key=types.get), gguf.LlamaFileType.ALL_F32)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    log.info("wrote %s (%s; linears: %s)", out, file_type.name, types)
    return out


def llama_cpp_logits(path: str | Path, ids: list[int], threads: int = 2) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] (float32) for token ids `ids` run through the GGUF file at `path`, in
    one batch (llama-cpp-python's low-level API; the `peers` extra)."""
    try:
        import llama_cpp as L
    except ImportError as e:
        raise ImportError("running a GGUF file in llama.cpp needs llama-cpp-python: "
                          "pip install 'fastllama[peers]'") from e
    L.llama_backend_init()
    params = L.llama_model_default_params()
    params.use_extra_bufts = False  # no weight repacking: its AMX path crashes on small tensors (0.3.36)
    model = L.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ValueError(f"llama.cpp could not load {path} (run with verbose llama.cpp logs to see why)")
    params = L.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = len(ids)
    params.n_threads = params.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, params)
    batch = L.llama_batch_init(len(ids), 0, 1)
    try:
        batch.n_tokens = len(ids)
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
            batch.seq_id[i][0] = 0
        if L.llama_decode(ctx, batch) != 0:
            raise ValueError(f"llama.cpp failed to evaluate {len(ids)} tokens with {path}")
        buf = ctypes.create_string_buffer(32)  # the vocabulary size from the metadata ("none" has no tokens)
        L.llama_model_meta_val_str(model, b"llama.vocab_size", buf, len(buf))
        vocab = int(buf.value)
        return np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(ids), vocab)).copy()
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
