"""fastllama.report: the writers, the Pareto front, the plot's label layout, the chance-level switch to lm-eval
mode, resuming only under the same settings, the load warning, and the real pruned fractions."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from itertools import combinations

import matplotlib.pyplot as plt
import pytest
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from fastllama import report
from fastllama.checkpoint import FORMAT
from fastllama.hardware import Machine
from fastllama.recipes import parse_recipe
from fastllama.report import (ReportConfig, Row, _build, _check_folder, _notes, _pareto_front, at_chance, fmt_ppl,
                              pareto_figure, plot_pareto, read_results, run_report, to_markdown, write_results)

pytestmark = pytest.mark.unit


def race(acc: float, low: float, high: float, mode: str = "letter", n: int = 1000) -> dict:
    return {"mode": mode, "acc": acc, "ci_low": low, "ci_high": high, "n": n}


ROWS = [Row("bf16", tpot_ms=30.0, tokens_per_s=33.3, peak_mem_gb=6.5, model_gb=6.4,
            race={"letter": race(0.69, 0.66, 0.72)}, ppl=8.1, load=1.5, speedup=1.0),
        Row("gptq4", tpot_ms=10.0, tokens_per_s=100.0, peak_mem_gb=2.4, model_gb=2.0,
            race={"letter": race(0.626, 0.6, 0.65)}, ppl=23090.45, load=1.7, speedup=3.0),
        Row("gptq4-prune-in10", tpot_ms=12.0, tokens_per_s=83.3, peak_mem_gb=2.5, model_gb=2.1,
            pruned={"input/576": 1 / 9, "mlp/1536": 2 / 24})]
MACHINE = Machine(device="cpu", name="Test CPU", cpu_capability="AVX2", bf16_native=False, threads=2, load=1.0)


def meta(**kw) -> dict:
    return {"model": "m", "machine": asdict(MACHINE), "race_mode": "letter", "race_modes": ["letter"],
            "calibration": "C4 (gptq4)", "fastllama": "0", "torch": "t", "transformers": "tf", "date": "d",
            "load_max": 1.7, "notes": ["a note"], "warnings": []} | kw


def test_markdown_names_the_machine_and_has_the_reference_columns_and_values():
    md = to_markdown(ROWS, meta()).splitlines()
    assert md[0] == ("# fastllama report: m on cpu, AVX2, no native bf16, 2 threads, load average up to 1.7; "
                     "RACE letter mode")
    assert md[2] == ("- machine: Test CPU (cpu); CPU capability AVX2; bf16 not native (no avx512_bf16 or amx_bf16 "
                     "flag); 2 threads; 1-minute load average around each recipe's timing: bf16 1.50, gptq4 1.70")
    assert md[3] == "- calibration: C4 (gptq4)"
    header = md[md.index(next(line for line in md if line.startswith("| recipe")))]
    assert header == ("| recipe | median latency (ms/token) | tokens/s | peak memory (GB) | RACE letter acc (95% CI) "
                      "| perplexity | model size (GB) | speedup | pruned |")
    body = md[md.index(header) + 2:]
    assert body[0] == "| bf16 | 30.00 | 33.3 | 6.5 | 69.0% (66.0%–72.0%, n=1000) | 8.10 | 6.4 | 1.00× | — |"
    assert body[1] == ("| gptq4 | 10.00 | 100.0 | 2.4 | 62.6% (60.0%–65.0%, n=1000) | 2.3e4 (collapsed) | 2 | 3.00× "
                       "| — |")
    assert body[2] == ("| gptq4-prune-in10 | 12.00 | 83.3 | 2.5 | — | — | 2.1 | — | 11.1% of 576 inputs, 8.3% of "
                       "1536 MLP channels |")
    assert md[-1] == "- a note"


@pytest.mark.parametrize("ppl, base, text", [
    (24.75, None, "24.75"), (999.994, None, "999.99"), (23090.45, None, "2.3e4"), (24908192.45, None, "2.5e7"),
    (9960.0, None, "1.0e4"),  # the mantissa rounds up to 10: the exponent carries
    (247.0, 24.7, "247.00"),  # exactly 10x is not over 10x
    (247.1, 24.7, "247.10 (collapsed)"), (24908192.45, 24.7, "2.5e7 (collapsed)"), (None, 24.7, "—")])
def test_perplexity_is_compact_and_collapse_is_marked(ppl, base, text):
    assert fmt_ppl(ppl, base) == text


def test_lm_eval_tasks_are_columns_by_their_first_metric():
    rows = [Row("bf16", tasks={"piqa": {"acc,none": 0.6, "acc_stderr,none": 0.02, "acc_norm,none": 0.61},
                               "gsm8k": {"exact_match,strict-match": 0.125, "exact_match_stderr,strict-match": 0.01,
                                         "exact_match,flexible-extract": 0.25}}),
            Row("gptq4")]
    md = to_markdown(rows, meta(tasks=["piqa", "gsm8k"]))
    assert "| perplexity | piqa acc | gsm8k exact_match (strict-match) | model size (GB) |" in md
    assert "| — | 60.0% | 12.5% |" in md and "| gptq4 | — | — | — | — | — | — | — |" in md


def test_json_round_trip(tmp_path):
    path = write_results(tmp_path, ROWS, {"model": "m"})
    assert read_results(path) == (ROWS, {"model": "m"})
    assert not list(tmp_path.glob("*.tmp"))


def test_pareto_front_drops_dominated_points():
    pts = [(33.3, 0.69, "bf16"), (100.0, 0.626, "gptq4"), (83.3, 0.53, "pruned"), (100.0, 0.60, "worse")]
    assert [p[2] for p in _pareto_front(pts, better_high=True)] == ["bf16", "gptq4"]
    mem = [(6.5, 0.69, "bf16"), (2.4, 0.626, "gptq4"), (2.5, 0.53, "pruned")]
    assert [p[2] for p in _pareto_front(mem, better_high=False)] == ["gptq4", "bf16"]


def test_plot_is_a_png(tmp_path):
    path = plot_pareto(ROWS, tmp_path / "p.png", floor=0.5, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def _marker_boxes(ax) -> list[Bbox]:
    """Each scatter point's square in pixels, from the collections themselves (size in points^2)."""
    boxes = []
    for c in ax.collections:
        r = math.sqrt(c.get_sizes()[0]) / 2 * ax.figure.dpi / 72
        boxes += [Bbox.from_extents(x - r, y - r, x + r, y + r)
                  for x, y in c.get_offset_transform().transform(c.get_offsets())]
    return boxes


