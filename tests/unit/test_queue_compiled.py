"""The compiled hot loop (dataplane/queue/_nfqueue.c) against the Python one, on the same datagrams.

A socketpair stands in for the netlink socket: what the "kernel" end sends
is what nfnetlink_queue would, and the verdicts it receives are compared
with what the balancer decides in Python. Skipped when the extension is not
built (pip install -e . builds it where gcc and the Python headers exist).

Address plan
    clients     192.168.50.0/24; node 192.168.50.1 (NodePort 30080)
    ClusterIPs  10.96.0.10:80/TCP round-robin, .11:53/UDP random (weights 1, 3), .12:80/TCP with ClientIP affinity,
                .13:80/TCP least-conn, fd00:96::10:80/TCP (IPv6)
    endpoints   10.244.1.11-.. :80, ids 1..N
"""

from __future__ import annotations

import socket
import struct
from collections import Counter

import pytest
from scapy.all import IP, IPv6, TCP, UDP, raw

from dataplane.lb.balancer import Balancer, NodeAddresses, ServicesChanged
from dataplane.lb.policy import PortTable, Target, packed
from dataplane.marks import KEEP_MASK, mark_for
from dataplane.packet import PacketQueued
from dataplane.queue import nfqueue, picks

from test_queue_packet import ack, packet_message

pytestmark = pytest.mark.skipif(nfqueue.compiled is None, reason="dataplane.queue._nfqueue is not built")


def targets(n: int, weights=None) -> tuple[Target, ...]:
    return tuple(Target(i + 1, f"10.244.1.{11 + i}", 80, (weights or [1] * n)[i]) for i in range(n))


def port(name, address, algorithm="random", n=3, weights=None, affinity=None, protocol=6, number=80, node_port=None):
    return PortTable(name, protocol, (packed(address),), number, node_port, targets(n, weights), algorithm, affinity, family=6 if ":" in address else 4)


PORTS = (
    port("default/rr:http", "10.96.0.10", "round-robin", node_port=30080),
    port("default/dns:dns", "10.96.0.11", "random", n=2, weights=[1, 3], protocol=17, number=53),
    port("default/sticky:http", "10.96.0.12", "random", affinity=10800),
    port("default/lc:http", "10.96.0.13", "least-conn"),
    port("default/v6:http", "fd00:96::10", "round-robin"),
)


def balancer() -> Balancer:
    b = Balancer(seed=3)
    b.handle(ServicesChanged({"all": PORTS}, 0.0))
    b.handle(NodeAddresses((packed("192.168.50.1"),)))
    return b


def syn(dst: str, sport: int, dport: int = 80, udp=False, src="192.168.50.2") -> bytes:
    ip = IPv6(src="fd00:50::2", dst=dst) if ":" in dst else IP(src=src, dst=dst)
    return raw(ip / (UDP(sport=sport, dport=dport) if udp else TCP(sport=sport, dport=dport, flags="S")))


def queue_pair():
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for seq in range(1, 5):
        kernel.send(ack(seq))
    queue = nfqueue.QueueSocket([0], sock=ours)
    for _ in range(4):
        kernel.recv(4096)  # the bind requests
    return queue, kernel


def verdicts(kernel: socket.socket) -> dict[int, int]:
    """packet id -> mark of every verdict waiting on the kernel side."""
    found = {}
    kernel.setblocking(False)
    try:
        while True:
            data = kernel.recv(65536)
            for at in range(0, len(data), 40):
                (_, packet_id), (mark,) = struct.unpack_from("!II", data, at + 24), struct.unpack_from("!I", data, at + 36)
                found[packet_id] = mark
    except BlockingIOError:
        pass
    kernel.setblocking(True)
    return found


def serve(queue, table, limit=1024, block=False):
    return queue.serve([table], KEEP_MASK, limit, block)


def test_round_robin_and_nodeport_decide_as_the_balancer_does():
    b, twin = balancer(), balancer()
    queue, kernel = queue_pair()
    packets = [PacketQueued(0, i, 0x2000 | 0x4000, syn("10.96.0.10", 40000 + i)) for i in range(7)]
    packets.append(PacketQueued(0, 7, 0x2000, syn("192.168.50.1", 40007, 30080)))  # the NodePort: same port state
    for p in packets:
        kernel.send(packet_message(p.queue, p.packet_id, p.mark, p.payload))
    datagrams, decided, rest, _ = serve(queue, picks.build(b))
    assert (datagrams, decided, rest) == (8, 8, [])
    assert verdicts(kernel) == {packet_id: mark for _, packet_id, mark in twin.decide(packets)}


