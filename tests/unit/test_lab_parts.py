"""The lab's pure parts, without root: reply format, leftover detection, sampling, manifests, waiting."""

from __future__ import annotations

import ipaddress

import pytest
import yaml

from dataplane.lab import Failure, ManifestDir, Outcome, Reply, sample, tally, wait_until
from dataplane.lab.echo import answer
from dataplane.lab.manifests import endpoint_slice, pod, port, service
from dataplane.lab import netns
from dataplane.lab.netns import leftovers
from dataplane.lab.topology import AddressPlan


@pytest.mark.parametrize("line, pod_name, peer, local", [
    ("pod1 192.168.50.2:40000 10.244.1.11:80", "pod1", ("192.168.50.2", 40000), ("10.244.1.11", 80)),
    ("pod2 [fd00::2]:5 [fd00:10::11]:8080", "pod2", ("fd00::2", 5), ("fd00:10::11", 8080)),
], ids=["ipv4", "ipv6-bracketed"])
def test_reply_parses_and_prints_back(line, pod_name, peer, local):
    reply = Reply.parse(line)
    assert (reply.pod, reply.peer, reply.local) == (pod_name, peer, local)
    assert str(reply) == line


@pytest.mark.parametrize("line", ["", "pod1", "pod1 1.2.3.4 10.0.0.1:80", "pod1 nothost:1 10.0.0.1:80",
                                  "a b c d"])
def test_reply_rejects_anything_else(line):
    with pytest.raises(ValueError):
        Reply.parse(line)


def test_echo_answer_unmaps_ipv4_mapped_peers():
    assert answer("p", ("::ffff:192.168.50.2", 1, 0, 0), ("10.244.1.11", 80)) == b"p 192.168.50.2:1 10.244.1.11:80\n"


def test_leftovers_are_our_prefix_and_dead_owners_only():
    names = ["dplab-10-1-node", "dplab-10-2-node", "dplab-20-1-pod1", "dplab-30-1-node", "other", "w1"]
    alive = {20, 30}.__contains__
    assert leftovers(names, "dplab-30-1-", alive) == ["dplab-10-1-node", "dplab-10-2-node", "dplab-30-1-node"]


def test_address_plan_numbers_pods_from_the_offset():
    plan = AddressPlan(pods=3)
    assert [str(plan.pod_ip(i)) for i in (1, 2, 3)] == ["10.244.1.11", "10.244.1.12", "10.244.1.13"]
    with pytest.raises(ValueError, match="does not fit"):
        AddressPlan(pods=250)


def test_dual_stack_plan_mirrors_the_ipv4_host_numbers_inside_the_cluster_cidrs():
    plan = AddressPlan(pods=3, dual_stack=True)
    assert [str(plan.pod_ip6(i)) for i in (1, 2, 3)] == ["fd00:244:1::11", "fd00:244:1::12", "fd00:244:1::13"]
    assert all(plan.pod_ip6(i) in plan.cluster_cidr6 for i in (1, 2, 3))
    assert plan.cluster_cidrs == "10.244.0.0/16,fd00:244::/32"
    assert plan.service_cidrs == "10.96.0.0/12,fd00:96::/108"
    assert AddressPlan().cluster_cidrs == "10.244.0.0/16"


@pytest.mark.parametrize("field, value", [
    ("cluster_cidr6", ipaddress.IPv6Network("fd00:244::/48")),  # fd00:244:1::/64 lies outside it
    ("cluster_cidr", ipaddress.IPv4Network("10.245.0.0/16")),
])
def test_address_plan_refuses_pods_outside_the_cluster_cidr(field, value):
    with pytest.raises(ValueError, match="not inside the cluster CIDR"):
        AddressPlan(**{field: value})


def test_endpoint_slice_takes_its_address_type_from_the_addresses():
    assert endpoint_slice("web", ["10.244.1.11"], [])["addressType"] == "IPv4"
    assert endpoint_slice("web", ["fd00:244:1::11"], [])["addressType"] == "IPv6"
    assert endpoint_slice("web", [], [], address_type="IPv6")["addressType"] == "IPv6"


