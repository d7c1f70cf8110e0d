"""Host-load watching: the queue yields to the application it is embedded in."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable


class LoadMonitor:
    """Measures event-loop lag and says when job claiming should pause.

    Every ``interval`` it sleeps and measures how late it woke up. Once that lag is above
    ``max_lag`` (or ``probe()`` returns True, e.g. a CPU or memory check), the host is busy and
    :attr:`overloaded` is True, until ``calm_checks`` measurements in a row find it calm again:
    the host gets a real pause, and claiming does not flap on and off with every job.
    """

    def __init__(
        self,
        max_lag: float | None,
        probe: Callable[[], bool] | None = None,
        interval: float = 0.02,
        calm_checks: int = 3,
    ) -> None:
        self.max_lag = max_lag
        self.probe = probe
        self.interval = interval
        self.calm_checks = calm_checks
        self.lag = 0.0
        self.overloaded = False
        self._calm = 0
        self.episodes = 0
        self._clear = anyio.Event()
        self._clear.set()

    @property
    def enabled(self) -> bool:
        """Whether there is anything to watch."""
        return self.max_lag is not None or self.probe is not None

    async def run(self) -> None:
        """Measure forever."""
        while True:
            before = anyio.current_time()
            await anyio.sleep(self.interval)
            self.lag = max(0.0, anyio.current_time() - before - self.interval)
            busy = (self.max_lag is not None and self.lag > self.max_lag) or bool(
                self.probe and self.probe()
            )
            self._calm = 0 if busy else self._calm + 1
            if busy and not self.overloaded:
                self.overloaded = True
                self.episodes += 1
                self._clear = anyio.Event()
            elif self.overloaded and self._calm >= self.calm_checks:
                self.overloaded = False
                self._clear.set()

    async def wait_until_clear(self) -> None:
        """Return once the host is no longer overloaded."""
        await self._clear.wait()
