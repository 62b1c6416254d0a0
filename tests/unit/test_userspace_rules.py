"""Userspace mode's rules: every kernel pick gets its mark-driven twin, ids are stable, syncs stay incremental.

Address plan: Pods 10.244.0.0/16, ClusterIPs 10.96.0.0/12, node 192.168.50.1 (node-a).
"""

from __future__ import annotations

import pytest

from dataplane.config import NodeSettings
from dataplane.lb.policy import parse_weights, port_tables, weight_of
from dataplane.model import parse_objects
from dataplane.nat import layout, plan
from dataplane.nat.render import RulesetBuilder
from dataplane.nat.expr import AnonMap, Counter, Nat, Queue, Vmap
from dataplane.nat.ruleset import Chain
from dataplane.marks import mark_for
from dataplane.nat.userspace import (
    ENDPOINT_IDS, FAIL_OPEN, USERSPACE_NODEPORTS, USERSPACE_SERVICES, EndpointIds, QueueSpec, UserspaceRules,
)
from dataplane.nat.xtables import Xtables
from dataplane.sync.store import Store

SETTINGS = NodeSettings(node_name="node-a", cluster_cidrs=("10.244.0.0/16",))


def service(name, ip, port=80, protocol="TCP", node_port=None, annotations=None, **spec):
    body = {"clusterIP": ip, "ports": [{"name": "p", "port": port, "protocol": protocol,
                                        **({"nodePort": node_port} if node_port else {})}], **spec}
    if node_port:
        body["type"] = "NodePort"
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "annotations": annotations or {}}, "spec": body}


def endpoint_slice(name, *ips, port=80, protocol="TCP", node="node-a"):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-x", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": port, "protocol": protocol}],
            "endpoints": [{"addresses": [ip], "nodeName": node} for ip in ips]}


class Cluster:
    def __init__(self, clock=lambda: 0.0):
        self.store = Store()
        self.builder = RulesetBuilder(SETTINGS)
        self.ids = EndpointIds(quarantine=60, clock=self.now)
        self.time = 0.0
        self.rules = UserspaceRules(SETTINGS, layout.Family(4), QueueSpec(count=2), self.ids)
        self.state = plan.Programmed()
        self.ruleset = None

    def now(self) -> float:
        return self.time

    def put(self, origin, *objects):
        parsed, errors = parse_objects(objects, origin)
        assert not errors, errors
        self.store.replace(origin, parsed)
        return self.sync()

    def remove(self, origin):
        self.store.replace(origin, None)
        return self.sync()

    def sync(self) -> str:
        snapshot = self.store.snapshot()
        self.ruleset = self.rules.extend(self.builder.build(snapshot, ["192.168.50.1"]), snapshot)
        transaction, change = self.state.plan(self.ruleset)
        self.state = self.state.commit(change)
        return str(transaction)


def _pick_chains(ruleset) -> list[Chain]:
    """Every chain with a random pick: shared ones and the Services' own (session affinity)."""
    owned = [d for f in ruleset.fragments.values() for d in f.owned]
    return [d for d in (*ruleset.declarations.values(), *owned) if isinstance(d, Chain) and d.picks]


@pytest.mark.parametrize("affinity", [False, True], ids=["shared", "affinity"])
def test_every_random_pick_gets_the_forwarders_decision_and_a_fail_open_count(affinity):
    cluster = Cluster()
    extra = {"sessionAffinity": "ClientIP"} if affinity else {}
    cluster.put("a", service("a", "10.96.0.1", node_port=30080, externalTrafficPolicy="Local", **extra),
                endpoint_slice("a", "10.244.1.1", "10.244.1.2", node="node-b"))
    picks = _pick_chains(cluster.ruleset)
    assert picks
    assert any(c.name.startswith("aff-") for c in picks) == affinity, "affinity chains pick on their own"
    for chain in picks:
        for index, rule in enumerate(chain.rules):
            if not rule.picks:
                continue
            decided, fail_open = chain.rules[index - 2], chain.rules[index - 1]
            action = decided.statements[len(decided.matches)]
            if isinstance(action, Nat):
                assert action.map == ENDPOINT_IDS, chain
            else:  # affinity: the mark picks the endpoint chain, which remembers the client
                assert isinstance(action, Vmap) and isinstance(action.map, AnonMap), chain
                chosen = {verdict.chain for _, verdict in action.map.entries}
                assert chosen == {verdict.chain for _, verdict in rule.statements[-1].map.entries}, chain
            assert Counter(FAIL_OPEN) in fail_open.statements, chain
            assert decided.matches[:-1] == rule.matches == fail_open.matches[:-1], "the pick's own conditions"


