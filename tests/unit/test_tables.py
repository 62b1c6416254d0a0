"""Balancing tables (nat/tables.py, lb/tables.py): the hash, the table, its elements and their changes.

Address plan: ClusterIP 10.96.7.1 (NodePort 30701, LoadBalancer 192.168.60.7), endpoints
10.244.1.1-10 port 8080, node 192.168.50.1.
"""

from __future__ import annotations

import pytest

from dataplane.config import NodeSettings
from dataplane.lab.manifests import endpoint_slice, port, service
from dataplane.lb import maglev
from dataplane.lb.tables import (
    DEFAULT_TABLE_SIZE, TABLE_SIZE_ANNOTATION, default_table_size, fill, jhash, scale, slot_of, table_balanced, table_size,
)
from dataplane.model import parse_objects
from dataplane.nat import layout, plan
from dataplane.nat.expr import Jhash, Lookup, SetMeta
from dataplane.nat.fake import FakeNftables, parse
from dataplane.nat.nftables import NftError
from dataplane.nat.render import RulesetBuilder
from dataplane.nat.ruleset import AddRule, Elements
from dataplane.nat.tables import KERNEL_TABLE, TableIdAllocator, balancing_paths
from dataplane.nat.trace import Packet, Tracer
from dataplane.sync.store import Store

SETTINGS = NodeSettings(node_name="node1", cluster_cidrs=("10.244.0.0/16",))
ENDPOINTS = [f"10.244.1.{i}" for i in range(1, 11)]
SIZE = 16381  # the default for 10 endpoints (lb/tables.default_table_size)
NODE_IPS = ("192.168.50.1",)


def documents(endpoints=ENDPOINTS, annotations=None, name="maglev", cluster_ip="10.96.7.1", node_port=30701,
              ingress_ip="192.168.60.7"):
    svc = service(name, cluster_ip, [port("tcp", 80, 8080, "TCP", node_port=node_port)], type="LoadBalancer",
                  ingress_ips=[ingress_ip])
    svc["metadata"]["annotations"] = annotations if annotations is not None else {"dataplane.io/lb-algorithm": "maglev"}
    return [svc, endpoint_slice(name, endpoints, [("tcp", 8080, "TCP")], name=f"{name}-1")]


def state_of(docs):
    store = Store()
    objects, errors = parse_objects(docs, "m.yaml")
    assert not errors
    store.replace("m.yaml", objects)
    return store, next(iter(store.snapshot().services.values()))


# The kernel's own answers (nft `ct mark set jhash ... mod 1021 seed 0x1234` on real packets, read back
# from conntrack), for saddr . sport . daddr . dport: the Python jhash must give the same.
KERNEL_SLOTS = [
    (("127.0.0.1", 40000, "127.0.0.5", 80), 610), (("127.0.0.1", 555, "127.0.0.9", 9999), 906),
    (("127.0.0.1", 12345, "127.0.0.5", 80), 241), (("::1", 40001, "::1", 8080), 484),
]


@pytest.mark.parametrize("flow, slot", KERNEL_SLOTS, ids=[str(s) for _, s in KERNEL_SLOTS])
def test_jhash_is_the_kernels(flow, slot) -> None:
    import ipaddress
    import struct
    saddr, sport, daddr, dport = flow
    data = (ipaddress.ip_address(saddr).packed + struct.pack("!H2x", sport)
            + ipaddress.ip_address(daddr).packed + struct.pack("!H2x", dport))
    assert scale(jhash(data, 0x1234), 1021) == slot


def test_which_services_get_a_table() -> None:
    _, maglev_state = state_of(documents())
    _, weighted = state_of(documents(annotations={"dataplane.io/weights": "10.244.1.1=0"}))
    _, least = state_of(documents(annotations={"dataplane.io/weights": "10.244.1.1=0",
                                               "dataplane.io/lb-algorithm": "least-conn"}))
    _, plain = state_of(documents(annotations={}))
    assert table_balanced(maglev_state.service, "random")
    assert table_balanced(weighted.service, "random") and table_balanced(weighted.service, "round-robin")
    assert not table_balanced(least.service, "random")  # needs per-flow state: the forwarder's
    assert not table_balanced(plain.service, "random")
    assert table_balanced(plain.service, "maglev")  # --lb-algorithm maglev


