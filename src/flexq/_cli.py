"""The ``flexq`` command: ``flexq migrate`` creates or migrates a store's schema, or checks it."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import urllib.parse
from typing import TYPE_CHECKING

import anyio

from flexq._errors import FlexqError, InvalidArguments, SchemaVersionError
from flexq._store.base import VersionedStore
from flexq._store.url import store_from_url

if TYPE_CHECKING:
    from collections.abc import Sequence

    from flexq._store.base import SchemaStatus

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PENDING = 3
EXIT_NEWER = 4

_EPILOG = f"""\
The URL is a sqlite:///path/to/file.db or postgresql://user@host/database URL (with
?schema=NAME, or --schema), as flexq.Queue takes it; without one, $FLEXQ_URL is used.

exit codes:
  {EXIT_OK}  done, or (--check) the schema is up to date
  {EXIT_ERROR}  error: bad URL, database unreachable, ...
  {EXIT_USAGE}  bad command line
  {EXIT_PENDING}  (--check) migrations are pending: run flexq migrate
  {EXIT_NEWER}  the schema is newer than this flexq: upgrade flexq (nothing was changed)
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: the process's); returns the exit code."""
    args = _parser().parse_args(argv)
    url: str | None = args.url or os.environ.get("FLEXQ_URL")
    if not url:
        command: argparse.ArgumentParser = args.command
        command.error("give the store's URL, or set FLEXQ_URL")
    try:
        store = store_from_url(url, schema=args.schema)
        if not isinstance(store, VersionedStore):
            raise InvalidArguments(
                f"{url!r} has no schema to migrate: flexq migrate is for sqlite:// and"
                " postgresql:// URLs"
            )
        if args.check:
            return _check(anyio.run(store.schema_status))
        print(_report(anyio.run(store.migrate)))
    except SchemaVersionError as exc:
        _fail(exc, url)
        return EXIT_NEWER
    except FlexqError as exc:
        _fail(exc, url)
        return EXIT_ERROR
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexq", description="The flexq job queue's command line."
    )
    parser.add_argument(
        "--version", action="version", version=f"flexq {importlib.metadata.version('flexq')}"
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    migrate = commands.add_parser(
        "migrate",
        help="create or migrate a store's schema to this flexq's version",
        description=(
            "Create the store's schema, or apply the migrations it lacks, and say what was\n"
            "done. Processes that run it (or open a queue) at once take turns. With --check,\n"
            "change nothing and say whether migrations are pending."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    migrate.set_defaults(command=migrate)
    migrate.add_argument("url", nargs="?", metavar="URL", help="the store (default: $FLEXQ_URL)")
    migrate.add_argument(
        "--schema", metavar="NAME", help="the PostgreSQL schema (over the URL's ?schema=)"
    )
    migrate.add_argument(
        "--check",
        action="store_true",
        help=f"change nothing; exit {EXIT_PENDING} if migrations are pending",
    )
    return parser


def _report(status: SchemaStatus) -> str:
    if status.version == status.latest:
        return f"{status.where}: already at version {status.latest}"
    if status.version == 0:
        head = f"{status.where}: created at version {status.latest}"
    else:
        head = f"{status.where}: version {status.version} -> {status.latest}"
    return "\n".join([head, *(f"  applied {v}: {what}" for v, what in status.applied)])


def _check(status: SchemaStatus) -> int:
    if status.version > status.latest:
        raise SchemaVersionError(status.where, status.version, status.latest)
    if status.version == status.latest:
        print(f"{status.where}: version {status.version}, up to date")
        return EXIT_OK
    found = "no flexq schema" if status.version == 0 else f"version {status.version}"
    print(
        f"{status.where}: {found}, this flexq's is {status.latest}: migrations pending"
        " (run flexq migrate)"
    )
    return EXIT_PENDING


def _fail(error: FlexqError, url: str) -> None:
    message = " ".join(str(error).split())
    password = urllib.parse.urlsplit(url).password
    if password:
        message = message.replace(f":{password}@", ":***@")
    print(f"flexq: error: {message}", file=sys.stderr)