def test_plot_labels_overlap_no_label_and_no_point():
    # the quick start's layout: pairs at nearly one point, all at chance; plus three recipes at exactly one point
    at = [(30.0, 0.68), (30.2, 0.52), (2.5, 0.57), (2.6, 0.52), (3.0, 0.52), (30.0, 0.68), (30.0, 0.68), (30.1, 0.68)]
    rows = [Row(f"recipe-{i}", tokens_per_s=tps, peak_mem_gb=mem, race={"letter": race(0.25, 0.17, 0.34)})
            for i, (tps, mem) in enumerate(at)]
    fig = pareto_figure(rows, floor=0.5, title="t")
    fig.canvas.draw()  # as savefig does: places each annotation's text
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = {t.get_text(): t for t in ax.texts}
        assert sorted(labels, key=int) == [str(i + 1) for i in range(len(rows))]  # every point numbered once
        boxes = {k: Text.get_window_extent(t, renderer) for k, t in labels.items()}  # the text, not its leader line
        markers = _marker_boxes(ax)
        assert len(markers) == len(rows)
        for (a, box_a), (b, box_b) in combinations(boxes.items(), 2):
            assert not box_a.overlaps(box_b), f"labels {a} and {b} overlap"
        inside = ax.get_window_extent(renderer)
        for k, box in boxes.items():
            assert not any(box.overlaps(m) for m in markers), f"label {k} covers a point"
            assert inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1), f"label {k} leaves the axes"
            point = ax.transData.transform(labels[k].xy)
            # the nearest free spot: within a few label widths of its point even in a cluster of eight
            assert math.dist(point, (box.x0 + box.width / 2, box.y0 + box.height / 2)) < 6 * max(box.width, box.height)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:len(rows)] == [f"{i + 1}: recipe-{i}" for i in range(len(rows))]
    plt.close(fig)


