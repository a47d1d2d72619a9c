"""`fastllama report`: the reference study's tables for any model, from one command.

For each recipe: compress the model (cached under the output folder), then measure decode speed and memory
(`bench`), RACE accuracy (`evaluate_race`) and perplexity (`perplexity`). Writes `results.json`, `results.md` and
`pareto.png`. Finished recipes are written to `results.partial.json` as they complete, so an interrupted run
resumes from them; a completed run re-measures every recipe on the next call but never re-quantizes.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

REFERENCE_RECIPES = ("bf16", "gptq4", "gptq8", "gptq4-prune-in10", "gptq8-prune-in35")


@dataclass
class ReportConfig:
    model: str = "smollm2-135m"                     # model spec (see fastllama.models)
    recipes: tuple[str, ...] = REFERENCE_RECIPES    # recipe names or texts; the first is the base for speedups
    out: Path = Path("fastllama-report")           # output folder: results, plot, cached compressed models
    data: str | None = None                         # RACE data (None: the hub if reachable, else the shipped sample)
    limit: int | None = None                        # RACE questions (a fixed seeded subset); None: all
    mode: str = "letter"                            # RACE scoring: letter (A-D after "Answer:") or lm-eval
    device: str | None = None                       # None: cuda when available, else cpu
    calib: str | None = None                        # calibration text file/folder (None: C4, else model samples)
    nsamples: int = 64                              # calibration sequences (fastllama.data.CALIB_SAMPLES)
    seqlen: int = 256                               # calibration sequence length
    prompt_len: int = 128                           # bench prompt tokens
    new_tokens: int = 64                            # bench new tokens
    floor: float = 0.50                             # accuracy floor drawn on the plot
    force: bool = False                             # rebuild cached models, drop partial results, allow another model's folder


@dataclass
class Row:
    recipe: str
    tpot_ms: float | None = None          # median decode time per token
    tokens_per_s: float | None = None
    ttft_ms: float | None = None
    peak_mem_gb: float | None = None      # GPU: max allocated; CPU: peak RSS
    model_gb: float | None = None
    race_acc: float | None = None
    race_ci: tuple[float, float] | None = None
    race_n: int | None = None
    ppl: float | None = None
    speedup: float | None = None          # tokens/s over the first recipe's
    extra: dict = field(default_factory=dict)  # every other metric bench and compress reported


# ---------------------------------------------------------------- writers
def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def to_markdown(rows: list[Row], meta: dict) -> str:
    """The results table: the reference study's columns plus perplexity, model size and speedup."""
    lines = [f"# fastllama report: {meta.get('model', '?')} on {meta.get('device_name', '?')}", "",
             "| recipe | median latency (ms/token) | tokens/s | peak memory (GB) | RACE acc (95% CI) | perplexity "
             "| model size (GB) | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "—" if r.race_acc is None else (
            f"{r.race_acc:.1%} ({r.race_ci[0]:.1%}–{r.race_ci[1]:.1%}, n={r.race_n})" if r.race_ci else f"{r.race_acc:.1%}")
        lines.append(f"| {r.recipe} | {_fmt(r.tpot_ms, '.2f')} | {_fmt(r.tokens_per_s, '.1f')} | "
                     f"{_fmt(r.peak_mem_gb, '.3g')} | {acc} | {_fmt(r.ppl, '.2f')} | {_fmt(r.model_gb, '.3g')} | "
                     f"{_fmt(r.speedup, '.2f')}{'' if r.speedup is None else '×'} |")
    notes = meta.get("notes") or []
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def write_results(out: Path, rows: list[Row], meta: dict, name: str = "results.json") -> Path:
    """Write {meta, rows} as JSON atomically (a crash never leaves half a file)."""
    path = out / name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    tmp.replace(path)
    return path


def read_rows(path: Path) -> list[Row]:
    """Rows back from a results JSON written by `write_results`."""
    rows = []
    for d in json.loads(path.read_text())["rows"]:
        d["race_ci"] = tuple(d["race_ci"]) if d.get("race_ci") else None
        rows.append(Row(**d))
    return rows