def test_queue_classification_names_service_addresses_and_nodeports():
    cluster = Cluster()
    text = cluster.put("a", service("a", "10.96.0.1", node_port=30080, externalIPs=["192.168.70.10"]),
                       endpoint_slice("a", "10.244.1.1"))
    assert f"add element ip dataplane {USERSPACE_SERVICES} {{\n\t10.96.0.1 . tcp . 80,\n\t192.168.70.10 . tcp . 80\n}}" in text
    assert f"add element ip dataplane {USERSPACE_NODEPORTS} {{\n\ttcp . 30080\n}}" in text
    assert f"0x{mark_for(1):08x} : 10.244.1.1 . 80" in text


def test_external_traffic_policy_local_keeps_external_flows_in_the_kernel():
    cluster = Cluster()
    text = cluster.put("a", service("a", "10.96.0.1", node_port=30080, externalIPs=["192.168.70.10"],
                                    externalTrafficPolicy="Local"), endpoint_slice("a", "10.244.1.1"))
    assert "10.96.0.1 . tcp . 80" in text
    assert "192.168.70.10 . tcp . 80" not in text.split(USERSPACE_SERVICES, 1)[1].split("}", 1)[0]
    assert f"{USERSPACE_NODEPORTS} {{" not in text.split("add element", 1)[1]


def test_endpoint_ids_are_stable_across_syncs_and_shared_between_services():
    cluster = Cluster()
    cluster.put("a", service("a", "10.96.0.1"), endpoint_slice("a", "10.244.1.1", "10.244.1.2"))
    first = dict(cluster.ids.ids)
    cluster.put("b", service("b", "10.96.0.2"), endpoint_slice("b", "10.244.1.2", "10.244.1.3"))
    assert {k: cluster.ids.ids[k] for k in first} == first
    assert len(cluster.ids.ids) == 3


def test_a_change_touches_only_its_own_elements():
    cluster = Cluster()
    for i in range(20):
        cluster.put(f"s{i}", service(f"s{i}", f"10.96.0.{i + 1}"), endpoint_slice(f"s{i}", f"10.244.2.{i + 1}"))
    text = cluster.put("s3", service("s3", "10.96.0.4"), endpoint_slice("s3", "10.244.2.4", "10.244.9.9"))
    assert "10.244.9.9 . 80" in text
    assert "10.96.0.5" not in text and "10.244.2.5" not in text
    assert "delete table" not in text
    assert all(line.endswith("-2") for line in text.splitlines() if line.startswith("add chain"))


def test_ids_of_departed_endpoints_are_quarantined_then_reused_oldest_first():
    ids = EndpointIds(quarantine=60, clock=lambda: now[0])
    now = [0.0]
    ids.update([("10.0.0.1", 80), ("10.0.0.2", 80)])
    ids.update([("10.0.0.2", 80)])  # .1 leaves at t=0: id 1 quarantined
    now[0] = 30.0
    added, _ = ids.update([("10.0.0.2", 80), ("10.0.0.3", 80)])
    assert added == {("10.0.0.3", 80): 3}  # not 1: still in quarantine
    now[0] = 61.0
    added, _ = ids.update([("10.0.0.2", 80), ("10.0.0.3", 80), ("10.0.0.4", 80)])
    assert added == {("10.0.0.4", 80): 1}


