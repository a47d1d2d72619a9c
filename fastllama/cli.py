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
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on GPU)")


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


# ---------------------------------------------------------------- report / search
def _add_report(sub) -> None:
    from .report import REFERENCE_RECIPES

    p = sub.add_parser("report", help="compress, benchmark and evaluate a model over recipes; write tables and a plot")
    _model_args(p)
    p.add_argument("--recipes", default=",".join(REFERENCE_RECIPES),
                   help="comma-separated recipe names or texts; the first is the base "
                        f"(default: {','.join(REFERENCE_RECIPES)})")
    p.add_argument("--data", default=None,
                   help="RACE data: a .jsonl/.parquet file (default: the hub if reachable, else the shipped sample)")
    p.add_argument("--limit", type=int, default=None, help="RACE questions to use (a fixed seeded subset)")
    p.add_argument("--mode", default="letter", choices=["letter", "lm-eval"],
                   help="RACE scoring: letter (A-D after 'Answer:', default) or lm-eval (each option's text)")
    _calib_args(p)
    p.add_argument("--new-tokens", type=int, default=64, help="decode tokens per bench run (default 64)")
    p.add_argument("--floor", type=float, default=0.50, help="accuracy floor drawn on the plot (default 0.50)")
    p.add_argument("--out", default="fastllama-report", help="output folder (default fastllama-report)")
    p.add_argument("--force", action="store_true", help="rebuild cached models and overwrite another model's folder")
    p.add_argument("--tasks", default=None, help="lm-eval tasks measured for each recipe too, comma-separated, e.g. "
                                                 "piqa (the eval extra; see `fastllama eval lm-eval`)")
    _task_data_arg(p)
    p.add_argument("--task-limit", type=int, default=None, help="at most N documents per lm-eval task")
    p.set_defaults(func=_cmd_report)


def _task_data_arg(p) -> None:
    p.add_argument("--task-data", action="append", default=[], metavar="TASK=DIR",
                   help="read TASK's splits from DIR (<split>.jsonl in the task's own format, e.g. "
                        "piqa=DIR/validation.jsonl) instead of the hub; repeatable")


def _names(text: str | None) -> tuple[str, ...]:
    """A comma-separated list of names (recipes, tasks), blanks dropped."""
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


def _task_data(values: list[str]) -> dict[str, str]:
    """--task-data TASK=DIR values as {task: dir}."""
    bad = [v for v in values if "=" not in v]
    if bad:
        raise ValueError(f"--task-data {bad[0]!r} is not TASK=DIR; e.g. --task-data piqa=piqa-dir")
    return dict(v.split("=", 1) for v in values)


def _cmd_report(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .report import ReportConfig, run_report, to_markdown

    cfg = ReportConfig(model=args.model, recipes=_names(args.recipes), out=Path(args.out), data=args.data,
                       limit=args.limit, mode=args.mode, device=args.device, calib=args.calib,
                       nsamples=args.nsamples, seqlen=args.seqlen,
                       new_tokens=args.new_tokens, floor=args.floor, force=args.force,
                       tasks=_names(args.tasks),
                       task_data=_task_data(args.task_data), task_limit=args.task_limit)
    rows, meta = run_report(cfg)
    print(to_markdown(rows, meta))
    print(f"wrote {cfg.out / 'results.json'}, {cfg.out / 'results.md'}, {cfg.out / 'pareto.png'}")


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="the largest pruning amount whose RACE accuracy stays at or above a floor")
    _model_args(p)
    p.add_argument("--quant", default="none", help="parent quantization: none, gptq4, gptq8, or a comma-separated list")
    p.add_argument("--dim", default="input", help="input, output, mlp, heads, or a comma-separated list")
    p.add_argument("--importance", default="l1", choices=["l1", "act"], help="channel importance (default l1)")
    floor = p.add_mutually_exclusive_group()
    floor.add_argument("--floor", type=float, default=0.50, help="absolute accuracy floor (default 0.50)")
    floor.add_argument("--floor-relative", type=float, default=None,
                       help="floor as a share of the parent's accuracy, e.g. 0.9")
    p.add_argument("--data", default=None, help="RACE data (default: the hub if reachable, else the shipped sample)")
    p.add_argument("--limit", type=int, default=None, help="RACE questions to use (a fixed seeded subset)")
    p.add_argument("--tol", type=float, default=0.01, help="bisection tolerance on the amount (default 0.01)")
    _calib_args(p)
    p.add_argument("--json", default="search.json", help="where to save the table as JSON (default search.json)")
    p.set_defaults(func=_cmd_search)


