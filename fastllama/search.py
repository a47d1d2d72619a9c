"""The largest pruning amount that keeps RACE accuracy at or above a floor.

Bisection over the amount, on the assumption the reference study makes too: accuracy falls as the amount grows.
The quantized parent is built once and deep-copied for each probe, so a search quantizes only once.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

QUANTS = {"none": None, "gptq4": "gptq4", "gptq8": "gptq8"}


@dataclass
class SearchResult:
    quant: str                  # none, gptq4 or gptq8: the parent the pruning starts from
    dim: str                    # input, output, mlp or heads
    floor: float                # the absolute accuracy floor that was applied
    base_acc: float             # accuracy of the unpruned (possibly quantized) parent
    max_amount: float           # the largest amount found with accuracy >= floor (0.0 if none)
    acc_at_max: float           # accuracy at max_amount
    probes: list[tuple[float, float]] = field(default_factory=list)  # (amount, accuracy) in the order tried

    def to_dict(self) -> dict:
        return asdict(self)


def bisect_max_amount(accuracy: Callable[[float], float], floor: float, lo: float = 0.0, hi: float = 0.95,
                      tol: float = 0.01) -> tuple[float, float, list[tuple[float, float]]]:
    """Largest amount in [lo, hi] with accuracy(amount) >= floor, to within `tol`.

    `accuracy(lo)` is assumed to pass (it is the parent's accuracy when lo == 0). Returns
    (amount, its accuracy, the probes as (amount, accuracy) pairs).
    """
    if not 0.0 <= lo < hi < 1.0:
        raise ValueError(f"the search range must satisfy 0 <= lo < hi < 1, got lo={lo}, hi={hi}")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    probes: list[tuple[float, float]] = []

    def probe(amount: float) -> float:
        acc = accuracy(amount)
        probes.append((amount, acc))
        log.info("amount %.4f: accuracy %.4f (floor %.4f)", amount, acc, floor)
        return acc

    best, best_acc = lo, probe(lo)
    if best_acc < floor:
        return lo, best_acc, probes
    acc_hi = probe(hi)
    if acc_hi >= floor:
        return hi, acc_hi, probes
    while hi - best > tol:
        mid = round((best + hi) / 2, 6)
        acc = probe(mid)
        if acc >= floor:
            best, best_acc = mid, acc
        else:
            hi = mid
    return best, best_acc, probes


def search_pruning(model, tokenizer, quant: str = "none", dim: str = "input", floor: float = 0.50,
                   floor_relative: float | None = None, importance: str = "l1", race=None, calib=None,
                   tol: float = 0.01, hi: float = 0.95) -> SearchResult:
    """Largest `dim` pruning amount on top of `quant` whose RACE accuracy stays >= the floor.

    `floor_relative` (e.g. 0.9) replaces the absolute floor by that share of the parent's accuracy.
    `race` is what `evaluate_race` takes as data (None: the shipped sample). `model` is quantized in place.
    """
    from .evaluate import evaluate_race
    from .prune import prune_model
    from .recipes import compress, parse_recipe

    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; valid: {', '.join(QUANTS)}")
    parent = model if QUANTS[quant] is None else compress(model, parse_recipe(QUANTS[quant]), calib=calib,
                                                          tokenizer=tokenizer)
    base_acc = evaluate_race(parent, tokenizer, data=race).acc
    if floor_relative is not None:
        if not 0.0 < floor_relative <= 1.0:
            raise ValueError(f"--floor-relative must be in (0, 1], got {floor_relative}")
        floor = floor_relative * base_acc
    log.info("%s parent: accuracy %.4f, floor %.4f", quant, base_acc, floor)

    def accuracy(amount: float) -> float:
        if amount == 0.0:
            return base_acc
        pruned = prune_model(copy.deepcopy(parent), amount, dim=dim, importance=importance, calib=calib)
        return evaluate_race(pruned, tokenizer, data=race).acc

    amount, acc, probes = bisect_max_amount(accuracy, floor, hi=hi, tol=tol)
    return SearchResult(quant, dim, floor, base_acc, amount, acc, probes)


def search_table(results: list[SearchResult]) -> str:
    """The reference study's second table: quantization x pruning type -> max amount (markdown)."""
    dims = sorted({r.dim for r in results})
    quants = list(dict.fromkeys(r.quant for r in results))
    cell = {(r.quant, r.dim): f"{r.max_amount:.1%} ({r.acc_at_max:.1%})" for r in results}
    lines = ["| quantization | " + " | ".join(f"max {d} pruning (acc)" for d in dims) + " |",
             "|---|" + "---|" * len(dims)]
    lines += [f"| {q} | " + " | ".join(cell.get((q, d), "—") for d in dims) + " |" for q in quants]
    return "\n".join(lines)
