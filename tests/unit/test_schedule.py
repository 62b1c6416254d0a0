"""The sync schedule, driven by a fake clock: no test sleeps."""

from __future__ import annotations

import asyncio

import pytest

from dataplane.daemon.schedule import Schedule, SyncLoop


def schedule() -> Schedule:
    return Schedule(min_interval=1.0, full_interval=60.0, retry_interval=2.0)


def test_first_sync_is_full_and_immediate() -> None:
    assert schedule().next_sync(now=100.0) == (0.0, True)


@pytest.mark.parametrize(
    "last_run, pending_since, now, expected",
    [
        (100.0, 100.5, 100.5, (0.5, False)),  # a change right after a sync waits for min_interval
        (100.0, 103.0, 103.0, (0.0, False)),  # a change after a quiet spell syncs at once
        (100.0, None, 110.0, (50.0, True)),  # nothing pending: next is the periodic full resync
        (100.0, 150.0, 161.0, (0.0, True)),  # a pending change when the resync is due rides on it
    ],
)
def test_next_sync(last_run, pending_since, now, expected) -> None:
    plan = schedule()
    plan.ran(started=100.0, full=True, ok=True, pending_at_start=None)
    plan.last_run = last_run
    plan.pending_since = pending_since
    assert plan.next_sync(now) == expected


def test_failure_retries_with_a_full_sync_after_the_retry_interval() -> None:
    plan = schedule()
    plan.ran(started=100.0, full=True, ok=True, pending_at_start=None)
    plan.request(now=105.0)
    plan.ran(started=105.0, full=False, ok=False, pending_at_start=105.0)
    assert plan.next_sync(now=105.5) == (1.5, True)
    assert plan.pending_since == 105.0  # the change is still owed


def test_change_arriving_during_a_sync_stays_pending() -> None:
    plan = schedule()
    plan.request(now=100.0)
    started_with = plan.pending_since
    plan.pending_since = 100.0
    plan.ran(started=100.0, full=True, ok=True, pending_at_start=started_with)
    assert plan.pending_since is None
    plan.request(now=100.2)
    plan.ran(started=100.1, full=False, ok=True, pending_at_start=None)  # began before the change
    assert plan.pending_since == 100.2


def test_change_arriving_during_a_sync_that_carried_an_older_one_stays_pending() -> None:
    plan = schedule()
    plan.ran(started=90.0, full=True, ok=True, pending_at_start=None)
    plan.request(now=100.0)
    started_with = plan.pending_since
    plan.request(now=100.3)  # while the sync that started at 100.1 runs
    plan.ran(started=100.1, full=False, ok=True, pending_at_start=started_with)
    assert plan.pending_since == 100.3


def test_loop_coalesces_a_burst_and_survives_a_crashing_sync() -> None:
    clock = [0.0]
    calls: list[bool] = []

    async def sync(full: bool) -> bool:
        calls.append(full)
        if len(calls) == 2:
            raise RuntimeError("a bug in one sync")
        return True

    async def scenario() -> None:
        loop = SyncLoop(Schedule(min_interval=0.0, full_interval=1e9, retry_interval=0.0), sync, clock=lambda: clock[0])
        runner = asyncio.create_task(loop.run())
        await asyncio.sleep(0.01)  # the first, full sync
        for _ in range(5):  # a burst: one sync
            clock[0] += 0.001
            loop.request()
        await asyncio.sleep(0.01)  # it raises; the loop retries with a full sync
        await asyncio.sleep(0.01)
        runner.cancel()

    asyncio.run(scenario())
    assert calls[:3] == [True, False, True]


def test_a_sync_fails_by_raising_and_the_schedule_knows_before_the_failure_is_reported() -> None:
    clock = [10.0]
    seen: list[tuple[str, bool, float | None]] = []
    plan = Schedule(min_interval=1.0, full_interval=60.0)

    async def sync(full: bool) -> None:
        clock[0] += 0.5
        raise OverflowError("more than 3 endpoints in userspace mode")

    loop = SyncLoop(plan, sync, clock=lambda: clock[0],
                    failed=lambda error: seen.append((str(error), plan.failed, plan.last_ok)))
    assert asyncio.run(loop.step(True)) is False
    assert seen == [("more than 3 endpoints in userspace mode", True, None)]
    assert plan.next_sync(clock[0]) == (0.5, True)  # retry_interval after it began, full


def test_last_ok_is_when_the_last_successful_sync_ended() -> None:
    clock = [10.0]

    async def sync(full: bool) -> None:
        clock[0] += 0.25

    plan = Schedule(min_interval=1.0, full_interval=60.0)
    loop = SyncLoop(plan, sync, clock=lambda: clock[0])
    assert asyncio.run(loop.step(True)) is True
    assert (plan.last_ok, plan.last_run, plan.failed) == (10.25, 10.0, False)


def test_a_failure_report_that_raises_does_not_stop_the_loop() -> None:
    async def sync(full: bool) -> None:
        raise RuntimeError("a bug in one sync")

    def report(error: Exception) -> None:
        raise ValueError("a bug in the report")

    plan = Schedule(min_interval=1.0, full_interval=60.0)
    assert asyncio.run(SyncLoop(plan, sync, clock=lambda: 5.0, failed=report).step(False)) is False
    assert plan.failed