def _cmd_search(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from .data import load_race
    from .search import search, search_table

    model, tok = _load(args)
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer: RACE accuracy needs a real model")
    race = load_race(args.data, limit=args.limit)
    calib, _ = _calib(args, model, tok)

    def save(results) -> None:  # after every (quant, dim) pair: a later failure loses nothing found before it
        Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=2))

    results = search(model, tok, [q.strip() for q in args.quant.split(",")], [d.strip() for d in args.dim.split(",")],
                     floor=args.floor, floor_relative=args.floor_relative, importance=args.importance, race=race,
                     calib=calib, tol=args.tol, on_result=save)
    print(search_table(results))
    print(f"wrote {args.json}")


# ---------------------------------------------------------------- prune / drop
def _calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default=None,
                   help="calibration text file or folder (default: C4 if reachable, else model samples)")
    p.add_argument("--nsamples", type=int, default=64, help="calibration sequences (default 64, as fastllama.data)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration sequence (default 256)")


def _calib(args: argparse.Namespace, model, tok):
    """(calibration ids, their source) as the calibration arguments ask."""
    from .data import calibration_with_source

    return calibration_with_source(tok, source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, model=model)


def _save_compressed(args: argparse.Namespace, model, tok, recipe: str, before: float,
                     calib_source: str | None = None, at_load=None) -> None:
    """Save the model to --out when given (with the `at_load` steps a checkpoint applies when loaded, see
    `Recipe.split_at_load`), and print the size before (GB, `bench.model_gb`) -> after, those steps applied."""
    from .bench import model_gb
    from .recipes import compress

    if args.out:
        from .checkpoint import save

        save(model, args.out, tokenizer=tok, recipe=recipe, calibration=calib_source, at_load=at_load)
    if at_load is not None:
        compress(model, at_load)
    after = model_gb(model)
    print(f"{recipe}: {before * 1e3:.1f} MB -> {after * 1e3:.1f} MB ({after / before:.1%})")
    if args.out:
        print(f"saved to {args.out}")


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="structured pruning: input/output channels of each linear, "
                                      "or coupled MLP channels / KV head groups")
    _model_args(p)
    p.add_argument("--dim", default="input", choices=["input", "output", "mlp", "heads"],
                   help="input/output channels of each linear, or coupled MLP channels / KV head groups "
                        "(default input)")
    p.add_argument("--amount", type=float, required=True,
                   help="fraction of channels (or KV groups) to remove, in [0, 1)")
    p.add_argument("--importance", default="l1", choices=["l1", "act"],
                   help="channel importance: l1 norm, or act (|W| x activation norm, needs calibration; default l1)")
    p.add_argument("--targets", default=None,
                   help="comma-separated linear names for input/output (default: q,k,v,o,gate,up,down _proj)")
    _calib_args(p)
    p.add_argument("--out", default=None, help="save the pruned model to this directory")
    p.set_defaults(func=_cmd_prune)


def _cmd_prune(args: argparse.Namespace) -> None:
    from .bench import model_gb
    from .prune import prune_model

    model, tok = _load(args)
    calib, source = _calib(args, model, tok) if args.importance == "act" else (None, None)
    targets = args.targets.split(",") if args.targets else None
    before = model_gb(model)
    prune_model(model, args.amount, dim=args.dim, importance=args.importance, calib=calib, targets=targets)
    _save_compressed(args, model, tok, f"prune:{args.dim}={args.amount},importance={args.importance}", before,
                     source)


def _add_drop(sub) -> None:
    p = sub.add_parser("drop",
                       help="drop the block of N consecutive decoder layers that changes the hidden state least")
    _model_args(p)
    p.add_argument("--layers", type=int, required=True, help="how many consecutive layers to drop")
    _calib_args(p)
    p.add_argument("--out", default=None, help="save the smaller model to this directory")
    p.set_defaults(func=_cmd_drop)


