"""fastllama.data: calibration sources and the RACE loader."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

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


@pytest.mark.parametrize("content, match",
                         [("", "is empty"), ("   \n", "is empty"), ("short", "5 tokens, fewer than seqlen=16")])
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


def test_sampled_calibration_never_ends_the_text(tiny_model, offline):
    """The model's end-of-text token is never drawn (transformers' min_new_tokens, as the sampler replaced)."""
    eos = tiny_model.config.eos_token_id
    tiny_model.lm_head.weight.data[eos] = 100.0  # eos would win nearly every draw
    a = data.calibration(None, model=tiny_model, nsamples=4, seqlen=24, seed=0)
    assert not (a[:, 1:] == eos).any()


def test_draw_follows_the_softmax():
    """The inverse-CDF draw: each index at its softmax probability (within 5 standard errors over 40000 draws), and
    an index of probability 0 never."""
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    draws = data._draw(p.log().expand(40000, 4), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4) / len(draws)
    assert (freq - p).abs().max() < 5 * (0.25 / len(draws)) ** 0.5 and freq[3] == 0


def test_ppl_text_is_shipped():
    words = data.PPL_TEXT.read_text().split()
    assert 3000 <= len(words) <= 6000


# ---------------------------------------------------------------- RACE loader
ROW = {"article": "Tom has a dog.", "question": "What does Tom have?",
       "options": ["a cat", "a dog", "a bird", "a fish"], "answer": "B"}


def _write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_race_jsonl_and_prior_questions(tmp_path):
    second = {**ROW, "question": "Who has a dog?", "options": ["Tom", "Ann", "Sue", "Bob"], "answer": "A"}
    other = {**ROW, "article": "Ann runs."}
    path = _write_jsonl(tmp_path / "r.jsonl", [ROW, second, other])
    ex = data.load_race(path)
    assert [e.answer for e in ex] == ["B", "A", "B"]
    assert ex[0].options == ("a cat", "a dog", "a bird", "a fish") and ex[0].id == "r.jsonl:1"
    assert ex[0].prior == () and ex[1].prior == (("What does Tom have?", "a dog"),) and ex[2].prior == ()


def test_load_race_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([ROW, ROW]), tmp_path / "r.parquet")
    ex = data.load_race(tmp_path / "r.parquet")
    assert len(ex) == 2 and ex[1].question == ROW["question"] and ex[1].answer == "B"


@pytest.mark.parametrize("row, match", [
    ({k: v for k, v in ROW.items() if k != "question"}, "row 2: field 'question' is missing"),
    ({**ROW, "options": ["a", "b", "c"]}, "row 2: field 'options' has 3 options, not 4"),
    ({**ROW, "answer": "E"}, "row 2: field 'answer' is 'E', not one of A, B, C, D"),
    ({**ROW, "article": ""}, "row 2: field 'article' must be a non-empty string"),
    ({**ROW, "options": "abcd"}, "row 2: field 'options' has str options"),
])
def test_load_race_bad_row_names_file_row_and_field(tmp_path, row, match):
    path = _write_jsonl(tmp_path / "bad.jsonl", [ROW, row])
    with pytest.raises(ValueError, match=match) as e:
        data.load_race(path)
    assert str(path) in str(e.value)


def test_load_race_file_errors(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="no RACE file at"):
        data.load_race(tmp_path / "none.jsonl")
    (tmp_path / "r.csv").write_text("x")
    with pytest.raises(ValueError, match="must be .jsonl or .parquet"):
        data.load_race(tmp_path / "r.csv")
    (tmp_path / "r.jsonl").write_text('{"article": \n')
    with pytest.raises(ValueError, match="row 1 is not valid JSON"):
        data.load_race(tmp_path / "r.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="has no RACE rows"):
        data.load_race(tmp_path / "e.jsonl")
    with pytest.raises(ValueError, match="ehovy/race needs the Hugging Face Hub, which is unreachable"):
        data.load_race("ehovy/race")
    with pytest.raises(ValueError, match="limit must be a positive"):
        data.load_race(_write_jsonl(tmp_path / "ok.jsonl", [ROW]), limit=0)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40), limit=st.integers(1, 50), seed=st.integers(0, 3))
def test_subset_is_fixed_ordered_and_sized(n, limit, seed):
    items = list(range(n))
    out = data.subset(items, limit, seed)
    assert out == data.subset(items, limit, seed) and out == sorted(out)
    assert len(out) == min(n, limit) and set(out) <= set(items)


def test_shipped_race_sample_is_valid_and_balanced(offline):
    ex = data.load_race()  # offline: the shipped sample
    assert len(ex) >= 100 and len({e.article for e in ex}) >= 25
    counts = {c: sum(e.answer == c for e in ex) for c in "ABCD"}
    assert max(counts.values()) - min(counts.values()) <= 2, counts
    assert all(len(set(e.options)) == 4 for e in ex)
