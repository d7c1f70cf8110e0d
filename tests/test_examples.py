"""Every program under examples/ runs as it is, under each event loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
EXPECTED = {
    "app.py": ["acme: "],
    "batch_reindex.py": [
        "why does 'archive' wait?",
        "holding #1",
        "acme     customers  COMPLETED",
        "(chunk 6: document 333 of customers is corrupt)",
    ],
    "callouts.py": [
        "receipt for A-1 (p-",
        "receipt for A-2 (p-",
        "receipt for G-1 (p-",
        "charge_card",
        "send_receipt",
    ],
    "schedules.py": [
        "WAITING: the fan-in waits for 3 jobs",
        "published: 535 orders in all",
        "billing is up",
    ],
}
"""Lines each example must print, beyond exiting with 0."""


def test_every_example_is_checked() -> None:
    """A new example gets its expected output here."""
    assert sorted(EXPECTED) == [path.name for path in EXAMPLES]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("example", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs(example: Path, backend: str, tmp_path: Path) -> None:
    """The example exits cleanly within two minutes and prints what it is meant to."""
    result = subprocess.run(
        [sys.executable, str(example), "--backend", backend],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # the example's database goes here
    )
    assert result.returncode == 0, result.stderr
    for expected in EXPECTED[example.name]:
        assert expected in result.stdout, result.stdout
