"""The documentation's code runs, and its tables match the code.

A fenced block that opens with ```` ```python {.runnable} ```` is a complete program. The test
runs its ``async def main()`` and every ``async def test_*()`` it defines, under each event
loop. Other Python blocks only have to compile.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

import flexq
import flexq.abc
import flexq.testing

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(
    r"^```python(?P<info>[^\n]*)\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL
)
RUNNABLE = "{.runnable}"


@dataclasses.dataclass(frozen=True)
class Block:
    """One Python code block of a docs page."""

    page: Path
    line: int
    """The line of the block's first line of code, 1-based."""
    code: str
    runnable: bool

    @property
    def name(self) -> str:
        return f"{self.page.name}:{self.line}"

    def compiled(self) -> Any:
        """The block's code object, with line numbers as in the page."""
        return compile("\n" * (self.line - 1) + self.code, str(self.page), "exec")


def python_blocks() -> list[Block]:
    """Every ```python block of every docs page, in page order."""
    blocks = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start("code")) + 1
            runnable = match["info"].strip() == RUNNABLE
            blocks.append(Block(page, line, match["code"], runnable))
    return blocks


BLOCKS = python_blocks()
RUNNABLE_BLOCKS = [block for block in BLOCKS if block.runnable]


def test_the_docs_have_runnable_blocks() -> None:
    """The block pattern still finds the runnable examples (a renamed marker would hide them)."""
    assert len(RUNNABLE_BLOCKS) >= 10


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_every_python_block_compiles(block: Block) -> None:
    """Every Python block on a docs page is valid Python."""
    block.compiled()


@pytest.mark.parametrize("block", RUNNABLE_BLOCKS, ids=[block.name for block in RUNNABLE_BLOCKS])
async def test_runnable_block_runs(
    block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runnable block's main() and test_*() coroutines complete without error."""
    monkeypatch.chdir(tmp_path)  # a block may use the default sqlite:///flexq.db
    namespace: dict[str, Any] = {"__name__": f"docs_{block.page.stem}_{block.line}"}
    exec(block.compiled(), namespace)
    entries: list[Callable[[], Coroutine[Any, Any, None]]] = [
        value
        for name, value in namespace.items()
        if (name == "main" or name.startswith("test_")) and inspect.iscoroutinefunction(value)
    ]
    assert entries, f"{block.name} defines no async main() or test_*()"
    with anyio.fail_after(30):
        for entry in entries:
            await entry()


def test_transition_table_in_concepts_matches_flexq() -> None:
    """The table of legal moves on the concepts page is flexq.TRANSITIONS."""
    text = (DOCS / "concepts.md").read_text(encoding="utf-8")
    table = text[text.index("| from | to |") :].split("\n\n", 1)[0].splitlines()[2:]
    documented: dict[flexq.State, frozenset[flexq.State]] = {}
    for row in table:
        source, targets = (cell.strip() for cell in row.strip("|").split("|"))
        documented[flexq.State(source.strip("`"))] = frozenset(
            flexq.State(name) for name in re.findall(r"`(\w+)`", targets)
        )
    assert documented == flexq.TRANSITIONS


def test_api_reference_covers_every_public_name() -> None:
    """docs/api.md documents each name in flexq.__all__, flexq.abc and flexq.testing."""
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: (flexq\.[\w.]+)$", text, re.MULTILINE))
    expected = {f"flexq.{name}" for name in flexq.__all__}
    expected |= {f"flexq.abc.{name}" for name in flexq.abc.__all__}
    expected |= {f"flexq.testing.{name}" for name in flexq.testing.__all__}
    assert sorted(expected - documented) == []
