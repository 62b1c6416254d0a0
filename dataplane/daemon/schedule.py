"""When to sync: coalesce bursts, resync periodically, retry after failures.

The decision is a pure function of the clock and a few timestamps, so it is
tested without sleeping; `SyncLoop` is the small async shell around it.
`Schedule` is also the one record of what is programmed and what is owed:
`/healthz` (`app.Health`) reads it rather than keeping a copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


@dataclass
class Schedule:
    min_interval: float  # at most one sync per this many seconds: bursts coalesce
    full_interval: float  # a full resync at least this often
    retry_interval: float = 1.0
    last_run: float = float("-inf")
    last_full: float = float("-inf")
    pending_since: float | None = None  # oldest change not yet synced
    failed: bool = True  # nothing is programmed yet: the first sync is full
    last_request: float = float("-inf")
    last_ok: float | None = None  # when the last successful sync ended; None: none has yet

    def request(self, now: float) -> None:
        if self.pending_since is None:
            self.pending_since = now
        self.last_request = now

    def next_sync(self, now: float) -> tuple[float, bool]:
        """(seconds to wait before syncing, whether that sync must be full)."""
        if self.failed:
            return max(0.0, self.last_run + self.retry_interval - now), True
        due_full = self.last_full + self.full_interval
        if now >= due_full:
            return 0.0, True  # a due resync also carries whatever is pending
        if self.pending_since is not None:
            due_partial = max(self.pending_since, self.last_run + self.min_interval)
            if due_partial < due_full:
                return max(0.0, due_partial - now), False
        return max(0.0, due_full - now), True

    def ran(self, started: float, full: bool, ok: bool, pending_at_start: float | None,
            ended: float | None = None) -> None:
        """A sync that began at `started` (when `pending_since` was `pending_at_start`) ended at `ended`."""
        self.last_run = started
        self.failed = not ok
        if ok:
            self.last_ok = started if ended is None else ended
        if ok and full:
            self.last_full = started
        if ok and self.pending_since == pending_at_start:
            # A change requested after the sync took its snapshot is not in it: still owed.
            self.pending_since = self.last_request if self.last_request > started else None


class SyncLoop:
    """Runs `sync(full)` as the schedule says; never dies of a failed sync.

    A sync fails by raising, whatever the exception: the schedule records the
    failure (so the next sync is full, after `retry_interval`) before
    `failed(error)` is told, and the loop goes on.
    """

    def __init__(self, schedule: Schedule, sync: Callable[[bool], Awaitable[object]], clock=time.monotonic,
                 failed: Callable[[Exception], None] | None = None):
        self.schedule = schedule
        self.clock = clock
        self._sync = sync
        self._failed = failed or (lambda error: log.error("sync failed", exc_info=error))
        self._wake = asyncio.Event()

    def request(self) -> None:
        self.schedule.request(self.clock())
        self._wake.set()

    async def run(self) -> None:
        while True:
            wait, full = self.schedule.next_sync(self.clock())
            if wait > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                    continue  # something changed: decide again
                except asyncio.TimeoutError:
                    pass
                wait, full = self.schedule.next_sync(self.clock())
                if wait > 0:
                    continue
            await self.step(full)

    async def step(self, full: bool) -> bool:
        """One sync now, recorded in the schedule; True when it succeeded."""
        started, pending = self.clock(), self.schedule.pending_since
        try:
            await self._sync(full)
        except Exception as error:  # the loop must outlive any failure, a bug in one sync included
            self.schedule.ran(started, full, False, pending, self.clock())
            try:
                self._failed(error)
            except Exception:
                log.exception("reporting a failed sync failed too")
            return False
        self.schedule.ran(started, full, True, pending, self.clock())
        return True