def test_random_picks_hold_the_weights_and_keep_the_kept_bits():
    b = balancer()
    queue, kernel = queue_pair()
    table, seen = picks.build(b), Counter()
    for batch in range(20):
        for i in range(200):
            kernel.send(packet_message(0, batch * 200 + i, 0x2000 | 0x8000, syn("10.96.0.11", 1000 + i, 53, udp=True)))
        assert serve(queue, table)[1] == 200
        seen.update(verdicts(kernel).values())
    assert set(seen) == {mark_for(1) | 0x8000, mark_for(2) | 0x8000}
    assert 2.4 < seen[mark_for(2) | 0x8000] / seen[mark_for(1) | 0x8000] < 3.8  # weights 1:3, 4,000 draws
    assert picks.fold(table, nfqueue.compiled.drain) == 4000
    counts = {e["endpoint"]: e["decided"] for s in b.status() if s["service"] == "default/dns:dns" for e in s["endpoints"]}
    assert sum(counts.values()) == 4000 and picks.fold(table, nfqueue.compiled.drain) == 0  # drained once


@pytest.mark.parametrize("dst, why", [
    ("10.96.0.12", "ClientIP affinity: per-client state"),
    ("10.96.0.13", "least-conn: live counts"),
    ("fd00:96::10", "IPv6"),
    ("10.96.0.99", "no such Service: the balancer counts it undecided"),
])
def test_what_the_table_cannot_decide_goes_back_to_the_balancer(dst, why):
    queue, kernel = queue_pair()
    payload = syn(dst, 40000)
    kernel.send(packet_message(0, 9, 0x2000, payload))
    datagrams, decided, rest, _ = serve(queue, picks.build(balancer()))
    assert (datagrams, decided, rest) == (1, 0, [PacketQueued(0, 9, 0x2000, payload)]), why
    assert verdicts(kernel) == {}


def test_a_frontend_on_a_node_address_wins_over_the_nodeport():
    b = Balancer(seed=1)
    b.handle(ServicesChanged({"a": (port("default/np:http", "10.96.0.10", node_port=30080),),
                              "b": (port("default/lb:http", "192.168.50.1", "least-conn", number=30080),)}, 0.0))
    b.handle(NodeAddresses((packed("192.168.50.1"),)))
    table = picks.build(b)
    assert picks.key(packed("192.168.50.1"), 6, 30080) not in table  # least-conn: the balancer decides
    assert picks.key(packed("10.96.0.10"), 6, 80) in table


def test_a_burst_is_read_in_one_call_up_to_the_limit_and_the_rest_stays():
    queue, kernel = queue_pair()
    for i in range(150):
        kernel.send(packet_message(0, i, 0x2000, syn("10.96.0.10", 2000 + i)))
    table = picks.build(balancer())
    assert serve(queue, table, limit=100)[:2] == (100, 100)
    assert serve(queue, table)[:2] == (50, 50)
    assert serve(queue, table)[:3] == (0, 0, [])  # empty: EAGAIN, nothing sent
    assert len(verdicts(kernel)) == 150


def test_malformed_datagrams_never_raise_and_answer_only_whole_packets():
    queue, kernel = queue_pair()
    whole = packet_message(0, 5, 0x2000, syn("10.96.0.10", 3000))
    for data in (b"", b"\xff" * 15, whole[:30], whole + whole[:25], struct.pack("=IH", 8, 0) + bytes(10)):
        kernel.send(data)
    table = picks.build(balancer())
    datagrams, decided, rest, _ = serve(queue, table)
    assert (datagrams, decided, rest) == (5, 1, [])
    assert list(verdicts(kernel)) == [5]


def test_a_table_swapped_while_asleep_is_the_one_used():
    queue, kernel = queue_pair()
    holder = [{}]
    kernel.send(packet_message(0, 1, 0x2000, syn("10.96.0.10", 4000)))
    holder[0] = picks.build(balancer())  # what a services change does while the loop sleeps in recv
    assert queue.serve(holder, KEEP_MASK, 1, True)[:3] == (1, 1, [])


def test_the_forwarder_folds_compiled_counts_into_its_snapshot():
    from dataplane.queue.forwarder import Forwarder

    queue, kernel = queue_pair()
    forwarder = Forwarder((0,), balancer())
    forwarder._socket = queue
    forwarder._handle(ServicesChanged({"all": PORTS}, 0.0))  # builds the pick table
    for i in range(6):
        kernel.send(packet_message(0, i, 0x2000, syn("10.96.0.10", 5000 + i)))
    kernel.send(packet_message(0, 6, 0x2000, syn("10.96.0.12", 5006)))  # affinity: decided in Python
    assert forwarder._decide(1024) == 7
    assert len(verdicts(kernel)) == 7
    snap = forwarder.snapshot()
    decided = {s["service"]: sum(e["decided"] for e in s["endpoints"]) for s in snap["services"]}
    assert (snap["packets"], decided["default/rr:http"], decided["default/sticky:http"]) == (7, 6, 1)


