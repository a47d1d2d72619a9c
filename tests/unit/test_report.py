"""fastllama.report: the markdown and JSON writers, the Pareto front, the plot, and folder ownership."""

from __future__ import annotations

import json

import pytest

from fastllama.recipes import parse_recipe
from fastllama.report import (ReportConfig, Row, _build, _check_folder, _pareto_front, plot_pareto, read_rows,
                              run_report, to_markdown, write_results)

pytestmark = pytest.mark.unit

ROWS = [Row("bf16", tpot_ms=30.0, tokens_per_s=33.3, peak_mem_gb=6.5, model_gb=6.4, race_acc=0.69, race_ci=(0.66, 0.72),
            race_n=1000, ppl=8.1, speedup=1.0),
        Row("gptq4", tpot_ms=10.0, tokens_per_s=100.0, peak_mem_gb=2.4, model_gb=2.0, race_acc=0.626, race_ci=(0.6, 0.65),
            race_n=1000, ppl=9.0, speedup=3.0),
        Row("gptq4-prune-in10", tpot_ms=12.0, tokens_per_s=83.3, peak_mem_gb=2.5, model_gb=2.1, race_acc=0.53)]


def test_markdown_table_has_the_reference_columns_and_values():
    md = to_markdown(ROWS, {"model": "m", "device_name": "cpu", "notes": ["a note"]}).splitlines()
    assert md[0] == "# fastllama report: m on cpu"
    assert md[2].startswith("| recipe | median latency (ms/token) | tokens/s | peak memory (GB) | RACE acc (95% CI) |")
    assert md[4] == "| bf16 | 30.00 | 33.3 | 6.5 | 69.0% (66.0%–72.0%, n=1000) | 8.10 | 6.4 | 1.00× |"
    assert md[6] == "| gptq4-prune-in10 | 12.00 | 83.3 | 2.5 | 53.0% | — | 2.1 | — |"
    assert md[-1] == "- a note"


def test_json_round_trip(tmp_path):
    path = write_results(tmp_path, ROWS, {"model": "m"})
    assert json.loads(path.read_text())["meta"] == {"model": "m"}
    assert read_rows(path) == ROWS
    assert not list(tmp_path.glob("*.tmp"))


def test_pareto_front_drops_dominated_points():
    pts = [(33.3, 0.69, "bf16"), (100.0, 0.626, "gptq4"), (83.3, 0.53, "pruned"), (100.0, 0.60, "worse")]
    assert [p[2] for p in _pareto_front(pts, better_high=True)] == ["bf16", "gptq4"]
    mem = [(6.5, 0.69, "bf16"), (2.4, 0.626, "gptq4"), (2.5, 0.53, "pruned")]
    assert [p[2] for p in _pareto_front(mem, better_high=False)] == ["gptq4", "bf16"]


def test_plot_is_a_png(tmp_path):
    path = plot_pareto(ROWS, tmp_path / "p.png", floor=0.5, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_folder_of_another_model_is_refused_unless_forced(tmp_path):
    _check_folder(ReportConfig(model="a", out=tmp_path))
    with pytest.raises(ValueError, match="holds results and cached models of 'a'.*--force"):
        _check_folder(ReportConfig(model="b", out=tmp_path))
    _check_folder(ReportConfig(model="b", out=tmp_path, force=True))
    assert (tmp_path / "model.txt").read_text().strip() == "b"


def test_report_end_to_end_on_tiny_caches_models_and_resumes(tmp_path):
    cfg = ReportConfig(model="random:tiny", recipes=("bf16", "rtn4 + prune:input=0.25"), out=tmp_path, prompt_len=8,
                       new_tokens=4, device="cpu")
    rows, meta = run_report(cfg)
    assert [r.recipe for r in rows] == ["bf16", "rtn4 + prune:input=0.25"]
    assert all(r.tokens_per_s > 0 and r.model_gb > 0 and r.peak_mem_gb > 0 for r in rows)
    assert rows[1].model_gb < rows[0].model_gb  # 4-bit and pruned linears, against bf16
    assert rows[0].speedup == 1.0 and rows[0].race_acc is None  # no tokenizer: no RACE
    assert read_rows(tmp_path / "results.json") == rows
    assert "| rtn4 + prune:input=0.25 |" in (tmp_path / "results.md").read_text()
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
    meta_file = next(p.parent for p in cached if "rtn4" in str(p)) / "fastllama.json"
    meta_file.write_text(meta_file.read_text().replace("rtn:bits=4", "rtn:bits=8"))
    _build(cfg, list(cfg.recipes), [parse_recipe(r) for r in cfg.recipes], "cpu")
    assert [p for p in cached if p.stat().st_mtime_ns != cached[p]] == [meta_file.parent / "model.safetensors"]
