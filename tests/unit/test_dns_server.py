"""The DNS server on loopback, on uvloop as in the daemon: UDP, TCP, updates,
forwarding, and a bounded fuzz of malformed messages.

Address plan: servers listen on 127.0.0.1 (kernel-chosen ports); ClusterIPs
10.96.0.0/12, Pods 10.244.0.0/16. The upstream is a second DnsServer serving
the zone `example.test`, so forwarding is checked against a real server.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import pytest
import uvloop

from dataplane.dns import server as server_module
from dataplane.dns.server import DnsServer
from dataplane.dns.upstream import Upstream
from dataplane.sync.store import Store
from yamlcases import parse_ok


def service(name: str, ip: str, namespace: str = "default") -> str:
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}
"""


HEADLESS = "\n---\n".join([
    """
apiVersion: v1
kind: Service
metadata: {name: big, namespace: default}
spec: {clusterIP: None}
""",
    """
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: big-1, namespace: default, labels: {kubernetes.io/service-name: big}}
addressType: IPv4
endpoints: [%s]
""" % ", ".join(f"{{addresses: [10.244.1.{i}]}}" for i in range(1, 101)),
])
EXTERNAL = """
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, externalName: web.default.svc.example.test}
"""


def run(coroutine):
    return uvloop.run(asyncio.wait_for(coroutine, 60))


class Cluster:
    def __init__(self):
        self.store = Store()

    def put(self, origin: str, text: str):
        self.store.replace(origin, parse_ok(text))
        return self.store.snapshot()

    def remove(self, origin: str):
        self.store.replace(origin, None)
        return self.store.snapshot()


async def started(cluster: Cluster | None = None, **options) -> DnsServer:
    server = DnsServer("127.0.0.1:0", upstreams=options.pop("upstreams", []), **options)
    await server.start()
    if cluster is not None:
        server.publish(cluster.store.snapshot())
        await server.applied()
    return server


async def udp(server: DnsServer, qname: str, qtype: str = "A", **options) -> dns.message.Message:
    host, port = server.address
    return await dns.asyncquery.udp(dns.message.make_query(qname, qtype, **options), host, timeout=5, port=port)


async def tcp(server: DnsServer, qname: str, qtype: str = "A") -> dns.message.Message:
    host, port = server.address
    return await dns.asyncquery.tcp(dns.message.make_query(qname, qtype), host, timeout=5, port=port)


def addresses(response: dns.message.Message) -> list[str]:
    return sorted(rdata.address for rrset in response.answer for rdata in rrset if hasattr(rdata, "address"))


def test_answers_over_udp_and_tcp_with_truncation():
    async def main():
        cluster = Cluster()
        cluster.put("web", service("web", "10.96.0.10"))
        cluster.put("big", HEADLESS)
        server = await started(cluster)
        try:
            assert addresses(await udp(server, "web.default.svc.cluster.local.")) == ["10.96.0.10"]
            assert addresses(await tcp(server, "web.default.svc.cluster.local.")) == ["10.96.0.10"]
            truncated = await udp(server, "big.default.svc.cluster.local.")
            assert truncated.flags & dns.flags.TC
            whole = await tcp(server, "big.default.svc.cluster.local.")
            assert len(addresses(whole)) == 100 and not whole.flags & dns.flags.TC
            missing = await udp(server, "nope.default.svc.cluster.local.")
            assert missing.rcode() == dns.rcode.NXDOMAIN and missing.authority
        finally:
            await server.close()

    run(main())


def test_tcp_connection_carries_several_queries():
    async def main():
        cluster = Cluster()
        cluster.put("web", service("web", "10.96.0.10"))
        server = await started(cluster)
        try:
            reader, writer = await asyncio.open_connection(*server.address)
            names = ("web", "x", "web")
            queries = [dns.message.make_query(f"{name}.default.svc.cluster.local.", "A") for name in names]
            writer.write(b"".join(q.to_wire(prepend_length=True) for q in queries))  # pipelined
            await writer.drain()
            answers = []
            for _ in queries:
                length = int.from_bytes(await reader.readexactly(2), "big")
                answers.append(dns.message.from_wire(await reader.readexactly(length)))
            writer.close()
            assert [a.id for a in answers] == [q.id for q in queries]
            assert [a.rcode() for a in answers] == [dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.NOERROR]
        finally:
            await server.close()

    run(main())