def outcome(pod_name: str | None) -> Outcome:
    return Outcome(Reply(pod_name, ("1.1.1.1", 1), ("2.2.2.2", 2)) if pod_name else None,
                   None if pod_name else Failure.TIMEOUT, 0.0)


def test_sample_stops_once_all_wanted_answered_and_enough_were_made():
    answers = iter(["a", "b", "a", "c", "a", "b", "c"] * 5)
    assert [o.pod for o in sample(lambda: outcome(next(answers)), {"a", "b", "c"})] == ["a", "b", "a", "c"]
    answers = iter(["a", "b", "c"] * 5)
    assert len(sample(lambda: outcome(next(answers)), {"a", "b", "c"}, at_least=7)) == 7


def test_sample_gives_up_after_enough_failures():
    answers = iter(["a", None, "a", None, "a"])
    assert len(sample(lambda: outcome(next(answers)), {"a", "b"}, give_up_after=2)) == 4


def test_sample_without_wants_makes_every_try_and_tally_counts_failures():
    answers = iter(["a", None, "a"])
    outcomes = sample(lambda: outcome(next(answers)), tries=3)
    assert tally(outcomes) == {"a": 2, "timeout": 1}


def test_manifest_dir_writes_atomically_into_subdirectories(tmp_path):
    manifests = ManifestDir(tmp_path)
    svc = service("web", "10.96.0.10", [port("http", 80, "http-web", node_port=30080)], type="NodePort",
                  selector={"app": "web"}, external_ips=["192.168.70.10"], ingress_ips=["192.168.60.10"])
    slice_ = endpoint_slice("web", ["10.244.1.11", "10.244.1.12"], [("http", 80, "TCP")], not_ready=["10.244.1.12"])
    written = manifests.write("sub/web.yaml", [svc, slice_])
    assert sorted(p.name for p in written.parent.iterdir()) == ["web.yaml"]
    docs = list(yaml.safe_load_all(written.read_text()))
    assert docs == [svc, slice_]
    assert docs[0]["status"]["loadBalancer"]["ingress"] == [{"ip": "192.168.60.10"}]
    assert [e["conditions"]["ready"] for e in docs[1]["endpoints"]] == [True, False]
    manifests.write("sub/web.yaml", "not: [valid")
    assert written.read_text() == "not: [valid"
    manifests.remove("sub/web.yaml")
    manifests.remove("sub/web.yaml")
    assert not written.exists()


def test_pod_manifest_carries_ip_ready_condition_and_named_ports():
    manifest = pod("web-1", "10.244.1.11", {"app": "web"}, [("http-web", 8080, "TCP")], ready=False)
    assert manifest["status"]["podIP"] == "10.244.1.11"
    assert manifest["status"]["conditions"] == [{"type": "Ready", "status": "False"}]
    assert manifest["spec"]["containers"][0]["ports"] == [{"name": "http-web", "containerPort": 8080,
                                                           "protocol": "TCP"}]


def test_wait_until_returns_the_first_truthy_value_or_names_what_timed_out():
    values = iter([0, None, "done"])
    assert wait_until(lambda: next(values), timeout=1, interval=0) == "done"
    with pytest.raises(TimeoutError, match="rules programmed: not met within 0.01 s .last: False"):
        wait_until(lambda: False, timeout=0.01, interval=0.005, what="rules programmed")


@pytest.mark.parametrize("euid, missing, problem", [
    (0, None, None),
    (1000, None, "needs root to create network namespaces"),
    (0, "nft", "needs `nft` on PATH"),
    (0, "ip", "needs `ip` on PATH"),
], ids=["root-with-tools", "not-root", "no-nft", "no-ip"])
def test_environment_problem_names_why_namespace_tests_skip(monkeypatch, euid, missing, problem):
    monkeypatch.setattr(netns.os, "geteuid", lambda: euid)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == missing else f"/usr/sbin/{tool}")
    assert netns.environment_problem() == problem