def plot_pareto(rows: list[Row], path: Path, floor: float, title: str = "") -> Path:
    """Accuracy against tokens/s and against peak memory, the floor drawn in, the Pareto-optimal recipes joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label, better_high in ((axes[0], "tokens_per_s", "decode tokens/s (higher is better)", True),
                                        (axes[1], "peak_mem_gb", "peak memory, GB (lower is better)", False)):
        pts = [(getattr(r, key), r.race_acc, r.recipe) for r in rows if getattr(r, key) is not None and r.race_acc is not None]
        for x, y, name in pts:
            ax.scatter(x, y, s=40)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        front = _pareto_front(pts, better_high)
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", lw=1, label="Pareto front")
        ax.axhline(floor, color="red", lw=1, label=f"accuracy floor {floor:.0%}")
        ax.set_xlabel(label)
        ax.set_ylabel("RACE accuracy")
        ax.grid(alpha=0.3)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8)  # hides no point
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pareto_front(pts: list[tuple[float, float, str]], better_high: bool) -> list[tuple[float, float, str]]:
    """The points no other point beats on both axes (x better and accuracy higher), sorted by x."""
    def dominated(p):
        return any((q[0] >= p[0] if better_high else q[0] <= p[0]) and q[1] >= p[1] and q[:2] != p[:2] for q in pts)
    return sorted((p for p in pts if not dominated(p)), key=lambda p: p[0])


# ---------------------------------------------------------------- the run
def _meta(cfg: ReportConfig, device: str) -> dict:
    import torch
    import transformers

    from . import __version__
    from .bench import device_name

    return {"model": cfg.model, "recipes": list(cfg.recipes), "race_mode": cfg.mode, "device": device,
            "device_name": device_name(torch.device(device)), "machine": platform.machine(),
            "cpu_count": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "fastllama": __version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "notes": []}


def _slug(recipe: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in recipe)


def _check_folder(cfg: ReportConfig) -> None:
    """Refuse an output folder that holds another model's cache, unless forced."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    owner = cfg.out / "model.txt"
    if owner.exists() and owner.read_text().strip() != cfg.model and not cfg.force:
        raise ValueError(f"{cfg.out} holds results and cached models of {owner.read_text().strip()!r}, not "
                         f"{cfg.model!r}; pass another --out, or --force to overwrite it")
    owner.write_text(cfg.model + "\n")


def _cached(folder: Path) -> str | None:
    """The recipe a cached model folder was built with (None if it holds no readable checkpoint): a folder is
    reused only for the same recipe, so a preset whose definition changed is rebuilt."""
    from .checkpoint import read_meta

    try:
        return read_meta(folder).get("recipe")
    except (FileNotFoundError, ValueError):
        return None


def _build(cfg: ReportConfig, names: list[str], recipes: list, device: str) -> dict[str, Path]:
    """Compress every recipe not cached yet, under out/models/<recipe>; returns name -> checkpoint folder.

    A recipe that extends another one of the run (gptq4-prune-in10 extends gptq4) starts from that one's
    checkpoint, so each quantization runs once. The base model is loaded only if something needs building.
    """
    from .checkpoint import load, save
    from .data import calibration
    from .models import load_model
    from .recipes import Recipe, compress

    folders = {name: cfg.out / "models" / _slug(name) for name in names}
    built = {str(r): folders[n] for n, r in zip(names, recipes) if not cfg.force and _cached(folders[n]) == str(r)}
    base = tok = calib = None
    for name, recipe in zip(names, tqdm(recipes, desc="compress", unit="recipe")):
        if str(recipe) in built:
            folders[name] = built[str(recipe)]
            continue
        if base is None:
            base, tok = load_model(cfg.model, device=device)
        prefix = next((k for k in range(len(recipe.steps) - 1, 0, -1) if str(Recipe(recipe.steps[:k])) in built), 0)
        if prefix:
            log.info("%s: starting from the cached %s", name, Recipe(recipe.steps[:prefix]))
            model = load(built[str(Recipe(recipe.steps[:prefix]))], device=device)[0]
        else:
            model = copy.deepcopy(base)
        rest = Recipe(recipe.steps[prefix:])
        if calib is None and rest.needs_calibration:
            calib = calibration(tok, source=cfg.calib, nsamples=cfg.nsamples, seqlen=cfg.seqlen, model=base)
        t0 = time.perf_counter()
        model = compress(model, rest, calib=calib, tokenizer=tok)
        log.info("%s: compressed in %.1f s", name, time.perf_counter() - t0)
        save(model, folders[name], tokenizer=tok, recipe=str(recipe))
        built[str(recipe)] = folders[name]
        del model
    return folders


