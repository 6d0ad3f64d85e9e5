"""The fault suite's counters: each test adds what it proved, and the run prints the totals.

inputs fuzzed       bad inputs given to a parser or command, each refused with exit 2 and one line
kills survived      processes killed (SIGKILL) mid-run whose resumed run equalled an uninterrupted one
bad files refused   crafted bad files (pickles, truncated or lying headers, NaN) refused with a clear error
outputs lost        finished outputs found damaged or missing after a fault (goal 0)
"""

from __future__ import annotations

from collections import Counter

KINDS = ("inputs fuzzed", "kills survived", "bad files refused", "outputs lost")
COUNTS: Counter[str] = Counter({kind: 0 for kind in KINDS})


def count(kind: str, n: int = 1) -> None:
    """Adds n to the counter `kind` (one of KINDS)."""
    if kind not in KINDS:
        raise KeyError(f"unknown fault counter {kind!r}; use one of {KINDS}")
    COUNTS[kind] += n


def summary() -> str:
    return "fault suite: " + ", ".join(f"{kind} {COUNTS[kind]:,}" for kind in KINDS)