def _cmd_drop(args: argparse.Namespace) -> None:
    from .bench import model_gb
    from .drop import drop_layers

    model, tok = _load(args)
    before = model_gb(model)
    calib, source = _calib(args, model, tok)
    drop_layers(model, args.layers, calib)
    _save_compressed(args, model, tok, f"drop:layers={args.layers}", before, source)


# ---------------------------------------------------------------- compress
def _add_compress(sub) -> None:
    p = sub.add_parser("compress",
                       help="apply a recipe (GPTQ, RTN, int8wo, pruning, layer dropping) and save the model")
    _model_args(p)
    p.add_argument("--recipe", required=True,
                   help="steps joined by ' + ', e.g. 'gptq:bits=4,group=128 + prune:input=0.10', or a preset such as "
                        "gptq4, gptq8, gptq4-prune-in10, int8wo (an unknown name lists them all)")
    _calib_args(p)
    p.add_argument("--out", required=True, help="directory to save the compressed model to (load it as --model DIR)")
    p.set_defaults(func=_cmd_compress)


def _cmd_compress(args: argparse.Namespace) -> None:
    import time

    from .bench import model_gb
    from .recipes import compress, parse_recipe

    recipe = parse_recipe(args.recipe)  # bad recipes fail before the model loads
    model, tok = _load(args)
    calib, source = None, None
    if recipe.needs_calibration:
        calib, source = _calib(args, model, tok)  # the text given, C4, or samples of the model
        print(f"calibration: {calib.shape[0]} x {calib.shape[1]} tokens from {source}")
    before, start = model_gb(model), time.perf_counter()
    body, at_load = recipe.split_at_load()  # a bnb step is saved to apply at load, as bitsandbytes quantizes
    compress(model, body, calib, tok)
    print(f"compressed in {time.perf_counter() - start:.1f} s")
    _save_compressed(args, model, tok, str(recipe), before, source, at_load)


# ---------------------------------------------------------------- export
def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a (compressed) model for another engine: GGUF for llama.cpp, "
                       "compressed-tensors for vLLM")
    _model_args(p)
    p.add_argument("--recipe", default=None,
                   help="compress first, e.g. 'gptq:bits=4,group=32,grid=q4_0' (GGUF Q4_0), 'gptq:bits=8,grid=q8_0' "
                   "(GGUF Q8_0), 'gptq:bits=4,group=128,grid=sym' (compressed-tensors W4A16) or 'gptq:bits=8' (W8A16)")
    _calib_args(p)
    p.add_argument("--format", required=True, choices=["gguf", "compressed-tensors"],
                   help="gguf (llama.cpp: a file) or compressed-tensors (vLLM: a model directory)")
    p.add_argument("--float-type", default="f16", choices=["f16", "f32"],
                   help="gguf: type of float tensors (default f16)")
    p.add_argument("--pre", default=None,
                   help="gguf: llama.cpp's pre-tokenizer name for the tokenizer, e.g. smollm, llama-bpe")
    p.add_argument("--tp", type=int, default=1,
                   help="compressed-tensors: the tensor-parallel size vLLM will serve it with, checked (default 1)")
    p.add_argument("--no-vllm-check", dest="vllm_check", action="store_false",
                   help="compressed-tensors: write layouts vLLM's Marlin kernel cannot run at --tp, with warnings")
    p.add_argument("--out", required=True, help="the file (gguf) or directory (compressed-tensors) to write")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import export

    options = {"gguf": dict(float_type=args.float_type, pre=args.pre),
               "compressed-tensors": dict(tp=args.tp, check=args.vllm_check)}[args.format]
    model, tok = _load_with_recipe(args, _recipe(args))
    path = export(model, tok, args.format, args.out, **options)
    print(f"wrote {path}")


