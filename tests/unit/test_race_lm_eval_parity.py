"""fastllama.evaluate `lm-eval` mode against lm-evaluation-harness itself.

lm-eval's own `race` task (its yaml and preprocess code) builds the requests from tests/data/race_blanks.jsonl,
rewritten in the EleutherAI/race layout, and its HF model (`HFLM`, `add_bos_token` unset) encodes and scores them
on the same random:tiny model. The file's questions have blanks ending them ("  _  ."), inside them, written "_.",
and after a question mark; one ends in a space. Two byte-level BPE tokenizers are trained on it offline: one that
adds a BOS (as Llama-3's does) and one that adds none (as SmolLM2's).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastllama.data import load_race
from fastllama.evaluate import LM_EVAL_RACE_VERSION, _encode, evaluate_race, lm_eval_prompt

pytestmark = pytest.mark.unit

lm_eval = pytest.importorskip("lm_eval", minversion="0.4.13",
                              reason="the parity check runs lm-evaluation-harness >= 0.4.13 itself; "
                                     "pip install 'fastllama[eval]' to run it")

DATA = Path(__file__).parents[1] / "data" / "race_blanks.jsonl"
ROWS = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
# the records keep 4 decimals (rounding <= 5e-5); lm-eval's padded batches and fastllama's prefix trees add
# float32 differences of ~1e-6 on these short inputs, so 1e-4 holds with room to spare
LOGLIK_TOL = 1e-4


def _lm_eval_requests(tmp_path: Path):
    """lm-eval's `race` task on the test file: one document per question, holding its article's questions up
    to it (lm-eval scores a document's last question), so every question is scored as fastllama scores it."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    docs, problems = [], {}
    for row in ROWS:
        problems.setdefault(row["article"], []).append({k: row[k] for k in ("question", "options", "answer")})
        docs.append({"example_id": str(len(docs)), "article": row["article"],
                     "problems": repr(problems[row["article"]])})  # a Python literal, as in EleutherAI/race
    (tmp_path / "race.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    config = load_yaml(Path(lm_eval.tasks.__file__).parent / "race" / "race.yaml")
    config |= {"dataset_path": "json", "dataset_name": None,
               "dataset_kwargs": {"data_files": {"test": str(tmp_path / "race.jsonl")},
                                  "cache_dir": str(tmp_path / "cache")}}
    task = ConfigurableTask(config=config)
    task.build_all_requests(rank=0, world_size=1)
    return task, sorted(task.instances, key=lambda i: (i.doc_id, i.idx))


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
def test_race_matches_lm_eval(tiny_model, tmp_path, bos, train_tokenizer):
    from lm_eval.models.huggingface import HFLM

    task, instances = _lm_eval_requests(tmp_path)
    assert str(task.VERSION) == LM_EVAL_RACE_VERSION, "lm-eval's race task changed version: re-check lm_eval_prompt"
    assert any(row["question"].endswith("  _  .") for row in ROWS[:-1])  # blanks among earlier questions
    tok = train_tokenizer([t for row in ROWS for t in (row["article"], row["question"], *row["options"])], bos)
    lm = HFLM(pretrained=tiny_model, tokenizer=tok, device="cpu", batch_size=4)
    result = evaluate_race(tiny_model, tok, DATA, mode="lm-eval")
    assert result.n == len(ROWS) and result.summary()["task_version"] == LM_EVAL_RACE_VERSION

    theirs = [ll for ll, _ in lm.loglikelihood(instances, disable_tqdm=True)]
    for q, (ex, record) in enumerate(zip(load_race(DATA), result.records)):
        context, continuations = lm_eval_prompt(ex)
        requests = [i.args for i in instances if i.doc_id == q]
        assert requests == [(context, c) for c in continuations], f"question {q}: prompt differs from lm-eval's"
        for context, continuation in requests:
            ctx, cont = _encode(tok, context, continuation)
            assert (ctx, cont) == lm._encode_pair(context, continuation), f"question {q}: token ids differ"
            assert (ctx[0] == tok.bos_token_id) == bos
        assert record["loglik"] == pytest.approx(theirs[4 * q:4 * q + 4], abs=LOGLIK_TOL), f"question {q}"