def test_a_change_made_while_a_batch_runs_python_code_waits_for_the_batch(monkeypatch):
    """A batch runs Python code (a leftover's PacketQueued), so the GIL may pass to the control thread mid-batch.

    Its change folds the counts and swaps the table: a decision the loop then
    made in the old table would be lost, and its round-robin position too.
    The forwarder's lock, held by the loop for the whole batch, keeps the
    change out until the batch is done, so every decision is folded exactly once.
    """
    import threading

    from dataplane.queue.forwarder import Forwarder

    mid_batch, changed = threading.Event(), threading.Event()

    class SlowPacket(PacketQueued):  # the control thread gets the GIL while a leftover is made
        __slots__ = ()

        def __new__(cls, *fields):
            mid_batch.set()
            changed.wait(0.3)
            return super().__new__(cls, *fields)

    monkeypatch.setattr(nfqueue, "PacketQueued", SlowPacket)
    queue, kernel = queue_pair()
    forwarder = Forwarder((0,), balancer())
    forwarder._socket = queue
    forwarder._handle(ServicesChanged({"all": PORTS}, 0.0))
    kernel.send(packet_message(0, 0, 0x2000, syn("10.96.0.12", 6000)))  # affinity: a leftover, first in the batch
    for i in range(1, 9):
        kernel.send(packet_message(0, i, 0x2000, syn("10.96.0.10", 6000 + i)))  # round-robin: decided in C

    def change() -> None:
        mid_batch.wait(5)
        forwarder._handle(ServicesChanged({"all": PORTS}, 1.0))  # same tables: a fold and a new pick table
        changed.set()

    control = threading.Thread(target=change)
    control.start()
    assert forwarder._decide(1024) == 9
    control.join(5)
    snap = forwarder.snapshot()
    decided = {s["service"]: sum(e["decided"] for e in s["endpoints"]) for s in snap["services"]}
    assert decided["default/rr:http"] == 8, decided
    port = forwarder.balancer.ports["default/rr:http"]
    assert port.cursor == 8 % len(port.sequence)  # the rotation carried on from every C decision


@pytest.mark.parametrize("entry", [
    "not a tuple", (0,), ("0", b"", b"", b""), (0, "str has no buffer", bytearray(8), bytearray(8)),
    (0, b"\1\0\0\0", b"read-only counts", bytearray(8)), (1 << 70, b"\1\0\0\0", bytearray(8), bytearray(8)),
], ids=["not-a-tuple", "short", "kind-not-int", "marks-not-a-buffer", "counts-read-only", "kind-too-big"])
def test_an_entry_of_the_wrong_shape_leaves_its_packets_to_the_balancer(entry):
    queue, kernel = queue_pair()
    payload = syn("10.96.0.10", 7000)
    kernel.send(packet_message(0, 3, 0x2000, payload))
    table = {picks.key(packed("10.96.0.10"), 6, 80): entry}
    assert serve(queue, table)[:3] == (1, 0, [PacketQueued(0, 3, 0x2000, payload)])


def test_a_holder_emptied_while_the_loop_sleeps_raises_instead_of_reading_freed_memory():
    import threading

    queue, kernel = queue_pair()
    holder = [picks.build(balancer())]

    def meanwhile() -> None:
        holder.clear()
        kernel.send(packet_message(0, 1, 0x2000, syn("10.96.0.10", 7100)))

    timer = threading.Timer(0.1, meanwhile)
    timer.start()
    with pytest.raises(TypeError, match="holder"):
        queue.serve(holder, KEEP_MASK, 1, True)
    timer.join()


def compiled_forwarder():
    from dataplane.queue.forwarder import Forwarder

    queue, kernel = queue_pair()
    forwarder = Forwarder((0,), balancer())
    forwarder._socket = queue
    forwarder._handle(ServicesChanged({"all": PORTS}, 0.0))
    return forwarder, kernel


def decided_per_endpoint(forwarder, service: str) -> dict[str, int]:
    return {e["endpoint"]: e["decided"] for s in forwarder.snapshot()["services"] if s["service"] == service
            for e in s["endpoints"]}


