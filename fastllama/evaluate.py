"""Judging a (compressed) model: RACE reading-comprehension accuracy, and perplexity over a text.

    evaluate_race(model, tokenizer, data)     accuracy with a 95% Wilson interval and per-question records
    perplexity(model, tokenizer, text)        exp(mean NLL) over a text, in strided windows
    lm_eval_tasks(model, tokenizer, tasks)    lm-evaluation-harness's own tasks (piqa, gsm8k, race, ...)
    race_cross_check(model, tokenizer, data)  lm-eval mode against lm-eval's race task on the same articles

RACE scoring compares the log-likelihood of four continuations of one prompt, in one of two modes:

    letter    the article, the question, options labelled A-D, then "Answer:"; continuations " A" .. " D"
    lm-eval   the lm-evaluation-harness `race` task (version LM_EVAL_RACE_VERSION): "Article: ...", the article's
              earlier questions with their answers, the question; continuations " " + option text, metric `acc`
              (summed log-likelihood, not length-normalized). lm-eval scores only each article's last question;
              here every question is scored with the prompt lm-eval would build if it were the last.

Both modes encode as lm-eval's HF model does by default (`add_bos_token` unset): with the tokenizer's own special
tokens, so a tokenizer that adds a BOS (Llama-3's) starts every input with it, and one that adds none (SmolLM2's)
adds nothing.

`lm_eval_tasks` runs lm-evaluation-harness itself (the `eval` extra) through its own HF model interface, `HFLM`
wrapped around the model as loaded, so any fastllama model, compressed ones included, takes any of its tasks;
offline, a task reads its splits from a local folder (`local_task`).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import LETTERS, RaceExample, load_race, subset

log = logging.getLogger(__name__)

MODES = ("letter", "lm-eval")
LM_EVAL_RACE_VERSION = "3.0"  # the `race` task version lm_eval_prompt writes (that of lm-evaluation-harness 0.4.13)
Z95 = 1.959964  # the normal quantile of a two-sided 95% interval


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(model, tokenizer, text: str | torch.Tensor, window: int = 512, stride: int = 256) -> float:
    """Perplexity of `text` (a string, or 1-D token ids when `tokenizer` is None) in strided windows.

    Each step scores the next `stride` tokens, with the model seeing the `window` tokens that end there,
    so every token after the first is scored exactly once, with at least `window - stride` tokens of context.
    """
    if not 0 < stride < window:
        raise ValueError(f"perplexity needs 0 < stride < window (a window must keep some context), "
                         f"got window={window}, stride={stride}; e.g. window=512, stride=256")
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("perplexity of a text needs a tokenizer and this model has none (a random preset?); "
                             "use a model spec with a tokenizer, or pass token ids")
        ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"])
    else:
        ids = torch.as_tensor(text).flatten()
    if len(ids) < 2:
        raise ValueError(f"perplexity needs a text of at least 2 tokens, got {len(ids)}; pass a longer text")
    ids = ids.to(_device(model))
    nll, done = 0.0, 1  # tokens before `done` are scored; the first token has no prediction
    for _ in tqdm(range(math.ceil((len(ids) - 1) / stride)), desc="perplexity", leave=False):
        end = min(done + stride, len(ids))
        begin = max(0, end - window)
        # the head on the scored positions alone (logits[i] predicts token i + 1): half a window's rows
        logits = model(ids[begin:end][None], logits_to_keep=end - done + 1).logits[0, :-1]
        nll += F.cross_entropy(logits.float(), ids[done:end], reduction="sum").item()
        done = end
    scored = len(ids) - 1
    ppl = math.exp(nll / scored)
    log.info("perplexity %.3f over %d tokens (window %d, stride %d)", ppl, scored, window, stride)
    return ppl


# ---------------------------------------------------------------- RACE
def letter_prompt(ex: RaceExample) -> tuple[str, list[str]]:
    """The `letter` prompt and its four continuations (" A" .. " D")."""
    options = "".join(f"{letter}. {option}\n" for letter, option in zip(LETTERS, ex.options))
    return f"Article: {ex.article}\n\nQuestion: {ex.question}\n{options}Answer:", [f" {c}" for c in LETTERS]


def lm_eval_prompt(ex: RaceExample) -> tuple[str, list[str]]:
    """lm-evaluation-harness `race` (version LM_EVAL_RACE_VERSION) `doc_to_text`, with " " + each option as the
    continuations.

    Earlier questions on the article come with their gold answers. One ending in a blank ("  _  .") is written
    as the sentence it completes: the question without its last 5 characters (the blank, its trailing spaces
    and the full stop; one space stays) followed by the answer, so "Tom is  _  ." with "kind" gives "Tom is kind".
    A blank anywhere else ("Tom  _  the book.", "Tom is _.") leaves the question as a Question/Answer pair.
    """
    text = "Article: " + ex.article + "\n\n"
    for question, answer in ex.prior:
        if question.endswith("  _  ."):
            text += question[:-5] + answer + "\n"
        else:
            text += "Question: " + question + "\n" + "Answer: " + answer + "\n"
    return text + ex.question, [" " + option for option in ex.options]


PROMPTS = {"letter": letter_prompt, "lm-eval": lm_eval_prompt}


@dataclass
class RaceResult:
    """RACE accuracy with its 95% Wilson interval, and one record per question."""

    acc: float  # fraction of questions answered correctly
    ci_low: float  # lower end of the 95% Wilson score interval of acc
    ci_high: float  # upper end of the 95% Wilson score interval of acc
    n: int  # questions scored
    mode: str  # "letter" or "lm-eval"
    task_version: str | None = None  # the lm-evaluation-harness `race` version of the prompt (lm-eval mode only)
    records: list[dict] = field(default_factory=list, repr=False)  # id, gold, chosen, correct, loglik (A-D)

    def summary(self) -> dict:
        """The numbers without the per-question records (for JSON reports)."""
        return {k: v for k, v in asdict(self).items() if k != "records"}

    def agreement(self, other: RaceResult) -> float:
        """Share of the questions scored by both results on which they chose the same answer."""
        mine = {r["id"]: r["chosen"] for r in self.records}
        common = [r for r in other.records if r["id"] in mine]
        if not common:
            raise ValueError("the two RACE results share no question ids; evaluate both on the same data")
        return sum(mine[r["id"]] == r["chosen"] for r in common) / len(common)

    def write_records(self, path: str | Path) -> None:
        """One JSON line per question: id, gold, chosen, correct and the four log-likelihoods."""
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion `correct / n` (z = 1.96: 95%)."""
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"a Wilson interval needs 0 <= correct <= n and n > 0, got correct={correct}, n={n}")
    p, z2 = correct / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at k = 0 or k = n one end is exactly 0 or 1; say so rather than leave float rounding there
    return (0.0 if correct == 0 else center - half), (1.0 if correct == n else center + half)


