"""The `fastllama` command line: one subcommand per public API name.

Heavy imports (torch, transformers) happen inside the handlers, so `fastllama --help` starts instantly.
Each subcommand is an `_add_<name>(subparsers)` function that registers its parser and handler.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("fastllama")


def _model_args(p: argparse.ArgumentParser) -> None:
    """--model/--device/--dtype, shared by every subcommand that loads a model."""
    p.add_argument("--model", default="smollm2-135m",
                   help="model spec: smollm2-135m (default), random:<preset>, a .gguf file, a directory, or a hub id")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on GPU)")


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load(args: argparse.Namespace):
    from .models import load_model

    return load_model(args.model, device=_device(args), dtype=args.dtype)


# ---------------------------------------------------------------- generate
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    _model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> None:
    import torch

    model, tok = _load(args)
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer (random-weight presets take token ids); "
                         "use a real model spec for text generation")
    if tok.chat_template and not args.raw:
        enc = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    else:
        enc = tok(args.prompt, return_tensors="pt")
    ids = enc["input_ids"].to(model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=enc["attention_mask"].to(model.device),
                             max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


# ---------------------------------------------------------------- main
COMMANDS = [_add_generate]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fastllama", description="Make Llama-family models smaller and faster.")
    parser.add_argument("--version", action="version", version=f"fastllama {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:  # bad input: a clear message, no traceback
        if args.verbose:
            raise
        print(f"fastllama: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
