"""Decoder-layer dropping by angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the
Deeper Layers").

For each block of n consecutive layers starting at l, the angular distance arccos(cos(h_l, h_{l+n})) / pi
between the hidden state entering layer l and the one leaving layer l+n-1 is averaged over the calibration
sequences at their last token (as in the paper: the last token has attended to the whole sequence). The
block with the smallest distance changes the representation least, and is removed.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .data import check_calib, run_calibration

log = logging.getLogger(__name__)


def _layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder layers at model.model.layers; "
                         "layer dropping needs a Llama-family causal LM")
    return layers


@torch.no_grad()
def angular_distances(model: nn.Module, calib: Tensor, n: int, batch_size: int = 8) -> Tensor:
    """Mean angular distance (in [0, 1]) over `calib` token ids [nsamples, seqlen] of each block of `n`
    consecutive layers: entry l compares the input of layer l with the output of layer l+n-1."""
    layers = _layers(model)
    states: list[list[Tensor]] = [[] for _ in range(len(layers) + 1)]  # last-token states entering layer i

    def record(i):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            states[i].append(hidden[:, -1].float())
        return hook

    def record_last(_module, _args, output):
        states[-1].append((output[0] if isinstance(output, tuple) else output)[:, -1].float())

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(record_last))
    run_calibration(model, calib, handles, "layer distances", batch_size)
    h = torch.stack([torch.cat(s) for s in states])  # [layers + 1, nsamples, hidden]
    cos = torch.nn.functional.cosine_similarity(h[:-n], h[n:], dim=-1).clamp(-1, 1)
    return (torch.arccos(cos) / torch.pi).mean(1)


def drop_layers(model: nn.Module, n: int, calib: Tensor) -> nn.Module:
    """Remove, in place, the block of `n` consecutive decoder layers with the smallest angular distance over
    `calib` (LongTensor token ids [nsamples, seqlen]), and keep the config and KV-cache layer indices consistent."""
    layers = _layers(model)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < len(layers):
        raise ValueError(f"cannot drop {n!r} layers of {len(layers)}; valid: an integer from 0 to {len(layers) - 1}")
    if n == 0:
        return model
    check_calib(calib, "drop_layers")
    dist = angular_distances(model, calib, n)
    start = int(dist.argmin())
    log.info("dropping layers %d..%d (angular distance %.4f; per block: %s)", start, start + n - 1,
             dist[start], [round(d, 4) for d in dist.tolist()])
    kept = [layer for i, layer in enumerate(layers) if not start <= i < start + n]
    model.model.layers = nn.ModuleList(kept)
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    config = model.config
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:start] + config.layer_types[start + n:]
    return model
