"""Which endpoints may take a new connection: shared by every proxy mode.

kube-proxy's rule: use the ready endpoints; when none is ready, fall back to
those still serving while terminating, so a rolling update never drops
traffic that could have been served. An endpoint that is not serving is never
used.
"""

from __future__ import annotations

from typing import Iterable

from ..model import Backend


def usable_endpoints(backends: Iterable[Backend]) -> tuple[Backend, ...]:
    backends = tuple(backends)
    ready = tuple(b for b in backends if b.ready)
    if ready:
        return ready
    return tuple(b for b in backends if b.serving and b.terminating)
