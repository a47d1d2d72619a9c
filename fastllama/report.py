"""`fastllama report`: the reference study's tables for any model, from one command.

For each recipe: compress the model (cached under the output folder), then measure decode speed and memory
(`bench`), RACE accuracy (`evaluate_race`), perplexity (`perplexity`) and any lm-eval tasks named
(`lm_eval_tasks`). Writes `results.json`, `results.md` and `pareto.png`. Finished recipes are written to
`results.partial.json` as they complete, so an interrupted run resumes from them when it measures under the same
settings; a completed run re-measures every recipe on the next call but never re-quantizes.

Reading the results needs three things beside the numbers, and the report gives them:
- the machine (`fastllama.hardware`) and its load average around each row's timing: a busy machine's speed
  figures are flagged as unreliable;
- an accuracy that separates recipes: where the base model's letter-mode RACE interval contains chance, the
  lm-eval mode is measured (the base's in both modes, every other recipe's in lm-eval mode alone) and plotted;
- what compression did: the share of channels each pruned recipe really removed (whole 4-bit groups), and
  perplexity marked as collapsed past COLLAPSED times the base's.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

# the reference study's rows; its bf16 base is `base` (the hardware policy's float dtype): bf16 on a GPU or a CPU with
# native bf16, float32 where the CPU emulates bf16 (its RACE, perplexity and decode took several times longer)
REFERENCE_RECIPES = ("base", "gptq4", "gptq8", "gptq4-prune-in10", "gptq8-prune-in35")
CHANCE = 0.25     # RACE accuracy of guessing among four options
COLLAPSED = 10.0  # a recipe whose perplexity exceeds this many times the base's is marked collapsed
MARKER_SIZE = 40  # plot marker area, points^2
LABEL = dict(fontsize=9, fontweight="bold")  # the plot's point numbers


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
    tasks: tuple[str, ...] = ()                     # lm-eval tasks measured for each recipe, e.g. ("piqa",)
    task_data: dict[str, str] = field(default_factory=dict)  # task -> folder of its splits (evaluate.local_task)
    task_limit: int | None = None                   # lm-eval documents per task; None: all
    force: bool = False                             # rebuild models, drop partial results, allow another model's folder


@dataclass
class Row:
    recipe: str
    tpot_ms: float | None = None          # median decode time per token
    tokens_per_s: float | None = None
    ttft_ms: float | None = None
    peak_mem_gb: float | None = None      # GPU: max allocated; CPU: peak RSS
    model_gb: float | None = None
    race: dict[str, dict] = field(default_factory=dict)  # RACE by mode ("letter", "lm-eval"): RaceResult.summary()
    ppl: float | None = None
    tasks: dict[str, dict] = field(default_factory=dict)  # lm-eval task -> its metrics, keyed as lm-eval keys them
    pruned: dict[str, float] = field(default_factory=dict)  # share of channels removed, e.g. {"input/576": 0.111}
    load: float | None = None             # the highest 1-minute load average read just before and after timing
    speedup: float | None = None          # tokens/s over the first recipe's
    extra: dict = field(default_factory=dict)  # every other metric bench and compress reported


def at_chance(row: Row, mode: str = "letter") -> bool:
    """Whether `row`'s RACE 95% interval in `mode` contains chance (CHANCE): that accuracy separates nothing."""
    r = row.race.get(mode)
    return r is not None and r["ci_low"] <= CHANCE <= r["ci_high"]


# ---------------------------------------------------------------- writers
def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def collapsed(ppl: float | None, base: float | None) -> bool:
    """Whether perplexity `ppl` is over COLLAPSED times the base's: the recipe has lost the language model."""
    return bool(ppl and base and ppl > COLLAPSED * base)


def fmt_ppl(ppl: float | None, base: float | None = None) -> str:
    """Perplexity for a table: two decimals below 1000, else one digit of mantissa (2.5e7); marked "collapsed"
    when over COLLAPSED times `base`."""
    if ppl is None:
        return "—"
    mantissa, _, exponent = format(ppl, ".1e").partition("e")
    text = f"{ppl:.2f}" if ppl < 1000 else f"{mantissa}e{int(exponent)}"
    return text + (" (collapsed)" if collapsed(ppl, base) else "")


def _fmt_acc(row: Row, mode: str) -> str:
    r = row.race.get(mode)
    return "—" if r is None else f"{r['acc']:.1%} ({r['ci_low']:.1%}–{r['ci_high']:.1%}, n={r['n']})"


