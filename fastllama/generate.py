"""Fast greedy decoding: a static KV cache, prefill separate from decode, a compiled one-token step.

`Decoder` runs the model's own modules (embeddings, norms, linears or their quantized/pruned swaps,
rotary tables, lm_head) in a compact forward, with one preallocated key/value buffer per layer. Each
layer's buffer is sized from what its own k/v projections return, so coupled-pruned layers (fewer
KV heads) and dropped layers just work; transformers' StaticCache sizes every layer from the config.

The same forward serves prefill (T prompt tokens at positions 0..T-1) and decode (one token at `pos`):
keys are written into the cache at their positions and attention reads the whole cache under a causal
mask, so every decode step has the same shapes. That is what torch.compile needs: the decode step is compiled
wherever `fastllama.hardware.policy` says (a GPU, with CUDA graphs; a CPU with a C++ compiler, where inductor fuses
the norms, rotary and residual ops between the matmul kernels and its code is cached on disk across processes; there
one layer is compiled and reused for every layer of the same shapes, `Policy.compile_layers`); prefill runs eager
(its length varies). Greedy output is token-identical to Hugging Face `generate` in float32 with
EOS disabled (logits equal up to rounding; the compiled step agrees up to rounding, and was token-identical on the
embedded model): the fast path always generates `max_new_tokens` and never stops at EOS. On the CPU, float32
linears run on oneDNN or MKL as the policy picks (`fastllama.nn.linear`), attention in float32 (see
`Decoder.attn_dtype`), and quantized q/k/v and gate/up as one kernel call each (`fastllama.nn.fuse`, which leaves
the parts as views of the fused integers). Output-pruned o/down projections add into the residual directly
(`fastllama.nn.add_linear`). On CUDA, attention runs on the fused memory-efficient kernel, pinned (see
`_folded_attention`), and a decode step reads its position from a device tensor updated in place, so no step
waits on the host.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .hardware import own_code, policy, simd_bits
from .nn import QuantLinear, add_linear, fuse, linear

log = logging.getLogger(__name__)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama RMSNorm as one fused op (F.rms_norm) instead of its module's seven, in float32 as HF computes it."""
    return norm.weight * F.rms_norm(x.float(), x.shape[-1:], eps=norm.variance_epsilon).to(x.dtype)


