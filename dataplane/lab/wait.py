"""Polling with a deadline, for conditions that converge (rules programmed, a server listening)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition") -> T:
    """Calls `check()` until it returns a truthy value, and returns that value.

    Raises TimeoutError naming `what` and the last value seen when `timeout` s pass
    first; `check` is always called at least once, and once more at the deadline.
    Exceptions from `check` propagate at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{what}: not met within {timeout} s (last: {value!r})")
        time.sleep(min(interval, remaining))