def test_ids_run_out_only_when_every_one_is_taken():
    ids = EndpointIds(quarantine=60, clock=lambda: 0.0, limit=2)
    ids.update([("a", 1), ("b", 1)])
    ids.update([("a", 1)])
    added, _ = ids.update([("a", 1), ("c", 1)])
    assert added == {("c", 1): 2}  # reused before its quarantine ended: nothing else was left
    with pytest.raises(OverflowError):
        ids.update([("a", 1), ("c", 1), ("d", 1)])


def test_the_queue_rule_text():
    assert Xtables(4).script(QueueSpec(count=2)).splitlines()[3] == (
        "-A DATAPLANE-QUEUE -m mark --mark 0x2000/0x2000 -j NFQUEUE --queue-balance 0:1 --queue-bypass")
    assert "--queue-num 0 " in Xtables(4).script(QueueSpec(count=1))
    assert Xtables(4).script(QueueSpec(count=2, fanout=True)).splitlines()[3].endswith(
        "--queue-balance 0:1 --queue-cpu-fanout --queue-bypass")
    assert "fanout" not in Xtables(4).script(QueueSpec(count=1, fanout=True))  # one queue: nothing to fan out to


def test_nft_queue_statement_where_the_kernel_has_it():
    rules = UserspaceRules(SETTINGS, layout.Family(4), QueueSpec(count=4, in_nft=True))
    classify = rules._own["userspace-classify"]
    assert all(rule.statements[-1] == Queue("0-3", bypass=True) for rule in classify.rules)
    assert all(str(rule).endswith("queue num 0-3 bypass") for rule in classify.rules)
    fanned = UserspaceRules(SETTINGS, layout.Family(4), QueueSpec(count=4, in_nft=True, fanout=True))
    assert all(str(rule).endswith("queue num 0-3 bypass,fanout") for rule in fanned._own["userspace-classify"].rules)


# -- policy: annotations and tables ---------------------------------------------------------------

@pytest.mark.parametrize("text, expected, problems", [
    ("", {}, 0),
    ("10.244.1.1=3", {"10.244.1.1": 3}, 0),
    ("10.244.1.1=3, node:n1=2 ,zone:a=0", {"10.244.1.1": 3, "node:n1": 2, "zone:a": 0}, 0),
    ("10.244.1.1=-1", {}, 1),
    ("10.244.1.1=1001", {}, 1),
    ("pod1=2", {}, 1),
    ("node:=2,zone:b=x", {}, 2),
    ("10.244.1.1", {}, 1),
])
def test_weights_annotation(text, expected, problems):
    found: list = []
    assert parse_weights(text, "Service default/a", found) == expected
    assert len(found) == problems
    assert all("Service default/a" in p and "dataplane.io/weights" in p for p in found)


def test_weight_precedence_ip_then_node_then_zone():
    rules = {"10.0.0.1": 5, "node:n1": 3, "zone:z": 2}
    assert weight_of(rules, "10.0.0.1", "n1", "z") == 5
    assert weight_of(rules, "10.0.0.2", "n1", "z") == 3
    assert weight_of(rules, "10.0.0.2", "n2", "z") == 2
    assert weight_of(rules, "10.0.0.2", "n2", "y") == 1


def tables_for(*objects, algorithm="random", expect_errors=0):
    store = Store()
    parsed, errors = parse_objects(objects, "x")
    assert len(errors) == expect_errors, errors
    store.replace("x", parsed)
    (state,) = store.snapshot().services.values()
    ids = {}
    tables, problems = port_tables(state, lambda e: ids.setdefault(e, len(ids) + 1), algorithm, 4, "node-a")
    return tables, [str(error) for error in errors] + problems


def test_algorithm_annotation_and_a_bad_one_named():
    tables, problems = tables_for(service("a", "10.96.0.1", annotations={"dataplane.io/lb-algorithm": "maglev"}),
                                  endpoint_slice("a", "10.244.1.1"))
    assert tables[0].algorithm == "maglev" and not problems
    # Reported once, when the Service is parsed, as an invalid field; the daemon's default applies.
    tables, problems = tables_for(service("a", "10.96.0.1", annotations={"dataplane.io/lb-algorithm": "fastest"}),
                                  endpoint_slice("a", "10.244.1.1"), algorithm="least-conn", expect_errors=1)
    assert tables[0].algorithm == "least-conn"
    assert problems == ["x: Service default/a: metadata.annotations[dataplane.io/lb-algorithm]: must be one of "
                        "random, round-robin, maglev, least-conn, got 'fastest'; the daemon's --lb-algorithm applies"]