@pytest.mark.parametrize("text, size", [("", SIZE), ("1021", 1021), ("65537", 65537), ("262139", 262139),
                                        ("1024", SIZE), ("1048583", SIZE),
                                        ("x", SIZE)])
def test_table_size_annotation(text: str, size: int) -> None:
    _, state = state_of(documents(annotations={TABLE_SIZE_ANNOTATION: text} if text else {}))
    problems: list[str] = []
    assert table_size(state.service, problems, len(ENDPOINTS)) == size
    assert bool(problems) == (size == SIZE and bool(text))
    assert all("default/maglev" in p and TABLE_SIZE_ANNOTATION in p for p in problems)


def test_weights_are_slot_shares_and_zero_drains() -> None:
    _, state = state_of(documents(ENDPOINTS[:3], {"dataplane.io/weights": "10.244.1.1=3, 10.244.1.3=0"}))
    table = fill(state.service, list(state.port_backends())[0][1], 4093)
    counts = {ip: sum(1 for b in table if b.ip == ip) for ip in ENDPOINTS[:3]}
    assert counts["10.244.1.3"] == 0
    assert abs(counts["10.244.1.1"] / counts["10.244.1.2"] - 3) < 0.05


def test_rules_parse_back_to_the_values_the_layout_built() -> None:
    for family in (4, 6):
        fam = layout.Family(family)
        for declaration in layout.declare(layout.HashPick(1021), SETTINGS, fam):
            for rule in getattr(declaration, "rules", ()):
                (parsed,) = parse(f"add rule {fam.nft} dataplane {declaration.name} {rule}")
                assert isinstance(parsed.subject, AddRule) and parsed.subject.rule == rule
    rule = next(d for d in layout.declare(layout.HashPick(7), SETTINGS, layout.Family(4))
                if d.name == "hash-cluster-7").rules
    assert isinstance(rule[0].statements[0], SetMeta) and isinstance(rule[0].statements[0].value, Lookup)
    assert any(isinstance(p, Jhash) and p.mod == 7 for p in rule[-1].statements[-1].expr)
    assert not any(r.picks for r in rule) and rule[-1].hashes  # not a random pick: userspace leaves it be


def test_the_fake_refuses_to_list_a_jhash_typeof_map_as_nft_1_0_6_crashes() -> None:
    nft = FakeNftables()
    nft.run("add table ip t\nadd map ip t m { typeof meta mark . jhash ip saddr . th sport mod 7 seed 0x1 : "
            "ip daddr . th dport ; }\n")
    with pytest.raises(NftError, match="Segmentation fault"):
        nft.run("list ruleset")
    with pytest.raises(NftError, match="Segmentation fault"):
        nft.run("list table ip t")
    assert nft.run("list tables") == "table ip t\n"
    assert nft.list_objects("ip", "t") == [("map", "m")]  # `nft -j -t list table` works on the kernel


def built(store):
    builder = RulesetBuilder(SETTINGS)
    return builder, builder.build(store.snapshot(), NODE_IPS)


def test_one_table_for_every_address_of_a_port() -> None:
    store, _ = state_of(documents())
    _, ruleset = built(store)
    (fragment,) = [f for owner, f in ruleset.fragments.items() if owner != "node"]
    slots = [e for e in fragment.elements if e.container.startswith("slots-")]
    assert len(slots) == SIZE  # ClusterIP, LoadBalancer IP and NodePort share them
    ids = {e.value for e in fragment.elements if e.container in (layout.TABLE_IDS, layout.NODEPORT_TABLE_IDS)}
    assert len(ids) == 1
    (path,) = [p for p in balancing_paths(ruleset)]
    assert path["paths"] == [KERNEL_TABLE] and path["table_slots"] == SIZE


