"""`/status` and `dataplane status`: how the running daemon balances, as JSON and as text.

`body` builds the JSON from values already in memory (no I/O: it runs on
the event loop); `format_status` is the CLI's rendering of that JSON.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .userspace import UserspaceMode


def body(mode: UserspaceMode | None) -> dict:
    """The /status document; kernel mode has no per-Service balancing to show."""
    if mode is None:
        return {"mode": "kernel", "services": []}
    snapshot = mode.forwarder.snapshot()
    return {
        "mode": "userspace",
        "queues": list(mode.forwarder.queues),
        "queue_mechanism": "nft" if mode.queue.in_nft else "iptables",
        "default_algorithm": mode.algorithm,
        "packets_queued": snapshot["packets"],
        "packets_per_queue": snapshot["per_queue"],
        "undecided": snapshot["undecided"],
        "fail_open": mode.fail_open.value,
        "services": snapshot["services"],
    }


def format_status(body: dict, out: Callable[[str], None] = print) -> None:
    """`dataplane status` as text: per Service port, its algorithm and endpoints with their flows."""
    per_queue = body.get("packets_per_queue") or {}
    per_queue = f" ({', '.join(f'queue {q}: {n}' for q, n in sorted(per_queue.items()))})" if len(per_queue) > 1 else ""
    out(f"mode {body.get('mode')}: queues {body.get('queues')} via {body.get('queue_mechanism')}, "
        f"default algorithm {body.get('default_algorithm')}; packets queued {body.get('packets_queued')}{per_queue}, "
        f"undecided {body.get('undecided')}, fail-open {body.get('fail_open')}")
    for service in body.get("services", []):
        affinity = service.get("affinity_timeout")
        extra = f", ClientIP affinity {affinity} s ({service['affinity_entries']} entries)" if affinity else ""
        out(f"{service['service']}  {service['algorithm']}{extra}")
        for endpoint in service["endpoints"]:
            out(f"    {endpoint['endpoint']:<24} weight {endpoint['weight']:<4} active {endpoint['active']:<6} "
                f"decided {endpoint['decided']}")
