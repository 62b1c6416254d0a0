"""The planner: incremental transactions, reference counts and conflicts.

Address plan: Pods 10.244.0.0/16, ClusterIPs 10.96.0.0/12, node 192.168.50.1.
"""

from __future__ import annotations

import yaml

from dataplane.config import NodeSettings
from dataplane.model import parse_objects
from dataplane.nat import plan
from dataplane.nat.render import RulesetBuilder
from dataplane.sync.store import Store

SETTINGS = NodeSettings(node_name="node-a", cluster_cidrs=("10.244.0.0/16",))


def service(name: str, ip: str, port: int = 80, protocol: str = "TCP") -> dict:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": port, "protocol": protocol}]},
    }


def endpoint_slice(name: str, *ips: str, port: int = 80, protocol: str = "TCP", node: str = "node-a") -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{name}-x", "namespace": "default", "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": port, "protocol": protocol}],
        "endpoints": [{"addresses": [ip], "nodeName": node} for ip in ips],
    }


class Cluster:
    """A store, a builder and the programmed state, stepped through changes."""

    def __init__(self) -> None:
        self.store = Store()
        self.builder = RulesetBuilder(SETTINGS)
        self.state = plan.Programmed()

    def put(self, origin: str, *objects: dict) -> str:
        parsed, errors = parse_objects(objects, origin)
        assert not errors, errors
        self.store.replace(origin, parsed)
        return self.sync()

    def remove(self, origin: str) -> str:
        self.store.replace(origin, None)
        return self.sync()

    def sync(self) -> str:
        ruleset = self.builder.build(self.store.snapshot(), ["192.168.50.1"])
        transaction, change = self.state.plan(ruleset)
        self.state = self.state.commit(change)
        return str(transaction)


def test_first_plan_is_a_full_replacement() -> None:
    text = Cluster().put("a", service("a", "10.96.0.1"), endpoint_slice("a", "10.244.1.1"))
    assert text.startswith("add table ip dataplane\ndelete table ip dataplane\nadd table ip dataplane\n")


def test_one_endpoint_change_touches_only_its_elements() -> None:
    cluster = Cluster()
    cluster.put("a", service("a", "10.96.0.1"), endpoint_slice("a", "10.244.1.1", "10.244.1.2"))
    cluster.put("b", service("b", "10.96.0.2"), endpoint_slice("b", "10.244.2.1", "10.244.2.2"))
    text = cluster.put("b", service("b", "10.96.0.2"), endpoint_slice("b", "10.244.2.1", "10.244.2.3"))
    assert "10.96.0.1" not in text and "chain" not in text
    assert "delete element ip dataplane endpoints-2 {\n\t10.96.0.2 . tcp . 80 . 1\n}" in text
    assert "10.96.0.2 . tcp . 80 . 1 : 10.244.2.3 . 80" in text


def test_new_endpoint_count_declares_its_chains_and_retires_unused_ones() -> None:
    cluster = Cluster()
    cluster.put("a", service("a", "10.96.0.1"), endpoint_slice("a", "10.244.1.1"))
    text = cluster.put("a", service("a", "10.96.0.1"), endpoint_slice("a", "10.244.1.1", "10.244.1.2"))
    assert "add map ip dataplane endpoints-2" in text and "add chain ip dataplane cluster-2" in text
    assert "delete chain ip dataplane cluster-1" in text and "delete map ip dataplane endpoints-1" in text
    # Elements move before the old declarations go: nothing refers to a deleted chain.
    assert text.index("goto cluster-2") < text.index("delete chain ip dataplane cluster-1")


def test_shared_hairpin_entry_stays_while_any_service_needs_it() -> None:
    cluster = Cluster()
    cluster.put("a", service("a", "10.96.0.1"), endpoint_slice("a", "10.244.1.1"))
    cluster.put("b", service("b", "10.96.0.2"), endpoint_slice("b", "10.244.1.1"))
    text = cluster.remove("b")
    assert "hairpin" not in text
    text = cluster.remove("a")
    assert "delete element ip dataplane hairpin {\n\t10.244.1.1 . 10.244.1.1\n}" in text


def test_remote_endpoints_need_no_hairpin_entry() -> None:
    text = Cluster().put("a", service("a", "10.96.0.1"), endpoint_slice("a", "10.244.9.9", node="node-z"))
    assert "10.244.9.9 . 10.244.9.9" not in text


