"""fastllama.evaluate: perplexity and RACE scoring."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastllama.data import RaceExample
from fastllama.evaluate import (LM_EVAL_RACE_VERSION, _encode, evaluate_race, letter_prompt, lm_eval_prompt, perplexity,
                                 wilson_interval)

pytestmark = pytest.mark.unit


def test_perplexity_uniform_logits_is_vocab_size(tiny_model):
    torch.nn.init.zeros_(tiny_model.lm_head.weight)  # tied: the embeddings are zero too, so every logit is 0
    ids = torch.randint(0, tiny_model.config.vocab_size, (100,))
    assert perplexity(tiny_model, None, ids, window=32, stride=16) == pytest.approx(tiny_model.config.vocab_size)


def test_perplexity_with_one_window_equals_one_pass(tiny_model):
    ids = torch.randint(0, 512, (50,))
    with torch.inference_mode():
        logits = tiny_model(ids[None]).logits[0, :-1]
    expected = math.exp(torch.nn.functional.cross_entropy(logits, ids[1:]).item())
    assert perplexity(tiny_model, None, ids, window=50, stride=49) == pytest.approx(expected, rel=1e-5)
    assert perplexity(tiny_model, None, ids, window=64, stride=16) == pytest.approx(expected, rel=1e-5)


def test_strided_perplexity_equals_the_full_logits_one(tiny_model):
    """Scoring only each window's last `stride` positions (the head on those rows alone) gives the perplexity of
    the full logits, sliced."""
    ids = torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(0))
    nll, done = 0.0, 1
    with torch.inference_mode():
        while done < len(ids):
            end = min(done + 16, len(ids))
            begin = max(0, end - 32)
            logits = tiny_model(ids[begin:end][None]).logits[0, done - begin - 1:end - begin - 1]
            nll += torch.nn.functional.cross_entropy(logits, ids[done:end], reduction="sum").item()
            done = end
    assert perplexity(tiny_model, None, ids, window=32, stride=16) == pytest.approx(math.exp(nll / 99), rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 90), window=st.integers(2, 40), data=st.data())
def test_perplexity_scores_each_token_once(n, window, data):
    """Whatever the window and stride, the n - 1 predictable tokens are each scored exactly once."""
    from unittest import mock

    import torch.nn.functional as F

    stride = data.draw(st.integers(1, window - 1))
    model = _ZeroModel()
    targets = []
    real = F.cross_entropy
    with mock.patch.object(F, "cross_entropy", lambda lg, t, **kw: (targets.append(t), real(lg, t, **kw))[1]):
        ppl = perplexity(model, None, torch.arange(n), window=window, stride=stride)
    assert torch.cat(targets).tolist() == list(range(1, n))
    assert ppl == pytest.approx(_ZeroModel.vocab)


class _ZeroModel(torch.nn.Module):
    """Uniform logits over `vocab` tokens for any input: a model with a known perplexity (= vocab)."""

    vocab = 128

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, logits_to_keep=0):  # as transformers' models: the last `logits_to_keep` positions (0: all)
        return type("Out", (), {"logits": torch.zeros(len(ids), logits_to_keep or ids.shape[1], self.vocab)})


def test_perplexity_errors(tiny_model):
    for window, stride in [(4, 8), (4, 4), (4, 0)]:
        with pytest.raises(ValueError, match="0 < stride < window"):
            perplexity(tiny_model, None, torch.arange(10), window=window, stride=stride)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        perplexity(tiny_model, None, "some text")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(tiny_model, None, torch.tensor([3]))


# ---------------------------------------------------------------- RACE
EXAMPLE = RaceExample(
    article="Mia planted beans in May.",
    question="When did Mia plant the beans?",
    options=("In March", "In May", "In June", "In July"),
    answer="B",
    prior=(("Mia planted  _  .", "beans"), ("Who planted beans?", "Mia"), ("Mia  _  beans.", "planted")),
)


def test_letter_prompt_format():
    context, continuations = letter_prompt(EXAMPLE)
    assert context == ("Article: Mia planted beans in May.\n\n"
                       "Question: When did Mia plant the beans?\n"
                       "A. In March\nB. In May\nC. In June\nD. In July\n"
                       "Answer:")
    assert continuations == [" A", " B", " C", " D"]


def test_lm_eval_prompt_format():
    """lm-eval race v3.0: earlier questions answered (one ending in a blank as the sentence it completes, with
    no full stop; a blank elsewhere as a plain question), then the bare question; the options' text as
    continuations after a space."""
    assert LM_EVAL_RACE_VERSION == "3.0"
    context, continuations = lm_eval_prompt(EXAMPLE)
    assert context == ("Article: Mia planted beans in May.\n\n"
                       "Mia planted beans\n"
                       "Question: Who planted beans?\nAnswer: Mia\n"
                       "Question: Mia  _  beans.\nAnswer: planted\n"
                       "When did Mia plant the beans?")
    assert continuations == [" In March", " In May", " In June", " In July"]


class CharTokenizer:
    """One token per character (ids < 128): a tokenizer for the tiny random model."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [ord(c) % 128 for c in text]}


