"""Reference forwarders for the userspace paths: the same decisions as `dataplane run`, another packet loop.

    python -m bench.forwarders KIND QUEUE CPU TABLES_JSON      (in the node namespace, as root)

KIND
    netfilterqueue  the NetfilterQueue binding (libnetfilter_queue): a callback
                    per packet, one verdict (with its mark) per packet, one
                    sendmsg each; the loop the design names as the obvious choice
    blocking        our nfqueue.QueueSocket read by a thread that blocks in
                    recv (no event loop), batched verdicts: what the event
                    loop's own cost is measured against

Both decide with `dataplane.lb.balancer.Balancer` on the tables given (the
same sans-IO code the daemon's forwarders run), bound to one queue, pinned to
CPU (or unpinned for -1), at nice -10 like the daemon's workers. They run in a
lab whose `dataplane run --proxy-mode userspace` was stopped with SIGTERM, which
leaves its rules in place: the queue rule, and the endpoint-id map the marks
name. Prints "ready" once bound; SIGTERM ends it (the queue unbinds).

TABLES_JSON: a list of {"name", "addresses": [ip], "protocol", "port",
"algorithm", "targets": [[id, ip, port, weight]]}: the measured Service's
ports with the ids the daemon gave their endpoints (its /status).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from dataplane.lb.balancer import Balancer, ServicesChanged
from dataplane.lb.policy import PortTable, Target, packed
from dataplane.packet import PacketQueued


def tables_from(text: str) -> tuple[PortTable, ...]:
    return tuple(
        PortTable(name=t["name"], protocol=t["protocol"], addresses=tuple(packed(a) for a in t["addresses"]),
                  port=t["port"], node_port=None, targets=tuple(Target(*target) for target in t["targets"]),
                  algorithm=t["algorithm"], affinity_timeout=None)
        for t in json.loads(text))


def _balancer(text: str) -> Balancer:
    balancer = Balancer()
    balancer.handle(ServicesChanged({"measured": tables_from(text)}, time.monotonic()))
    return balancer


def run_netfilterqueue(queue: int, balancer: Balancer) -> None:
    from netfilterqueue import NetfilterQueue

    decide = balancer.decide

    def on_packet(packet) -> None:
        balancer.now = time.monotonic()
        (_, _, mark), = decide([PacketQueued(queue, 0, packet.get_mark(), packet.get_payload())])
        packet.set_mark(mark)
        packet.accept()

    nfq = NetfilterQueue()
    nfq.bind(queue, on_packet, max_len=16384, range=128)
    print("ready", flush=True)
    try:
        nfq.run()
    finally:
        nfq.unbind()


def run_blocking(queue: int, balancer: Balancer) -> None:
    from dataplane.queue.nfqueue import QueueSocket

    sock = QueueSocket((queue,))
    print("ready", flush=True)
    read, send, decide, clock, perf = sock.read, sock.send, balancer.decide, time.monotonic, time.perf_counter
    try:
        while True:
            packets: list = []
            started = perf()
            read(packets, 1, block=True)  # answer the first datagram before looking for more, as the daemon does
            burst = perf() - started < 10e-6  # it was waiting: look for more (forwarder.BURST)
            while packets:
                balancer.now = clock()
                send(decide(packets))
                packets = []
                if burst:
                    read(packets, 1024)
    finally:
        sock.close()


def main(argv: list[str]) -> int:
    kind, queue, cpu, tables = argv[0], int(argv[1]), int(argv[2]), argv[3]
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except OSError:
        pass
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    balancer = _balancer(tables)
    {"netfilterqueue": run_netfilterqueue, "blocking": run_blocking}[kind](queue, balancer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
