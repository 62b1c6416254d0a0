"""Cluster DNS records, checked against the Kubernetes DNS specification (schema 1.1.0).

Address plan: the specification's own examples keep their addresses (ClusterIP
10.3.0.1 for default/kubernetes, headless endpoints 10.3.0.100-103); everything
else follows the usual plan: ClusterIPs 10.96.0.0/12 (IPv6 fd00:10:96::/112),
Pods 10.244.0.0/16 (IPv6 fd00:10:244::/64).

Every case goes through the whole answer path (Zone.lookup, then
wire.Responder to a real DNS message) and compares dig-style text lines.
"""

from __future__ import annotations

import random

import dns.flags
import dns.message
import dns.rcode
import pytest

from dataplane.dns.wire import Reply, Responder
from dataplane.dns.zone import A, Zone, endpoint_hostname, normalize_domain, reverse_name
from dataplane.model import ServiceKey
from dataplane.sync.store import Store
from yamlcases import parse_ok

SPEC = """
apiVersion: v1
kind: Service
metadata: {name: kubernetes, namespace: default}
spec:
  clusterIP: 10.3.0.1
  ports: [{name: https, port: 443, targetPort: 6443}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: default}
spec:
  clusterIP: None
  ports: [{name: https, port: 443, targetPort: 8443}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: headless-1, namespace: default, labels: {kubernetes.io/service-name: headless}}
addressType: IPv4
ports: [{name: https, port: 8443}]
endpoints:
- {addresses: [10.3.0.100], hostname: my-pet}
- {addresses: [10.3.0.101], hostname: my-pet-2}
- {addresses: [10.3.0.102]}
- {addresses: [10.3.0.103], hostname: sick, conditions: {ready: false}}
---
apiVersion: v1
kind: Service
metadata: {name: foo, namespace: default}
spec: {type: ExternalName, externalName: www.example.com}
---
apiVersion: v1
kind: Service
metadata: {name: single, namespace: default}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec: {clusterIP: None, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: prod}
spec:
  clusterIPs: [10.96.0.30, "fd00:10:96::30"]
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: inside, namespace: prod}
spec: {type: ExternalName, externalName: dual.prod.svc.cluster.local}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: prod}
spec: {clusterIP: None, selector: {app: db}}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: prod, labels: {app: db}}
spec: {hostname: db-0, subdomain: db, containers: [{name: c}]}
status: {podIPs: [{ip: 10.244.1.5}, {ip: "fd00:10:244::5"}], conditions: [{type: Ready, status: "True"}]}
"""