# The compiled step checks no guards on the model's modules: dynamo re-checked every parameter, buffer and module
# attribute of the model before each step (0.4-0.6 ms of a 7.9-8.4 ms gptq4 step on a 2-core Xeon). A decoder's step
# has a code object of its own and serves one model, whose modules stay as they were when the decoder was built (it
# already holds views of their integers, see `fastllama.nn.fuse`). A torch without this filter guards as before.
_MODULE_GUARDS_OFF = ({"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
                      if hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe") else {})
# nor does its code re-assert the size, stride and alignment of every graph input: inductor's wrapper checked each of
# a gptq4 step's 370 inputs (the model's weights, scales and caches) on every call, 644 checks taking 0.35-0.38 ms of
# a 7.6-8.4 ms step on a 2-core Xeon. The inputs are the same tensors every step, for the reason above.
_INPUT_ASSERTS_OFF = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}
# On the CPU inductor tries to fuse two nodes reading one buffer only when they are at most 8 nodes apart, not 64:
# the nodes reading the rotary tables and the positions, in every layer, made pairs that never fuse. The same code
# comes out (the embedded model's gptq4 step, run as AVX2, every layer unrolled), its cold compile 24.3-25.2 s
# instead of 28.8-29.2. With one layer compiled and reused (`Policy.compile_layers`) it changes nothing measurable
# (6.4-6.8 s either way): it serves the steps that stay unrolled (see `_reusable_layers`).
_FUSION_TRIES = ({"max_fusion_buffer_group_pairwise_attempts": 8}
                 if hasattr(inductor_config, "max_fusion_buffer_group_pairwise_attempts") else {})


class Decoder:
    """A static-cache greedy decoder for a Llama-family `model`, for prompts + new tokens up to `max_len`.

    The model's modules must not change while a decoder holds it (its compiled step does not re-check them): build
    a new decoder after swapping, compressing or moving them. Weights updated in place are read as they are."""

    def __init__(self, model: nn.Module, max_len: int, batch_size: int = 1, compile: bool | None = None):
        """`compile=None` compiles the decode step where `fastllama.hardware.policy` says (`compile_step`)."""
        inner = getattr(model, "model", None)
        if not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
            raise ValueError(f"Decoder needs a Llama-family causal LM (model.model.layers, model.model.rotary_emb); "
                             f"got {type(model).__name__}: load it with fastllama.load_model")
        self.model, self.max_len = model, max_len
        param = inner.embed_tokens.weight
        self.device, self.dtype = param.device, param.dtype
        # the cache and attention: float32 on the CPU, where a bfloat16 attention step took 100 us against 18 us
        # in float32 (no native bf16 SDPA there); the model's dtype on a GPU
        self.attn_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        with torch.no_grad():
            positions = torch.arange(max_len, device=self.device)[None]
            cos, sin = inner.rotary_emb(torch.empty(0, dtype=self.dtype, device=self.device), positions)
            half = cos.shape[-1] // 2
            # rotate_half(x) * sin == x.roll(half) * [-sin | sin], exactly (negation is exact): 2 ops fewer per call
            self.cos, self.sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)  # (max_len, head_dim)
            probe = torch.zeros(1, 1, param.shape[1], dtype=self.dtype, device=self.device)
            self.cache = [self._buffers(layer.self_attn, probe, batch_size) for layer in inner.layers]
            # q/k/v and gate/up as one matmul each where their kind allows (`fastllama.nn.fuse`): fewer kernel calls
            # (float32 linears measured no faster fused on the CPU: 25.4 vs 25.2 ms a compiled step, not fused)
            self.fused = [(fuse([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                           fuse([layer.mlp.gate_proj, layer.mlp.up_proj])) for layer in inner.layers]
        future = torch.ones(max_len, max_len, dtype=torch.bool, device=self.device).triu(1)
        self.causal = torch.zeros(max_len, max_len, dtype=self.attn_dtype, device=self.device).masked_fill(
            future, -torch.inf)
        self.batch_size = batch_size
        # the decode position lives on the device and is updated in place (fill_ passes the value to a kernel):
        # building it from host data each step (torch.tensor([pos], device=...)) synchronized with the GPU
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        # on CUDA the q heads of each KV group are folded into that group's query rows (see `_attention`), so SDPA
        # runs the fused memory-efficient kernel; the CPU's flash kernel takes grouped heads as they are
        self.fold_gqa = self.device.type == "cuda"
        device_policy = policy(self.device)
        self.compiled = device_policy.compile_step if compile is None else compile
        # the class's function, not the bound method: a decoder holding its own method (or a compiled wrapper of
        # it) is a reference cycle that keeps it, its cache and the model alive until the next gc.collect()
        self._step, self._layer = Decoder.forward, Decoder._layer_step
        if self.compiled and device_policy.compile_layers and _reusable_layers(model):
            # one layer compiled, then reused for every layer of the same shapes (a copy of its own, as the step's:
            # its reuse limit is this model's layer count, enough where every layer has shapes of its own)
            self._layer = torch.compiler.nested_compile_region(own_code(Decoder._layer_step),
                                                               max_reuse_entries=len(inner.layers))
        if self.compiled:
            for t in (self.cos, self.sin, self.causal, self.pos, *(t for kv in self.cache for t in kv)):
                torch._dynamo.mark_static_address(t)  # fixed addresses: CUDA graphs update the cache in place
            # CUDA graphs: what mode="reduce-overhead" sets, as an option (torch.compile takes a mode or options)
            how = ({"triton.cudagraphs": True} if self.device.type == "cuda" else
                   {"cpp.simdlen": simd_bits()} | _FUSION_TRIES)
            log.info("compiling the decode step (%s): the first steps take a while", how)
            self._step = torch.compile(own_code(Decoder.forward), fullgraph=True, dynamic=False,
                                       options=how | _MODULE_GUARDS_OFF | _INPUT_ASSERTS_OFF)

    def _buffers(self, attn: nn.Module, probe: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed key and value buffers shaped by what this layer's k and v projections return."""
        def shape(proj: nn.Module) -> tuple[int, ...]:
            return batch_size, proj(probe).shape[-1] // attn.head_dim, self.max_len, attn.head_dim

        return (torch.zeros(shape(attn.k_proj), dtype=self.attn_dtype, device=self.device),
                torch.zeros(shape(attn.v_proj), dtype=self.attn_dtype, device=self.device))

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits of the last position for `ids` (B, T) at positions `pos` (T,); fills the cache there."""
        inner = self.model.model
        x = inner.embed_tokens(ids)
        cos, sin, mask = self.cos[pos], self.sin[pos], self.causal[pos]
        for layer, kv, fused in zip(inner.layers, self.cache, self.fused):
            x = self._layer(layer, kv, fused, x, cos, sin, mask, pos, self.fold_gqa)
        return linear(self.model.lm_head, _rms_norm(inner.norm, x[:, -1]))

    @staticmethod
    def _layer_step(layer: nn.Module, kv: tuple[torch.Tensor, torch.Tensor], fused: tuple[nn.Module | None, ...],
                    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                    fold_gqa: bool) -> torch.Tensor:
        """One decoder layer: attention, filling the layer's cache `kv` at `pos`, then the MLP, each with its
        residual; `fused` holds its fused q/k/v and gate/up (or None)."""
        (k_cache, v_cache), (qkv, gate_up), attn, mlp = kv, fused, layer.self_attn, layer.mlp
        y = Decoder._attention(attn, qkv, _rms_norm(layer.input_layernorm, x), cos, sin, mask, pos, k_cache, v_cache,
                               fold_gqa)
        x = add_linear(x, attn.o_proj, y)
        gate, up = _project(_rms_norm(layer.post_attention_layernorm, x), (mlp.gate_proj, mlp.up_proj), gate_up)
        return add_linear(x, mlp.down_proj, mlp.act_fn(gate) * up)

    @staticmethod
    def _attention(attn: nn.Module, qkv: nn.Module | None, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   fold_gqa: bool) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (y.view(B, T, -1, attn.head_dim).transpose(1, 2)
                   for y in _project(x, (attn.q_proj, attn.k_proj, attn.v_proj), qkv))
        half = attn.head_dim // 2
        q, k = q * cos + q.roll(half, -1) * sin, k * cos + k.roll(half, -1) * sin
        k_cache.index_copy_(2, pos, k.to(k_cache.dtype))
        v_cache.index_copy_(2, pos, v.to(v_cache.dtype))
        if fold_gqa:
            y = _folded_attention(q.to(k_cache.dtype), k_cache, v_cache, mask, attn.scaling)
        else:
            y = F.scaled_dot_product_attention(q.to(k_cache.dtype), k_cache, v_cache, attn_mask=mask,
                                               scale=attn.scaling, enable_gqa=True)
        return y.transpose(1, 2).reshape(B, T, -1).to(x.dtype)  # o_proj's input

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The first new token (B, 1) after the prompt `ids` (B, T)."""
        pos = torch.arange(ids.shape[1], device=self.device)
        return self.forward(ids, pos).argmax(-1, keepdim=True)

    @torch.inference_mode()
    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """The next token (B, 1) after `token` (B, 1) at position `pos`."""
        self.pos.fill_(pos)
        return self._step(self, token, self.pos).argmax(-1, keepdim=True).clone()


def _reusable_layers(model: nn.Module) -> bool:
    """Whether the decode step may compile a layer once and reuse it (`Policy.compile_layers`): not where a CPU int4
    matmul runs on PyTorch's kernel, whose inductor lowering holds the group size as a tensor constant that inductor
    leaves unbound inside a reused layer (torch 2.13: "group size must be a scalar")."""
    return not any(isinstance(m, QuantLinear) and m.bits != 8 and not m.own for m in model.modules())


def _project(x: torch.Tensor, parts: tuple[nn.Module, ...], fused: nn.Module | None) -> tuple[torch.Tensor, ...]:
    """Each part's output for input `x`: one matmul through `fused` (their weights side by side) where there is one."""
    if fused is None:
        return tuple(linear(p, x) for p in parts)
    return linear(fused, x).split([p.out_features for p in parts], -1)


# the fused kernel that takes an additive mask (flash takes none); pinned on CUDA, so a shape or dtype it cannot
# take is an error rather than a silent fallback to the math backend (which expands K/V and upcasts)
FUSED_ATTENTION = SDPBackend.EFFICIENT_ATTENTION


def _folded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Grouped-query attention of q (B, Hq, T, D) over k, v (B, Hkv, L, D) under `mask` (T, L), with each KV
    group's q heads folded into its query rows: (B, Hkv, rep * T, D) against (B, Hkv, L, D).

    Every query row meets the keys of its own group, as with `enable_gqa`, but the heads now match, which the
    memory-efficient kernel needs (some PyTorch versions' reject GQA), and K/V are read once per group, not
    copied per q head as `repeat_interleave` (gpt-fast) or the math backend do. Returns (B, Hq, T, D)."""
    B, Hq, T, D = q.shape
    groups = k.shape[1]
    rep = Hq // groups
    folded = q.reshape(B, groups, rep * T, D)  # rows (q head within the group, position): a view when T == 1
    mask = mask.repeat(rep, 1) if T > 1 else mask  # one mask row per folded row; a decode step's row broadcasts
    with sdpa_kernel(FUSED_ATTENTION) if q.is_cuda else contextlib.nullcontext():
        y = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
    return y.reshape(B, Hq, T, D)


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, compile: bool | None = None,
             decoder: Decoder | None = None) -> torch.LongTensor:
    """Greedy continuation of `input_ids` (B, T): returns (B, T + max_new_tokens), like HF `generate`.

    Pass a `decoder` to reuse its cache (and compiled step) across calls.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}; "
                         "add a batch dimension with input_ids[None]")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    B, T = input_ids.shape
    decoder = decoder or Decoder(model, T + max_new_tokens, batch_size=B, compile=compile)
    if T + max_new_tokens > decoder.max_len or B != decoder.batch_size:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} + max_new_tokens ({max_new_tokens}) do not fit the "
                         f"decoder (batch {decoder.batch_size}, max_len {decoder.max_len}); build a Decoder "
                         "with that batch size and a large enough max_len")
    ids = input_ids.to(decoder.device)
    tokens = [decoder.prefill(ids)]
    for pos in range(T, T + max_new_tokens - 1):
        tokens.append(decoder.step(tokens[-1], pos))
    return torch.cat([ids, *tokens], dim=1)
