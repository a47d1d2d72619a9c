"""fastllama.cli: fast start, clear errors for bad input, and the report/search argument plumbing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastllama.cli import build_parser, main

pytestmark = pytest.mark.unit


def test_help_does_not_import_torch():
    code = "import sys, fastllama.cli as c; c.build_parser(); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_every_subcommand_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"generate", "report", "search"} <= set(sub.choices)


def test_unknown_model_spec_is_a_clean_error(capsys):
    assert main(["generate", "--model", "no-such-thing", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastllama: error: unknown model spec 'no-such-thing'") and "Traceback" not in err


def test_generate_on_a_model_without_tokenizer_says_so(capsys):
    assert main(["generate", "--model", "random:tiny", "--prompt", "hi"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_report_rejects_an_unknown_recipe_before_any_work(tmp_path, capsys):
    assert main(["report", "--model", "random:tiny", "--recipes", "bf16,nonsense", "--out", str(tmp_path / "r")]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing was created: the recipe list is checked first