def test_at_chance():
    assert at_chance(Row("a", race={"letter": race(0.25, 0.17, 0.34)}))
    assert at_chance(Row("a", race={"letter": race(0.31, 0.25, 0.40)}))  # the interval's end counts
    assert not at_chance(Row("a", race={"letter": race(0.40, 0.31, 0.50)}))
    assert not at_chance(Row("a", race={"lm-eval": race(0.25, 0.17, 0.34, "lm-eval")}))  # no letter result
    assert not at_chance(Row("a"))  # no RACE at all (no tokenizer)


# ------------------------------------------------------------------ run_report on stubs (no model is measured)
RECIPES = ("bf16", "rtn4", "rtn8")  # none calibrates, so no checkpoint is read
LM_EVAL = {"bf16": 0.75, "rtn4": 0.5, "rtn8": 0.75}


@pytest.fixture
def stub(monkeypatch, tmp_path):
    """run_report with _build, the fresh-process measuring and the plot stubbed: `calls` records (function,
    recipe, mode); the letter accuracy of every recipe is `letter[0]` with a +-0.09 interval; `plotted` holds the
    plot's mode and title."""
    calls, letter, plotted = [], [0.25], {}

    def fresh(fn, folder, device, data, limit, modes, *rest):
        at_chance_also = rest[-1] if fn is report.measure else None
        calls.append((fn.__name__, folder.name, modes, at_chance_also))

        def result(mode):
            acc = letter[0] if mode == "letter" else LM_EVAL[folder.name]
            return race(acc, acc - 0.09, acc + 0.09, mode, n=100)

        if fn is report.measure_race:
            return result(modes)
        measured = {mode: result(mode) for mode in modes}
        if at_chance_also and at_chance(Row("", race=measured), modes[0]):
            measured[at_chance_also] = result(at_chance_also)
        return {"tpot_ms": 10.0, "tokens_per_s": 100.0, "ttft_ms": 5.0, "peak_mem_gb": None, "peak_rss_gb": 0.5,
                "model_gb": 0.2, "race": measured, "ppl": 25.0, "pruned": {}, "load": 1.0, "mlp_width": 1536}

    monkeypatch.setattr(report, "_build", lambda cfg, names, recipes, device: {n: tmp_path / n for n in names})
    monkeypatch.setattr(report, "_fresh", fresh)
    monkeypatch.setattr(report, "plot_pareto",
                        lambda rows, path, floor, mode, title: plotted.update(mode=mode, title=title))
    return calls, letter, plotted


def test_letter_mode_at_chance_measures_and_plots_lm_eval(stub, tmp_path):
    calls, _, plotted = stub
    rows, meta = run_report(ReportConfig(model="m", recipes=RECIPES, out=tmp_path, device="cpu"))
    # the base's letter interval holds chance: it measures lm-eval mode too, and every other recipe lm-eval mode
    # alone, each in its one process
    assert calls == [("measure", "bf16", ("letter",), "lm-eval"),
                     *(("measure", r, ("lm-eval",), None) for r in RECIPES[1:])]
    assert [list(r.race) for r in rows] == [["letter", "lm-eval"], *[["lm-eval"]] * (len(RECIPES) - 1)]
    assert [r.race["lm-eval"]["acc"] for r in rows] == [LM_EVAL[r] for r in RECIPES]
    assert meta["race_mode"] == "lm-eval" and meta["race_modes"] == ["letter", "lm-eval"]
    assert plotted["mode"] == "lm-eval" and plotted["title"].endswith("\nRACE lm-eval mode")
    md = (tmp_path / "results.md").read_text()
    assert md.splitlines()[0].endswith("; RACE lm-eval mode")
    assert "| RACE letter acc (95% CI) | RACE lm-eval acc (95% CI), plotted |" in md
    assert "| rtn4 | 10.00 | 100.0 | 0.5 | — | 50.0% (41.0%–59.0%, n=100) |" in md
    assert "cannot be told from chance (25%)" in md and "lm-eval mode" in md
    assert read_results(tmp_path / "results.json")[0] == rows