def test_an_endpoint_leaving_rewrites_only_the_slots_maglev_moves() -> None:
    store, _ = state_of(documents())
    builder = RulesetBuilder(SETTINGS)
    state = plan.Programmed()
    tx, change = state.plan(builder.build(store.snapshot(), NODE_IPS))
    state = state.commit(change)
    objects, _ = parse_objects(documents(ENDPOINTS[:-1]), "m.yaml")
    store.replace("m.yaml", objects)
    tx, change = state.plan(builder.build(store.snapshot(), NODE_IPS))
    by_verb = {c.verb: len(c.subject.elements) for c in tx if isinstance(c.subject, Elements)
               and c.subject.container.startswith("slots-")}
    names = sorted(f"{ip}:8080" for ip in ENDPOINTS)  # as the renderer orders them (by address text)
    rest = sorted(f"{ip}:8080" for ip in ENDPOINTS[:-1])
    before, after = maglev.build(names, None, SIZE), maglev.build(rest, None, SIZE)
    moved = sum(1 for a, b in zip(before, after) if names[a] != rest[b])
    assert by_verb == {"delete": moved, "add": moved}
    assert moved / SIZE <= 1 / len(ENDPOINTS) + 0.01  # the goal, at the default size for N = 10
    assert not [c for c in tx if not isinstance(c.subject, Elements)]  # elements only: no rule, no chain


def test_table_ids_are_a_hash_of_the_name_whatever_the_order() -> None:
    first, second = TableIdAllocator(), TableIdAllocator()
    a, b = first.get("a", "t", "ns/a/TCP/80/cluster"), first.get("b", "t", "ns/b/TCP/80/cluster")
    assert second.get("b", "t", "ns/b/TCP/80/cluster") == b and second.get("a", "t", "ns/a/TCP/80/cluster") == a
    assert a != b and first.get("a", "t", "ignored once held") == a


def test_table_ids_that_hash_alike_probe_and_are_released() -> None:
    ids = TableIdAllocator()
    a = ids.get("a", "t", "same")
    b = ids.get("b", "t", "same")  # the same name: a collision, settled by probing
    assert a != b
    ids.keep("a", set())
    assert ids.get("c", "t", "same") == a


def test_the_node_bound_on_slots_falls_back_to_the_random_pick(caplog) -> None:
    store = Store()
    for n in range(3):
        # Each its own addresses: a shared LoadBalancer IP:port would be a conflict the store decides.
        objects, errors = parse_objects(documents(name=f"m{n}", cluster_ip=f"10.96.7.{n + 1}", node_port=30701 + n,
                                                  ingress_ip=f"192.168.60.{n + 7}"), f"m{n}.yaml")
        assert not errors
        store.replace(f"m{n}.yaml", objects)
    builder = RulesetBuilder(NodeSettings(cluster_cidrs=("10.244.0.0/16",), table_slots=2 * SIZE))
    ruleset = builder.build(store.snapshot(), NODE_IPS)
    paths = [p["paths"] for p in balancing_paths(ruleset)]
    assert sorted(map(tuple, paths)) == [("kernel-random",), ("kernel-table",), ("kernel-table",)]
    assert "kernel's random pick instead" in caplog.text


def test_a_traced_flow_reaches_the_slot_it_hashes_to() -> None:
    store, state = state_of(documents())
    _, ruleset = built(store)
    nft = FakeNftables()
    nft.apply(plan.full(ruleset)[0])
    table = fill(state.service, list(state.port_backends())[0][1], SIZE)
    tracer = Tracer(nft)
    for sport in range(40000, 40020):
        for daddr, dport in (("10.96.7.1", 80), ("192.168.60.7", 80), ("192.168.50.1", 30701)):
            (outcome,) = tracer.outcomes(Packet("192.168.50.2", daddr, "tcp", dport, sport))
            assert outcome.address == table[slot_of("192.168.50.2", sport, SIZE)].ip


@pytest.mark.parametrize("endpoints, size", [(1, 4093), (4, 4093), (5, 16381), (16, 16381), (17, 65537),
                                             (65, 65537), (66, 262139), (1048, 1048573), (5000, 1048573)])
def test_the_default_size_holds_a_thousand_slots_per_endpoint(endpoints: int, size: int) -> None:
    assert default_table_size(endpoints) == size
    assert default_table_size(endpoints, bound=65537) == min(size, 65537)  # the node's slot bound caps it


