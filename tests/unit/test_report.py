"""fastllama.report: the markdown and JSON writers, the Pareto front, the plot, and folder ownership."""

from __future__ import annotations

import json

import pytest

from fastllama.report import ReportConfig, Row, _check_folder, _pareto_front, plot_pareto, read_rows, to_markdown, write_results

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
    assert md[4] == "| bf16 | 30.00 | 33.3 | 6.500 | 69.0% (66.0%–72.0%, n=1000) | 8.10 | 6.400 | 1.00× |"
    assert md[6] == "| gptq4-prune-in10 | 12.00 | 83.3 | 2.500 | 53.0% | — | 2.100 | — |"
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
