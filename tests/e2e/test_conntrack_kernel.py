"""The conntrack dump's two readers against a real conntrack table, each in a namespace of its own.

- least-conn survives an event overflow: a forwarder (its conntrack side;
  no queue is bound) follows three TCP flows to 127.0.0.1:8080, stops
  reading while a UDP burst overflows its socket and two of the flows close
  (their events are lost), then reads again: the loss is counted and the
  counts come back from a dump read in a thread;
- stale-flow cleanup deletes exactly the UDP entries it is asked for.

Address plan (inside the namespace, all on lo)
    10.96.0.10:53/UDP  a "Service", DNAT to 127.0.0.1:5353 (its endpoint)
    10.96.0.11:53/UDP  a "Service" without rules yet: its flows are never translated
    127.0.0.1:7000/UDP someone else's flow
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="nft is not installed"),
]

ROOT = Path(__file__).resolve().parents[2]

SCENARIO = r"""
import asyncio, json, socket, time
from dataplane.lb.balancer import Balancer
from dataplane.lb.policy import PortTable, Target
from dataplane.netlink import ctevents
from dataplane.netlink.ctevents import EventSocket
from dataplane.queue import forwarder

forwarder.EventSocket = lambda: EventSocket(rcvbuf=8192)  # small, so that a burst overflows it
dumps = []
real_dump = ctevents.dump_flows
def timed_dump():
    started = time.perf_counter()
    try:
        return real_dump()
    finally:
        dumps.append(time.perf_counter() - started)
forwarder.dump_flows = timed_dump

async def until(condition, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)

async def main():
    loop = asyncio.get_running_loop()
    server = socket.socket()
    server.bind(("127.0.0.1", 8080))
    server.listen(16)
    f = forwarder.Forwarder((0,), Balancer())
    f._loop = loop  # the conntrack side only: no queue is bound
    table = PortTable("default/web:http", 6, (socket.inet_aton("127.0.0.1"),), 8080, None,
                      (Target(1, "127.0.0.1", 8080),), "least-conn", None)
    active = lambda: f.balancer.ports["default/web:http"].active.get(1, 0)
    f.services_changed({("default", "web"): (table,)})
    await until(lambda: f.conntrack_resyncs == 1, "the first dump")
    clients = [socket.create_connection(("127.0.0.1", 8080)) for _ in range(3)]
    accepted = [server.accept()[0] for _ in range(3)]
    await until(lambda: active() == 3, "three flows counted from events")

    loop.remove_reader(f._events.fileno())  # busy elsewhere: events pile up in the socket
    burst = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for n in range(20000):
        burst.sendto(b"x", ("127.0.0.1", 1024 + n))
    for sock in clients[:2] + accepted[:2]:
        sock.close()
    time.sleep(0.2)
    loop.add_reader(f._events.fileno(), f._on_conntrack)

    lag, last = 0.0, time.perf_counter()
    async def ticker():
        nonlocal lag, last
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            lag, last = max(lag, now - last), now
    ticking = asyncio.create_task(ticker())
    await until(lambda: f.conntrack_resyncs >= 2 and f._resync is None, "the dump after the overflow")
    ticking.cancel()
    print(json.dumps({"lost": f.snapshot()["conntrack_overflows"], "resyncs": f.conntrack_resyncs,
                      "active": active(), "dump_seconds": dumps[-1], "loop_lag": lag}))
    f.close()

asyncio.run(main())
"""


@pytest.fixture
def namespace():
    name = f"dp-ct-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        # Conntrack tracks a namespace's packets once a rule there needs it.
        subprocess.run(["ip", "netns", "exec", name, "nft",
                        "add table ip t; add chain ip t out { type filter hook output priority 0; }; "
                        "add rule ip t out ct state new counter"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


CLEANUP = r"""
import json, socket
from dataplane.netlink import conntrack
from dataplane.netlink.ctevents import dump_flows

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for source, target in ((40001, ("10.96.0.10", 53)), (40002, ("10.96.0.11", 53)), (40003, ("127.0.0.1", 7000))):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", source))
    s.sendto(b"x", target)
udp = lambda: sorted((e.flow.sport, socket.inet_ntoa(e.endpoint[0]), e.endpoint[1])
                     for e in dump_flows() if e.flow.protocol == 17)
before = udp()
deleted = conntrack.clear([conntrack.StaleFlows("UDP", "127.0.0.1", 5353),
                           conntrack.StaleFlows("UDP", "10.96.0.11", 53, "frontend")])
print(json.dumps({"before": before, "deleted": deleted, "after": udp()}))
"""


def test_cleanup_deletes_the_stale_udp_entries_and_no_other(namespace):
    subprocess.run(["ip", "netns", "exec", namespace, "ip", "addr", "add", "10.96.0.10/32", "dev", "lo"], check=True)
    subprocess.run(["ip", "netns", "exec", namespace, "ip", "addr", "add", "10.96.0.11/32", "dev", "lo"], check=True)
    subprocess.run(["ip", "netns", "exec", namespace, "nft",
                    "add table ip n; add chain ip n out { type nat hook output priority -100; }; "
                    "add rule ip n out ip daddr 10.96.0.10 udp dport 53 dnat to 127.0.0.1:5353"], check=True)
    done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", CLEANUP], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before"] == [[40001, "127.0.0.1", 5353], [40002, "10.96.0.11", 53], [40003, "127.0.0.1", 7000]]
    assert result["deleted"] == 2
    assert result["after"] == [[40003, "127.0.0.1", 7000]]


def test_lost_events_are_counted_and_least_conn_recounts_from_a_dump_off_the_loop(namespace):
    done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", SCENARIO], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["lost"] >= 1  # the overflow is counted (dataplane_userspace_conntrack_events_lost)
    assert result["active"] == 1  # the two flows whose ends were lost no longer count
    # The dump ran in a thread: the loop kept its 1 ms ticks while it read 20,000 entries.
    assert result["loop_lag"] < max(0.1, result["dump_seconds"] / 3), result