@pytest.mark.parametrize("n", [2, 3, 4, 5, 10, 16])
def test_one_of_n_leaving_moves_at_most_one_nth_and_one_percent_at_one_size(n: int) -> None:
    """The issue's goal at the default size for n, the size staying (an explicit one, or n - 1 on the
    same step); the pure computation; nat/README.md has n up to 200."""
    size = default_table_size(n)
    names = [f"10.244.1.{i}:8080" for i in range(1, n + 1)]
    before = maglev.build(names, None, size)
    for gone in range(n):
        rest = names[:gone] + names[gone + 1:]
        after = maglev.build(rest, None, size)
        moved = sum(1 for a, b in zip(before, after) if names[a] != rest[b]) / size
        assert moved <= 1 / n + 0.01, (n, names[gone], moved)


@pytest.mark.parametrize("n", [
    2, 4, 10, 16, 30,
    # At a step of the default size (lb/tables.TABLE_SIZES: 5 -> 4, 17 -> 16, ...) one leaving changes the
    # size, which rehashes every flow: about 1 - 1/n of new flows move (bench/results/tables-moved: 80%
    # at n = 5, real packets). A known defect: the size is a pure function of the endpoints listed, so
    # that every node picks the same one; keeping the old size needs state (README, issue 15).
    pytest.param(5, marks=pytest.mark.xfail(strict=True, reason="the default size steps from 16381 to 4093")),
    pytest.param(17, marks=pytest.mark.xfail(strict=True, reason="the default size steps from 65537 to 16381")),
])
def test_one_of_n_leaving_at_the_default_sizes_moves_at_most_one_nth_and_one_percent(n: int) -> None:
    """The fraction of the hash space whose endpoint changes when one of n leaves, each table at the
    default size for its endpoint count (what a Service without an explicit size gets)."""
    from bench.tables import hash_space_moved

    names = [f"10.244.1.{i}:8080" for i in sorted(range(1, n + 1), key=str)]
    before = maglev.build(names, None, default_table_size(n))
    rest = names[1:]
    after = maglev.build(rest, None, default_table_size(n - 1))
    assert hash_space_moved(before, names, after, rest) <= 1 / n + 0.01


# Which path each Service port takes, per port: `mixed` is Maglev with 3-slot tables, so its port
# `small` (2 endpoints) has a table and its port `big` (4 endpoints, not fewer than the slots) has
# none: kernel mode picks at random there, userspace mode queues it to the forwarder.
MIXED_SMALL, MIXED_BIG = ["10.244.2.1", "10.244.2.2"], [f"10.244.3.{i}" for i in range(1, 5)]


def path_documents(mixed_size: int = 3) -> dict[str, list[dict]]:
    def one(name: str, number: int, annotations: dict, **spec) -> list[dict]:
        svc = service(name, f"10.96.8.{number}", [port("http", 80, 8080, "TCP")], **spec)
        svc["metadata"]["annotations"] = annotations
        return [svc, endpoint_slice(name, [f"10.244.4.{number}", f"10.244.5.{number}"], [("http", 8080, "TCP")])]

    mixed = service("mixed", "10.96.8.1", [port("small", 80, 8080, "TCP", node_port=30801),
                                           port("big", 81, 8081, "TCP", node_port=30802)], type="NodePort")
    mixed["metadata"]["annotations"] = {"dataplane.io/lb-algorithm": "maglev", TABLE_SIZE_ANNOTATION: str(mixed_size)}
    return {
        "mixed.yaml": [mixed, endpoint_slice("mixed", MIXED_SMALL, [("small", 8080, "TCP")], name="mixed-small"),
                       endpoint_slice("mixed", MIXED_BIG, [("big", 8081, "TCP")], name="mixed-big")],
        "weighted.yaml": one("weighted", 2, {"dataplane.io/weights": "10.244.4.2=0"}),  # draining one
        "plain.yaml": one("plain", 3, {}),
        "least.yaml": one("least", 4, {"dataplane.io/lb-algorithm": "least-conn"}),
        "sticky.yaml": one("sticky", 5, {"dataplane.io/lb-algorithm": "maglev"}, sessionAffinity="ClientIP"),
    }


PATHS = {  # Service port -> (kernel mode's path, userspace mode's path, table slots)
    "default/mixed:small": ("kernel-table", "kernel-table", 3),
    "default/mixed:big": ("kernel-random", "forwarder", None),
    "default/weighted:http": ("kernel-table", "kernel-table", DEFAULT_TABLE_SIZE),
    "default/plain:http": ("kernel-random", "forwarder", None),
    "default/least:http": ("kernel-random", "forwarder", None),
    "default/sticky:http": ("kernel-table", "kernel-table", DEFAULT_TABLE_SIZE),
}


