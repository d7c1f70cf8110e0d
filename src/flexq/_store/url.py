"""Store selection from a URL."""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any

from flexq._errors import FlexqError, InvalidArguments
from flexq._store.memory import MemoryStore
from flexq._store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from flexq._store.base import Store


def store_from_url(url: str, *, schema: str | None = None, migrate: bool = True) -> Store:
    """The store a URL names: ``memory://``, ``sqlite:///relative.db``, ``sqlite:////abs.db``.

    SQLite URLs take ``?synchronous=NORMAL|FULL`` (default NORMAL: durable across process
    crashes; FULL: also across power loss).

    ``postgresql://`` (or ``postgres://``) URLs select the PostgreSQL store and take
    ``?schema=NAME`` (default ``flexq``) and ``?connections=N`` (default 4); other query
    parameters go to libpq as they are (``sslmode=require``, say). ``schema`` overrides the
    URL's schema.

    ``migrate=False`` makes a SQLite or PostgreSQL store check its schema's version when it
    opens instead of migrating it.
    """
    parsed = urllib.parse.urlsplit(url)
    if schema is not None and parsed.scheme not in ("postgresql", "postgres"):
        raise InvalidArguments(f"schema= is for postgresql:// URLs, not {url!r}")
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
        return SQLiteStore(path, synchronous=options.get("synchronous", "NORMAL"), migrate=migrate)
    if parsed.scheme in ("postgresql", "postgres"):
        return _postgres(parsed, schema, migrate)
    raise InvalidArguments(
        f"unsupported store URL {url!r}: use 'memory://', 'sqlite:///path/to/file.db'"
        " or 'postgresql://user@host/database'"
    )


def _postgres(parsed: urllib.parse.SplitResult, schema: str | None, migrate: bool) -> Store:
    try:
        from flexq._store.postgres import PostgresStore
    except ModuleNotFoundError as exc:
        if exc.name != "psycopg":
            raise
        raise FlexqError("postgresql:// URLs need psycopg: pip install 'flexq[postgres]'") from exc

    options: dict[str, Any] = {"migrate": migrate}
    libpq = []
    for name, value in urllib.parse.parse_qsl(parsed.query, keep_blank_values=True):
        if name == "schema":
            options["schema"] = value
        elif name == "connections":
            try:
                options["connections"] = int(value)
            except ValueError:
                raise InvalidArguments(f"connections must be an int, not {value!r}") from None
        else:
            libpq.append((name, value))
    if schema is not None:
        options["schema"] = schema
    dsn = parsed._replace(query=urllib.parse.urlencode(libpq)).geturl()
    return PostgresStore(dsn, **options)