def test_weights_annotation_reaches_the_targets_and_a_bad_item_is_reported_once():
    annotations = {"dataplane.io/weights": "10.244.1.1=0, node:node-b=3, pod1=2"}
    slice_ = {**endpoint_slice("a", "10.244.1.1"), "endpoints": [
        {"addresses": ["10.244.1.1"], "nodeName": "node-a"}, {"addresses": ["10.244.2.1"], "nodeName": "node-b"},
        {"addresses": ["10.244.3.1"], "nodeName": "node-c"}]}
    tables, problems = tables_for(service("a", "10.96.0.1", annotations=annotations), slice_, expect_errors=1)
    assert [(t.ip, t.weight) for t in tables[0].targets] == [("10.244.1.1", 0), ("10.244.2.1", 3), ("10.244.3.1", 1)]
    assert problems == ["x: Service default/a: metadata.annotations[dataplane.io/weights]: items must be IP=N, "
                        "node:NAME=N or zone:NAME=N with N in 0..1000, got 'pod1=2'; those are ignored"]


def test_internal_traffic_policy_local_splits_internal_and_external_tables():
    tables, _ = tables_for(
        service("a", "10.96.0.1", node_port=30080, internalTrafficPolicy="Local"),
        {**endpoint_slice("a", "10.244.1.1"), "endpoints": [
            {"addresses": ["10.244.1.1"], "nodeName": "node-a"}, {"addresses": ["10.244.2.1"], "nodeName": "node-b"}]})
    internal, external = tables
    assert [t.ip for t in internal.targets] == ["10.244.1.1"] and internal.node_port is None
    assert [t.ip for t in external.targets] == ["10.244.1.1", "10.244.2.1"] and external.node_port == 30080


def test_session_affinity_reaches_the_table():
    tables, _ = tables_for(service("a", "10.96.0.1", sessionAffinity="ClientIP",
                                   sessionAffinityConfig={"clientIP": {"timeoutSeconds": 30}}),
                           endpoint_slice("a", "10.244.1.1"))
    assert tables[0].affinity_timeout == 30


# -- traced through the in-memory nftables (nat/fake/, nat/trace.py) -------------------------------

def decided_tracer(cluster: Cluster):
    """The cluster's userspace ruleset in the fake, seen from after the forwarder's verdict.

    The marking chains at -160 come before the queue (iptables, -150) and the
    verdict that sets the id; a traced packet carries the verdict's mark
    already, so they are left out here.
    """
    from dataplane.nat.fake import FakeNftables
    from dataplane.nat.trace import Tracer

    text = str(plan.full(cluster.ruleset)[0])
    kept = [line for line in text.splitlines(keepends=True)
            if "userspace-prerouting" not in line and "userspace-output" not in line]
    nft = FakeNftables()
    nft.run("".join(kept))
    return Tracer(nft)


@pytest.mark.parametrize("address, port", [("10.96.0.1", 80), ("192.168.70.10", 80), ("192.168.50.1", 30080)],
                         ids=["clusterip", "external-ip", "nodeport"])
def test_a_decision_reaches_exactly_its_endpoint_and_no_decision_reaches_any(address, port):
    from dataplane.nat.trace import Packet

    cluster = Cluster()
    cluster.put("a", service("a", "10.96.0.1", node_port=30080, externalIPs=["192.168.70.10"]),
                endpoint_slice("a", "10.244.1.1", "10.244.1.2", "10.244.1.3"))
    tracer = decided_tracer(cluster)
    everyone = {"10.244.1.1:80", "10.244.1.2:80", "10.244.1.3:80"}
    for endpoint, endpoint_id in cluster.ids.ids.items():
        outcomes = tracer.outcomes(Packet("192.168.50.2", address, "tcp", port, mark=mark_for(endpoint_id)))
        assert {o.endpoint for o in outcomes} == {f"{endpoint[0]}:{endpoint[1]}"}
    undecided = tracer.outcomes(Packet("192.168.50.2", address, "tcp", port, mark=0x2000))
    assert {o.endpoint for o in undecided} == everyone
    gone = tracer.outcomes(Packet("192.168.50.2", address, "tcp", port, mark=mark_for(999)))
    assert {o.endpoint for o in gone} == everyone  # an id that left the map: the kernel's pick, never a stranger


