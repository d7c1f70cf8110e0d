"""The public surface is what we mean it to be."""

from __future__ import annotations

import flexq
import flexq.abc


def test_all_lists_exactly_the_public_names() -> None:
    """__all__ is sorted-unique and every public attribute is in it."""
    public = {name for name in dir(flexq) if not name.startswith("_")} - {
        "abc",
        "annotations",
        "testing",
    }
    assert set(flexq.__all__) == public
    assert len(flexq.__all__) == len(set(flexq.__all__))


def test_every_error_derives_from_flexq_error() -> None:
    """Users can catch flexq.FlexqError for anything flexq raises."""
    errors = [
        getattr(flexq, name)
        for name in flexq.__all__
        if name.endswith(
            (
                "Error",
                "Task",
                "Arguments",
                "Found",
                "Transition",
                "Exceeded",
                "Closed",
                "Timeout",
                "Job",
            )
        )
    ]
    for error in errors:
        if isinstance(error, type) and issubclass(error, Exception):
            assert issubclass(error, flexq.FlexqError), error


def test_abc_exports_the_store_protocol() -> None:
    """Store implementers find the protocol and its records in flexq.abc."""
    assert set(flexq.abc.__all__) == {
        "BatchCounts",
        "ChunkDone",
        "Placement",
        "WaitFacts",
        "WorkerRecord",
        "ClaimedJob",
        "DependentJob",
        "EnqueueResult",
        "EnqueueUnit",
        "JobFilter",
        "NewJob",
        "Outcome",
        "Recovered",
        "Renewal",
        "ScheduleFiring",
        "ScheduleRecord",
        "Store",
    }