def test_letter_mode_above_chance_stays_the_only_mode(stub, tmp_path):
    calls, letter, plotted = stub
    letter[0] = 0.60  # interval 0.51-0.69: above chance
    rows, meta = run_report(ReportConfig(model="m", recipes=RECIPES, out=tmp_path, device="cpu"))
    assert calls == [("measure", "bf16", ("letter",), "lm-eval"), *(("measure", r, ("letter",), None)
                                                                     for r in RECIPES[1:])]
    assert meta["race_mode"] == "letter" and all(list(r.race) == ["letter"] for r in rows)
    assert plotted["mode"] == "letter" and plotted["title"].endswith("\nRACE letter mode")
    md = (tmp_path / "results.md").read_text()
    assert "RACE letter mode" in md.splitlines()[0] and "lm-eval" not in md


@pytest.mark.parametrize("changed", [dict(limit=8), dict(data="other.jsonl"), dict(mode="lm-eval"),
                                     dict(new_tokens=8), dict(prompt_len=16), dict(device="cuda")])
def test_partial_rows_are_reused_only_under_the_same_settings(stub, tmp_path, caplog, changed):
    calls, letter, _ = stub
    letter[0] = 0.60
    cfg = ReportConfig(model="m", recipes=RECIPES, out=tmp_path, device="cpu")
    _, meta = run_report(cfg)
    finished = [Row("bf16", tpot_ms=123.0, tokens_per_s=8.0, race={"letter": race(0.6, 0.51, 0.69)})]

    # the same settings: the finished row is reused, the others measured
    write_results(tmp_path, finished, meta, "results.partial.json")
    calls.clear()
    rows, _ = run_report(cfg)
    assert [c[1] for c in calls] == ["rtn4", "rtn8"] and rows[0].tpot_ms == 123.0

    # one setting differs: every recipe is measured again, and the log says why
    key, value = next(iter(changed.items()))
    meta["measured_under"][key] = value
    write_results(tmp_path, finished, meta, "results.partial.json")
    calls.clear()
    with caplog.at_level(logging.INFO, logger="fastllama.report"):
        rows, _ = run_report(cfg)
    assert [c[1] for c in calls] == list(RECIPES) and rows[0].tpot_ms == 10.0
    assert f"{key} {value!r} -> {getattr(cfg, key)!r}" in caplog.text


def test_a_busy_machine_is_warned_about():
    rows = [Row("bf16", load=1.2), Row("gptq4", load=3.4), Row("gptq8", load=2.0)]  # 2 threads: gptq4 was crowded
    m = meta(notes=[], warnings=[])
    _notes(rows, m)
    assert m["load_max"] == 3.4
    assert m["warnings"] == ["the load average exceeded the 2 threads while timing (gptq4 3.4): other "
                             "processes shared the CPU, so latency, tokens/s and speedup are unreliable; rerun on a "
                             "quiet machine"]
    md = to_markdown(rows, m)
    assert "load average up to 3.4 (busy: speeds unreliable)" in md.splitlines()[0]
    assert "> **Warning:** the load average exceeded the 2 threads" in md
    quiet = meta(notes=[], warnings=[])
    _notes([Row("bf16", load=2.0)], quiet)  # at the thread count, not above it
    assert quiet["warnings"] == [] and "busy" not in to_markdown(rows, quiet)


# ------------------------------------------------------------------ folders and a real run on a tiny model
def test_folder_of_another_model_is_refused_unless_forced(tmp_path):
    _check_folder(ReportConfig(model="a", out=tmp_path))
    with pytest.raises(ValueError, match="holds results and cached models of 'a'.*--force"):
        _check_folder(ReportConfig(model="b", out=tmp_path))
    _check_folder(ReportConfig(model="b", out=tmp_path, force=True))
    assert (tmp_path / "model.txt").read_text().strip() == "b"


