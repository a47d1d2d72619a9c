"""prune_model on random:tiny: per-linear pruning equals ln_structured, coupled pruning equals masking the
removed channels, `act` importance is Wanda's, and the pruned model still generates."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from fastllama.generate import generate
from fastllama.nn import PrunedInputLinear, PrunedOutputLinear, _Pruned
from fastllama.prune import MLP_MULTIPLE, TARGETS, _prune_linears, activation_norms, mlp_keep_count, prune_model

pytestmark = pytest.mark.unit

CALIB = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _linears(model, leaf):
    return [m for n, m in model.named_modules() if n.endswith(f".{leaf}")]


def _bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


@settings(max_examples=8, deadline=None)
@given(amount=st.floats(0, 0.9), dim=st.sampled_from(["input", "output"]))
def test_per_linear_equals_ln_structured_on_every_target(amount, dim):
    from fastllama.models import load_model

    model, _ = load_model("random:tiny", dtype=torch.float32)
    ref = copy.deepcopy(model)
    for leaf in TARGETS:
        for linear in _linears(ref, leaf):
            prune.ln_structured(linear, "weight", amount, n=1, dim=1 if dim == "input" else 0)
    width = model.config.intermediate_size
    prune_model(model, amount, dim=dim)
    swap = PrunedInputLinear if dim == "input" else PrunedOutputLinear
    # the MLP folds (see _fold_mlp): input pruning leaves down_proj plain, output pruning gate_proj and up_proj
    folded = {"input": ("down_proj",), "output": ("gate_proj", "up_proj")}[dim] if round(amount * width) else ()
    assert all(isinstance(m, nn.Linear if leaf in folded else swap) for leaf in TARGETS for m in _linears(model, leaf))
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    torch.testing.assert_close(_logits(model), _logits(ref), atol=1e-4, rtol=1e-4)


def test_targets_select_the_linears(tiny_model):
    prune_model(tiny_model, 0.25, dim="input", targets=["o_proj", "lm_head"])
    assert isinstance(tiny_model.lm_head, PrunedInputLinear)
    assert all(isinstance(m, PrunedInputLinear) for m in _linears(tiny_model, "o_proj"))
    assert all(isinstance(m, nn.Linear) for m in _linears(tiny_model, "q_proj"))


@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("dim", ["input", "output"])
def test_folding_the_mlp_keeps_the_function_and_saves_bytes(tiny_model, dim, bits, monkeypatch):
    """Channels that per-linear pruning leaves without effect leave the MLP: down_proj (input pruning) or gate and
    up (output pruning) become plain, smaller linears, nothing is gathered or scattered there, and the function
    is that of the unfolded swaps. A 4-bit down_proj selects whole groups only: output pruning does not fold it.
    Quantized matmuls compare dequantized (any row count): the decode kernels round activations in blocks of 64
    values, which a folded, narrower input shifts."""
    import fastllama.nn
    from fastllama.bench import model_gb
    from fastllama.gptq import RTNConfig, quantize_

    monkeypatch.setattr(fastllama.nn, "DEQUANT_ROWS", 1)

    if bits:
        quantize_(tiny_model, RTNConfig(bits=bits, group_size=32))
    ref = copy.deepcopy(tiny_model)
    _prune_linears(ref, 0.25, dim, None, [n for n, _ in ref.named_modules() if n.rpartition(".")[2] in TARGETS])
    prune_model(tiny_model, 0.25, dim=dim)
    mlp, width = tiny_model.model.layers[0].mlp, ref.model.layers[0].mlp.down_proj.in_features
    folds = not (dim == "output" and bits == 4)
    assert (mlp.gate_proj.out_features < width) == folds
    assert isinstance(mlp.down_proj if dim == "input" else mlp.gate_proj, _Pruned) != folds
    assert (model_gb(tiny_model) < model_gb(ref)) == folds
    torch.testing.assert_close(_logits(tiny_model), _logits(ref), atol=1e-4, rtol=1e-4)


def test_activation_norms_are_the_input_l2_norms(tiny_model):
    norms = activation_norms(tiny_model, CALIB, ["model.layers.0.self_attn.q_proj"])
    with torch.no_grad():
        x = tiny_model.model.layers[0].input_layernorm(tiny_model.model.embed_tokens(CALIB))
    torch.testing.assert_close(norms["model.layers.0.self_attn.q_proj"], x.flatten(0, 1).norm(dim=0))


def test_act_importance_is_wanda(tiny_model):
    q = tiny_model.model.layers[0].self_attn.q_proj
    norm = activation_norms(tiny_model, CALIB, ["model.layers.0.self_attn.q_proj"])["model.layers.0.self_attn.q_proj"]
    score = (q.weight.detach().abs() * norm).sum(0)
    expected = torch.topk(score, k=96).indices.sort().values
    prune_model(tiny_model, 0.25, dim="input", importance="act", calib=CALIB)
    assert tiny_model.model.layers[0].self_attn.q_proj.keep.tolist() == expected.tolist()


def test_act_keeps_a_massive_activation_channel_that_l1_prunes(tiny_model):
    with torch.no_grad():  # channel 5: huge activations through small weights, as in Llama's massive activations
        tiny_model.model.embed_tokens.weight[:, 5] *= 100
        tiny_model.model.layers[0].self_attn.q_proj.weight[:, 5] *= 0.1
    l1 = prune_model(copy.deepcopy(tiny_model), 0.25, dim="input")
    act = prune_model(tiny_model, 0.25, dim="input", importance="act", calib=CALIB)
    assert 5 not in l1.model.layers[0].self_attn.q_proj.keep.tolist()
    assert 5 in act.model.layers[0].self_attn.q_proj.keep.tolist()


@pytest.mark.parametrize("importance", ["l1", "act"])
def test_mlp_coupled_equals_masking_the_channels(tiny_model, importance):
    ref = copy.deepcopy(tiny_model)
    before = _bytes(tiny_model)
    prune_model(tiny_model, 0.5, dim="mlp", importance=importance, calib=CALIB)
    assert tiny_model.config.intermediate_size == 128
    for mlp, mlp_ref in zip((lay.mlp for lay in tiny_model.model.layers), (lay.mlp for lay in ref.model.layers)):
        assert type(mlp.down_proj) is nn.Linear and mlp.down_proj.in_features == mlp.gate_proj.out_features == 128
        kept = (mlp_ref.gate_proj.weight[:, None] == mlp.gate_proj.weight[None]).all(-1).any(-1)  # kept rows
        with torch.no_grad():
            mlp_ref.down_proj.weight[:, ~kept] = 0
    torch.testing.assert_close(_logits(tiny_model), _logits(ref), atol=1e-5, rtol=1e-5)
    mlp_bytes = 3 * 128 * 256 * 4 * 2  # two layers of gate, up, down in fp32
    assert before - _bytes(tiny_model) == mlp_bytes // 2


@pytest.mark.parametrize("importance", ["l1", "act"])
def test_heads_coupled_equals_masking_the_kv_group(tiny_model, importance):
    ref = copy.deepcopy(tiny_model)
    prune_model(tiny_model, 0.5, dim="heads", importance=importance, calib=CALIB)
    cfg = tiny_model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 32)  # GQA ratio 2 kept
    for attn, attn_ref in zip((lay.self_attn for lay in tiny_model.model.layers),
                              (lay.self_attn for lay in ref.model.layers)):
        assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (64, 32, 64)
        group = int(torch.equal(attn.k_proj.weight, attn_ref.k_proj.weight[32:]))  # which KV group survived
        with torch.no_grad():  # without its o_proj columns, the other group contributes nothing
            attn_ref.o_proj.weight[:, (1 - group) * 64:(2 - group) * 64] = 0
    torch.testing.assert_close(_logits(tiny_model), _logits(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", ["mlp", "heads"])
def test_coupled_pruning_stays_on_the_model_device(tiny_model, dim):
    """A meta-device copy stands in for a GPU: an index built on the CPU and used on the weights' device raises
    the same device mismatch there (heads pruning built its row indices with a bare torch.arange)."""
    model = prune_model(tiny_model.to("meta"), 0.5, dim=dim)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert (attn.q_proj.out_features, mlp.gate_proj.out_features) == ((64, 256) if dim == "heads" else (128, 128))
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.parametrize("dim", ["input", "output", "mlp", "heads"])
@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_after_pruning(tiny_model, dim, cache):
    prune_model(tiny_model, 0.5, dim=dim)
    out = tiny_model.generate(IDS[:1], max_new_tokens=6, do_sample=False, cache_implementation=cache,
                              pad_token_id=0)
    assert out.shape == (1, 18)
    torch.testing.assert_close(out[0, 12:], _logits(tiny_model, out[:, :-1])[0, 11:].argmax(-1))
    assert torch.equal(generate(tiny_model, IDS[:1], 6, compile=False), out)  # fastllama's static-cache decoder


@given(width=st.integers(1, 4096), amount=st.floats(0, 0.99))
def test_mlp_keep_count_is_kernel_friendly(width, amount):
    exact = width - round(amount * width)
    if exact < 1:
        with pytest.raises(ValueError, match="would remove all"):
            mlp_keep_count(width, amount)
        return
    keep = mlp_keep_count(width, amount)
    if width % MLP_MULTIPLE:
        assert keep == exact
    else:
        assert keep % MLP_MULTIPLE == 0 and MLP_MULTIPLE <= keep <= width
        assert abs(keep - exact) <= MLP_MULTIPLE // 2 or keep == MLP_MULTIPLE


@pytest.mark.parametrize("amount", [-0.5, 1.0, 2])
def test_amount_outside_range_is_rejected(tiny_model, amount):
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        prune_model(tiny_model, amount)


@pytest.mark.parametrize("dim, amount, match", [("heads", 0.9, "would remove all 2 KV head groups"),
                                                ("mlp", 0.999, "would remove all 256 MLP channels"),
                                                ("input", 0.999, "would remove all 128 input channels")])
def test_amount_that_removes_everything_is_rejected(tiny_model, dim, amount, match):
    with pytest.raises(ValueError, match=match):
        prune_model(tiny_model, amount, dim=dim)


def test_unknown_dim_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="unknown pruning dim 'rows'; valid: input, output, mlp, heads"):
        prune_model(tiny_model, 0.1, dim="rows")


def test_unknown_importance_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="unknown importance 'l2'; valid: l1, act"):
        prune_model(tiny_model, 0.1, importance="l2")


def test_act_without_calibration_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="importance='act' needs calib"):
        prune_model(tiny_model, 0.1, importance="act")


def test_model_without_linears_is_rejected():
    with pytest.raises(ValueError, match="Sequential has no linear layers named q_proj"):
        prune_model(nn.Sequential(nn.Embedding(4, 4), nn.ReLU()), 0.1)


def test_cli_prune_reports_the_smaller_model(capsys):
    from fastllama.cli import main

    assert main(["prune", "--model", "random:tiny", "--dim", "mlp", "--amount", "0.5"]) == 0
    assert "prune:mlp=0.5,importance=l1: 1.4 MB -> 1.1 MB" in capsys.readouterr().out


def test_cli_prune_bad_amount_is_a_clean_error(capsys):
    from fastllama.cli import main

    assert main(["prune", "--model", "random:tiny", "--amount", "1.5"]) == 2
    assert "fastllama: error: pruning amount 1.5 is outside [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", ["input", "output", "mlp", "heads"])
def test_pruning_a_quantized_model_keeps_it_quantized_and_smaller(tiny_model, bits, dim):
    from fastllama.gptq import RTNConfig, quantize_
    from fastllama.nn import QuantLinear

    quantize_(tiny_model, RTNConfig(bits=bits, group_size=32))
    before, ref = _state_bytes(tiny_model), _logits(tiny_model)
    prune_model(tiny_model, 0.25 if dim != "heads" else 0.5, dim=dim, importance="act", calib=CALIB)
    leaves = [m for leaf in TARGETS for m in _linears(tiny_model, leaf)]
    assert all(isinstance(getattr(m, "inner", m), QuantLinear) for m in leaves)
    assert _state_bytes(tiny_model) < before
    out = tiny_model.generate(IDS[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 16) and _logits(tiny_model).shape == ref.shape


def _state_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("dim", ["input", "output", "mlp", "heads"])
def test_pruned_model_saves_and_loads_exactly(tiny_model, tmp_path, dim):
    from fastllama.checkpoint import load, save

    prune_model(tiny_model, 0.5, dim=dim)
    save(tiny_model, tmp_path, recipe=f"prune:{dim}=0.5")
    loaded, _ = load(tmp_path)
    assert torch.equal(_logits(loaded), _logits(tiny_model))
    assert _state_bytes(loaded) == _state_bytes(tiny_model)


def test_cli_prune_out_loads_back(tmp_path):
    from fastllama.checkpoint import load
    from fastllama.cli import main

    assert main(["prune", "--model", "random:tiny", "--dim", "heads", "--amount", "0.5", "--out", str(tmp_path)]) == 0
    model, _ = load(tmp_path)
    assert model.config.num_key_value_heads == 1 and model.model.layers[0].self_attn.k_proj.out_features == 32


@pytest.mark.parametrize("dim, amount, removes", [("mlp", 0.0002, False), ("input", 0.001, False),
                                                  ("heads", 0.1, False), ("mlp", 0.25, True), ("input", 0.01, True)])
def test_an_amount_that_removes_nothing_warns_with_the_counts(tiny_model, caplog, dim, amount, removes):
    with caplog.at_level("WARNING", logger="fastllama.prune"):
        prune_model(tiny_model, amount, dim=dim)
    warned = [r.getMessage() for r in caplog.records if "removes nothing" in r.getMessage()]
    assert bool(warned) != removes, warned
    if warned:
        assert {"mlp": "(256 of them", "input": "(128/256 of them", "heads": "(2 of them"}[dim] in warned[0]


def _input_norms(model, leaf):
    """The L2 norm of each input channel of every layer's `leaf` linear over CALIB, gathered here with plain hooks
    (independently of fastllama.prune.activation_norms)."""
    sq = {}
    hooks = [layer.get_submodule(leaf).register_forward_pre_hook(
        lambda m, args, i=i: sq.__setitem__(i, sq.get(i, 0) + args[0].detach().flatten(0, -2).square().sum(0)))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(CALIB)
    for h in hooks:
        h.remove()
    return [sq[i].sqrt() for i in range(len(model.model.layers))]


@pytest.mark.parametrize("importance", ["l1", "act"])
def test_coupled_mlp_keeps_the_top_scoring_channels(tiny_model, importance):
    """The kept MLP channels are the top-k of a score computed here from its definition: l1, the L1 norm of the
    channel's gate and up rows and down column; act, its down column's |W| times the column's activation norm."""
    ref = copy.deepcopy(tiny_model)
    norms = _input_norms(ref, "mlp.down_proj")
    prune_model(tiny_model, 0.5, dim="mlp", importance=importance, calib=CALIB)
    for i, (layer, layer_ref) in enumerate(zip(tiny_model.model.layers, ref.model.layers)):
        g, u, d = (layer_ref.mlp.get_submodule(n).weight.detach() for n in ("gate_proj", "up_proj", "down_proj"))
        score = (g.abs().sum(1) + u.abs().sum(1) + d.abs().sum(0)) if importance == "l1" else \
            (d.abs() * norms[i]).sum(0)
        expected = torch.topk(score, 128).indices.sort().values
        kept = (layer.mlp.gate_proj.weight[:, None] == g[None]).all(-1).nonzero()[:, 1]
        assert kept.tolist() == expected.tolist()