def _fmt_pruned(pruned: dict[str, float]) -> str:
    """{"input/576": 0.111, "mlp/1536": 0.083} -> "11.1% of 576 inputs, 8.3% of 1536 MLP channels"."""
    what = {"input": "inputs", "output": "outputs", "mlp": "MLP channels"}
    parts = []
    for key, share in pruned.items():
        side, _, width = key.partition("/")
        parts.append(f"{share:.1%} of {width} {what[side]}")
    return ", ".join(parts) or "—"


def title(meta: dict, sep: str = "; ") -> str:
    """The model, the machine, its load while timing and the RACE mode plotted: results.md's and the plot's title."""
    from .hardware import Machine

    m, load = Machine(**meta["machine"]), meta.get("load_max")
    busy = "" if load is None or load <= m.threads else " (busy: speeds unreliable)"
    loaded = "" if load is None else f", load average up to {load:.1f}{busy}"
    return f"{meta['model']} on {m.describe()}{loaded}{sep}RACE {meta['race_mode']} mode"


def to_markdown(rows: list[Row], meta: dict) -> str:
    """The results table: the reference study's columns plus perplexity, model size, speedup and pruned share,
    under a header naming the machine, its load while timing, the RACE mode and the calibration source."""
    m, modes, plotted = meta["machine"], meta["race_modes"], meta["race_mode"]
    bf16 = "native" if m["bf16_native"] else "not native (" + ("compute capability below 8.0" if m["device"] != "cpu"
                                                              else "no avx512_bf16 or amx_bf16 flag") + ")"
    load = ", ".join(f"{r.recipe} {r.load:.2f}" for r in rows if r.load is not None) or "not measured"
    lines = [f"# fastllama report: {title(meta)}", "",
             f"- machine: {m['name']} ({m['device']}); CPU capability {m['cpu_capability']}; bf16 {bf16}; "
             f"{m['threads']} threads; 1-minute load average around each recipe's timing: {load}",
             f"- calibration: {meta['calibration']}",
             f"- fastllama {meta['fastllama']}, torch {meta['torch']}, transformers {meta['transformers']}; "
             f"{meta['date']}",
             ""]
    lines += [f"> **Warning:** {w}" for w in meta.get("warnings", [])] + ([""] if meta.get("warnings") else [])
    race_cols = [f"RACE {mode} acc (95% CI)" + (", plotted" if len(modes) > 1 and mode == plotted else "")
                 for mode in modes]
    tasks = {t: _headline(r.tasks[t]) for t in meta.get("tasks", []) for r in rows if r.tasks.get(t)}
    task_cols = [f"{t} {key.partition(',')[0]}" + ("" if key.endswith(",none") else f" ({key.partition(',')[2]})")
                 for t, key in tasks.items()]
    cols = ["recipe", "median latency (ms/token)", "tokens/s", "peak memory (GB)", *race_cols, "perplexity",
            *task_cols, "model size (GB)", "speedup", "pruned"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    base_ppl = rows[0].ppl if rows else None
    for r in rows:
        cells = [r.recipe, _fmt(r.tpot_ms, ".2f"), _fmt(r.tokens_per_s, ".1f"), _fmt(r.peak_mem_gb, ".3g"),
                 *(_fmt_acc(r, mode) for mode in modes), fmt_ppl(r.ppl, base_ppl),
                 *(_fmt(r.tasks.get(t, {}).get(key), ".1%") for t, key in tasks.items()), _fmt(r.model_gb, ".3g"),
                 "—" if r.speedup is None else f"{r.speedup:.2f}×", _fmt_pruned(r.pruned)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = meta.get("notes") or []
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def _headline(metrics: dict) -> str:
    """The key of a task's first metric (lm-eval lists a task's main one first: acc, exact_match,strict-match)."""
    return next(k for k in metrics if "_stderr" not in k)


def write_results(out: Path, rows: list[Row], meta: dict, name: str = "results.json") -> Path:
    """Write {meta, rows} as JSON atomically (a crash never leaves half a file)."""
    path = out / name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    tmp.replace(path)
    return path


def read_results(path: Path) -> tuple[list[Row], dict]:
    """Rows and meta back from a results JSON written by `write_results`."""
    doc = json.loads(path.read_text())
    return [Row(**d) for d in doc["rows"]], doc["meta"]


def _acc(row: Row, mode: str) -> float | None:
    return row.race.get(mode, {}).get("acc")


def pareto_figure(rows: list[Row], floor: float, mode: str = "letter", title: str = ""):
    """Accuracy in `mode` against tokens/s and against peak memory, the floor and chance drawn in, the
    Pareto-optimal recipes joined. Points are numbered (the legend lists number and recipe); each number sits at
    the nearest spot where it overlaps no other number and no point (see `_place_labels`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(11, 5), dpi=120)
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(rows))]
    placed = []
    for ax, key, label, better_high in ((axes[0], "tokens_per_s", "decode tokens/s (higher is better)", True),
                                        (axes[1], "peak_mem_gb", "peak memory, GB (lower is better)", False)):
        pts = [(getattr(r, key), _acc(r, mode), i) for i, r in enumerate(rows)
               if getattr(r, key) is not None and _acc(r, mode) is not None]
        for x, y, i in pts:
            ax.scatter(x, y, s=MARKER_SIZE, color=colors[i], zorder=3)
        front = _pareto_front(pts, better_high)
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", lw=1, label="Pareto front")
        ax.axhline(floor, color="red", lw=1, label=f"accuracy floor {floor:.0%}")
        ax.axhline(CHANCE, color="gray", lw=1, ls=":", label=f"chance {CHANCE:.0%}")
        ax.margins(0.2)
        ax.set_xlabel(label)
        ax.set_ylabel(f"RACE accuracy ({mode} mode)")
        ax.grid(alpha=0.3)
        placed.append((ax, pts))
    recipes = [Line2D([], [], ls="", marker="o", color=colors[i], label=f"{i + 1}: {r.recipe}")
               for i, r in enumerate(rows)]
    lines = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    legend = fig.legend(recipes + list(lines.values()), [h.get_label() for h in recipes] + list(lines),
                        loc="lower center", ncol=min(4, len(recipes) + len(lines)), fontsize=8)  # hides no point
    fig.suptitle(title, fontsize=10)
    fig.canvas.draw()
    bottom = legend.get_window_extent().height / fig.bbox.height
    fig.tight_layout(rect=(0, bottom + 0.01, 1, 1))
    fig.canvas.draw()  # axes limits and transforms are final from here: labels are placed in pixels
    for ax, pts in placed:
        _place_labels(ax, pts, colors)
    return fig


def _place_labels(ax, pts: list[tuple[float, float, int]], colors: list) -> None:
    """Write each point's number (index + 1) at the nearest free spot around it, inside the axes: candidates on
    rings of growing radius, the first whose box meets no placed number and no point's marker wins. A number
    that had to move away from its point gets a leader line to it."""
    import numpy as np
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    px_per_pt, pad = fig.dpi / 72, 2.0
    radius = math.sqrt(MARKER_SIZE) / 2 * px_per_pt + pad  # a marker's half width in pixels, padded
    centers = ax.transData.transform([(x, y) for x, y, _ in pts]) if pts else []
    taken = [Bbox.from_extents(cx - radius, cy - radius, cx + radius, cy + radius) for cx, cy in centers]
    inside = ax.get_window_extent(renderer)
    for (x, y, i), (cx, cy) in zip(pts, centers):
        probe = ax.text(0, 0, str(i + 1), **LABEL)
        w, h = (v + 2 * pad for v in probe.get_window_extent(renderer).size)
        probe.remove()
        spots = ((r * math.cos(a), r * math.sin(a)) for r in np.arange(radius, 40 * radius, 2.0)
                 for a in np.linspace(0, 2 * np.pi, max(8, int(r / 2)), endpoint=False))  # rightwards first
        for dx, dy in spots:
            box = Bbox.from_bounds(cx + dx - w / 2, cy + dy - h / 2, w, h)
            within = inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
            if within and not any(map(box.overlaps, taken)):
                break
        else:
            log.warning("no free spot for label %d within the axes: it may overlap", i + 1)
        taken.append(box)
        far = math.hypot(dx, dy) > radius + max(w, h)  # not next to its point: join them
        ax.annotate(str(i + 1), (x, y), xytext=(dx / px_per_pt, dy / px_per_pt), textcoords="offset points",
                    ha="center", va="center", color=colors[i], **LABEL,
                    arrowprops=dict(arrowstyle="-", color=colors[i], lw=0.6, shrinkA=0, shrinkB=radius / px_per_pt)
                    if far else None)


def plot_pareto(rows: list[Row], path: Path, floor: float, mode: str = "letter", title: str = "") -> Path:
    """Write `pareto_figure` as a PNG at `path`."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(rows, floor, mode, title)
    fig.savefig(path, dpi=fig.dpi)  # the dpi the labels were placed at
    plt.close(fig)
    return path


def _pareto_front(pts: list[tuple], better_high: bool) -> list[tuple]:
    """The points no other point beats on both axes (x better and accuracy higher), sorted by x."""
    def dominated(p):
        return any((q[0] >= p[0] if better_high else q[0] <= p[0]) and q[1] >= p[1] and q[:2] != p[:2] for q in pts)
    return sorted((p for p in pts if not dominated(p)), key=lambda p: p[0])


# ---------------------------------------------------------------- the run
def _meta(cfg: ReportConfig, device: str) -> dict:
    import torch
    import transformers

    from . import __version__
    from .hardware import machine

    return {"model": cfg.model, "recipes": list(cfg.recipes), "race_mode": cfg.mode, "race_modes": [cfg.mode],
            "tasks": list(cfg.tasks),
            "machine": asdict(machine(device)),
            # a partial row is reused only if it was measured under all of these
            "measured_under": {"model": cfg.model, "device": device, "data": cfg.data, "limit": cfg.limit,
                               "mode": cfg.mode, "prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens,
                               "tasks": list(cfg.tasks), "task_data": cfg.task_data, "task_limit": cfg.task_limit},
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "fastllama": __version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "notes": [], "warnings": []}


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
    from .checkpoint import load, read_meta, save
    from .data import calibration_with_source
    from .models import load_model
    from .recipes import Recipe, compress

    folders = {name: cfg.out / "models" / _slug(name) for name in names}
    built = {str(r): folders[n] for n, r in zip(names, recipes) if not cfg.force and _cached(folders[n]) == str(r)}
    base = tok = calib = calib_source = None
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
        rest, at_load = Recipe(recipe.steps[prefix:]).split_at_load()  # a bnb step applies at load
        source = read_meta(built[str(Recipe(recipe.steps[:prefix]))]).get("calibration") if prefix else None
        if rest.needs_calibration:
            if calib is None:
                calib, calib_source = calibration_with_source(tok, source=cfg.calib, nsamples=cfg.nsamples,
                                                              seqlen=cfg.seqlen, model=base)
            source = calib_source
        t0 = time.perf_counter()
        model = compress(model, rest, calib=calib, tokenizer=tok)
        log.info("%s: compressed in %.1f s", name, time.perf_counter() - t0)
        save(model, folders[name], tokenizer=tok, recipe=str(recipe), calibration=source, at_load=at_load)
        built[str(recipe)] = folders[name]
        del model
    return folders


def measure(folder: Path, device: str, data: str | None, limit: int | None, modes: tuple[str, ...], prompt_len: int,
            new_tokens: int, tasks: tuple[str, ...] = (), task_data: dict[str, str] | None = None,
            task_limit: int | None = None, at_chance_also: str | None = None) -> dict:
    """Bench, RACE in each of `modes` (and in `at_chance_also` where the first mode's interval holds chance: the
    base's, which decides for every recipe, without a second process), perplexity and the lm-eval `tasks` (each
    one's numeric metrics) of one saved model, the load
    average around the bench and the share of channels pruning removed. Runs in a fresh process (see `_fresh`), so
    peak memory belongs to this model alone: it is read right after the bench, before evaluation allocates its
    batches."""
    from .bench import bench
    from .checkpoint import load
    from .data import PPL_TEXT
    from .evaluate import perplexity
    from .hardware import load_average
    from .prune import pruned_fraction

    model, tok = load(folder, device=device)
    before = load_average()
    m = bench(model, tok, prompt_len=prompt_len, new_tokens=new_tokens)
    m["load"] = max((v for v in (before, m.pop("machine")["load"]) if v is not None), default=None)
    m["pruned"] = {f"{side}/{width}": share
                   for side, by in pruned_fraction(model).items() for width, share in by.items()}
    m["mlp_width"] = getattr(model.config, "intermediate_size", None)  # narrower where pruning folded MLP channels
    if tok is not None:
        race = {mode: _race(model, tok, data, limit, mode) for mode in modes}
        if at_chance_also and at_chance(Row("", race=race), modes[0]):
            race[at_chance_also] = _race(model, tok, data, limit, at_chance_also)
        m |= {"race": race, "ppl": perplexity(model, tok, PPL_TEXT.read_text())}
        if tasks:
            from .evaluate import lm_eval_tasks

            results = lm_eval_tasks(model, tok, tasks, limit=task_limit, data=task_data)["results"]
            m["tasks"] = {t: {k: v for k, v in results[t].items() if "," in k} for t in tasks}  # metric,filter
    return m


def measure_race(folder: Path, device: str, data: str | None, limit: int | None, mode: str) -> dict:
    """RACE alone of one saved model (the second mode, when the first is at chance), like `measure`."""
    from .checkpoint import load

    model, tok = load(folder, device=device)
    return _race(model, tok, data, limit, mode)


def _race(model, tok, data: str | None, limit: int | None, mode: str) -> dict:
    from .data import load_race
    from .evaluate import evaluate_race

    return evaluate_race(model, tok, data=load_race(data, limit=limit), mode=mode).summary()


def _row(name: str, m: dict, device: str) -> Row:
    return Row(name, tpot_ms=m["tpot_ms"], tokens_per_s=m["tokens_per_s"], ttft_ms=m["ttft_ms"],
               peak_mem_gb=m["peak_mem_gb"] if device.startswith("cuda") else m["peak_rss_gb"], model_gb=m["model_gb"],
               race=m.pop("race", {}), ppl=m.pop("ppl", None), tasks=m.pop("tasks", {}),
               pruned=m.pop("pruned"),
               load=m.pop("load"), extra=m)


def _init_worker(level: int) -> None:
    """Log in the measuring process as in this one (a spawned process starts with logging unconfigured)."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _fresh(fn, *args):
    """`fn(*args)` in a fresh spawned process, so that peak memory is one model's alone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(logging.getLogger().getEffectiveLevel(),)) as pool:
        return pool.submit(fn, *args).result()


def _resumable(partial: Path, meta: dict) -> dict[str, Row]:
    """The rows an interrupted run finished, by recipe, if it measured them under this run's settings (else
    none, and the log says which setting changed)."""
    if not partial.exists():
        return {}
    rows, old = read_results(partial)
    was, now = old.get("measured_under", {}), meta["measured_under"]
    changed = [f"{k} {was.get(k)!r} -> {v!r}" for k, v in now.items() if was.get(k) != v]
    if changed:
        log.info("not resuming from %s: it was measured under other settings (%s); measuring every recipe",
                 partial, ", ".join(changed))
        return {}
    log.info("resuming: %d finished recipe(s) from %s", len(rows), partial)
    return {r.recipe: r for r in rows}


def _calibration(names: list[str], recipes: list, folders: dict[str, Path]) -> str:
    """Where the calibrated recipes' calibration came from, as their checkpoints record it ("unknown" where one
    does not), e.g. "C4 (gptq4, gptq8)"; "none needed" if no recipe calibrates."""
    from .checkpoint import read_meta

    sources: dict[str, list[str]] = {}
    for name, recipe in zip(names, recipes):
        if recipe.needs_calibration:
            sources.setdefault(str(read_meta(folders[name]).get("calibration") or "unknown"), []).append(name)
    return "; ".join(f"{src} ({', '.join(ns)})" for src, ns in sources.items()) or "none needed"


def _notes(rows: list[Row], meta: dict) -> None:
    """Notes and warnings under the table: how memory was read, the load while timing, what "collapsed" and
    "pruned" mean."""
    notes, device = meta["notes"], meta["machine"]["device"]
    if not rows[0].race:
        notes.append("no tokenizer (random-weight model): RACE accuracy and perplexity are not measured")
    notes.append("peak memory: " + ("torch.cuda.max_memory_allocated during decode" if device.startswith("cuda") else
                                    "peak RSS while decoding (reset after loading), in a fresh process per recipe"))
    plain = [r.recipe for r in rows if r.extra.get("path") == "plain generate"]
    if plain:
        notes.append(f"decode path: {', '.join(plain)} decoded on plain transformers generate, as their users run "
                     "them (bitsandbytes' layers are not on fastllama's fast path); every other recipe on fastllama's "
                     "fast path")
    if any(collapsed(r.ppl, rows[0].ppl) for r in rows):
        notes.append(f"perplexity (collapsed): over {COLLAPSED:g}× the base's ({rows[0].ppl:.2f}); the recipe has "
                     "lost the model's language ability, whatever its RACE accuracy")
    if any(r.pruned for r in rows):
        notes.append("pruned: the share of channels removed, counted in the compressed model (4-bit linears drop whole "
                     "groups, so it differs from the amount asked for); MLP channels against the base's MLP width")
    loads = [r.load for r in rows if r.load is not None]
    meta["load_max"] = max(loads, default=None)
    threads = meta["machine"]["threads"]
    busy = [r for r in rows if r.load is not None and r.load > threads]
    if busy:
        crowded = ", ".join(f"{r.recipe} {r.load:.1f}" for r in busy)
        meta["warnings"].append(
            f"the load average exceeded the {threads} threads while timing ({crowded}): "
            "other processes shared the CPU, so latency, tokens/s and speedup are unreliable; rerun on a quiet machine")


def run_report(cfg: ReportConfig) -> tuple[list[Row], dict]:
    """Measure every recipe of `cfg` on its model; write results.json, results.md and pareto.png under cfg.out."""
    import torch

    from .recipes import parse_recipe

    names = list(cfg.recipes)
    recipes = [parse_recipe(r) for r in names]  # every recipe is checked before any work starts
    _check_folder(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    meta = _meta(cfg, device)
    partial = cfg.out / "results.partial.json"
    done = {} if cfg.force else _resumable(partial, meta)
    folders = _build(cfg, names, recipes, device)
    meta["calibration"] = _calibration(names, recipes, folders)

    rows: list[Row] = []
    for name in tqdm(names, desc="measure", unit="recipe"):
        if name not in done:
            # letter mode at chance for the base: it ranks nothing on this model, so every other recipe measures
            # lm-eval mode instead (a RACE pass of 9-16 s saved per recipe on a 2-core AVX2 CPU)
            instead = bool(rows) and cfg.mode == "letter" and at_chance(rows[0])
            done[name] = _row(name, _fresh(measure, folders[name], device, cfg.data, cfg.limit,
                                           ("lm-eval",) if instead else (cfg.mode,), cfg.prompt_len,
                                           cfg.new_tokens, cfg.tasks, cfg.task_data, cfg.task_limit,
                                           "lm-eval" if not rows and cfg.mode == "letter" else None), device)
        rows.append(done[name])
        write_results(cfg.out, rows, meta, name=partial.name)
    if cfg.mode == "letter" and at_chance(rows[0]):
        base = rows[0].race["letter"]
        log.info("%s's letter-mode RACE interval contains chance: measuring lm-eval mode too", rows[0].recipe)
        for r in tqdm(rows, desc="RACE lm-eval", unit="recipe"):
            if "lm-eval" not in r.race:
                r.race["lm-eval"] = _fresh(measure_race, folders[r.recipe], device, cfg.data, cfg.limit, "lm-eval")
                write_results(cfg.out, rows, meta, name=partial.name)
        meta["race_mode"], meta["race_modes"] = "lm-eval", ["letter", "lm-eval"]
        meta["notes"].append(
            f"RACE mode: {rows[0].recipe}'s letter-mode accuracy, {base['acc']:.1%} ({base['ci_low']:.1%}–"
            f"{base['ci_high']:.1%}), cannot be told from chance ({CHANCE:.0%}), so letter mode cannot rank recipes "
            "on this model; lm-eval mode (each option's text scored) was measured instead, for every recipe "
            f"(letter mode for {rows[0].recipe} alone), and the plot and Pareto front use it"
            + ("; its interval contains chance too, so neither mode ranks these recipes: use more questions "
               "(--limit) or a larger model" if at_chance(rows[0], "lm-eval") else ""))
    base_tps, base_width = rows[0].tokens_per_s, rows[0].extra.get("mlp_width")
    for r in rows:
        r.speedup = None if not (base_tps and r.tokens_per_s) else r.tokens_per_s / base_tps
        width = r.extra.get("mlp_width")
        if base_width and width and width < base_width:
            r.pruned[f"mlp/{base_width}"] = 1 - width / base_width
    _notes(rows, meta)
    write_results(cfg.out, rows, meta)
    (cfg.out / "results.md").write_text(to_markdown(rows, meta))
    plot_pareto(rows, cfg.out / "pareto.png", cfg.floor, meta["race_mode"], title(meta, sep="\n"))
    partial.unlink(missing_ok=True)
    return rows, meta
