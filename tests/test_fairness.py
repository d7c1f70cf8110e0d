"""Fair sharing of workers between tenants."""

from __future__ import annotations

import collections
import random

import anyio
import pytest

import flexq
from flexq._fairness import DeficitRoundRobin
from tests.conftest import make_queue


async def test_a_flooding_tenant_does_not_starve_another(queue_url: str) -> None:
    """4 workers; A enqueues 1000 jobs of 10 ms, then B 20: all of B's finish before A does 60."""
    queue = make_queue(queue_url, workers=4)
    finished: list[str] = []
    a_going, b_done = anyio.Event(), anyio.Event()

    @queue.task
    async def job(tenant: str) -> None:
        await anyio.sleep(0.01)
        finished.append(tenant)
        if finished.count("A") == 8:
            a_going.set()
        if finished.count("B") == 20:
            b_done.set()

    async with queue:
        await queue.enqueue_many([flexq.Call(job, "A") for _ in range(1000)], tenant="A")
        await a_going.wait()
        a_before = finished.count("A")
        for _ in range(20):
            await queue.enqueue(job, "B", tenant="B")
        with anyio.fail_after(30):
            await b_done.wait()
        a_meanwhile = finished.count("A") - a_before
        await queue.pause()
    assert a_meanwhile < 60, f"A finished {a_meanwhile} jobs while B ran its 20"


async def test_weights_share_workers_in_proportion(queue_url: str) -> None:
    """A tenant of weight 3 gets about three times the workers of a tenant of weight 1."""
    queue = make_queue(queue_url, workers=4, weights={"heavy": 3.0})
    finished: list[str] = []
    enough = anyio.Event()

    @queue.task
    async def job(tenant: str) -> None:
        await anyio.sleep(0.005)
        finished.append(tenant)
        if len(finished) == 200:
            enough.set()

    async with queue:
        await queue.enqueue_many([flexq.Call(job, "heavy") for _ in range(400)], tenant="heavy")
        await queue.enqueue_many([flexq.Call(job, "light") for _ in range(400)], tenant="light")
        with anyio.fail_after(30):
            await enough.wait()
        await queue.pause()
    window = collections.Counter(finished[20:200])
    assert 2.0 < window["heavy"] / window["light"] < 4.5, window


def test_deficit_round_robin_alternates_equal_tenants() -> None:
    """Equal weights take turns one job at a time."""
    drr = DeficitRoundRobin()
    drr.add(["a", "b"])
    assert [drr.allocate(1) for _ in range(4)] == [{"a": 1}, {"b": 1}, {"a": 1}, {"b": 1}]
    assert drr.allocate(5) == {"a": 3, "b": 2}


def test_deficit_round_robin_weights_and_leaving() -> None:
    """Weights set the share; a tenant that leaves loses its saved-up deficit."""
    drr = DeficitRoundRobin({"big": 2.0, "tiny": 0.5})
    drr.add(["big", "small", "tiny"])
    shares: collections.Counter[str] = collections.Counter()
    for _ in range(70):
        shares.update(drr.allocate(1))
    assert shares["big"] == 2 * shares["small"] == 4 * shares["tiny"]
    drr.discard("big")
    drr.discard("big")
    assert drr.active[0] in {"small", "tiny"}
    assert set(drr.active) == {"small", "tiny"}
    drr.discard("small")
    drr.discard("tiny")
    assert not drr
    assert drr.allocate(3) == {}


class _TurnByTurn(DeficitRoundRobin):
    """Deficit round robin as the textbook says it: one turn at a time, however many."""

    def allocate(self, capacity: int) -> dict[str, int]:
        shares: dict[str, int] = {}
        while capacity > 0 and self:
            capacity = self._turn(capacity, shares)
        return shares


@pytest.mark.parametrize("weights", [{}, {"t1": 3.0, "t4": 2.0}, {"t1": 2.5, "t2": 0.3}])
def test_deficit_round_robin_shares_many_slots_as_it_shares_one_turn_at_a_time(
    weights: dict[str, float],
) -> None:
    """Whole rounds handed out at once give each tenant what turn after turn would, and
    leave the same turn and deficits: across calls, joins and departures."""
    rng = random.Random(7)
    fast, slow = DeficitRoundRobin(weights), _TurnByTurn(weights)
    for _ in range(2000):
        action = rng.random()
        if action < 0.1:
            tenants = [f"t{rng.randrange(8)}" for _ in range(rng.randrange(1, 4))]
            fast.add(tenants)
            slow.add(tenants)
        elif action < 0.15:
            tenant = f"t{rng.randrange(8)}"
            fast.discard(tenant)
            slow.discard(tenant)
        else:
            capacity = rng.choice([1, 2, 3, 7, 64, 256, 1000])
            assert fast.allocate(capacity) == slow.allocate(capacity)
        assert fast.active == slow.active


def test_deficit_round_robin_rejects_bad_weights() -> None:
    """Weights must be positive numbers."""
    with pytest.raises(flexq.InvalidArguments):
        DeficitRoundRobin({"a": -1.0})
    with pytest.raises(flexq.InvalidArguments):
        DeficitRoundRobin(default_weight=float("nan"))