def test_report_end_to_end_on_tiny_caches_models_and_resumes(tmp_path):
    # 4-bit groups of 32 prune whole groups: 15% of the 4 groups of a 128-wide input rounds to 1 (25%), of the
    # 8 groups of the 256-wide down_proj to 1 (12.5%), which folds into a 224-wide MLP
    pruned = "rtn:bits=4,group=32 + prune:input=0.15"
    cfg = ReportConfig(model="random:tiny", recipes=("bf16", pruned), out=tmp_path, prompt_len=8, new_tokens=4,
                       device="cpu")
    rows, meta = run_report(cfg)
    assert [r.recipe for r in rows] == ["bf16", pruned]
    assert all(r.tokens_per_s > 0 and r.model_gb > 0 and r.peak_mem_gb > 0 and r.load is not None for r in rows)
    assert rows[1].model_gb < rows[0].model_gb  # 4-bit and pruned linears, against bf16
    assert rows[0].speedup == 1.0 and rows[0].race == {}  # no tokenizer: no RACE
    assert rows[0].pruned == {} and rows[1].pruned == {"input/128": 0.25, "mlp/256": 0.125}
    assert meta["machine"]["device"] == "cpu" and meta["calibration"] == "none needed"
    assert read_results(tmp_path / "results.json")[0] == rows
    md = (tmp_path / "results.md").read_text()
    assert f"| {pruned} |" in md and "| 25.0% of 128 inputs, 12.5% of 256 MLP channels |" in md
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "results.partial.json").exists()
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "models").rglob("model.safetensors")}
    assert len(cached) == 2

    # an interrupted run: the finished recipe's row survives, the rest is measured; nothing is re-quantized
    write_results(tmp_path, [Row("bf16", tpot_ms=123.0, tokens_per_s=1.0, model_gb=1.0)], meta, "results.partial.json")
    again, _ = run_report(cfg)
    assert again[0].tpot_ms == 123.0 and again[1].tokens_per_s > 0
    assert {p: p.stat().st_mtime_ns for p in cached} == cached

    # a cached folder built with another definition of the recipe (a preset changed) is rebuilt, the others kept
    meta_file = next(p.parent for p in cached if "rtn" in str(p)) / "fastllama.json"
    meta_file.write_text(meta_file.read_text().replace("rtn:bits=4", "rtn:bits=8"))
    _build(cfg, list(cfg.recipes), [parse_recipe(r) for r in cfg.recipes], "cpu")
    assert [p for p in cached if p.stat().st_mtime_ns != cached[p]] == [meta_file.parent / "model.safetensors"]


def test_bitsandbytes_rows_are_measured_on_plain_generate(tmp_path):
    """The peers' rows: cached as the model before bitsandbytes, which quantizes when each row's process loads it;
    decoded on plain generate, said in a note; smaller than bf16 (int8 and NF4 decoder weights)."""
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes: pip install -e '.[peers]'")
    from fastllama.checkpoint import read_meta

    cfg = ReportConfig(model="random:tiny", recipes=("bf16", "bnb8", "nf4"), out=tmp_path, prompt_len=8,
                       new_tokens=4, device="cpu")
    rows, meta = run_report(cfg)
    assert [r.extra["path"] for r in rows] == ["fast", "plain generate", "plain generate"]
    assert all(r.tokens_per_s > 0 for r in rows) and rows[0].model_gb > rows[1].model_gb > rows[2].model_gb
    assert read_meta(tmp_path / "models" / "nf4")["at_load"] == "bnb:type=nf4"
    assert ("decode path: bnb8, nf4 decoded on plain transformers generate, as their users run them (bitsandbytes' "
            "layers are not on fastllama's fast path)") in (tmp_path / "results.md").read_text()


def test_calibration_source_is_read_from_the_checkpoints(tmp_path):
    folders = {}
    for name, source in (("gptq4", "C4"), ("gptq8", "C4"), ("gptq4-prune-in10", None)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        meta = {"format": FORMAT, "config": {}, "dtype": "bf16", "modules": {}, "aliases": {}, "buffer_dtypes": {}}
        (folders[name] / "fastllama.json").write_text(json.dumps(meta | ({"calibration": source} if source else {})))
    names = ["bf16", *folders]
    recipes = [parse_recipe(n) for n in names]
    assert report._calibration(names, recipes, folders) == "C4 (gptq4, gptq8); unknown (gptq4-prune-in10)"
    assert report._calibration(["bf16"], [parse_recipe("bf16")], {}) == "none needed"
