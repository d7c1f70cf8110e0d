"""Store selection from a URL."""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING

from flexq._errors import InvalidArguments
from flexq._store.memory import MemoryStore
from flexq._store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from flexq._store.base import Store


def store_from_url(url: str) -> Store:
    """The store a URL names: ``memory://``, ``sqlite:///relative.db``, ``sqlite:////abs.db``.

    SQLite URLs take ``?synchronous=NORMAL|FULL`` (default NORMAL: durable across process
    crashes; FULL: also across power loss).
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "memory":
        return MemoryStore()
    if parsed.scheme == "sqlite":
        path = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
        if parsed.netloc == ":memory:" or path == ":memory:":
            path = ":memory:"
        if not path:
            raise InvalidArguments(f"{url!r} names no file: use sqlite:///flexq.db")
        options = dict(urllib.parse.parse_qsl(parsed.query))
        unknown = set(options) - {"synchronous"}
        if unknown:
            raise InvalidArguments(f"unknown SQLite option(s) {sorted(unknown)} in {url!r}")
        return SQLiteStore(path, synchronous=options.get("synchronous", "NORMAL"))
    raise InvalidArguments(
        f"unsupported store URL {url!r}: use 'memory://' or 'sqlite:///path/to/file.db'"
    )
