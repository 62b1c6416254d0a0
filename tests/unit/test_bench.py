"""The benchmark harness's pure parts: statistics, the iptables reference layout, loadgen output, the report.

Address plan (as in the harness): ClusterIPs 10.96.0.0/12 counting up from
10.96.0.1, synthetic endpoints 10.128.0.0/9, lab Pod addresses 10.244.1.11+,
client 10.244.0.2 (inside the cluster CIDR 10.244.0.0/16).
"""

from __future__ import annotations

import re

import pytest
import yaml

from bench import iptables_reference, loadgen, report, stats
from bench.manifests import measured_spec, service_yaml, synthetic_cluster, synthetic_spec


@pytest.mark.parametrize("samples, q, expected", [
    ([5], 50, 5),
    ([1, 2, 3, 4], 50, 2),
    ([1, 2, 3, 4], 100, 4),
    (list(range(1, 1001)), 99.9, 999),
    (list(range(1, 1001)), 99, 990),
    (list(range(1, 11)), 0.1, 1),
])
def test_percentile_is_nearest_rank(samples, q, expected):
    assert stats.percentile(samples, q) == expected


def test_summarize_reports_every_percentile_and_nothing_for_no_samples():
    summary = stats.summarize([3, 1, 2])
    assert summary["p50"] == 2 and summary["p99.9"] == 3 and summary["count"] == 3 and summary["min"] == 1
    assert stats.summarize([]) == {}


def test_paired_ratios_skip_rounds_missing_on_either_side():
    assert stats.paired_ratios([2, None, 6, 8], [1, 1, None, 4]) == [2.0, 2.0]


def test_cdf_points_are_monotonic_and_end_at_the_tail():
    points = stats.cdf_points(list(range(1, 10001)))
    assert [p[0] for p in points] == sorted(p[0] for p in points)
    assert points[-1] == (10000, 1.0) and (9999, 0.9999) in points


def _rules(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


def test_iptables_reference_walks_services_in_order_with_the_measured_one_last():
    specs = [*synthetic_cluster(3, 10), measured_spec(3, ["10.244.1.11", "10.244.1.12"], "node1", 80, 7000)]
    text = iptables_reference.render(specs, "10.244.0.0/16")
    services = _rules(text, "KUBE-SERVICES")
    assert [re.search(r"-d (\S+)", r).group(1) for r in services[:-1]] == [
        "10.96.0.1", "10.96.0.2", "10.96.0.3", "10.96.0.4", "10.96.0.4"]
    assert "-p udp" in services[-2] and "KUBE-NODEPORTS" in services[-1]


def test_iptables_reference_picks_endpoints_with_falling_statistic_probabilities():
    text = iptables_reference.render(synthetic_cluster(1, 4), "10.244.0.0/16")
    svc = re.search(r"-j (KUBE-SVC-\w+)", _rules(text, "KUBE-SERVICES")[0]).group(1)
    rules = _rules(text, svc)
    assert "! -s 10.244.0.0/16" in rules[0] and "KUBE-MARK-MASQ" in rules[0]
    probabilities = [re.search(r"--probability (\S+)", r).group(1) for r in rules[1:-1]]
    assert probabilities == ["0.2500000000", "0.3333333333", "0.5000000000"]
    assert "statistic" not in rules[-1]
    seps = [re.search(r"-j (KUBE-SEP-\w+)", r).group(1) for r in rules[1:]]
    assert len(set(seps)) == 4
    assert all(len(_rules(text, sep)) == 2 for sep in seps)
    assert "--to-destination 10.128.0.0:8080" in _rules(text, seps[0])[1]


def test_iptables_reference_declares_every_chain_it_jumps_to():
    text = iptables_reference.render(synthetic_cluster(5, 3))
    declared = set(re.findall(r"^:(\S+)", text, re.MULTILINE))
    targets = set(re.findall(r"-j (KUBE-[\w-]+)", text))
    assert targets <= declared
    assert iptables_reference.rule_count(text) == len(re.findall(r"^-A ", text, re.MULTILINE))


def test_yaml_and_iptables_describe_the_same_cluster():
    spec = synthetic_spec(7, 10)
    documents = list(yaml.safe_load_all(service_yaml(7, 10)))
    assert documents[0]["spec"]["clusterIP"] == spec.cluster_ip
    assert [e["addresses"][0] for e in documents[1]["endpoints"]] == [ip for ip, _ in spec.endpoints]
    text = iptables_reference.render([spec])
    assert all(f"--to-destination {ip}:8080" in text for ip, _ in spec.endpoints)


@pytest.mark.parametrize("text, samples, failed, errors", [
    ("ok 2 failed 0\n100\n200\n", [100, 200], 0, {}),
    ("ok 1 failed 2\n150\nerrno 111 2\n", [150], 2, {111: 2}),
    ("ok 0 failed 3\nerrno 110 1\nerrno 111 2\n", [], 3, {110: 1, 111: 2}),
])
def test_loadgen_output_parses(text, samples, failed, errors):
    run = loadgen.parse(text)
    assert (run.samples_ns, run.failed, run.errors) == (samples, failed, errors)


@pytest.mark.parametrize("text", ["", "garbage", "ok 3 failed 0\n1\n2\n"])
def test_loadgen_output_that_is_not_whole_is_an_error(text):
    with pytest.raises(loadgen.LoadgenError):
        loadgen.parse(text)


def _record(path, services, p50, vs_direct=None, **extra):
    return {"path": path, "services": services, "mode": "tcp-crr", "failed": 0, "errors": {},
            "latency_us": {"count": 10, "p50": p50, "p90": p50, "p99": p50 * 2, "p99.9": p50 * 3},
            "rounds_p50_us": {"median": p50, "min": p50, "max": p50, "rounds": 1}, "cdf_us": [],
            **({"vs_direct": vs_direct} if vs_direct else {}), **extra}


def _ratio(value):
    return {"p50": value, "p99": value, "rounds_p50": {"median": value, "min": value - 0.01, "max": value + 0.01},
            "rounds_p99": {"median": value, "min": value, "max": value}}


def test_report_says_when_a_goal_is_missed_and_when_userspace_is_not_there():
    results = {"latency": {"records": [
        _record("direct", None, 30.0),
        _record("kernel", 10000, 40.0, _ratio(1.33)),
        _record("iptables-reference", 10000, 90.0, _ratio(3.0)),
    ], "unavailable": {"userspace": "not available: no userspace mode"}}}
    rows = {goal: (measured, verdict) for goal, measured, verdict in report.goals(results)}
    assert rows["kernel, new TCP connection, median ≤ 1.05× direct at 10,000 Services"][1] == "**missed**"
    assert any(v == "as expected" for _, v in rows.values())
    assert rows["userspace, new TCP connection, median ≤ 1.25× kernel"] == (
        "not available: no userspace mode", "not available")


def test_report_met_goal_near_the_limit_is_flagged_as_within_noise():
    results = {"latency": {"records": [_record("direct", None, 30.0), _record("kernel", 10000, 31.0, _ratio(1.045))],
                           "unavailable": {}}}
    verdict = report.goals(results)[0][2]
    assert verdict.startswith("met") and "straddle" in verdict