def test_the_next_table_is_built_while_the_loop_goes_on_deciding_with_the_last():
    """A build takes tens of ms at 10,000 Services: the loop must not wait for it (nor lose what it decided meanwhile)."""
    import threading

    forwarder, kernel = compiled_forwarder()
    build, during = picks.build, []

    def slow_build(*args):
        kernel.send(packet_message(0, 50, 0x2000, syn("10.96.0.10", 8050)))
        reader = threading.Thread(target=lambda: during.append(forwarder._decide(1024)))
        reader.start()
        reader.join(2.0)  # it would wait for the whole build if the build held the forwarder's lock
        during.append(reader.is_alive())
        return build(*args)

    picks.build = slow_build
    try:
        forwarder._handle(ServicesChanged({"all": PORTS}, 1.0))
    finally:
        picks.build = build
    assert during == [1, False]
    assert verdicts(kernel) == {50: mark_for(1)}  # the last table's pick, answered at once
    assert decided_per_endpoint(forwarder, "default/rr:http")["10.244.1.11:80"] == 1  # folded at the swap


def test_counts_folded_after_a_change_renumbered_the_targets_go_to_the_endpoints_that_took_them():
    forwarder, kernel = compiled_forwarder()
    for i in range(6):  # round-robin over ids 1, 2, 3: two flows each
        kernel.send(packet_message(0, i, 0x2000, syn("10.96.0.10", 8100 + i)))
    assert forwarder._decide(1024) == 6
    first_gone = tuple(p if p.name != "default/rr:http" else
                       PortTable(p.name, p.protocol, p.addresses, p.port, p.node_port, p.targets[1:], p.algorithm, None)
                       for p in PORTS)
    forwarder._handle(ServicesChanged({"all": first_gone}, 1.0))  # id 1 leaves: ids 2 and 3 are now indices 0, 1
    assert decided_per_endpoint(forwarder, "default/rr:http") == {"10.244.1.12:80": 2, "10.244.1.13:80": 2}
    assert forwarder.balancer.ports["default/rr:http"].decided[1] == 2


def test_a_rebuilt_table_goes_on_with_the_round_robin_position():
    forwarder, kernel = compiled_forwarder()
    order = []
    for i in range(5):
        kernel.send(packet_message(0, i, 0x2000, syn("10.96.0.10", 8200 + i)))
        assert forwarder._decide(1) == 1
        order += verdicts(kernel).values()
        forwarder._handle(ServicesChanged({"all": PORTS}, float(i)))  # a change between every two flows
    assert order == [mark_for(1), mark_for(2), mark_for(3), mark_for(1), mark_for(2)]


def test_conntrack_events_wait_for_the_batch_the_packet_thread_decides():
    """least-conn's counts change on both threads (a decision counts a pending flow, conntrack confirms or ends
    it): the event handler takes the forwarder's lock, as a batch does, so no update is lost between them."""
    import threading

    from dataplane.netlink.ctevents import CtEvent
    from dataplane.packet import Flow

    forwarder, _ = compiled_forwarder()
    flow = Flow(4, 6, packed("192.168.50.2"), packed("10.96.0.13"), 40000, 80)

    class Events:
        lost = 0

        @staticmethod
        def read(into):
            into.append(CtEvent("new", 7, flow, (packed("10.244.1.11"), 80)))

    forwarder._events = Events()
    handled = threading.Event()
    with forwarder._lock:  # a batch in progress
        threading.Thread(target=lambda: (forwarder._on_conntrack(), handled.set())).start()
        assert not handled.wait(0.2)
    assert handled.wait(2.0)
    assert forwarder.balancer.ports["default/lc:http"].active == {1: 1}


SLEEPER = r"""
import signal, socket, sys, threading, time
from dataplane.packet import PacketQueued
from dataplane.queue import nfqueue
ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)  # blocking, no receive timeout
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
threading.Thread(target=lambda: time.sleep(60), daemon=True).start()  # as the worker's control thread
print("ready", flush=True)
found = nfqueue.compiled.serve(ours.fileno(), bytearray(4096), [{}], 0, 1, True, PacketQueued, threading.Lock())
print(found[:3], stopping, flush=True)
"""


def test_sigterm_ends_the_blocking_recv_at_once_and_its_handler_has_run():
    """The loop sleeps in recv without the GIL: SIGTERM must end that sleep (EINTR), run the Python handler
    (the forwarder's stop flag) and return, rather than retry and sleep on until a packet or a timeout."""
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", SLEEPER], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # into the recv
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=5)
    finally:
        child.kill()
    assert out.strip() == "(0, 0, []) [True]"
