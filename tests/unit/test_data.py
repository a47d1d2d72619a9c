"""fastllama.data: calibration sources and the RACE loader."""

from __future__ import annotations

import pytest
import torch

from fastllama import data

pytestmark = pytest.mark.unit


class CharTokenizer:
    """One token per character (ids 0..255): enough to test windowing without a real vocabulary."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [min(ord(c), 255) for c in text]}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=2.0: False)


def test_calibration_text_file_windows(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("abcdefghij" * 20)
    out = data.calibration(CharTokenizer(), source=path, nsamples=7, seqlen=16, seed=3)
    assert out.shape == (7, 16) and out.dtype == torch.long
    text = [ord(c) for c in path.read_text()]
    for row in out.tolist():  # every row is a contiguous window of the text
        assert any(text[s:s + 16] == row for s in range(len(text) - 15))
    assert torch.equal(out, data.calibration(CharTokenizer(), source=path, nsamples=7, seqlen=16, seed=3))
    assert not torch.equal(out, data.calibration(CharTokenizer(), source=path, nsamples=7, seqlen=16, seed=4))


def test_calibration_folder_reads_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("x" * 40)
    (tmp_path / "b.md").write_text("y" * 40)
    (tmp_path / "c.bin").write_text("z" * 400)  # ignored: not .txt/.md
    out = data.calibration(CharTokenizer(), source=tmp_path, nsamples=50, seqlen=8)
    assert set(out.flatten().tolist()) <= {ord("x"), ord("y"), ord("\n")}


@pytest.mark.parametrize("content, match", [("", "is empty"), ("   \n", "is empty"), ("short", "5 tokens, fewer than seqlen=16")])
def test_calibration_rejects_empty_or_short_text(tmp_path, content, match):
    path = tmp_path / "t.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        data.calibration(CharTokenizer(), source=path, seqlen=16)


def test_calibration_errors(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="no calibration text at"):
        data.calibration(CharTokenizer(), source=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="has no .txt/.md files"):
        data.calibration(CharTokenizer(), source=tmp_path)
    with pytest.raises(ValueError, match="pass source=PATH"):
        data.calibration(CharTokenizer(), source=None, model=None)
    with pytest.raises(ValueError, match="nsamples >= 1"):
        data.calibration(CharTokenizer(), nsamples=0)


def test_calibration_samples_from_model_when_offline(tiny_model, offline):
    a = data.calibration(None, model=tiny_model, nsamples=3, seqlen=12, seed=1)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert 0 <= a.min() and a.max() < tiny_model.config.vocab_size
    assert torch.equal(a, data.calibration(None, model=tiny_model, nsamples=3, seqlen=12, seed=1))


def test_ppl_text_is_shipped():
    words = data.PPL_TEXT.read_text().split()
    assert 3000 <= len(words) <= 6000