IPV6_PTR = "0.3.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.1.0.0.0.0.d.f.ip6.arpa."  # fd00:10:96::30
SOA = "cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. {serial} 7200 1800 86400 5"
CASES = [
    # (case, qname, qtype, rcode, answer lines); NXDOMAIN and NODATA also carry the SOA.
    ("2.2 schema version", "dns-version.cluster.local.", "TXT", "NOERROR",
     ['dns-version.cluster.local. 5 IN TXT "1.1.0"']),
    ("2.3.1 ClusterIP A", "kubernetes.default.svc.cluster.local.", "A", "NOERROR",
     ["kubernetes.default.svc.cluster.local. 5 IN A 10.3.0.1"]),
    ("2.3.1 no AAAA for an IPv4 Service: NODATA", "kubernetes.default.svc.cluster.local.", "AAAA", "NOERROR", []),
    ("2.3.2 ClusterIP SRV", "_https._tcp.kubernetes.default.svc.cluster.local.", "SRV", "NOERROR",
     ["_https._tcp.kubernetes.default.svc.cluster.local. 5 IN SRV 0 100 443 kubernetes.default.svc.cluster.local."]),
    ("2.3.2 unnamed ports have no SRV", "_._tcp.single.default.svc.cluster.local.", "SRV", "NXDOMAIN", []),
    ("2.3.2 wrong protocol", "_https._udp.kubernetes.default.svc.cluster.local.", "SRV", "NXDOMAIN", []),
    ("2.3.3 ClusterIP PTR", "1.0.3.10.in-addr.arpa.", "PTR", "NOERROR",
     ["1.0.3.10.in-addr.arpa. 5 IN PTR kubernetes.default.svc.cluster.local."]),
    ("2.4.1 headless A: every ready endpoint", "headless.default.svc.cluster.local.", "A", "NOERROR",
     ["headless.default.svc.cluster.local. 5 IN A 10.3.0.100",
      "headless.default.svc.cluster.local. 5 IN A 10.3.0.101",
      "headless.default.svc.cluster.local. 5 IN A 10.3.0.102"]),
    ("2.4.1 endpoint hostname A", "my-pet.headless.default.svc.cluster.local.", "A", "NOERROR",
     ["my-pet.headless.default.svc.cluster.local. 5 IN A 10.3.0.100"]),
    ("2.4.1 system-assigned hostname", "10-3-0-102.headless.default.svc.cluster.local.", "A", "NOERROR",
     ["10-3-0-102.headless.default.svc.cluster.local. 5 IN A 10.3.0.102"]),
    ("2.4.1 not-ready endpoint has no record", "sick.headless.default.svc.cluster.local.", "A", "NXDOMAIN", []),
    ("2.4.1 headless without ready endpoints: NXDOMAIN", "empty.default.svc.cluster.local.", "A", "NXDOMAIN", []),
    ("2.4.2 headless SRV: one per ready endpoint", "_https._tcp.headless.default.svc.cluster.local.", "SRV",
     "NOERROR",
     [f"_https._tcp.headless.default.svc.cluster.local. 5 IN SRV 0 33 8443 {host}.headless.default.svc.cluster.local."
      for host in ("10-3-0-102", "my-pet-2", "my-pet")]),
    ("2.4.3 headless PTR", "100.0.3.10.in-addr.arpa.", "PTR", "NOERROR",
     ["100.0.3.10.in-addr.arpa. 5 IN PTR my-pet.headless.default.svc.cluster.local."]),
    ("2.4.3 no PTR for a not-ready endpoint: not ours", "103.0.3.10.in-addr.arpa.", "PTR", "REFUSED", []),
    ("2.5 ExternalName CNAME", "foo.default.svc.cluster.local.", "A", "NOERROR",
     ["foo.default.svc.cluster.local. 5 IN CNAME www.example.com."]),
    ("2.5 ExternalName inside the zone is followed", "inside.prod.svc.cluster.local.", "A", "NOERROR",
     ["inside.prod.svc.cluster.local. 5 IN CNAME dual.prod.svc.cluster.local.",
      "dual.prod.svc.cluster.local. 5 IN A 10.96.0.30"]),
    ("2.6 pod A record, any address", "10-244-9-9.default.pod.cluster.local.", "A", "NOERROR",
     ["10-244-9-9.default.pod.cluster.local. 5 IN A 10.244.9.9"]),
    ("2.6 not an address", "10-244-9.default.pod.cluster.local.", "A", "NXDOMAIN", []),
    ("dual-stack AAAA", "dual.prod.svc.cluster.local.", "AAAA", "NOERROR",
     ["dual.prod.svc.cluster.local. 5 IN AAAA fd00:10:96::30"]),
    ("dual-stack UDP SRV", "_dns._udp.dual.prod.svc.cluster.local.", "SRV", "NOERROR",
     ["_dns._udp.dual.prod.svc.cluster.local. 5 IN SRV 0 100 53 dual.prod.svc.cluster.local."]),
    ("IPv6 PTR", IPV6_PTR, "PTR", "NOERROR", [f"{IPV6_PTR} 5 IN PTR dual.prod.svc.cluster.local."]),
    ("Pod hostname/subdomain, both families", "db-0.db.prod.svc.cluster.local.", "AAAA", "NOERROR",
     ["db-0.db.prod.svc.cluster.local. 5 IN AAAA fd00:10:244::5"]),
    ("case-insensitive, question case kept", "KUBERNETES.Default.SVC.Cluster.Local.", "A", "NOERROR",
     ["KUBERNETES.Default.SVC.Cluster.Local. 5 IN A 10.3.0.1"]),
    ("missing Service", "missing.default.svc.cluster.local.", "A", "NXDOMAIN", []),
    ("missing namespace", "kubernetes.nowhere.svc.cluster.local.", "A", "NXDOMAIN", []),
    ("namespace is an empty non-terminal", "default.svc.cluster.local.", "A", "NOERROR", []),
    ("SRV protocol label is an empty non-terminal", "_tcp.kubernetes.default.svc.cluster.local.", "SRV", "NOERROR",
     []),
    ("apex SOA", "cluster.local.", "SOA", "NOERROR", [SOA]),
    ("outside the zone, no upstream", "example.com.", "A", "REFUSED", []),
    ("unknown reverse name is not ours", "9.9.9.9.in-addr.arpa.", "PTR", "REFUSED", []),
]


