"""lm-evaluation-harness's own tasks on fastllama models, offline: piqa, gsm8k and race read from small local files in
each task's own format, written here; the scores are the loaded (compressed) model's; the race cross-check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastllama.data import load_race
from fastllama.evaluate import LM_EVAL_TASKS, _encode, lm_eval_tasks, local_task, race_cross_check, race_docs
from fastllama.recipes import compress

pytestmark = pytest.mark.unit

lm_eval = pytest.importorskip("lm_eval", minversion="0.4.13", reason="needs lm-evaluation-harness: pip install -e "
                                                                     "'.[eval]'")

RACE = Path(__file__).parents[1] / "data" / "race_blanks.jsonl"
PIQA = [{"goal": f"To keep {thing} fresh,", "sol1": f"put the {thing} in the fridge.", "sol2": f"leave the {thing} "
         "in the sun.", "label": i % 2} for i, thing in enumerate(["bread", "milk", "fish", "lettuce", "cheese"])]
GSM8K = [{"question": f"Ann has {n} pens and buys {n + 1} more. How many pens does she have?",
          "answer": f"She has {n} + {n + 1} = <<{n}+{n + 1}={2 * n + 1}>>{2 * n + 1} pens.\n#### {2 * n + 1}"}
         for n in range(1, 9)]


def write(folder: Path, split: str, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


@pytest.fixture
def task_data(tmp_path) -> dict[str, Path]:
    """Each task's splits as its hub dataset has them: piqa's validation, gsm8k's test and the train split its five
    few-shot examples come from, race's test (one row per article, from the blanks file)."""
    return {"piqa": write(tmp_path / "piqa", "validation", PIQA),
            "gsm8k": write(write(tmp_path / "gsm8k", "train", GSM8K[:6]), "test", GSM8K[6:]),
            "race": write(tmp_path / "race", "test", race_docs(load_race(RACE)))}


@pytest.fixture
def tok(train_tokenizer):
    texts = [r["goal"] + r["sol1"] + r["sol2"] for r in PIQA] + [r["question"] + r["answer"] for r in GSM8K]
    return train_tokenizer(texts + [ex.article + ex.question + "".join(ex.options) for ex in load_race(RACE)], False)


def loglik(model, tok, context: str, continuation: str) -> float:
    """The summed log-probability of `continuation` after `context`, read off one forward of the model."""
    ctx, cont = _encode(tok, context, continuation)
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_the_tasks_run_offline_on_a_compressed_model(tiny_model, tok, task_data):
    """piqa and race score each option by the compressed model's own log-likelihood (not the float model's), race
    one question per article; gsm8k generates after five few-shot examples drawn from the local train split."""
    model = compress(tiny_model, "rtn:bits=4,group=32")
    out = lm_eval_tasks(model, tok, list(LM_EVAL_TASKS), data=task_data, batch_size=4, log_samples=True)
    assert set(LM_EVAL_TASKS) <= set(out["results"])
    assert out["n-samples"]["piqa"]["effective"] == len(PIQA) and out["n-samples"]["gsm8k"]["effective"] == 2
    assert out["n-samples"]["race"]["effective"] == len(race_docs(load_race(RACE)))
    for sample in out["samples"]["piqa"]:
        doc = sample["doc"]
        context = f"Question: {doc['goal']}\nAnswer:"
        scores = [ll for ll, _ in sample["filtered_resps"]]
        # lm-eval's batches of 4 pass QuantLinear enough rows to dequantize once (fastllama.nn.DEQUANT_ROWS), one
        # sequence runs the kernel: the two agree up to bfloat16 rounding (measured 2.5e-5 relative)
        assert scores == pytest.approx([loglik(model, tok, context, " " + doc[s]) for s in ("sol1", "sol2")],
                                       rel=2e-4, abs=1e-4)
    acc = sum(max(range(2), key=[ll for ll, _ in s["filtered_resps"]].__getitem__) == s["doc"]["label"]
              for s in out["samples"]["piqa"]) / len(PIQA)
    assert out["results"]["piqa"]["acc,none"] == acc
    for sample in out["samples"]["gsm8k"]:
        prompt = sample["arguments"][0][0]  # five shots from the train split, then the question
        assert prompt.count("Question: ") == 6 and sample["doc"]["question"] in prompt
        assert all(r["question"] not in prompt for r in GSM8K[6:] if r["question"] != sample["doc"]["question"])


def test_race_cross_check_agrees_with_lm_evals_task(tiny_model, train_tokenizer):
    """lm-eval scores each article's last question with the earlier ones as context; fastllama's lm-eval mode
    chooses the same options with the same log-likelihoods (records keep 4 decimals: 5e-5, and float32 batching
    ~1e-6; the parity test's 1e-4)."""
    tok = train_tokenizer([ex.article + ex.question + "".join(ex.options) for ex in load_race(RACE)], True)
    check = race_cross_check(tiny_model, tok, RACE, batch_size=4)
    assert check["articles"] == len({ex.article for ex in load_race(RACE)}) > 1
    assert check["agreements"] == check["articles"] and check["max_loglik_diff"] < 1e-4


def test_local_data_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="unknown lm-eval task 'piqa2'; e.g. piqa, gsm8k, race"):
        local_task("piqa2", tmp_path)
    with pytest.raises(ValueError, match="holds none of gsm8k's splits: write them as test.jsonl, train.jsonl"):
        local_task("gsm8k", tmp_path)
    config = local_task("gsm8k", write(tmp_path, "test", GSM8K))
    assert config["dataset_kwargs"] == {"data_files": {"test": str(tmp_path / "test.jsonl")}}
    assert (config["test_split"], config["training_split"], config["fewshot_split"]) == ("test", None, None)
    with pytest.raises(ValueError, match="local data for race, which --tasks does not name"):
        lm_eval_tasks(None, object(), ["piqa"], data={"race": tmp_path})


def test_cli_writes_lm_evals_json(tiny_model, tok, task_data, tmp_path, capsys):
    from fastllama.checkpoint import save
    from fastllama.cli import main

    save(tiny_model, tmp_path / "m", tokenizer=tok)
    out = tmp_path / "out.json"
    assert main(["eval", "lm-eval", "--model", str(tmp_path / "m"), "--recipe", "int8wo", "--tasks", "piqa",
                 "--task-data", f"piqa={task_data['piqa']}", "--limit", "3", "--json", str(out)]) == 0
    assert "piqa" in capsys.readouterr().out
    assert json.loads(out.read_text())["n-samples"]["piqa"]["effective"] == 3
    assert main(["eval", "lm-eval", "--model", str(tmp_path / "m"), "--tasks", "piqa", "--task-data", "piqa"]) == 2
    assert "--task-data 'piqa' is not TASK=DIR" in capsys.readouterr().err


def test_report_measures_the_tasks_named(tiny_model, tok, task_data, tmp_path):
    """A report row carries each named task's numeric metrics, keyed as lm-eval keys them."""
    from fastllama.checkpoint import save
    from fastllama.report import measure

    save(tiny_model, tmp_path / "m", tokenizer=tok)
    m = measure(tmp_path / "m", "cpu", str(RACE), 4, ("lm-eval",), 8, 4, ("piqa",), {"piqa": str(task_data["piqa"])},
                3)
    assert list(m["race"]) == ["lm-eval"] and m["race"]["lm-eval"]["n"] == 4
    piqa = m["tasks"]["piqa"]
    assert set(piqa) == {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"}
    assert piqa["acc,none"] in (0, 1 / 3, 2 / 3, 1)  # 3 documents