def test_conflicting_cluster_ip_keeps_the_first_and_leaves_the_other_out() -> None:
    cluster = Cluster()
    cluster.put("a", service("a", "10.96.0.1"), endpoint_slice("a", "10.244.1.1"))
    text = cluster.put("b", service("b", "10.96.0.1"), endpoint_slice("b", "10.244.2.1", "10.244.2.2"))
    assert "10.96.0.1 . tcp . 80 comment" not in text  # the dispatch entry stays a's
    # Removing the newcomer must not delete what the first one holds.
    text = cluster.remove("b")
    assert "delete element ip dataplane service-ips" not in text


def test_unchanged_snapshot_plans_an_empty_transaction() -> None:
    cluster = Cluster()
    cluster.put("a", service("a", "10.96.0.1"), endpoint_slice("a", "10.244.1.1"))
    assert cluster.sync() == ""


def test_plan_leaves_state_untouched_until_commit() -> None:
    cluster = Cluster()
    cluster.put("a", service("a", "10.96.0.1"), endpoint_slice("a", "10.244.1.1"))
    before = {container: dict(entries) for container, entries in cluster.state.held.items()}
    parsed, _ = parse_objects([service("b", "10.96.0.2"), endpoint_slice("b", "10.244.2.1")])
    cluster.store.replace("b", parsed)
    transaction, _change = cluster.state.plan(cluster.builder.build(cluster.store.snapshot(), ["192.168.50.1"]))
    assert transaction and cluster.state.held == before  # as if the apply had failed


def test_packet_path_does_not_grow_with_services() -> None:
    """1 and 1,000 Services with the same endpoint count give the same rules: only elements grow."""

    def rules(count: int) -> list[str]:
        docs = []
        for i in range(count):
            docs += [service(f"s{i}", f"10.96.{i // 250}.{i % 250 + 1}"), endpoint_slice(f"s{i}", "10.244.1.1", "10.244.1.2")]
        parsed, errors = parse_objects(docs)
        store = Store()
        store.replace("all", parsed)
        text = str(plan.full(RulesetBuilder(SETTINGS).build(store.snapshot(), ["192.168.50.1"]))[0])
        return [line for line in text.splitlines() if line.startswith(("add rule", "add chain"))]

    assert rules(1) == rules(1000)


def test_golden_yaml_is_valid_kubernetes() -> None:
    from pathlib import Path

    paths = sorted((Path(__file__).parent.parent / "golden").glob("*.yaml"))
    assert paths, "no golden manifests found"
    for path in paths:
        _, errors = parse_objects(yaml.safe_load_all(path.read_text()), str(path))
        assert not errors, errors


def test_element_counts_follow_commits() -> None:
    cluster = Cluster()
    cluster.put("a", service("a", "10.96.0.1"), endpoint_slice("a", "10.244.1.1", "10.244.1.2"))
    cluster.put("b", service("b", "10.96.0.2"), endpoint_slice("b", "10.244.1.1"))
    cluster.remove("a")
    counted: dict[str, int] = {}
    for container, entries in cluster.state.held.items():
        counted[container] = len(entries)
    assert {k: v for k, v in cluster.state.sizes.items() if v} == counted


def test_an_entry_left_out_is_taken_when_its_holder_leaves_in_the_same_change() -> None:
    # The planner diffs only the elements that differ: b's refused entry is the same element
    # before and after, and must still be tried again once a, holding the key, is gone.
    from dataplane.nat.ruleset import Element, Fragment, Ruleset

    def ruleset(**fragments: Fragment) -> Ruleset:
        return Ruleset("ip", "dataplane", {}, frozenset(), fragments)

    a = Fragment(frozenset({Element("m", "k", "a")}))
    b = Fragment(frozenset({Element("m", "k", "b"), Element("m", "b1", "x")}))
    b_changed = Fragment(frozenset({Element("m", "k", "b"), Element("m", "b2", "x")}))
    state = plan.Programmed()
    state = state.commit(state.plan(ruleset(a=a, b=b))[1])
    assert state.held["m"]["k"].value == "a" and state.conflicts["b"]
    tx, change = state.plan(ruleset(b=b_changed))
    state = state.commit(change)
    assert "k : b" in str(tx) and not state.conflicts.get("b")
    assert state.held == plan.full(ruleset(b=b_changed))[1].held
