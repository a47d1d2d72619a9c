"""Save and load compressed models: `model.safetensors` plus `fastllama.json`, never a pickle.

    save(model, dir, tokenizer=None, recipe=None)   write the directory (`fastllama compress --out`)
    load(dir, device="cpu") -> (model, tokenizer)   rebuild the model as it was saved, on `device`

fastllama.json holds the format version, the versions that wrote it, the recipe, the transformers config (which
already records dropped layers and coupled-pruned widths), the float dtype, the spec of every linear
(`fastllama.nn.to_spec`: its swap type, shapes, bits and per-layer group size), the keys of tied tensors
(stored once), and the dtype of buffers that are rebuilt rather than stored (rotary frequencies).

Loading builds the model from the config, swaps in an empty module wherever a spec differs from the freshly
built one, and loads the safetensors file strictly. Quantized weights are stored portably (integers, scales,
zeros) and packed for the device's kernel at load, so a checkpoint written on a GPU loads on a CPU and back.

bitsandbytes quantizes at load, as transformers does with a BitsAndBytesConfig: a model bound for its layers is
saved before the `bnb` step, which fastllama.json records as `at_load` and `load` applies (see
`Recipe.split_at_load`). bitsandbytes' own layers are not saved.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .nn import SWAPS, foreign_linear, from_spec, to_spec

log = logging.getLogger(__name__)

FORMAT = 1  # the layout of fastllama.json; bumped on incompatible changes
META_FILE, WEIGHTS_FILE = "fastllama.json", "model.safetensors"


def _modules(model: nn.Module) -> dict[str, dict]:
    """The spec of every linear and swap, outermost only (a swap's `inner` is in its own spec); ValueError for a
    linear of another library (bitsandbytes'), whose weights this format does not hold."""
    specs = {}
    for name, module in model.named_modules():
        inside = any(name.startswith(outer + ".") for outer in specs)
        if not inside and (type(module) is nn.Linear or type(module).__name__ in SWAPS):
            specs[name] = to_spec(module)
        elif foreign_linear(module):
            raise ValueError(f"cannot save {name}, a {type(module).__name__}: bitsandbytes quantizes at load, so save "
                             "the model before its bnb step with save(..., at_load='bnb:type=...') (see "
                             "Recipe.split_at_load)")
    return specs


def save(model: nn.Module, path: str | Path, tokenizer=None, recipe: str | None = None,
         calibration: str | None = None, at_load: str | None = None) -> Path:
    """Write `model` (any mix of float, quantized and pruned linears) to the directory `path`; returns it.
    `calibration` records where the recipe's calibration text came from (see `data.calibration_with_source`);
    `at_load`, recipe steps `load` applies (a bnb step: bitsandbytes quantizes at load)."""
    from safetensors.torch import save_file
    import transformers

    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    tensors, aliases, seen = {}, {}, {}
    state = model.state_dict()
    for key, tensor in state.items():
        origin = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.dtype)
        if tensor.numel() and origin in seen:  # tied weights: stored once
            aliases[key] = seen[origin]
        else:
            seen[origin] = key
            tensors[key] = tensor.detach().cpu().contiguous()
    float_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    meta = {
        "format": FORMAT,
        "versions": {"fastllama": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "recipe": None if recipe is None else str(recipe),
        "calibration": calibration,
        "at_load": str(at_load or "") or None,
        "dtype": str(float_dtype).removeprefix("torch."),
        "config": model.config.to_dict(),
        "modules": _modules(model),
        "aliases": aliases,
        # buffers computed at build time (rotary frequencies): their dtype, which a cast of the model may change
        "buffer_dtypes": {k: str(b.dtype).removeprefix("torch.") for k, b in model.named_buffers()
                          if k not in state and b.is_floating_point()},
    }
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / META_FILE).write_text(json.dumps(meta, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    log.info("saved %s (%d tensors%s)", path, len(tensors), f", recipe {recipe}" if recipe else "")
    return path


def read_meta(path: Path) -> dict:
    """The checked contents of `path/fastllama.json` (FileNotFoundError or ValueError, naming the fix)."""
    file = path / META_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: {path} is not a `fastllama compress --out` directory")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); it may be truncated: save the model again") from e
    missing = {"format", "config", "dtype", "modules", "aliases", "buffer_dtypes"} - meta.keys()
    if missing:
        raise ValueError(f"{file} lacks {', '.join(sorted(missing))}; it may be truncated: save the model again")
    if meta["format"] != FORMAT:
        raise ValueError(f"{file} has format {meta['format']}, this fastllama reads format {FORMAT}; "
                         f"save it again with fastllama {__version__}")
    return meta


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; the checkpoint is incomplete: save the model again")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
                         "save the model again") from e


def _short(e: Exception) -> str:
    """An exception's message on one line, cut to a readable length."""
    return " ".join(str(e).split())[:600]


def _build(meta: dict) -> nn.Module:
    """The model of the saved config, in the saved dtype, with each saved linear's spec swapped in."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(meta["config"])
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    dtype = getattr(torch, meta["dtype"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in meta["modules"].items():
        parent, _, attr = name.rpartition(".")
        current = model.get_submodule(name)
        if type(current) is not nn.Linear or to_spec(current) != spec:  # unchanged linears stay (and stay tied)
            setattr(model.get_submodule(parent), attr, from_spec(spec).to(dtype))
    for name, buffer_dtype in meta["buffer_dtypes"].items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        setattr(module, attr, getattr(module, attr).to(getattr(torch, buffer_dtype)))
    return model


def load(path: str | Path, device: str | torch.device = "cpu"):
    """The model saved in the directory `path` and its tokenizer (None if none was saved), on `device`, with the
    steps saved `at_load` applied."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no such checkpoint directory: {path}")
    meta = read_meta(path)
    state = _read_weights(path)
    state |= {key: state[origin] for key, origin in meta["aliases"].items() if origin in state}
    try:
        model = _build(meta)
    except (ValueError, KeyError, AttributeError) as e:  # a config or module spec this version cannot build
        saved = meta.get("versions", {}).get("fastllama", "an unknown version")
        raise ValueError(f"{path / META_FILE} describes a model this fastllama ({__version__}, saved by {saved}) "
                         f"cannot build: {type(e).__name__}: {_short(e)}; load it with the fastllama that saved it, "
                         "or save the model again") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        raise ValueError(f"{path / WEIGHTS_FILE} does not match {path / META_FILE}: {_short(e)}; the two files come "
                         "from different saves: save the model again") from e
    model = model.to(device).eval()
    if meta.get("at_load"):
        from .recipes import compress

        compress(model, meta["at_load"])
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    log.info("loaded %s (recipe %s) on %s", path, meta.get("recipe"), device)
    return model, tokenizer