# ---------------------------------------------------------------- eval
def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="RACE accuracy, perplexity or lm-eval tasks of a model, optionally compressed by a "
                                    "recipe first")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    race = tasks.add_parser("race", help="RACE reading-comprehension accuracy with its 95%% Wilson interval")
    ppl = tasks.add_parser("ppl", help="perplexity over a text file, in strided windows")
    harness = tasks.add_parser("lm-eval", help="lm-evaluation-harness's own tasks (piqa, gsm8k, race, ...) through its "
                                               "HF model interface (the eval extra)")
    for q in (race, ppl, harness):
        _model_args(q)
        q.add_argument("--recipe", default=None, help="compress with this recipe before evaluating (e.g. gptq4)")
        _calib_args(q)
    race.add_argument("--data", default=None, help="RACE .jsonl/.parquet (default: ehovy/race high test if the hub "
                                                   "is reachable, else the shipped sample)")
    race.add_argument("--mode", default="letter", choices=["letter", "lm-eval"],
                      help="letter: pick A-D after 'Answer:' (default); "
                           "lm-eval: the harness's race prompt, option texts")
    race.add_argument("--limit", type=int, default=None, help="evaluate a fixed seeded subset of N questions")
    race.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    race.add_argument("--json", default=None, help="write the result (and per-question records) to this JSON file")
    race.add_argument("--cross-check", type=int, default=None, metavar="ARTICLES",
                      help="instead, compare lm-eval mode with lm-eval's own race task on the first ARTICLES articles "
                           "of --data (each one's last question): agreements and log-likelihood differences")
    race.set_defaults(func=_cmd_eval_race)
    harness.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated, e.g. piqa,gsm8k,race")
    harness.add_argument("--limit", type=int, default=None, help="at most N documents per task (lm-eval's --limit)")
    _task_data_arg(harness)
    harness.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size (default 8)")
    harness.add_argument("--json", default=None, help="write lm-eval's results JSON to this file")
    harness.set_defaults(func=_cmd_eval_lm_eval)
    ppl.add_argument("--text-file", default=None, help="text to score (default: the shipped fastllama/data/ppl.txt)")
    ppl.add_argument("--window", type=int, default=512, help="tokens the model sees per step (default 512)")
    ppl.add_argument("--stride", type=int, default=256, help="new tokens scored per step (default 256)")
    ppl.set_defaults(func=_cmd_eval_ppl)


def _load_with_recipe(args: argparse.Namespace, recipe=None):
    """The model of --model, compressed by `recipe` (a Recipe, parsed before this so a bad one fails before the
    model loads; None: as loaded), calibrated per --calib when the recipe needs it."""
    model, tok = _load(args)
    if recipe is not None:
        from .recipes import compress

        compress(model, recipe, _calib(args, model, tok)[0] if recipe.needs_calibration else None, tok)
    return model, tok


def _recipe(args: argparse.Namespace):
    """--recipe parsed (None without one)."""
    from .recipes import parse_recipe

    return None if args.recipe is None else parse_recipe(args.recipe)


def _cmd_eval_race(args: argparse.Namespace) -> None:
    import json
    import time

    from .evaluate import evaluate_race

    model, tok = _load_with_recipe(args, _recipe(args))
    if args.cross_check is not None:
        from .evaluate import race_cross_check

        check = race_cross_check(model, tok, args.data, args.cross_check, args.batch_size)
        print(f"lm-eval race cross-check, {args.model}{' + ' + args.recipe if args.recipe else ''}: "
              f"{check['agreements']} of {check['articles']} articles chose the same option; largest "
              f"log-likelihood difference {check['max_loglik_diff']:.2g}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"model": args.model, "recipe": args.recipe, "data": args.data, **check}, f, indent=2)
        return
    start = time.perf_counter()
    result = evaluate_race(model, tok, args.data, mode=args.mode, limit=args.limit, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    print(f"RACE ({result.mode}) {args.model}{' + ' + args.recipe if args.recipe else ''}: "
          f"acc {result.acc:.3f}  95% CI [{result.ci_low:.3f}, {result.ci_high:.3f}]  n={result.n}  ({seconds:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "recipe": args.recipe, "data": args.data, **result.summary(),
                       "seconds": round(seconds, 1), "records": result.records}, f, indent=2)
        print(f"wrote {args.json}")


def _cmd_eval_lm_eval(args: argparse.Namespace) -> None:
    from .evaluate import lm_eval_tasks

    data = _task_data(args.task_data)
    model, tok = _load_with_recipe(args, _recipe(args))
    out = lm_eval_tasks(model, tok, _names(args.tasks), limit=args.limit, data=data, batch_size=args.batch_size)
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(out))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=handle_non_serializable)
        print(f"wrote {args.json}")


