"""Calibration text for GPTQ and activation-aware pruning, and the RACE reading-comprehension loader.

    calibration(tokenizer, source=None)   token windows [nsamples, seqlen]: C4, a local text, or the model's samples
    load_race(path=None)                  RACE examples: ehovy/race (high, test) from the hub, or a .jsonl/.parquet

The hub is only tried when it answers within a second or two: offline, everything falls back at once.
"""

from __future__ import annotations

import json
import logging
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
RACE_SAMPLE = DATA_DIR / "race_sample.jsonl"  # the project's own RACE-format sample (original text)
PPL_TEXT = DATA_DIR / "ppl.txt"  # the project's own prose for perplexity (not calibration text)

C4_FILE = "en/c4-validation.00000-of-00008.json.gz"  # the shard GPTQ papers calibrate on
RACE_HUB = "ehovy/race"  # RACE on the hub; its config "high", split "test" is RACE-H
TEXT_SUFFIXES = (".txt", ".md")  # files read from a calibration folder
# 64 x 256 = 16k tokens: GPTQ on the embedded model improved held-out perplexity from 8k to 16k tokens and no
# further at 32k or 64k, which cost 1.7x and 3.1x the time of 16k (act-order, licence and package-doc text)
CALIB_SAMPLES, CALIB_SEQLEN = 64, 256
LETTERS = "ABCD"


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the Hugging Face Hub is not switched off (HF_HUB_OFFLINE) and answers a TCP connect in `timeout` s."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


# ---------------------------------------------------------------- calibration
def calibration(tokenizer, source: str | Path | None = None, nsamples: int = CALIB_SAMPLES, seqlen: int = CALIB_SEQLEN,
                model=None, seed: int = 0) -> torch.LongTensor:
    """`nsamples` windows of `seqlen` token ids (a CPU LongTensor [nsamples, seqlen]) for calibration.

    source: a text file or a folder of .txt/.md files; or None: C4 (allenai/c4, English validation shard) when
    the hub is reachable, else text sampled from `model` itself. Windows are drawn with `seed`, so the same
    arguments give the same tensor. `tokenizer` may be None only when sampling from the model.
    """
    return calibration_with_source(tokenizer, source, nsamples, seqlen, model, seed)[0]


def calibration_with_source(tokenizer, source: str | Path | None = None, nsamples: int = 128, seqlen: int = 512,
                            model=None, seed: int = 0) -> tuple[torch.LongTensor, str]:
    """`calibration` and where its text came from: "file:PATH", "c4" or "model samples" (the silent fallback when
    the hub is unreachable), to record beside what it calibrated (checkpoints, report results)."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"calibration needs nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    if source is not None:
        path = Path(source).expanduser()
        return _from_text(tokenizer, path, nsamples, seqlen, seed), f"file:{path}"
    if tokenizer is not None and hub_reachable():
        try:
            return _from_c4(tokenizer, nsamples, seqlen, seed), "c4"
        except Exception as e:  # the hub answered but the dataset did not (rate limit, gated, moved): fall back
            log.warning("C4 calibration failed (%s: %s); falling back to text sampled from the model",
                        type(e).__name__, e)
    if model is None:
        raise ValueError("no calibration source: the hub (C4) is unreachable and no model was given to sample from; "
                         "pass source=PATH (a text file or folder) or model=MODEL")
    return _from_model(model, tokenizer, nsamples, seqlen, seed), "model samples"


def check_calib(calib, who: str) -> None:
    """ValueError, naming `who`, unless `calib` is a non-empty LongTensor of token ids [nsamples, seqlen]."""
    if calib is None or calib.dtype != torch.long or calib.dim() != 2 or calib.numel() == 0:
        raise ValueError(f"{who} needs calibration token ids, a LongTensor [nsamples, seqlen]: "
                         "fastllama.data.calibration(tokenizer, model=model)")


@torch.no_grad()
def run_calibration(model, calib: torch.Tensor, hooks: list, desc: str, batch_size: int = 8) -> None:
    """Feed `calib` token ids [n, seqlen] through `model` in batches, with the hook `handles` attached; they are
    removed afterwards, also on error. What the hooks record is the caller's result."""
    try:
        device = next(model.parameters()).device
        for batch in tqdm(calib.split(batch_size), desc=desc, leave=False):
            model(batch.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()

def _windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.LongTensor:
    """`nsamples` seeded random windows of `seqlen` tokens from one long 1-D token stream."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()]).long()


def _read_text(path: Path) -> str:
    """The text of a file, or of every .txt/.md file under a folder (sorted, joined by blank lines)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"calibration folder {path} has no {'/'.join(TEXT_SUFFIXES)} files; "
                             "put text files in it or pass a single file")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"no calibration text at {path}; pass an existing text file or folder")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def _from_text(tokenizer, path: Path, nsamples: int, seqlen: int, seed: int) -> torch.LongTensor:
    if tokenizer is None:
        raise ValueError(f"calibration text {path} needs a tokenizer, and the model has none; "
                         "use a model spec with a tokenizer, or source=None to sample from the model")
    text = _read_text(path)
    if not text.strip():
        raise ValueError(f"calibration text {path} is empty; pass a file with at least {seqlen} tokens of text")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    if len(ids) < seqlen:
        raise ValueError(f"calibration text {path} has {len(ids)} tokens, fewer than seqlen={seqlen}; "
                         "pass a longer text or a smaller seqlen")
    log.info("calibration: %d x %d tokens from %s (%d tokens of text)", nsamples, seqlen, path, len(ids))
    return _windows(ids, nsamples, seqlen, seed)