def snapshot_of(text: str):
    store = Store()
    store.replace("spec.yaml", parse_ok(text))
    return store.snapshot()


def ask(responder: Responder, qname: str, qtype: str, tcp: bool = True, **query_options) -> dns.message.Message:
    query = dns.message.make_query(qname, qtype, **query_options)
    command = responder.handle(query.to_wire(), tcp=tcp)
    assert isinstance(command, Reply), command
    return dns.message.from_wire(command.wire)


def lines(section) -> list[str]:
    return sorted(line for rrset in section for line in rrset.to_text().splitlines())


@pytest.fixture(scope="module")
def spec_zone() -> Zone:
    return Zone.build(snapshot_of(SPEC))


@pytest.fixture
def responder(spec_zone: Zone) -> Responder:
    responder = Responder(spec_zone.domain, ttl=5, forwarding=False)
    responder.set_zone(spec_zone)
    return responder


@pytest.mark.parametrize("case, qname, qtype, rcode, answer", CASES, ids=[c[0] for c in CASES])
def test_answers_follow_the_specification(responder, spec_zone, case, qname, qtype, rcode, answer):
    response = ask(responder, qname, qtype)
    assert dns.rcode.to_text(response.rcode()) == rcode
    assert lines(response.answer) == sorted(line.format(serial=spec_zone.serial) for line in answer)
    if rcode in ("NOERROR", "NXDOMAIN"):
        assert response.flags & dns.flags.AA
    if rcode == "NXDOMAIN" or (rcode == "NOERROR" and not answer):
        assert lines(response.authority) == [SOA.format(serial=spec_zone.serial)], "negative answers carry the SOA"
    else:
        assert not response.authority


def test_srv_answers_carry_the_targets_addresses(responder):
    response = ask(responder, "_https._tcp.headless.default.svc.cluster.local.", "SRV")
    assert lines(response.additional) == [
        "10-3-0-102.headless.default.svc.cluster.local. 5 IN A 10.3.0.102",
        "my-pet-2.headless.default.svc.cluster.local. 5 IN A 10.3.0.101",
        "my-pet.headless.default.svc.cluster.local. 5 IN A 10.3.0.100",
    ]


def test_ttl_and_negative_ttl_follow_the_setting(spec_zone):
    responder = Responder(spec_zone.domain, ttl=30, forwarding=False)
    responder.set_zone(spec_zone)
    positive = ask(responder, "kubernetes.default.svc.cluster.local.", "A")
    negative = ask(responder, "missing.default.svc.cluster.local.", "A")
    assert positive.answer[0].ttl == 30
    soa = negative.authority[0]
    assert soa.ttl == 30 and soa[0].minimum == 30  # RFC 2308: negative TTL = min(SOA TTL, minimum)


def test_another_cluster_domain():
    zone = Zone.build(snapshot_of(SPEC), "Example.Test")
    assert zone.lookup("kubernetes.default.svc.example.test.", A).records[0].value == "10.3.0.1"
    assert zone.lookup("kubernetes.default.svc.cluster.local.", A).outside
    assert zone.lookup("dns-version.example.test.", 16).records[0].value == "1.1.0"


@pytest.mark.parametrize("domain, normal", [
    ("cluster.local", "cluster.local."),
    ("Cluster.Local.", "cluster.local."),
    ("k8s", "k8s."),
])
def test_cluster_domain_is_normalised(domain, normal):
    assert normalize_domain(domain) == normal


@pytest.mark.parametrize("domain", ["", ".", "bad_label.local", "a..b", "-x.local", "x" * 64 + ".local"])
def test_bad_cluster_domain_is_refused(domain):
    with pytest.raises(ValueError, match="--cluster-domain"):
        normalize_domain(domain)


