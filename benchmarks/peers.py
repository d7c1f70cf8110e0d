"""Peers and machine limits, measured by the shared scripts in a venv of their own.

The peers are not flexq dependencies: they live in ``.peers/`` at the repository root, made
here on first use. The scripts are those of ``../shared/bench-peers/`` beside the repository.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPTS = ROOT.parent / "shared" / "bench-peers"
PEERS_VENV = ROOT / ".peers"
PEER_PACKAGES = [
    "apscheduler>=4.0.0a1",
    "sqlalchemy[asyncio]",
    "aiosqlite",
    "anyio",
    # APScheduler 4.0.0a6 imports sniffio without requiring it, and recent anyio dropped it.
    "sniffio",
    # limits.py measures task spawning under trio too.
    "trio",
    # The PostgreSQL peers.
    "pgqueuer",
    "procrastinate",
    "asyncpg",
    "psycopg[binary]",
]
PEER_IMPORTS = (
    "import apscheduler, sqlalchemy, aiosqlite, anyio, sniffio, trio, pgqueuer, procrastinate"
)

_APS = re.compile(
    r"apscheduler4 (?P<kind>\w+): n=(?P<n>\d+) enqueue (?P<enqueue>[\d.]+)/s\s+"
    r"run (?P<run>[\d.]+)/s\s+total (?P<total>[\d.]+) jobs/s"
)
_PG_PEER = re.compile(
    r"(?P<name>pgqueuer|procrastinate) postgres: n=(?P<n>\d+) .*?enqueue (?P<enqueue>[\d.]+)/s"
    r" batch-enqueue (?P<batch>[\d.]+)/s\s+run (?P<run>[\d.]+)/s\s+total (?P<total>[\d.]+)"
    r" jobs/s\s+idle latency p50 (?P<p50>[\d.]+) ms"
)
_LIMIT = re.compile(r"^(?P<name>[^:]+):\s+(?P<value>[\d,.]+) (?P<unit>jobs/s|tasks/s)")


@dataclasses.dataclass(frozen=True, slots=True)
class PeerRun:
    """APScheduler 4 on one store: rates in jobs per second."""

    kind: str
    jobs: int
    enqueue: float
    run: float
    total: float


@dataclasses.dataclass(frozen=True, slots=True)
class PostgresPeerRun:
    """A PostgreSQL peer: rates in jobs per second, idle latency in milliseconds."""

    name: str
    jobs: int
    settings: str
    enqueue: float
    """One by one, from one task."""
    batch_enqueue: float
    run: float
    total: float
    idle_p50_ms: float


class PeerError(Exception):
    """A peer could not be installed or measured; the message says why."""


def peer_python(venv: Path = PEERS_VENV) -> Path:
    """The peer venv's python, made and filled first if needed.

    Raises:
        PeerError: the venv or its packages could not be installed.
    """
    python = venv / "bin" / "python"
    if python.exists() and _imports_ok(python):
        return python
    try:
        if not python.exists():
            print(f"  creating the peer venv {venv} ...", flush=True)
            _check([sys.executable, "-m", "venv", str(venv)], timeout=300)
        print("  installing the peers into it (pip) ...", flush=True)
        _check(
            [str(python), "-m", "pip", "install", "--quiet", "--pre", *PEER_PACKAGES],
            timeout=900,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise PeerError(f"could not make the peer venv {venv}: {exc}") from exc
    if not _imports_ok(python):
        raise PeerError(f"the peer venv {venv} was made but cannot import the peers")
    return python


def _imports_ok(python: Path) -> bool:
    result = subprocess.run(
        [str(python), "-c", PEER_IMPORTS], capture_output=True, timeout=120, check=False
    )
    return result.returncode == 0


def _check(command: list[str], timeout: float) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise subprocess.SubprocessError(f"{' '.join(command[:4])} ...: " + " | ".join(tail))
    return result.stdout


def _script(name: str) -> Path:
    path = PEER_SCRIPTS / name
    if not path.exists():
        raise PeerError(f"{path} is missing (the shared peer scripts sit beside the repository)")
    return path


def apscheduler(python: Path, kind: str, jobs: int, timeout: float = 600) -> PeerRun:
    """Run ``peer_apscheduler.py kind jobs`` (asyncio) and parse its line."""
    try:
        output = _check(
            [str(python), str(_script("peer_apscheduler.py")), kind, str(jobs)], timeout
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise PeerError(f"APScheduler 4 ({kind}) failed: {exc}") from exc
    match = _APS.search(output)
    if match is None:
        raise PeerError(f"could not parse APScheduler's output: {output.strip()!r}")
    return PeerRun(
        kind=kind,
        jobs=int(match["n"]),
        enqueue=float(match["enqueue"]),
        run=float(match["run"]),
        total=float(match["total"]),
    )


def limits(python: Path, timeout: float = 600) -> dict[str, float]:
    """Run ``limits.py``; its figures by line label (jobs/s or tasks/s)."""
    try:
        output = _check([str(python), str(_script("limits.py"))], timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise PeerError(f"limits.py failed: {exc}") from exc
    found = {}
    for line in output.splitlines():
        match = _LIMIT.match(line.strip())
        if match:
            found[match["name"].strip()] = float(match["value"].replace(",", ""))
    if not found:
        raise PeerError(f"could not parse limits.py's output: {output.strip()!r}")
    return found


def postgres_peer(
    python: Path, name: str, jobs: int, concurrency: int, extra: int, dsn: str, timeout: float = 900
) -> PostgresPeerRun:
    """Run ``peer_pgqueuer.py`` (``extra`` = dequeue batch size) or ``peer_procrastinate.py``
    (``extra`` = pool size) and parse its line."""
    script = _script(f"peer_{name}.py")
    command = [str(python), str(script), str(jobs), str(concurrency), str(extra), dsn]
    try:
        output = _check(command, timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise PeerError(f"{name} failed: {exc}") from exc
    match = _PG_PEER.search(output)
    if match is None:
        raise PeerError(f"could not parse {name}'s output: {output.strip()!r}")
    kind = "batch" if name == "pgqueuer" else "pool"
    return PostgresPeerRun(
        name=name,
        jobs=int(match["n"]),
        settings=f"C={concurrency} {kind}={extra}",
        enqueue=float(match["enqueue"]),
        batch_enqueue=float(match["batch"]),
        run=float(match["run"]),
        total=float(match["total"]),
        idle_p50_ms=float(match["p50"]),
    )
