"""The largest pruning amount that keeps RACE accuracy at or above a floor.

Bisection over the amount, on the assumption the reference study makes too: accuracy falls as the amount grows.
`search` builds each quantized parent once, evaluates it once, and deep-copies it for each probe of each pruning
dimension. The range searched ends at the largest amount that leaves one unit (channel, 4-bit group, KV group) of
every pruned layer (`prune.max_amount`), and an amount that would remove all of one is a failed probe, not a crash.
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


def search(model, tokenizer, quants: list[str], dims: list[str], floor: float = 0.50,
           floor_relative: float | None = None, importance: str = "l1", race=None, calib=None, tol: float = 0.01,
           hi: float = 0.95, on_result: Callable[[list[SearchResult]], None] | None = None) -> list[SearchResult]:
    """For each quantization in `quants` (a parent built once from a copy of `model`) and each pruning dimension in
    `dims`, the largest amount whose RACE accuracy stays >= the floor. `on_result` gets the results so far after
    each (quant, dim) pair, so a later failure loses nothing found before it.

    `floor_relative` (e.g. 0.9) replaces the absolute floor by that share of each parent's accuracy.
    `race` is what `evaluate_race` takes as data (None: the shipped sample).
    """
    from .evaluate import evaluate_race
    from .prune import DIMS, max_amount, prune_model
    from .recipes import compress, parse_recipe

    bad = [q for q in quants if q not in QUANTS] + [d for d in dims if d not in DIMS]
    if bad:
        raise ValueError(f"unknown quantization or pruning dim {', '.join(map(repr, bad))}; valid quantizations: "
                         f"{', '.join(QUANTS)}; dims: {', '.join(DIMS)}")
    if floor_relative is not None and not 0.0 < floor_relative <= 1.0:
        raise ValueError(f"--floor-relative must be in (0, 1], got {floor_relative}")
    results: list[SearchResult] = []
    for quant in quants:
        parent = copy.deepcopy(model)
        if QUANTS[quant] is not None:
            compress(parent, parse_recipe(QUANTS[quant]), calib=calib, tokenizer=tokenizer)
        base_acc = evaluate_race(parent, tokenizer, data=race).acc
        quant_floor = floor if floor_relative is None else floor_relative * base_acc
        log.info("%s parent: accuracy %.4f, floor %.4f", quant, base_acc, quant_floor)
        for dim in dims:
            def accuracy(amount: float) -> float:
                if amount == 0.0:
                    return base_acc
                try:
                    pruned = prune_model(copy.deepcopy(parent), amount, dim=dim, importance=importance, calib=calib)
                except ValueError as e:  # an amount that would remove every unit of a layer: a failed probe
                    log.info("amount %.4f fails: %s", amount, e)
                    return float("-inf")
                return evaluate_race(pruned, tokenizer, data=race).acc

            top = min(hi, max_amount(parent, dim))
            log.info("%s %s: searching amounts up to %.4f (one unit of the narrowest layer left)", quant, dim, top)
            amount, acc, probes = (bisect_max_amount(accuracy, quant_floor, hi=top, tol=tol) if top > 0 else
                                   (0.0, base_acc, [(0.0, base_acc)]))  # layers of one unit: nothing to prune
            results.append(SearchResult(quant, dim, quant_floor, base_acc, amount, acc, probes))
            if on_result is not None:
                on_result(results)
    return results


def search_table(results: list[SearchResult]) -> str:
    """The reference study's second table: quantization x pruning type -> max amount (markdown)."""
    dims = sorted({r.dim for r in results})
    quants = list(dict.fromkeys(r.quant for r in results))
    cell = {(r.quant, r.dim): f"{r.max_amount:.1%} ({r.acc_at_max:.1%})" for r in results}
    lines = ["| quantization | " + " | ".join(f"max {d} pruning (acc)" for d in dims) + " |",
             "|---|" + "---|" * len(dims)]
    lines += [f"| {q} | " + " | ".join(cell.get((q, d), "—") for d in dims) + " |" for q in quants]
    return "\n".join(lines)