def evaluate_race(model, tokenizer, data: str | Path | Sequence[RaceExample] | None = None, mode: str = "letter",
                  limit: int | None = None, batch_size: int = 8, max_length: int = 2048, seed: int = 0) -> RaceResult:
    """RACE accuracy of `model`: for each question, the option whose continuation has the highest log-likelihood.

    data: examples, a RACE file, or None (see `data.load_race`); `limit` keeps a seeded subset of that many.
    Prompts longer than `max_length` tokens lose their beginning (the article's start), with a warning.
    """
    if mode not in PROMPTS:
        raise ValueError(f"unknown RACE mode {mode!r}; valid: {', '.join(MODES)}")
    if tokenizer is None:
        raise ValueError("RACE needs a tokenizer and this model has none (a random preset?); use a real model spec")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if data is None or isinstance(data, (str, Path)):
        examples = load_race(data, limit=limit, seed=seed)
    else:
        examples = subset(list(data), limit, seed)
    if not examples:
        raise ValueError("no RACE questions to evaluate: `data` is empty; pass examples or a RACE file")
    requests = []
    for ex in examples:
        context, continuations = PROMPTS[mode](ex)
        requests.append([_encode(tokenizer, context, c) for c in continuations])
    scores = _loglikelihoods(model, requests, [ex.article for ex in examples], batch_size, max_length,
                             [ex.id for ex in examples])
    records = []
    for ex, s in zip(examples, scores):
        chosen = LETTERS[max(range(4), key=s.__getitem__)]
        records.append({"id": ex.id, "gold": ex.answer, "chosen": chosen, "correct": chosen == ex.answer,
                        "loglik": [round(v, 4) for v in s]})
    correct = sum(r["correct"] for r in records)
    low, high = wilson_interval(correct, len(records))
    version = LM_EVAL_RACE_VERSION if mode == "lm-eval" else None
    result = RaceResult(correct / len(records), low, high, len(records), mode, version, records)
    log.info("RACE (%s%s): %.3f [%.3f, %.3f] over %d questions", mode, f" race v{version}" if version else "",
             result.acc, low, high, result.n)
    return result