def test_render_in_userspace_mode_prints_a_loadable_table_and_the_queue_rule(capsys):
    from pathlib import Path

    from dataplane.cli import main
    from dataplane.nat.fake import FakeNftables

    examples = Path(__file__).resolve().parents[2] / "examples"
    assert main(["render", "--source", str(examples), "--node-ips", "192.168.50.1", "--proxy-mode", "userspace",
                 "--hostname-override", "node1", "--queues", "1"]) == 0
    text = capsys.readouterr().out
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert any("-j NFQUEUE --queue-num 0 --queue-bypass" in line for line in comments)
    FakeNftables().run("".join(line + "\n" for line in text.splitlines() if not line.startswith("#")))
    assert "add chain ip dataplane userspace-classify" in text and "endpoint-ids" in text


@pytest.mark.parametrize("refuses, expected", [(True, False), (False, True)])
def test_the_queue_rule_falls_back_to_the_hash_where_fanout_is_refused(tmp_path, refuses, expected):
    # A stand-in for iptables(-restore): refuses a batch naming --queue-cpu-fanout, as an old xt_NFQUEUE does.
    fake = tmp_path / "iptables"
    fake.write_text("#!/bin/sh\ninput=''\ncase \"$1\" in *-restore) input=$(cat);; esac\ncase \"$input\" in *--queue-cpu-fanout*) "
                    f"[ {'1' if refuses else '0'} = 1 ] && {{ echo 'NFQUEUE: revision 3 not supported' >&2; exit 1; }};; esac\n"
                    "exit 0\n")
    fake.chmod(0o755)
    installed = Xtables(4, wrap=(str(fake),)).install_probing(QueueSpec(count=2, fanout=True))
    assert installed == QueueSpec(count=2, fanout=expected)


def test_the_forwarder_decides_the_nodeport_of_an_internal_local_service_and_no_family_it_lacks():
    """internalTrafficPolicy Local with no external address: the NodePort's table (`.../external`, no
    address of its own) reaches the forwarder, keyed as IPv4; the IPv6 pass, a family this Service lacks,
    adds no NodePort table that would take the IPv4 one's key."""
    from dataplane.daemon.userspace import UserspaceMode
    from dataplane.nat.fake import FakeNftables

    store = Store()
    objects, errors = parse_objects([
        service("a", "10.96.0.1", node_port=30080, internalTrafficPolicy="Local"),
        {**endpoint_slice("a", "10.244.1.1"), "endpoints": [
            {"addresses": ["10.244.1.1"], "nodeName": "node-a"}, {"addresses": ["10.244.2.1"], "nodeName": "node-b"}]},
    ], "a.yaml")
    assert not errors
    store.replace("a.yaml", objects)
    mode = UserspaceMode(SETTINGS, FakeNftables(), queues=1, queue_in_nft=True)
    snapshot = store.snapshot()
    for version in (4, 6):
        mode.extend(RulesetBuilder(SETTINGS, version).build(snapshot, ("192.168.50.1",)), snapshot)
    mode.synced(snapshot)
    known = {s["service"]: s for s in mode.forwarder.snapshot()["services"]}
    assert set(known) == {"default/a:p", "default/a:p/external"}
    balancer = mode.forwarder.balancer
    assert {key: state.table.name for key, state in balancer.nodeports.items()} == {
        (4, 6, 30080): "default/a:p/external"}
    assert [t.ip for t in balancer.nodeports[(4, 6, 30080)].table.targets] == ["10.244.1.1", "10.244.2.1"]
