"""What the perf budgets gate with, apart from the machine: floors, the slowdown used to test them, and the rules
a budget file keeps (checked by tests/unit/test_perf_budgets.py, so a loose floor cannot land)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest

FLOOR_FRACTION = 0.85  # the lowest a floor may sit under its measured median: a 20% slowdown gives 1/1.2 = 0.833
# the sections whose entries carry a measured floor
SECTIONS = ("speedup", "vs_parent", "tokens_per_s", "peers", "prefill_peers")


def slowed(step: Callable, fraction: float, sync: Callable[[], None] = lambda: None) -> Callable:
    """`step` made `fraction` slower: after each call (and `sync`), wait `fraction` of the call's own time."""
    def slow(*args, **kwargs):
        start = time.perf_counter()
        out = step(*args, **kwargs)
        sync()
        time.sleep(fraction * (time.perf_counter() - start))
        return out

    return slow


def check_floor(what: str, measured: float, floor: float, entry: dict, where: str) -> None:
    """Fail when `measured` is under `floor`, giving both; an entry with `known_failure` xfails instead. A pass prints
    both (`pytest -rA` shows them)."""
    message = f"{what}: measured {measured:.4g}, floor {floor:.4g} ({where})"
    print(message)
    if measured >= floor:
        return
    if "known_failure" in entry:
        pytest.xfail(f"{message}; known: {entry['known_failure']}")
    pytest.fail(message)


def budget_problems(budget: dict) -> list[str]:
    """What breaks the rules in a budget file: every floor (ceiling) is set from measurements on its machine class,
    at most FLOOR_FRACTION under (1 / FLOOR_FRACTION over) their median, or says why it is unmeasured; every name
    refers to a recipe of the file."""
    problems = [f"missing key {k!r}" for k in ("device_class", "note", "model", "dtype", "prompt_len", "new_tokens",
                                               "rounds", "recipes") if k not in budget]
    if budget.get("device_class") == "cpu" and "capability" not in budget:
        problems.append("a CPU budget names the CPU capability it was measured on ('capability')")
    recipes = budget.get("recipes", {})
    for section in (*SECTIONS, "memory"):
        for name, entry in budget.get(section, {}).items():
            where = f"{section}.{name}"
            if name not in recipes:
                problems.append(f"{where}: no recipe {name!r} in 'recipes'")
            if section == "vs_parent" and entry.get("parent") not in recipes:
                problems.append(f"{where}: parent {entry.get('parent')!r} is not a recipe of this file")
            if "unmeasured" in entry:
                continue
            limits = {k: v for k, v in entry.items() if k == "floor" or k.startswith("max_")}
            for key, limit in limits.items():
                measured = entry.get("measured" if key == "floor" else f"measured_{key[4:]}")
                if not measured:
                    problems.append(f"{where}: {key} needs its measurements ('measured' for a floor, "
                                    f"'measured_{key[4:]}' for a ceiling) or 'unmeasured' (why)")
                    continue
                median = statistics.median(measured)
                if key == "floor" and limit < FLOOR_FRACTION * median:
                    problems.append(f"{where}: floor {limit} sits more than {1 - FLOOR_FRACTION:.0%} under the "
                                    f"measured median {median:.4g}")
                if key != "floor" and limit > median / FLOOR_FRACTION:
                    problems.append(f"{where}: {key} {limit} sits more than {1 / FLOOR_FRACTION - 1:.0%} over the "
                                    f"measured median {median:.4g}")
    return problems
