"""Fixtures of the fault suite (`make faults`); the helpers are in faultlib.py.

Every test records what it measured with the `figures` fixture; the figures are printed
at the end of the run (and written as JSON to $FAULTS_FIGURES when it is set), so
`make faults` shows them and the README's "Reliability" section can quote them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_FIGURES: dict[str, dict[str, Any]] = {}


@pytest.fixture
def figures(request) -> Iterator[dict[str, Any]]:
    """A dict for the test's figures, printed under its name at the end of the run."""
    found: dict[str, Any] = {}
    yield found
    if found:
        _FIGURES[request.node.name] = found


def pytest_terminal_summary(terminalreporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("fault suite figures")
    for test, values in _FIGURES.items():
        terminalreporter.write_line(f"{test}:")
        for key, value in values.items():
            terminalreporter.write_line(f"    {key}: {value}")
    target = os.environ.get("FAULTS_FIGURES")
    if target:
        Path(target).write_text(json.dumps(_FIGURES, indent=2, sort_keys=True) + "\n")