@pytest.mark.parametrize("mode", ["kernel", "userspace"])
def test_status_says_which_path_each_service_port_takes_and_the_forwarder_knows_only_queued_ports(
        tmp_path, mode: str) -> None:
    """Through the daemon's HTTP: /status's `paths`, per Service port; in userspace mode the forwarder
    is told only of the queued ports (it builds no table for a table-balanced one, `mixed:small`), and
    forgets one that gains a table."""
    import asyncio
    import json

    from dataplane.daemon import http
    from dataplane.daemon.app import Daemon, Options
    from dataplane.daemon.status import format_status
    from dataplane.daemon.userspace import UserspaceMode
    from dataplane.lab.manifests import ManifestDir

    manifests = ManifestDir(tmp_path / "manifests")
    for name, docs in path_documents().items():
        manifests.write(name, docs)
    nft = FakeNftables()
    settings = NodeSettings(node_name="node1", cluster_cidrs=("10.244.0.0/16",))
    userspace = UserspaceMode(settings, nft, queues=1, queue_in_nft=True) if mode == "userspace" else None
    daemon = Daemon(Options(source=manifests.path, settings=settings), nft, userspace=userspace)

    async def status() -> dict:
        server = await http.serve("127.0.0.1:0", {"/status": daemon._status})
        try:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await reader.read()
            writer.close()
        finally:
            server.close()
        assert response.startswith(b"HTTP/1.1 200 OK")
        return json.loads(response.split(b"\r\n\r\n", 1)[1])

    async def synced() -> dict:
        daemon.source.load_all()
        daemon.changed("test")
        assert await daemon.loop.step(True)
        return await status()

    body = asyncio.run(synced())
    paths = {p["service"]: p for p in body["paths"] if p["family"] == "ip"}
    assert {name: p["paths"] for name, p in paths.items()} == {
        name: [kernel if mode == "kernel" else user] for name, (kernel, user, _) in PATHS.items()}
    assert {name: p.get("table_slots") for name, p in paths.items()} == {
        name: slots for name, (_, _, slots) in PATHS.items()}
    if mode == "kernel":
        return
    forwarded = {s["service"]: s["algorithm"] for s in daemon.userspace.forwarder.snapshot()["services"]}
    assert forwarded == {"default/mixed:big": "maglev", "default/plain:http": "random",
                         "default/least:http": "least-conn"}
    # /status lists every port with its path; a table port's endpoints with their weights, no flow counts.
    listed = {s["service"]: (s["path"], s["algorithm"]) for s in body["services"]}
    assert listed == {name: (user, "least-conn" if "least" in name else "random" if name.split("/")[1][:5]
                             in ("plain", "weigh") else "maglev") for name, (_, user, _) in PATHS.items()}
    (weighted,) = [s for s in body["services"] if s["service"] == "default/weighted:http"]
    assert {e["endpoint"]: (e["weight"], e["decided"]) for e in weighted["endpoints"]} == {
        "10.244.4.2:8080": (0, None), "10.244.5.2:8080": (1, None)}
    lines: list[str] = []
    format_status(body, lines.append)
    assert "default/weighted:http  random  (kernel table)" in lines
    assert f"    {'10.244.4.2:8080':<24} weight 0" in lines
    assert set(nft.elements("ip", "dataplane", "userspace-nodeports")) == {"tcp . 30802"}  # not 30801
    # The mixed Service's tables grow to 5 slots: its big port now has one, and leaves the forwarder.
    manifests.write("mixed.yaml", path_documents(mixed_size=5)["mixed.yaml"])
    body = asyncio.run(synced())
    assert [p["paths"] for p in body["paths"] if p["service"] == "default/mixed:big" and p["family"] == "ip"] \
        == [["kernel-table"]]
    assert {s["service"] for s in daemon.userspace.forwarder.snapshot()["services"]} == {
        "default/plain:http", "default/least:http"}
    assert [s["path"] for s in body["services"] if s["service"] == "default/mixed:big"] == ["kernel-table"]
    assert set(nft.elements("ip", "dataplane", "userspace-nodeports")) == set()


