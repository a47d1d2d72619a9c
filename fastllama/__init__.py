"""fastllama: make Llama-family models smaller and faster at inference, without retraining.

The public API (the same names as the `fastllama` subcommands). Names are imported on first use,
so `import fastllama` and `fastllama --help` stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_model": "models",
    "compress": "recipes",
    "parse_recipe": "recipes",
    "evaluate_race": "evaluate",
    "perplexity": "evaluate",
    "bench": "bench",
    "generate": "generate",
    "save": "checkpoint",
    "load": "checkpoint",
    "export": "export",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'fastllama' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