def measure(folder: Path, device: str, data: str | None, limit: int | None, mode: str, prompt_len: int,
            new_tokens: int) -> dict:
    """Bench, RACE and perplexity of one saved model. Runs in a fresh process (see run_report), so peak memory
    belongs to this model alone: it is read right after the bench, before evaluation allocates its batches."""
    from .bench import bench
    from .checkpoint import load
    from .data import PPL_TEXT, load_race
    from .evaluate import evaluate_race, perplexity

    model, tok = load(folder, device=device)
    m = bench(model, tok, prompt_len=prompt_len, new_tokens=new_tokens)
    if tok is not None:
        r = evaluate_race(model, tok, data=load_race(data, limit=limit), mode=mode)
        m |= {"race": r.summary(), "ppl": perplexity(model, tok, PPL_TEXT.read_text())}
    return m


def _row(name: str, m: dict, device: str) -> Row:
    race = m.pop("race", None)
    return Row(name, tpot_ms=m["tpot_ms"], tokens_per_s=m["tokens_per_s"], ttft_ms=m["ttft_ms"],
               peak_mem_gb=m["peak_mem_gb"] if device.startswith("cuda") else m["peak_rss_gb"], model_gb=m["model_gb"],
               race_acc=race and race["acc"], race_ci=race and (race["ci_low"], race["ci_high"]),
               race_n=race and race["n"], ppl=m.pop("ppl", None), extra=m)


def _init_worker(level: int) -> None:
    """Log in the measuring process as in this one (a spawned process starts with logging unconfigured)."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def run_report(cfg: ReportConfig) -> tuple[list[Row], dict]:
    """Measure every recipe of `cfg` on its model; write results.json, results.md and pareto.png under cfg.out."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from .recipes import parse_recipe

    names = list(cfg.recipes)
    recipes = [parse_recipe(r) for r in names]  # every recipe is checked before any work starts
    _check_folder(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    meta = _meta(cfg, device)
    partial = cfg.out / "results.partial.json"
    done = {} if cfg.force or not partial.exists() else {r.recipe: r for r in read_rows(partial)}
    if done:
        log.info("resuming: %d finished recipe(s) from %s", len(done), partial)
    folders = _build(cfg, names, recipes, device)

    rows: list[Row] = []
    spawn = multiprocessing.get_context("spawn")
    for name in tqdm(names, desc="measure", unit="recipe"):
        if name not in done:
            # a fresh process per recipe, so that peak memory is this model's alone
            with ProcessPoolExecutor(1, mp_context=spawn, initializer=_init_worker,
                                     initargs=(logging.getLogger().getEffectiveLevel(),)) as pool:
                m = pool.submit(measure, folders[name], device, cfg.data, cfg.limit, cfg.mode, cfg.prompt_len,
                                cfg.new_tokens).result()
            done[name] = _row(name, m, device)
        rows.append(done[name])
        write_results(cfg.out, rows, meta, name=partial.name)
    if rows[0].race_acc is None:
        meta["notes"].append("no tokenizer (random-weight model): RACE accuracy and perplexity are not measured")
    meta["notes"].append("peak memory: " + ("torch.cuda.max_memory_allocated during decode" if device.startswith("cuda")
                                            else "peak RSS while decoding (reset after loading), in a fresh process per recipe"))

    base_tps = rows[0].tokens_per_s
    for r in rows:
        r.speedup = None if not (base_tps and r.tokens_per_s) else r.tokens_per_s / base_tps
    write_results(cfg.out, rows, meta)
    (cfg.out / "results.md").write_text(to_markdown(rows, meta))
    plot_pareto(rows, cfg.out / "pareto.png", cfg.floor, title=f"{cfg.model} on {meta['device_name']}")
    partial.unlink(missing_ok=True)
    return rows, meta
