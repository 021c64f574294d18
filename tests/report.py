"""Figures the tests measure (cases run, recovery times, load rates), printed together after the run.

Tests call ``figure(section, text)``; the conftest prints every figure at the end of the session, so a run
of `.ci/run` shows what was measured next to what passed.
"""

from __future__ import annotations

FIGURES: list[tuple[str, str]] = []


def figure(section: str, text: str) -> None:
    FIGURES.append((section, text))
