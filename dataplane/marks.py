"""Packet mark layout: which bits of `meta mark` mean what, for every mode.

0x4000 (masquerade) and 0x8000 (drop) are kube-proxy's; userspace mode's
queue bit and endpoint ids avoid them. A leaf module: the rules (nat), the
balancer (lb) and the forwarder (queue) all read the same bits.
"""

from __future__ import annotations

QUEUE_BIT = 0x2000  # "ask the forwarder": set before the NFQUEUE rule, read back in the nat chains
ID_MASK = 0xFFFF1FFF  # the endpoint id: bits 0-12 and 16-31 (2^29 ids)
KEEP_MASK = 0x0000C000  # bits a decision leaves as they were
MAX_ID = (1 << 29) - 1


def mark_for(endpoint_id: int) -> int:
    """The mark bits that name `endpoint_id` (1..MAX_ID)."""
    return ((endpoint_id >> 13) << 16) | (endpoint_id & 0x1FFF)


def id_of(mark: int) -> int:
    return ((mark >> 16) << 13) | (mark & 0x1FFF)