class BosCharTokenizer(CharTokenizer):
    """CharTokenizer that starts every encoding with a BOS (id 1) unless told not to, as Llama-3's does."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [1] * add_special_tokens + super().__call__(text)["input_ids"]}


@pytest.mark.parametrize("tok, bos", [(CharTokenizer(), []), (BosCharTokenizer(), [1])])
def test_encode_keeps_the_tokenizers_bos_and_moves_trailing_spaces(tok, bos):
    """As lm-eval's HF model with `add_bos_token` unset: the tokenizer's default BOS (if any) opens the context
    and never reaches the continuation; the context's trailing spaces join the continuation."""
    assert _encode(tok, "Q? ", "yes") == (bos + [ord(c) for c in "Q?"], [ord(c) for c in " yes"])


def _examples(n: int, seed: int = 0) -> list[RaceExample]:
    import random

    rng = random.Random(seed)
    words = ["red", "blue", "green", "tall", "small", "river", "stone", "bread", "light", "clock"]
    out = []
    for i in range(n):
        article = " ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) + "."
        options = tuple(" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) + f" {k}" for k in range(4))
        out.append(RaceExample(article, f"Question {i}?", options, "ABCD"[i % 4], id=str(i)))
    return out


def _force_token(model, token: int) -> None:
    """Make every position predict `token`: an untied head whose only nonzero is a bias on that token."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[token] = 10.0
    model.lm_head = head


@pytest.mark.parametrize("letter", "ABCD")
def test_letter_scoring_picks_the_forced_letter(tiny_model, letter):
    _force_token(tiny_model, ord(letter))
    examples = _examples(8)
    result = evaluate_race(tiny_model, CharTokenizer(), examples, mode="letter")
    assert [r["chosen"] for r in result.records] == [letter] * 8
    assert [r["gold"] for r in result.records] == [e.answer for e in examples]
    assert result.acc == 2 / 8 and result.n == 8 and result.mode == "letter"
    assert (result.ci_low, result.ci_high) == pytest.approx(wilson_interval(2, 8))


def _plain_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """The reference: one unpadded, unpacked forward pass over context + continuation."""
    from fastllama.evaluate import _encode

    ctx, cont = _encode(tokenizer, context, continuation)
    ids = torch.tensor(ctx + cont)
    with torch.inference_mode():
        logp = model(ids[None, :-1]).logits[0].log_softmax(-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


@pytest.mark.parametrize("mode", ["letter", "lm-eval"])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_packed_batched_scores_equal_plain_forward(tiny_model, mode, batch_size, monkeypatch):
    """Articles shared by several questions (one prefix tree), varied lengths (padding in each batch), and a
    small tree limit (one article split over several trees): each score equals a plain forward pass."""
    import fastllama.evaluate as ev

    monkeypatch.setattr(ev, "PACK_TOKENS", 120)
    base = _examples(9, seed=1)
    examples, prior = [], ()
    for i, ex in enumerate(base):  # three articles with three questions each, lm-eval's prior answers included
        article = base[i - i % 3].article
        prior = () if i % 3 == 0 else prior + ((examples[-1].question, examples[-1].options[0]),)
        examples.append(RaceExample(article, ex.question, ex.options, ex.answer, id=str(i), prior=prior))
    tok = CharTokenizer()
    result = evaluate_race(tiny_model, tok, examples, mode=mode, batch_size=batch_size)
    for ex, record in zip(examples, result.records):
        context, continuations = ev.PROMPTS[mode](ex)
        expected = [_plain_loglik(tiny_model, tok, context, c) for c in continuations]
        assert record["loglik"] == pytest.approx(expected, abs=2e-3)


def test_long_prompts_are_truncated_with_a_warning(tiny_model, caplog):
    ex = _examples(1)[0]
    long = RaceExample("word " * 200, ex.question, ex.options, ex.answer, id="long")
    result = evaluate_race(tiny_model, CharTokenizer(), [long], mode="lm-eval", max_length=64)
    assert result.n == 1 and all(math.isfinite(v) for v in result.records[0]["loglik"])
    assert "RACE question long: prompt of" in caplog.text and "truncated from the front" in caplog.text


def test_limit_and_records_file(tiny_model, tmp_path):
    import json

    result = evaluate_race(tiny_model, CharTokenizer(), _examples(10), limit=4)
    assert result.n == 4
    result.write_records(tmp_path / "r.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in result.records]
    assert set(rows[0]) == {"id", "gold", "chosen", "correct", "loglik"}
    assert result.summary() == {"acc": result.acc, "ci_low": result.ci_low, "ci_high": result.ci_high, "n": 4,
                                "mode": "letter", "task_version": None}


def test_agreement_counts_shared_choices(tiny_model):
    examples = _examples(4)
    _force_token(tiny_model, ord("A"))
    a = evaluate_race(tiny_model, CharTokenizer(), examples)
    b = evaluate_race(tiny_model, CharTokenizer(), examples)
    b.records[1]["chosen"] = "C"
    assert a.agreement(b) == 0.75
    b.records = [{**r, "id": "x" + r["id"]} for r in b.records]
    with pytest.raises(ValueError, match="share no question ids"):
        a.agreement(b)


def test_wilson_interval_known_values():
    # reference values (Wilson 1927; e.g. statsmodels proportion_confint(method="wilson"))
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 2000), data=st.data())
def test_wilson_interval_contains_the_estimate(n, data):
    k = data.draw(st.integers(0, n))
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_race_errors(tiny_model):
    with pytest.raises(ValueError, match="unknown RACE mode 'mmlu'; valid: letter, lm-eval"):
        evaluate_race(tiny_model, CharTokenizer(), _examples(1), mode="mmlu")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        evaluate_race(tiny_model, None, _examples(1))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_race(tiny_model, CharTokenizer(), _examples(1), batch_size=0)
    with pytest.raises(ValueError, match="no RACE questions to evaluate"):
        evaluate_race(tiny_model, CharTokenizer(), [])
    with pytest.raises(ValueError, match="0 <= correct <= n"):
        wilson_interval(3, 2)


# ---------------------------------------------------------------- fastllama eval
@pytest.fixture
def cli_model(tiny_model, monkeypatch):
    """`fastllama eval` on the tiny model with the character tokenizer (no download, no 20 s load)."""
    import fastllama.cli as cli

    monkeypatch.setattr(cli, "_load", lambda args: (tiny_model, CharTokenizer()))
    return cli


def test_cli_eval_race_prints_and_writes_json(cli_model, tmp_path, capsys):
    import json

    from fastllama.data import load_race

    data = tmp_path / "r.jsonl"
    data.write_text("".join(json.dumps({"article": e.article, "question": e.question, "options": list(e.options),
                                        "answer": e.answer}) + "\n" for e in _examples(6)))
    out = tmp_path / "r.json"
    assert cli_model.main(["eval", "race", "--data", str(data), "--mode", "lm-eval", "--limit", "4",
                           "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "RACE (lm-eval)" in printed and "95% CI [" in printed and "n=4" in printed
    saved = json.loads(out.read_text())
    assert saved["n"] == 4 and saved["mode"] == "lm-eval" and len(saved["records"]) == 4
    assert saved["task_version"] == LM_EVAL_RACE_VERSION
    assert {r["id"] for r in saved["records"]} <= {e.id for e in load_race(data)}


def test_cli_eval_ppl(cli_model, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 10)
    assert cli_model.main(["eval", "ppl", "--text-file", str(text), "--window", "64", "--stride", "32"]) == 0
    ppl = float(capsys.readouterr().out.rsplit(":", 1)[1])
    assert 1.0 < ppl < 10 * 512


def test_cli_eval_errors(cli_model, tmp_path, capsys):
    assert cli_model.main(["eval", "ppl", "--text-file", str(tmp_path / "none.txt")]) == 2
    assert "no text file at" in capsys.readouterr().err
    assert cli_model.main(["eval", "race", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "no RACE file at" in capsys.readouterr().err
    assert cli_model.main(["eval", "race", "--recipe", "nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err
