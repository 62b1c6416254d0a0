"""Every invalid object is reported (issue 13), once per change, through the one error path
(Store.report: file, kind, namespace/name, field, value, why), and counted in what
`dataplane_invalid_objects` sums (`source.errors`).

SILENT lists the cases that used to be dropped or programmed without a word: before this
change each of them gave no error at all. Addresses no Service may have (loopback, unspecified,
multicast, broadcast, link-local, and their IPv6 kinds) are among them.

Address plan: see yamlcases.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from dataplane.model import ServiceKey, parse_objects
from dataplane.sync.manifests import ManifestSource
from dataplane.sync.store import Store
from yamlcases import WEB, WEB_SLICE, overlay

SPECIAL = [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"),
    ("239.1.2.3", "multicast"), ("255.255.255.255", "broadcast"), ("169.254.169.254", "link-local"),
    ("::1", "loopback"), ("::", "unspecified"), ("ff02::1", "multicast"), ("fe80::1", "link-local"),
    ("::ffff:127.0.0.1", "loopback"),
]

# (base, patch, kind, field, words of the problem, skipped): each was silent before.
SILENT = [
    *(pytest.param(WEB, f"{{spec: {{clusterIP: '{ip}', clusterIPs: ['{ip}']}}}}", "Service", "spec.clusterIPs[0]",
                   f"may not be a {kind} address", True, id=f"clusterip-{kind}-{ip}") for ip, kind in SPECIAL),
    *(pytest.param(WEB, f"{{spec: {{externalIPs: ['{ip}']}}}}", "Service", "spec.externalIPs[0]",
                   f"may not be a {kind} address", True, id=f"externalip-{kind}-{ip}") for ip, kind in SPECIAL),
    *(pytest.param(WEB, f"{{spec: {{type: LoadBalancer}}, status: {{loadBalancer: {{ingress: [{{ip: '{ip}'}}]}}}}}}",
                   "Service", "status.loadBalancer.ingress[0].ip", f"may not be a {kind} address", False,
                   id=f"ingress-{kind}-{ip}") for ip, kind in SPECIAL),
    pytest.param(WEB, "{spec: {clusterIP: 10.96.0.11, clusterIPs: [10.96.0.12]}}", "Service", "spec.clusterIP",
                 "must be clusterIPs[0] ('10.96.0.12') when both are set, got '10.96.0.11'", False,
                 id="clusterip-disagrees-with-clusterips"),
    pytest.param(WEB, "{spec: {ports: [{name: http, port: 80, nodePort: 30080}]}}", "Service", "spec.ports[0].nodePort",
                 "is only used with type NodePort or LoadBalancer, not ClusterIP", False, id="nodeport-on-clusterip"),
    pytest.param(WEB, "{spec: {type: ExternalName, clusterIP: null, clusterIPs: null}}", "Service", "spec.externalName",
                 "is required for type ExternalName", True, id="externalname-without-name"),
    pytest.param(WEB, "{spec: {clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10], externalIPs: [10.96.0.10]}}", "Service",
                 "spec.externalIPs[0]",
                 "is the Service's own clusterIP", False, id="externalip-is-own-clusterip"),
    pytest.param(WEB, "{metadata: {creationTimestamp: yesterday}}", "Service", "metadata.creationTimestamp",
                 "must be an RFC 3339 time, got 'yesterday'", False, id="creation-timestamp"),
    pytest.param(WEB, "{metadata: {annotations: {dataplane.io/lb-algorithm: fastest}}}", "Service",
                 "metadata.annotations[dataplane.io/lb-algorithm]", "must be one of random, round-robin, maglev, "
                 "least-conn, got 'fastest'", False, id="annotation-algorithm"),
    pytest.param(WEB, "{metadata: {annotations: {dataplane.io/weights: '10.244.1.5=3, pod1=2, node:n1=x'}}}",
                 "Service", "metadata.annotations[dataplane.io/weights]", "got 'pod1=2', 'node:n1=x'", False,
                 id="annotation-weights"),
    pytest.param(WEB, "{metadata: {annotations: {dataplane.io/weight: '10.244.1.5=3'}}}", "Service",
                 "metadata.annotations[dataplane.io/weight]", "is not an annotation dataplane reads", False,
                 id="annotation-unknown-key"),
    pytest.param(WEB_SLICE, "{endpoints: [{addresses: []}, {addresses: [10.244.1.6]}]}", "EndpointSlice",
                 "endpoints[0].addresses", "must hold one address at least", False, id="slice-endpoint-no-address"),
    pytest.param(WEB_SLICE, "{metadata: {labels: {kubernetes.io/service-name: null}}}", "EndpointSlice",
                 "metadata.labels[kubernetes.io/service-name]", "is required", True, id="slice-without-service"),
    pytest.param(WEB_SLICE, "{endpoints: [{addresses: ['fd00:10:244::5']}]}", "EndpointSlice",
                 "endpoints[0].addresses[0]", "must be an IPv4 address (the slice's addressType)", True,
                 id="slice-ipv6-address-in-ipv4-slice"),
    pytest.param(WEB_SLICE, "{addressType: IPv6, endpoints: [{addresses: [10.244.1.5]}]}", "EndpointSlice",
                 "endpoints[0].addresses[0]", "must be an IPv6 address", True, id="slice-ipv4-address-in-ipv6-slice"),
]


@pytest.mark.parametrize("base, patch, kind, field, words, skipped", SILENT)
def test_a_case_once_silent_is_reported_naming_file_object_field_and_value(base, patch, kind, field, words, skipped):
    objects, errors = parse_objects([overlay(base, patch)], "shop.yaml")
    (error,) = errors
    assert (error.source, error.kind, error.ref, error.field, error.skipped) == ("shop.yaml", kind,
                                                                                 "shop/" + base["metadata"]["name"],
                                                                                 field, skipped)
    assert words in error.problem, error.problem
    used = objects.services + objects.slices
    assert len(used) == (0 if skipped else 1), "skipped or used without the bad part, as the flag says"
    assert "\n" not in str(error)


@pytest.mark.parametrize("ip, kind", SPECIAL)
def test_a_special_address_never_reaches_a_snapshot(ip, kind):
    """A special Service address refuses the Service; a special ingress address drops only that address."""
    cases = [(f"{{spec: {{clusterIP: '{ip}', clusterIPs: ['{ip}']}}}}", "spec.clusterIPs[0]", False),
             (f"{{spec: {{externalIPs: ['{ip}']}}}}", "spec.externalIPs[0]", False),
             (f"{{spec: {{type: LoadBalancer}}, status: {{loadBalancer: {{ingress: [{{ip: '{ip}'}}]}}}}}}",
              "status.loadBalancer.ingress[0].ip", True)]
    for patch, field, kept in cases:
        store = Store()
        objects, errors = parse_objects([overlay(WEB, patch)], "x.yaml")
        store.replace("x.yaml", objects)
        assert [f"{field}: may not be a {kind} address" in str(error) for error in errors] == [True], errors
        services = store.snapshot().services
        assert (ServiceKey("shop", "web") in services) is kept, field
        for state in services.values():
            assert ip not in state.service.cluster_ips + state.service.external_ips_all


def test_every_silent_case_is_reported_and_counted_through_a_manifest_folder(tmp_path, caplog):
    """The whole table as files in a folder next to a good Service: one problem per file, each logged once."""
    root = tmp_path / "m"
    root.mkdir()
    good = overlay(WEB, "{metadata: {name: good}, spec: {clusterIP: 10.96.0.99, clusterIPs: [10.96.0.99]}}")
    (root / "good.yaml").write_text(yaml.safe_dump(good))
    cases = [case.values for case in SILENT]
    for index, (base, patch, *_rest) in enumerate(cases):
        # Each its own name and address: one file's case must not meet another's.
        own = overlay(base, f"{{metadata: {{name: c{index}}}, spec: {{clusterIP: 10.96.1.{index}, "
                            f"clusterIPs: [10.96.1.{index}]}}}}" if base is WEB else f"{{metadata: {{name: c{index}}}}}")
        (root / f"case-{index:03}.yaml").write_text(yaml.safe_dump(overlay(own, patch)))
    source = ManifestSource(root, Store())
    with caplog.at_level(logging.ERROR):
        source.load_all()
        source.load_all(only_changed=True)  # nothing changed: nothing logged again
    assert ServiceKey("shop", "good") in source.store.snapshot().services
    counted = {origin: problems for origin, problems in source.errors.items() if problems}
    assert sorted(Path(o).name for o in counted) == [f"case-{i:03}.yaml" for i in range(len(cases))]
    assert sum(len(p) for p in source.errors.values()) == len(cases), "dataplane_invalid_objects"
    for (_, _, kind, field, _, _), (origin, (problem,)) in zip(cases, sorted(counted.items())):
        assert problem.startswith(f"{origin}: {kind} shop/") and f": {field}: " in problem
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == len(cases) and all(any(p in m for m in logged) for (p,) in counted.values())


def test_an_annotation_problem_is_reported_once_per_change_not_per_sync(tmp_path, caplog):
    root = tmp_path / "m"
    root.mkdir()
    path = root / "web.yaml"
    path.write_text(yaml.safe_dump(overlay(WEB, "{metadata: {annotations: {dataplane.io/lb-algorithm: fastest}}}")))
    source = ManifestSource(root, Store())
    with caplog.at_level(logging.ERROR):
        source.load_all()
        for _ in range(3):
            source.store.snapshot()
    assert len(caplog.records) == 1 and "dataplane.io/lb-algorithm" in caplog.records[0].getMessage()
    state = source.store.snapshot().services[ServiceKey("shop", "web")]
    assert state.service.lb_algorithm == ""  # the daemon's default applies
    path.write_text(yaml.safe_dump(overlay(WEB, "{metadata: {annotations: {dataplane.io/lb-algorithm: maglev}}}")))
    source.load(path)
    assert source.errors[str(path)] == []
    assert source.store.snapshot().services[ServiceKey("shop", "web")].service.lb_algorithm == "maglev"
