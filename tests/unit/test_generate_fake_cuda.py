"""The CUDA decode step, traced without a GPU: every recipe kind is loaded onto fake CUDA tensors
(torch._subclasses.fake_tensor.FakeTensorMode) the way a GPU run loads it (checkpoint.load on the CPU, then
.to("cuda:0")), and `Decoder.step` runs with its step compiled by dynamo (fullgraph=True) into a backend that only
records the graph. A graph break, a recompile, a tensor left on the CPU or a CPU-only kernel shows up here."""

from __future__ import annotations

import ctypes
import os
from collections import Counter

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastllama.checkpoint import load, save
from fastllama.generate import Decoder
from fastllama.recipes import compress

pytestmark = pytest.mark.unit

CUDA = torch.device("cuda:0")
CPU_ONLY_OPS = ("_for_cpu", "_weight_int8pack_mm", "mkldnn")  # kernels with no (or a naive) CUDA version
RECIPES = {  # every kind of linear, pruning and layer dropping, in bf16 as on a GPU
    "float": "bf16",
    "rtn4": "rtn:bits=4,group=32 + bf16",
    "rtn4-rotate": "rtn:bits=4,group=32,rotate=true + bf16",
    "rtn8": "rtn:bits=8 + bf16",
    "int8wo": "int8wo + bf16",
    "prune-input": "prune:input=0.25 + bf16",
    "prune-output": "prune:output=0.1 + bf16",
    "prune-mlp": "prune:mlp=0.5 + bf16",
    "prune-heads": "prune:heads=0.5 + bf16",
    "rtn4-prune-input": "rtn:bits=4,group=32 + bf16 + prune:input=0.25",
    "drop": "drop:layers=1 + bf16",
}


@pytest.fixture(scope="module", autouse=True)
def fake_cuda_guard():
    """Fake CUDA tensors still enter a CUDA device guard (indexing does). FakeTensorMode installs a no-op one on a
    CUDA build without a GPU; a CPU-only build has none, so the no-op guard registered for `meta` is registered for
    CUDA too (c10::impl::registerDeviceGuard through ctypes): device guards do nothing on fake tensors."""
    if torch.backends.cuda.is_built():
        return
    try:
        c10 = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
        registry = (ctypes.c_void_p * 15).in_dll(c10, "_ZN3c104impl26device_guard_impl_registryE")
        register = c10._ZN3c104impl19registerDeviceGuardENS_10DeviceTypeEPKNS0_24DeviceGuardImplInterfaceE
    except (OSError, AttributeError, ValueError) as e:
        pytest.skip(f"cannot register a no-op CUDA device guard in this torch build ({e})")
    cuda, meta = 1, 14  # c10::DeviceType
    if not registry[cuda]:
        register(ctypes.c_int8(cuda), ctypes.c_void_p(registry[meta]))


@pytest.mark.parametrize("name", RECIPES)
def test_decode_step_traces_whole_on_fake_cuda(tiny_model, tmp_path, name):
    compress(tiny_model, RECIPES[name], torch.randint(0, 512, (2, 16)))
    save(tiny_model, tmp_path)
    model, _ = load(tmp_path)  # as a GPU run loads it: on the CPU, then moved
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to(CUDA)
        decoder = Decoder(model, max_len=16)
        assert decoder.compiled and decoder.fold_gqa  # the CUDA defaults
        decoder._step = torch.compile(decoder._step._torchdynamo_orig_callable, backend=record, fullgraph=True,
                                      dynamic=False)  # the decoder's own step, recorded instead of run by inductor
        token = decoder.prefill(torch.zeros(1, 6, dtype=torch.long, device=CUDA))
        for pos in (6, 7, 8):
            token = decoder.step(token, pos)
    assert token.device == CUDA and len(graphs) == 1  # one graph, reused: no break, no recompile per position
    nodes = list(graphs[0].graph.nodes)
    devices = {n.meta["example_value"].device for n in nodes if isinstance(n.meta.get("example_value"), torch.Tensor)}
    assert devices == {CUDA}
    ops = Counter(getattr(n.target, "__name__", str(n.target)) for n in nodes if n.op == "call_function")
    assert not [op for op in ops if any(bad in op for bad in CPU_ONLY_OPS)], ops
    assert ops["scaled_dot_product_attention"] == len(model.model.layers)
    assert ops["_sdpa_kernel"] == 2 * ops["scaled_dot_product_attention"]  # each one inside the pinned backend
    assert ("_weight_int4pack_mm" in ops) == name.startswith("rtn4")