@pytest.mark.parametrize("importance", ["l1", "act"])
def test_coupled_heads_keep_the_top_scoring_kv_group(tiny_model, importance):
    """The kept KV group is the top one by a score computed here: l1, the L1 norm of its q, k, v rows and o columns;
    act, its o columns' |W| times their activation norms. Layers are made to disagree so both choices occur."""
    with torch.no_grad():  # layer 0 favours group 0, layer 1 group 1, under either score
        tiny_model.model.layers[0].self_attn.o_proj.weight[:, :64] *= 4
        tiny_model.model.layers[1].self_attn.o_proj.weight[:, 64:] *= 4
    ref = copy.deepcopy(tiny_model)
    norms = _input_norms(ref, "self_attn.o_proj")
    prune_model(tiny_model, 0.5, dim="heads", importance=importance, calib=CALIB)
    for i, (layer, layer_ref) in enumerate(zip(tiny_model.model.layers, ref.model.layers)):
        a = layer_ref.self_attn
        o = a.o_proj.weight.detach().abs()
        if importance == "l1":
            score = o.sum(0).view(2, -1).sum(1) + sum(p.weight.detach().abs().sum(1).view(2, -1).sum(1)
                                                      for p in (a.q_proj, a.k_proj, a.v_proj))
        else:
            score = (o * norms[i]).sum(0).view(2, -1).sum(1)
        kept = int(torch.equal(layer.self_attn.k_proj.weight, a.k_proj.weight[32:]))
        assert kept == int(score.argmax()) == i
