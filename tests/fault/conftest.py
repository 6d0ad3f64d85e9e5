"""Prints the fault suite's totals (tests/fault/tally.py) at the end of a run that used it."""

from __future__ import annotations

from tests.fault import tally


def pytest_terminal_summary(terminalreporter) -> None:
    if any(tally.COUNTS.values()):
        terminalreporter.write_line(tally.summary())