def test_a_port_that_gains_its_table_in_a_whole_rebuild_leaves_the_forwarder() -> None:
    """The node's slot bound holds two of three Maglev Services' tables: the third is queued and decided
    by the forwarder. When one of the two leaves, the third keeps its random pick until the ruleset is
    rendered whole (new node addresses); then it has its table, and userspace mode stops queueing it and
    tells the forwarder, though the Service itself did not change."""
    from dataplane.daemon.userspace import UserspaceMode

    settings = NodeSettings(node_name="node1", cluster_cidrs=("10.244.0.0/16",), table_slots=2 * SIZE)
    store = Store()
    for n in range(3):
        objects, _ = parse_objects(documents(name=f"m{n}", cluster_ip=f"10.96.7.{n + 1}", node_port=30701 + n,
                                             ingress_ip=f"192.168.60.{n + 7}"), f"m{n}.yaml")
        store.replace(f"m{n}.yaml", objects)
    mode = UserspaceMode(settings, FakeNftables(), queues=1, queue_in_nft=True)
    builders = {4: RulesetBuilder(settings, 4), 6: RulesetBuilder(settings, 6)}

    def sync(node_ips) -> set[str]:
        snapshot = store.snapshot()
        for version, builder in builders.items():
            mode.extend(builder.build(snapshot, node_ips), snapshot)
        mode.synced(snapshot)
        return {s["service"] for s in mode.forwarder.snapshot()["services"]}

    (fallback,) = sync(NODE_IPS)  # one of the three, whichever rendered last
    store.replace([n for n in ("m0.yaml", "m1.yaml", "m2.yaml") if f"/{n[:2]}:" not in fallback][0], None)
    assert sync(NODE_IPS) == {fallback}  # rendered incrementally: it keeps the random pick, still queued
    assert sync((*NODE_IPS, "192.168.50.9")) == set()  # rendered whole: it has its table now


def test_incremental_table_changes_converge_to_what_a_fresh_render_and_full_sync_give() -> None:
    """The builder remembers each table's last rendering (nat/tables.SlotElements) and the planner diffs
    only differing elements: after every step the elements and the planner's state are a fresh one's."""
    store, _ = state_of(documents())
    builder, state = RulesetBuilder(SETTINGS), plan.Programmed()
    held = []
    weighted = {"dataplane.io/lb-algorithm": "maglev", "dataplane.io/weights": "10.244.1.2=3,10.244.1.3=0"}
    steps = [ENDPOINTS[:-1], ENDPOINTS, ENDPOINTS[:-1], ENDPOINTS[1:], (ENDPOINTS, weighted), ENDPOINTS,
             (ENDPOINTS, {"dataplane.io/lb-algorithm": "maglev", TABLE_SIZE_ANNOTATION: "1021"}), ENDPOINTS[:3]]
    for step in [ENDPOINTS, *steps]:
        endpoints, annotations = step if isinstance(step, tuple) else (step, None)
        objects, _ = parse_objects(documents(endpoints, annotations), "m.yaml")
        store.replace("m.yaml", objects)
        snapshot = store.snapshot()
        ruleset = builder.build(snapshot, NODE_IPS)
        held[:] = [snapshot]
        tx, change = state.plan(ruleset)
        state = state.commit(change)
        fresh = RulesetBuilder(SETTINGS).build(snapshot, NODE_IPS)
        assert {o: f.elements for o, f in ruleset.fragments.items()} == {o: f.elements for o, f in fresh.fragments.items()}
        assert state.held == plan.full(fresh)[1].held


def test_an_endpoint_coming_back_reuses_the_fill_before_and_its_unchanged_slots() -> None:
    from dataplane.nat.tables import SlotElements

    _, state = state_of(documents())
    backends = list(state.port_backends())[0][1]
    slots = SlotElements()
    first = slots.render(state.service, backends, 1021, 7)
    fewer = slots.render(state.service, backends[:-1], 1021, 7)
    back = slots.render(state.service, backends, 1021, 7)
    assert back == first and back == SlotElements().render(state.service, backends, 1021, 7)
    kept = sum(1 for a, b in zip(first, fewer) if a is b)
    assert kept == sum(1 for a, b in zip(first, fewer) if a == b) > 1021 * 0.8  # unchanged slots: the same objects
    assert all(a is b for a, b in zip(fewer, back) if a == b)