def _cmd_eval_ppl(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .data import PPL_TEXT
    from .evaluate import perplexity

    path = Path(args.text_file or PPL_TEXT)
    if not path.is_file():
        raise FileNotFoundError(f"no text file at {path}; pass --text-file with an existing file")
    model, tok = _load_with_recipe(args, _recipe(args))
    ppl = perplexity(model, tok, path.read_text(encoding="utf-8"), window=args.window, stride=args.stride)
    print(f"perplexity {args.model}{' + ' + args.recipe if args.recipe else ''} on {path}: {ppl:.3f}")


# ---------------------------------------------------------------- bench
def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="decode speed and memory (tokens/s, TTFT, peak memory), optionally against "
                                     "plain transformers generate")
    _model_args(p)
    p.add_argument("--recipe", default=None, help="compress with this recipe first (e.g. gptq4, int8wo)")
    p.add_argument("--rtn", action="store_true", help="run GPTQ steps as round-to-nearest on the same grid: the same "
                                                      "kernels and bytes, so the same speed, without calibration "
                                                      "(always on for random:* models)")
    _calib_args(p)
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens to generate per run (default 256)")
    p.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (default 3)")
    p.add_argument("--baseline", default=None, choices=["hf"], help="hf: also time plain generate, same model")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the decode step (auto: as the hardware policy says: on a GPU with CUDA "
                        "graphs, on a CPU with a C++ compiler)")
    p.add_argument("--engine", default="fastllama", choices=["fastllama", "llama.cpp"],
                   help="llama.cpp: the peer alone, on the model's GGUF requantized by llama.cpp to --gguf-type (the "
                        "embedded model or a .gguf spec; needs the peers extra)")
    p.add_argument("--gguf-type", default="q4_0", choices=["q4_0", "q8_0", "f16", "f32"],
                   help="llama.cpp's quantization for --engine llama.cpp (default q4_0)")
    p.add_argument("--json", default=None, help="write the metrics to this JSON file")
    p.set_defaults(func=_cmd_bench)


def _bench_llama_cpp(args: argparse.Namespace) -> dict:
    """The llama.cpp peer alone, timed as the fast path is (see fastllama.peers)."""
    from dataclasses import asdict
    from pathlib import Path

    from .bench import compare, prompt_ids
    from .hardware import machine
    from .models import EMBEDDED, embedded_gguf
    from .peers import LlamaCpp

    gguf = embedded_gguf() if args.model == EMBEDDED else Path(args.model)
    if gguf.suffix != ".gguf":
        raise ValueError(f"--engine llama.cpp runs a GGUF: pass --model {EMBEDDED} or a .gguf file, not {args.model}")
    model, tok = _load(args)
    ids = prompt_ids(model, args.prompt_len, tok)
    peer = LlamaCpp.from_gguf(gguf, args.gguf_type)
    metrics = compare({"peer": peer.run(ids, args.new_tokens)}, args.new_tokens, args.runs)["peer"]
    return metrics | {"engine": peer.name, "file_gb": peer.file_gb(), "machine": asdict(machine("cpu"))}


def _cmd_bench(args: argparse.Namespace) -> None:
    import json

    from .bench import bench, speed_recipe

    recipe, swapped = _recipe(args), False  # a bad recipe fails before the model loads
    if recipe is not None and (args.rtn or args.model.startswith("random:")):
        recipe, swapped = speed_recipe(args.recipe)
    if swapped:
        print(f"note: GPTQ steps run as round-to-nearest with the same layout (speed does not depend on the "
              f"values): {recipe}")
    if args.engine == "llama.cpp":
        metrics = _bench_llama_cpp(args)
    else:
        model, tok = _load_with_recipe(args, recipe)
        metrics = bench(model, tok, args.prompt_len, args.new_tokens, args.runs, args.baseline,
                        compile={"auto": None, "on": True, "off": False}[args.compile])
    metrics |= {"model": args.model, "recipe": str(recipe) if recipe else None}
    for key, value in metrics.items():
        print(f"{key:>20}  {value:.4g}" if isinstance(value, float) else f"{key:>20}  {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
        print(f"wrote {args.json}")


# ---------------------------------------------------------------- main
COMMANDS = [_add_generate, _add_report, _add_search, _add_prune, _add_drop, _add_compress, _add_export, _add_eval,
            _add_bench]


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
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
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