def _from_c4(tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.LongTensor:
    """GPTQ's recipe: random documents longer than `seqlen`, one random window from each."""
    from datasets import load_dataset

    docs = load_dataset("allenai/c4", data_files={"validation": C4_FILE}, split="validation")
    rng, rows = random.Random(seed), []
    for _ in range(100 * nsamples):
        ids = tokenizer(docs[rng.randrange(len(docs))]["text"], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) > seqlen:
            start = rng.randrange(len(ids) - seqlen + 1)
            rows.append(ids[start:start + seqlen])
            if len(rows) == nsamples:
                log.info("calibration: %d x %d tokens from C4 (%s)", nsamples, seqlen, C4_FILE)
                return torch.tensor(rows, dtype=torch.long)
    raise ValueError(f"C4 has too few documents longer than seqlen={seqlen} tokens; use a smaller seqlen")


@torch.inference_mode()
def _from_model(model, tokenizer, nsamples: int, seqlen: int, seed: int, batch_size: int = 64) -> torch.LongTensor:
    """Text the model writes itself (as in LLM-QAT): a random first token, then `seqlen - 1` tokens sampled from its
    distribution (never its end-of-text token), `batch_size` rows at a time on fastllama's static-cache decoder.

    Each token is drawn by inverse CDF (a uniform number searched in the cumulated probabilities): `torch.multinomial`
    draws one sample through an exponential variate per vocabulary entry, 58 ms a step for 64 rows of SmolLM2's 49152,
    a quarter of the step. 64 x 96 tokens of the embedded model on 2 AVX2 cores: 15.1-15.4 s against 21.6-21.9 s on
    transformers' `generate`; 64 rows at a time against 32: 19.8 against 25.9 s on `generate`."""
    from .generate import Decoder

    vocab = model.config.vocab_size
    eos = getattr(tokenizer, "eos_token_id", None) or model.config.eos_token_id
    log.info("calibration: %d x %d tokens sampled from the model (seed %d): no hub and no text source given",
             nsamples, seqlen, seed)
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    positions = torch.arange(seqlen, device=device)  # built once: a position made from host data each step syncs
    rows = []
    for n in tqdm(range(0, nsamples, batch_size), desc="sampling calibration text", leave=False):
        out = torch.empty(min(batch_size, nsamples - n), seqlen, dtype=torch.long, device=device)
        out[:, 0] = torch.randint(0, vocab, (len(out),), generator=gen, device=device)
        decoder = Decoder(model, seqlen, batch_size=len(out), compile=False)
        for pos in range(seqlen - 1):
            logits = decoder.forward(out[:, pos:pos + 1], positions[pos:pos + 1])
            if eos is not None:
                logits[:, eos] = -torch.inf
            out[:, pos + 1] = _draw(logits, gen)
        rows.append(out)
    return torch.cat(rows).cpu()


def _draw(logits: torch.Tensor, gen: torch.Generator) -> torch.LongTensor:
    """One index per row of `logits` [rows, n], drawn from their softmax by inverse CDF (see `_from_model`)."""
    cdf = logits.float().softmax(-1).cumsum(-1)
    u = 1 - torch.rand(len(cdf), 1, generator=gen, device=cdf.device)  # in (0, 1]: never an index of mass 0
    return torch.searchsorted(cdf, u * cdf[:, -1:])[:, 0].clamp_(max=cdf.shape[-1] - 1)


# ---------------------------------------------------------------- RACE
@dataclass(frozen=True)
class RaceExample:
    """One RACE question: an article, a question, four options and the gold letter."""

    article: str  # the reading passage
    question: str  # the question, or a sentence with a blank (`  _  .`) to complete
    options: tuple[str, str, str, str]  # the option texts, labelled A-D in order
    answer: str  # the gold letter, A-D
    id: str = ""  # where it came from ("file:row" or the hub's example_id and question number)
    prior: tuple[tuple[str, str], ...] = ()  # (question, gold option) of the article's earlier questions (lm-eval)


_RACE_FIELDS = ("article", "question", "options", "answer")


def load_race(path: str | Path | None = None, limit: int | None = None, seed: int = 0) -> list[RaceExample]:
    """RACE questions from a local .jsonl/.parquet (fields article, question, options, answer), from the hub
    (path="ehovy/race": its high/test split), or with path=None the hub when it is reachable, else the shipped
    sample (with a warning).

    Every row is validated; `limit` keeps a fixed subset of that many questions chosen with `seed`, in file order.
    """
    if path == RACE_HUB or (path is None and hub_reachable()):
        if path == RACE_HUB and not hub_reachable():
            raise ValueError(f"{RACE_HUB} needs the Hugging Face Hub, which is unreachable; download the high/test "
                             "split elsewhere as .parquet or .jsonl and pass its path")
        from datasets import load_dataset

        rows, where = list(load_dataset(RACE_HUB, "high", split="test")), f"{RACE_HUB} (high, test)"
    else:
        if path is None:
            log.warning("the hub is unreachable: evaluating on the shipped RACE-format sample %s, not RACE-H; "
                        "pass a local RACE file for the real benchmark", RACE_SAMPLE)
        path = Path(path or RACE_SAMPLE).expanduser()
        rows, where = _read_rows(path), str(path)
    examples = subset(_to_examples(rows, where), limit, seed)
    log.info("RACE: %d questions from %s", len(examples), where)
    return examples


def subset(examples: list, limit: int | None, seed: int = 0) -> list:
    """A fixed subset of `limit` items drawn with `seed`, in their original order (all of them for None)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of questions, got {limit}; or None for all")
    if limit is None or limit >= len(examples):
        return examples
    return [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), limit))]


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"no RACE file at {path}; pass a .jsonl or .parquet file with the fields "
                                f"{', '.join(_RACE_FIELDS)}")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: row {i} is not valid JSON ({e}); "
                                     "each line must be one JSON object") from e
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"RACE file {path} must be .jsonl or .parquet, got {path.suffix!r}; convert it to one of those")


def _to_examples(rows: list[dict], where: str) -> list[RaceExample]:
    """Validated examples; each carries the earlier questions on its article (the lm-eval prompt shows them)."""
    if not rows:
        raise ValueError(f"{where} has no RACE rows; pass a file with at least one question")
    examples, seen = [], {}
    for i, row in enumerate(rows, 1):
        _check_row(row, where, i)
        options = tuple(str(o) for o in row["options"])
        prior = seen.setdefault(row["article"], [])
        uid = f"{row['example_id']}#{len(prior)}" if row.get("example_id") else f"{Path(where).name}:{i}"
        examples.append(RaceExample(row["article"], row["question"], options, row["answer"], uid, tuple(prior)))
        prior.append((row["question"], options[LETTERS.index(row["answer"])]))
    return examples


def _check_row(row, where: str, i: int) -> None:
    def bad(field: str, why: str):
        return ValueError(f"{where}: row {i}: field {field!r} {why}; every row needs article, question (strings), "
                          "options (4 strings) and answer (one of A, B, C, D)")

    if not isinstance(row, dict):
        raise bad("(row)", f"is a {type(row).__name__}, not an object")
    for field in _RACE_FIELDS:
        if field not in row:
            raise bad(field, "is missing")
    for field in ("article", "question"):
        if not isinstance(row[field], str) or (field == "article" and not row[field].strip()):
            raise bad(field, "must be a non-empty string")
    options = row["options"]
    if not isinstance(options, (list, tuple)) or len(options) != 4 or not all(isinstance(o, str) for o in options):
        n = len(options) if isinstance(options, (list, tuple)) else type(options).__name__
        raise bad("options", f"has {n} options, not 4 strings")
    if row["answer"] not in tuple(LETTERS):
        raise bad("answer", f"is {row['answer']!r}, not one of A, B, C, D")