def _encode(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's encoding of a (context, continuation) pair: trailing spaces of the context move to the
    continuation, both texts get the tokenizer's default special tokens (a BOS where it adds one), and the
    continuation's tokens are those the whole text has beyond the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tokenizer(context, verbose=False)["input_ids"]
    whole = tokenizer(context + continuation, verbose=False)["input_ids"]
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def _loglikelihoods(model, requests: list[list[tuple[list[int], list[int]]]], groups: list[str], batch_size: int,
                    max_length: int, ids: list[str]) -> list[list[float]]:
    """For each request (the options of one question), the summed log-probability of each continuation.

    A continuation is read from the input (context + continuation)[:-1]. The inputs of one group (an article's
    questions and options) share long prefixes, so they run as one prefix tree (see `_Tree`): the article once,
    each question once, then each option. Every token sees exactly the tokens before it in its own input, at
    the same positions, so the scores are those of running every input alone.
    """
    trees: list[_Tree] = []
    last_group = None
    for q, options in enumerate(requests):
        for o, (ctx, cont) in enumerate(options):
            if not cont:
                raise ValueError(f"RACE question {ids[q]}: option {LETTERS[o]} encodes to no tokens; check the data")
            full = ctx + cont
            if len(full) - 1 > max_length:
                if o == 0:
                    log.warning("RACE question %s: prompt of %d tokens truncated from the front to max_length=%d",
                                ids[q], len(full) - 1, max_length)
                full = full[-(max_length + 1):]
            row = full[:-1]
            if groups[q] != last_group or len(trees[-1].tokens) + trees[-1].new_tokens(row) > PACK_TOKENS:
                trees.append(_Tree())
                last_group = groups[q]
            trees[-1].add(row, (q, o, cont))
    trees.sort(key=lambda t: len(t.tokens), reverse=True)
    scores = [[0.0] * len(options) for options in requests]
    device = _device(model)
    for start in tqdm(range(0, len(trees), batch_size), desc="RACE", leave=False):
        batch = trees[start:start + batch_size]
        tokens, positions, mask = _collate(batch, model.dtype)
        hidden = model.get_decoder()(input_ids=tokens.to(device), position_ids=positions.to(device),
                                     attention_mask=mask.to(device)).last_hidden_state
        b_idx, pos, targets, owners = [], [], [], []
        for b, tree in enumerate(batch):
            for (q, o, cont), at in tree.reads:
                b_idx += [b] * len(cont)
                pos += at
                targets += cont
                owners += [(q, o)] * len(cont)
        logits = model.get_output_embeddings()(hidden[b_idx, pos]).float()
        logp = logits.log_softmax(-1)[torch.arange(len(targets)), torch.tensor(targets, device=device)].tolist()
        for (q, o), lp in zip(owners, logp):
            scores[q][o] += lp
    return scores


PACK_TOKENS = 2048  # the most tokens in one prefix tree (an input longer than that gets a tree of its own)


class _Tree:
    """Token sequences that share prefixes, stored once as a tree and flattened in insertion order.

    A token's position is its depth, and it attends to itself and its ancestors only: for each input, exactly
    the causal attention of running that input alone.
    """

    def __init__(self):
        self.tokens: list[int] = []
        self.positions: list[int] = []  # depth in the tree: the token's index in its input
        self.parents: list[int] = []  # flat index of the parent, -1 at a root
        self.reads: list[tuple[tuple, list[int]]] = []  # ((question, option, continuation), flat indices to read)
        self._children: dict[tuple[int, int], int] = {}  # (parent, token) -> flat index

    def new_tokens(self, row: list[int]) -> int:
        """How many tokens adding `row` would append (those beyond its longest prefix already in the tree)."""
        node = -1
        for n, token in enumerate(row):
            node = self._children.get((node, token), -2)
            if node == -2:
                return len(row) - n
        return 0

    def add(self, row: list[int], reader: tuple[int, int, list[int]]) -> None:
        """Add `row`; its last len(continuation) tokens predict the reader's continuation."""
        path, node = [], -1
        for token in row:
            child = self._children.get((node, token))
            if child is None:
                child = self._children[node, token] = len(self.tokens)
                self.tokens.append(token)
                self.positions.append(len(path))
                self.parents.append(node)
            path.append(node := child)
        self.reads.append((reader, path[len(row) - len(reader[2]):]))


def _collate(trees: list[_Tree], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded tokens and positions [B, L], and the additive tree-attention mask [B, 1, L, L]."""
    width = max(len(t.tokens) for t in trees)
    tokens = torch.zeros(len(trees), width, dtype=torch.long)
    positions = torch.zeros(len(trees), width, dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(trees), 1, 1)  # padding sees only itself
    for b, tree in enumerate(trees):
        tokens[b, :len(tree.tokens)] = torch.tensor(tree.tokens)
        positions[b, :len(tree.tokens)] = torch.tensor(tree.positions)
        for i, parent in enumerate(tree.parents):  # parents come first: a token sees what its parent sees
            if parent >= 0:
                allowed[b, i] |= allowed[b, parent]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return tokens, positions, mask[:, None]


# ---------------------------------------------------------------- lm-evaluation-harness's own tasks
LM_EVAL_TASKS = ("piqa", "gsm8k", "race")  # the studies' tasks; any lm-eval task name runs where the hub answers
SPLITS = ("training_split", "validation_split", "test_split", "fewshot_split")  # a task config's split keys


def _lm_eval():
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError("lm-evaluation-harness is the optional extra `eval`: pip install -e '.[eval]'") from e
    return lm_eval


def local_task(name: str, folder: str | Path, manager=None) -> dict:
    """lm-eval's own config of task `name`, reading its splits from `folder` instead of the hub: one
    `<split>.jsonl` per split the task names (piqa: validation; gsm8k: test, and train for its few-shot examples;
    race: test), each row as the task's hub dataset has it. A split without a file is left out (a task that needs
    it, such as gsm8k's few-shot split, then says so). `manager`: an lm-eval TaskManager to reuse."""
    _lm_eval()
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = (manager or TaskManager()).task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise ValueError(f"unknown lm-eval task {name!r}; e.g. {', '.join(LM_EVAL_TASKS)}")
    folder, config = Path(folder).expanduser(), load_yaml(entry.yaml_path)
    named = {config[k] for k in SPLITS if config.get(k)}
    files = {split: str(folder / f"{split}.jsonl") for split in named if (folder / f"{split}.jsonl").is_file()}
    if not files:
        raise ValueError(f"{folder} holds none of {name}'s splits: write them as "
                         f"{', '.join(sorted(f'{split}.jsonl' for split in named))} in the task's row format")
    return config | {k: config.get(k) if config.get(k) in files else None for k in SPLITS} | {
        "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files}}


def lm_eval_tasks(model, tokenizer, tasks: Sequence[str], limit: int | None = None,
                  data: dict[str, str | Path] | None = None, batch_size: int = 8, log_samples: bool = False) -> dict:
    """lm-evaluation-harness's own `tasks` on `model` through its HF model interface (`HFLM` around the model and
    tokenizer as loaded): lm-eval's results, whose `results[task]` holds each task's metrics (`samples` too with
    `log_samples`). `limit` caps the documents per task (lm-eval's --limit); `data` maps tasks to local folders
    of their splits (see `local_task`), for runs without the hub."""
    if tokenizer is None:
        raise ValueError("lm-eval tasks need a tokenizer and this model has none (a random preset?); use a real model")
    extra = set(data or {}) - set(tasks)
    if extra:
        raise ValueError(f"local data for {', '.join(sorted(extra))}, which --tasks does not name; add it to the tasks")
    _lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    specs = [local_task(t, data[t], manager) if t in (data or {}) else t for t in tasks]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_device(model)))
    return simple_evaluate(model=lm, tasks=specs, limit=limit, log_samples=log_samples, task_manager=manager)


def race_docs(examples: Sequence[RaceExample]) -> list[dict]:
    """Rows of lm-eval's race task (EleutherAI/race's layout) from RACE examples: one per article, its questions in
    order as `problems`, a Python literal as that dataset stores it; lm-eval scores each row's last question."""
    problems: dict[str, list[dict]] = {}
    for ex in examples:
        problems.setdefault(ex.article, []).append({"question": ex.question, "options": list(ex.options),
                                                    "answer": ex.answer})
    return [{"example_id": str(i), "article": a, "problems": repr(p)} for i, (a, p) in enumerate(problems.items())]


def race_cross_check(model, tokenizer, data: str | Path | None = None, articles: int | None = None,
                     batch_size: int = 8) -> dict:
    """fastllama's lm-eval mode against lm-eval's own race task on the same articles (the first `articles` of the
    RACE file, all their questions): lm-eval scores each article's last question, its earlier ones as context, and
    `evaluate_race` scores that question. Returns the article count, on how many the same option was chosen, and
    the largest difference of an option's log-likelihood (fastllama's are rounded to 4 decimals)."""
    examples = load_race(data)
    last = {ex.article: ex for ex in examples}  # each article's last question
    kept = list(last)[:articles]
    chosen = set(kept)
    with tempfile.TemporaryDirectory() as folder:
        rows = race_docs([ex for ex in examples if ex.article in chosen])
        (Path(folder) / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        out = lm_eval_tasks(model, tokenizer, ["race"], data={"race": folder}, batch_size=batch_size,
                            log_samples=True)
    theirs = [[ll for ll, _ in s["filtered_resps"]] for s in sorted(out["samples"]["race"], key=lambda s: s["doc_id"])]
    ours = evaluate_race(model, tokenizer, [last[a] for a in kept], mode="lm-eval", batch_size=batch_size).records
    agree = sum(LETTERS[max(range(4), key=t.__getitem__)] == r["chosen"] for t, r in zip(theirs, ours))
    diff = max(abs(a - b) for t, r in zip(theirs, ours) for a, b in zip(t, r["loglik"]))
    log.info("lm-eval race cross-check: %d articles, %d agree, largest log-likelihood difference %.2g", len(kept),
             agree, diff)
    return {"articles": len(kept), "agreements": agree, "max_loglik_diff": diff}