@pytest.mark.parametrize("hostname, address, expected", [
    ("my-pet", "10.3.0.100", "my-pet"),
    ("My-Pet", "10.3.0.100", "my-pet"),
    ("", "10.3.0.102", "10-3-0-102"),
    ("not a label", "10.3.0.102", "10-3-0-102"),
    ("", "fd00:10:244::5", "fd00-10-244--5"),
])
def test_endpoint_hostname(hostname, address, expected):
    assert endpoint_hostname(hostname, address) == expected


@pytest.mark.parametrize("address, name", [
    ("10.96.0.1", "1.0.96.10.in-addr.arpa."),
    ("fd00::1", "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa."),
])
def test_reverse_name(address, name):
    assert reverse_name(address) == name


def test_hostile_names_make_no_records():
    zone = Zone.build(snapshot_of("""
apiVersion: v1
kind: Service
metadata: {name: evil, namespace: default}
spec: {type: ExternalName, externalName: "bad name.example.com"}
---
apiVersion: v1
kind: Service
metadata: {name: h, namespace: default}
spec: {clusterIP: None}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: h-1, namespace: default, labels: {kubernetes.io/service-name: h}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.1], hostname: "x.y\\\\000"}]
"""))
    assert zone.lookup("evil.default.svc.cluster.local.", A).rcode == "NXDOMAIN"
    names = [r.name for r in zone.lookup("h.default.svc.cluster.local.", 255).records]
    assert names == ["h.default.svc.cluster.local."]
    assert zone.lookup("10-244-1-1.h.default.svc.cluster.local.", A).records


# Incremental updates: after any sequence of changes, the zone equals one built from scratch.

def _service(i: int, kind: str, generation: int) -> str:
    name = f"svc-{i}"
    if kind == "external":
        return f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: ns-{i % 3}}}
spec: {{type: ExternalName, externalName: target-{generation}.example.com}}
"""
    cluster_ip = "None" if kind == "headless" else f"10.96.1.{i}"
    endpoints = ", ".join(
        f"{{addresses: [10.244.{i}.{j + generation}], hostname: h{j}, conditions: {{ready: {str(j != 1).lower()}}}}}"
        for j in range(1 + generation % 3)
    )
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: ns-{i % 3}}}
spec: {{clusterIP: {cluster_ip}, ports: [{{name: http, port: 80}}, {{name: dns, port: 53, protocol: UDP}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-a, namespace: ns-{i % 3}, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints: [{endpoints}]
"""


def _state(zone: Zone) -> tuple:
    return zone.records(), dict(zone._parents)


def test_incremental_updates_equal_a_full_build():
    """Whether the snapshot's lineage names the changes (O(changed)) or the zone scans for them."""
    rng = random.Random(7)
    store = Store()
    zone = Zone()
    for step in range(150):
        i = rng.randrange(12)
        if rng.random() < 0.2:
            store.replace(f"svc-{i}.yaml", None)
        else:
            kind = rng.choice(["clusterip", "headless", "external"])
            store.replace(f"svc-{i}.yaml", parse_ok(_service(i, kind, rng.randrange(6))))
        skipped = None
        if step % 7 == 3:  # a snapshot the zone never sees (kept alive): the next one's lineage misses the zone
            skipped = store.snapshot()
            store.replace(f"svc-{(i + 1) % 12}.yaml", None)
        snapshot = store.snapshot()
        zone.update(snapshot)
        assert _state(zone) == _state(Zone.build(snapshot)), f"step {step}"
        del skipped
    for i in range(12):
        store.replace(f"svc-{i}.yaml", None)
    zone.update(store.snapshot())
    assert _state(zone) == _state(Zone()), "removing everything leaves only the static records"


def test_update_reports_only_real_changes():
    store = Store()
    store.replace("a.yaml", parse_ok(_service(1, "clusterip", 0)))
    zone = Zone.build(store.snapshot())
    serial = zone.serial
    assert zone.update(store.snapshot()) == 0 and zone.serial == serial
    store.replace("b.yaml", parse_ok(_service(2, "headless", 1)))
    assert zone.update(store.snapshot()) == 1 and zone.serial == serial + 1
    assert set(zone.changes(store.snapshot())[0]) == set()
    store.replace("a.yaml", None)
    assert zone.changes(store.snapshot()) == ([], [ServiceKey("ns-1", "svc-1")])