def test_updates_are_visible_once_applied():
    async def main():
        cluster = Cluster()
        server = await started(cluster)
        try:
            assert (await udp(server, "web.default.svc.cluster.local.")).rcode() == dns.rcode.NXDOMAIN
            server.publish(cluster.put("web", service("web", "10.96.0.10")))
            await server.applied()
            assert addresses(await udp(server, "web.default.svc.cluster.local.")) == ["10.96.0.10"]
            server.publish(cluster.put("web", service("web", "10.96.0.11")))
            server.publish(cluster.put("other", service("other", "10.96.0.12")))  # a burst coalesces
            await server.applied()
            assert addresses(await udp(server, "web.default.svc.cluster.local.")) == ["10.96.0.11"]
            assert addresses(await udp(server, "other.default.svc.cluster.local.")) == ["10.96.0.12"]
            server.publish(cluster.remove("web"))
            await server.applied()
            assert (await udp(server, "web.default.svc.cluster.local.")).rcode() == dns.rcode.NXDOMAIN
        finally:
            await server.close()

    run(main())


def test_before_the_first_snapshot_cluster_names_get_servfail():
    async def main():
        server = await started()
        try:
            assert (await udp(server, "web.default.svc.cluster.local.")).rcode() == dns.rcode.SERVFAIL
            assert (await udp(server, "example.com.")).rcode() == dns.rcode.REFUSED
        finally:
            await server.close()

    run(main())


def test_large_updates_are_built_off_the_loop_and_swapped_in(monkeypatch):
    monkeypatch.setattr(server_module, "INCREMENTAL_LIMIT", 5)

    async def main():
        cluster = Cluster()
        cluster.put("web", service("web", "10.96.0.10"))
        server = await started(cluster)
        try:
            first = server.zone
            for i in range(20):
                cluster.put(f"s{i}", service(f"s{i}", f"10.96.1.{i}"))
            server.publish(cluster.store.snapshot())
            answered_meanwhile = addresses(await udp(server, "web.default.svc.cluster.local."))
            await server.applied()
            assert server.zone is not first, "a large change builds a new zone"
            assert server.zone.serial > first.serial
            assert answered_meanwhile == ["10.96.0.10"]
            assert addresses(await udp(server, "s19.default.svc.cluster.local.")) == ["10.96.1.19"]
            server.publish(cluster.put("web", service("web", "10.96.0.20")))
            await server.applied()
            assert addresses(await udp(server, "web.default.svc.cluster.local.")) == ["10.96.0.20"]
        finally:
            await server.close()

    run(main())


def test_forwarding_and_external_name_chasing():
    async def main():
        upstream_cluster = Cluster()
        upstream_cluster.put("web", service("web", "10.96.5.5"))
        upstream = await started(upstream_cluster, domain="example.test")
        cluster = Cluster()
        cluster.put("ext", EXTERNAL)
        server = await started(cluster, upstreams=[Upstream(*upstream.address)])
        try:
            forwarded = await udp(server, "web.default.svc.example.test.")
            assert addresses(forwarded) == ["10.96.5.5"] and forwarded.flags & dns.flags.RA
            assert (await tcp(server, "nope.default.svc.example.test.")).rcode() == dns.rcode.NXDOMAIN
            chased = await udp(server, "ext.default.svc.cluster.local.")
            assert [rrset.to_text() for rrset in chased.answer] == [
                "ext.default.svc.cluster.local. 5 IN CNAME web.default.svc.example.test.",
                "web.default.svc.example.test. 5 IN A 10.96.5.5",
            ]
            assert server.stats["forwarded"] == 3
        finally:
            await server.close()
            await upstream.close()

    run(main())


def test_a_dead_upstream_gives_servfail_in_time():
    async def main():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
            silent.bind(("127.0.0.1", 0))
            server = await started(Cluster(), upstreams=[Upstream(*silent.getsockname())], upstream_timeout=0.3)
            try:
                began = time.monotonic()
                response = await udp(server, "example.com.")
                assert response.rcode() == dns.rcode.SERVFAIL
                assert time.monotonic() - began < 2
            finally:
                await server.close()

    run(main())


