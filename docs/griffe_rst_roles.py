"""A griffe extension for the API reference: Sphinx roles in docstrings become Markdown.

flexq's docstrings are Google style but name other objects with Sphinx roles
(``:class:`Store```, ``:meth:`resume```) and introduce examples with ``::``. mkdocstrings
renders Markdown, so this turns a role into a cross-reference when it names public API (or a
code span when it does not) and an ``::`` example into a fenced Python block.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

import flexq
import flexq.abc

_ROLE = re.compile(r":(?:class|meth|func|attr|data|exc|obj):`~?([A-Za-z_][\w.]*)`")
_PUBLIC = {name: f"flexq.{name}" for name in flexq.__all__} | {
    name: f"flexq.abc.{name}" for name in flexq.abc.__all__
}


def _public_path(name: str, context: griffe.Object | griffe.Alias) -> str | None:
    """The public dotted path a role's target means, or None if it is not public API."""
    head, _, rest = name.removeprefix("flexq.").partition(".")
    if head == "abc" and rest:
        head, _, rest = rest.partition(".")
    if head in _PUBLIC:
        return _PUBLIC[head] + (f".{rest}" if rest else "")
    owner: Any = context if isinstance(context, griffe.Class) else context.parent
    if isinstance(owner, griffe.Class) and owner.name in _PUBLIC and head in owner.members:
        return f"{_PUBLIC[owner.name]}.{name}"
    return None


def _convert(text: str, context: griffe.Object | griffe.Alias) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match[1]
        path = _public_path(name, context)
        return f"[`{name}`][{path}]" if path else f"`{name}`"

    text = _ROLE.sub(replace, text)
    return _fence_literal_blocks(text)


def _fence_literal_blocks(text: str) -> str:
    """Turn ``intro::`` plus an indented block into ``intro:`` plus a fenced Python block."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and i + 2 < len(lines) and not lines[i + 1].strip():
            out.append(line.rstrip()[:-1])
            block: list[str] = []
            j = i + 2
            while j < len(lines) and (not lines[j].strip() or lines[j].startswith((" ", "\t"))):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
            out += ["", "```python", *textwrap.dedent("\n".join(block)).splitlines(), "```", ""]
            i = j
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class RstRoles(griffe.Extension):
    """Rewrites every loaded docstring once, before mkdocstrings parses it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _convert(obj.docstring.value, obj)