def free_port() -> int:
    """A loopback port free for both UDP and TCP at this moment."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp_probe, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp_probe:
            udp_probe.bind(("127.0.0.1", 0))
            port = udp_probe.getsockname()[1]
            try:
                tcp_probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def test_never_forwards_to_itself():
    async def main():
        port = free_port()
        server = DnsServer(f"127.0.0.1:{port}", upstreams=[Upstream("127.0.0.1", port)])
        await server.start()
        try:
            assert server.upstreams == []
            assert (await udp(server, "example.com.")).rcode() == dns.rcode.REFUSED
            assert server.stats["forwarded"] == 0
        finally:
            await server.close()

    run(main())


# Fuzzing: the server answers every malformed query with FORMERR (or another error)
# or drops it, never answers with garbage, and keeps serving.

FUZZ_MESSAGES = 3000


def fuzz_messages(rng: random.Random, count: int) -> list[bytes]:
    seeds = [
        dns.message.make_query(name, kind, use_edns=edns).to_wire()
        for name, kind, edns in [
            ("web.default.svc.cluster.local.", "A", None),
            ("_http._tcp.web.default.svc.cluster.local.", "SRV", 0),
            ("10.0.96.10.in-addr.arpa.", "PTR", None),
            ("example.com.", "AAAA", 0),
        ]
    ]
    messages = []
    for i in range(count):
        seed = bytearray(rng.choice(seeds))
        kind = i % 6
        if kind == 0:  # random bytes
            message = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
        elif kind == 1:  # bit flips
            for _ in range(rng.randrange(1, 6)):
                seed[rng.randrange(len(seed))] ^= 1 << rng.randrange(8)
            message = bytes(seed)
        elif kind == 2:  # truncation
            message = bytes(seed[: rng.randrange(len(seed))])
        elif kind == 3:  # hostile counts
            struct.pack_into("!HHHH", seed, 4, *(rng.choice([0, 1, 2, 255, 65535]) for _ in range(4)))
            message = bytes(seed)
        elif kind == 4:  # compression pointers anywhere
            position = rng.randrange(12, len(seed))
            seed[position: position + 2] = struct.pack("!H", 0xC000 | rng.randrange(0, 0x3FFF))
            message = bytes(seed)
        else:  # trailing junk and oversized labels
            message = bytes(seed) + bytes([63]) + b"a" * rng.randrange(0, 300)
        messages.append(message[:2] + message[2:])
    return messages


def test_fuzzed_queries_never_break_the_server():
    rng = random.Random(20240611)
    messages = fuzz_messages(rng, FUZZ_MESSAGES)

    async def main():
        cluster = Cluster()
        cluster.put("web", service("web", "10.96.0.10"))
        server = await started(cluster)
        loop = asyncio.get_running_loop()
        received: list[bytes] = []

        class Collect(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                received.append(data)

        transport, _ = await loop.create_datagram_endpoint(Collect, remote_addr=server.address)
        try:
            for start in range(0, len(messages), 50):
                for message in messages[start: start + 50]:
                    transport.sendto(message)
                await asyncio.sleep(0.005)  # let the server keep up: each queued datagram costs ~1 kB of buffer
            await asyncio.sleep(0.3)
            for data in received:
                response = dns.message.from_wire(data, ignore_trailing=True, question_only=True)
                assert response.flags & dns.flags.QR
            # TCP: garbage bodies, lying lengths and half-closed connections.
            for message in messages[:300]:
                reader, writer = await asyncio.open_connection(*server.address)
                length = len(message) if rng.random() < 0.8 else rng.randrange(0, 65536)
                writer.write(struct.pack("!H", length) + message)
                if rng.random() < 0.5:
                    writer.write_eof()
                await writer.drain()
                writer.close()
            assert addresses(await udp(server, "web.default.svc.cluster.local.")) == ["10.96.0.10"]
            assert addresses(await tcp(server, "web.default.svc.cluster.local.")) == ["10.96.0.10"]
            assert server.stats["internal_errors"] == 0
            assert server.stats["udp"] >= FUZZ_MESSAGES * 0.9, "most fuzz datagrams reached the server"
            assert len(received) > FUZZ_MESSAGES / 3, "malformed queries get FORMERR, not silence"
        finally:
            transport.close()
            await server.close()

    run(main())


@pytest.mark.parametrize("bind, message", [
    ("localhost:53", "--dns-bind-address"),
    ("127.0.0.1:99999", "--dns-bind-address"),
])
def test_bad_bind_address(bind, message):
    with pytest.raises(ValueError, match=message):
        DnsServer(bind)


def test_bad_ttl():
    with pytest.raises(ValueError, match="--dns-ttl"):
        DnsServer("127.0.0.1:53", ttl=-1)
