"""Invalid input: every error names the file, the object and the field path;
one bad object never takes the others down; names that could smuggle nftables
syntax (quotes, semicolons, braces, newlines) are refused at parse time.

Address plan: see yamlcases.py.
"""

from __future__ import annotations

import pytest

from dataplane.model import parse_objects
from yamlcases import WEB, WEB_ENDPOINTS, WEB_POD, WEB_SLICE, overlay, parse, parse_error


def test_error_message_names_file_object_and_field():
    error = parse_error(overlay(WEB, "{spec: {ports: [{name: http, port: 0}]}}"))
    assert str(error) == "test.yaml: Service shop/web: spec.ports[0].port: must be between 1 and 65535, got 0"
    assert (error.source, error.kind, error.ref, error.field) == ("test.yaml", "Service", "shop/web", "spec.ports[0].port")
    assert isinstance(error, ValueError)


# Each case: a YAML patch over the kubectl Service WEB, the field path named, and words of the problem.
@pytest.mark.parametrize(
    "patch, field, problem",
    [
        pytest.param("{spec: {ports: [{name: http, port: 0}]}}", "spec.ports[0].port", "between 1 and 65535, got 0", id="port-zero"),
        pytest.param("{spec: {ports: [{name: a, port: 80}, {name: b, port: 70000}]}}", "spec.ports[1].port", "got 70000", id="port-too-big"),
        pytest.param("{spec: {ports: [{name: http}]}}", "spec.ports[0].port", "is required", id="port-missing"),
        pytest.param("{spec: {ports: [{name: http, port: '80'}]}}", "spec.ports[0].port", "must be an integer, got '80'", id="port-string"),
        pytest.param("{spec: {ports: [{name: http, port: true}]}}", "spec.ports[0].port", "must be an integer", id="port-bool"),
        pytest.param("{spec: {ports: [{name: http, port: 80.5}]}}", "spec.ports[0].port", "must be an integer", id="port-float"),
        pytest.param("{spec: {ports: [{name: http, port: 80, targetPort: 0}]}}", "spec.ports[0].targetPort", "between 1 and 65535", id="targetport-zero"),
        pytest.param("{spec: {ports: [{name: http, port: 80, targetPort: 65536}]}}", "spec.ports[0].targetPort", "between 1 and 65535", id="targetport-too-big"),
        pytest.param("{spec: {ports: [{name: http, port: 80, targetPort: true}]}}", "spec.ports[0].targetPort", "port number or name", id="targetport-bool"),
        pytest.param("{spec: {ports: [{name: http, port: 80, targetPort: [80]}]}}", "spec.ports[0].targetPort", "port number or name", id="targetport-list"),
        pytest.param("{spec: {ports: [{name: http, port: 80, targetPort: web-server-longname}]}}", "spec.ports[0].targetPort", "IANA service name", id="targetport-name-too-long"),
        pytest.param("{spec: {type: NodePort, ports: [{name: http, port: 80, nodePort: 70000}]}}", "spec.ports[0].nodePort", "between 1 and 65535", id="nodeport-out-of-range"),
        pytest.param("{spec: {ports: [{name: http, port: 80, protocol: ICMP}]}}", "spec.ports[0].protocol", "must be one of TCP, UDP, SCTP, got 'ICMP'", id="protocol-unknown"),
        pytest.param("{spec: {ports: [{name: http, port: 80, protocol: tcp}]}}", "spec.ports[0].protocol", "got 'tcp'", id="protocol-lowercase"),
        pytest.param("{spec: {ports: [{name: a, port: 80}, {name: b, port: 80}]}}", "spec.ports[1]", "duplicate port 80", id="duplicate-port"),
        pytest.param("{spec: {ports: [{name: a, port: 80}, {name: a, port: 81}]}}", "spec.ports[1]", "duplicate name 'a'", id="duplicate-port-name"),
        pytest.param("{spec: {type: NodePort, ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30080}]}}", "spec.ports[1].nodePort", "duplicate nodePort 30080", id="duplicate-nodeport"),
        pytest.param("{spec: {ports: {name: http, port: 80}}}", "spec.ports", "must be a list", id="ports-not-a-list"),
        pytest.param("{spec: {type: Internal}}", "spec.type", "must be one of ClusterIP, NodePort, LoadBalancer, ExternalName", id="type-unknown"),
        pytest.param("{spec: {clusterIP: 10.96.0.300, clusterIPs: null}}", "spec.clusterIP", "not a valid IP address: '10.96.0.300'", id="clusterip-invalid"),
        pytest.param("{spec: {clusterIPs: [10.96.0.10, 10.96.0.11]}}", "spec.clusterIPs", "at most one address per IP family", id="clusterips-same-family"),
        pytest.param("{spec: {clusterIPs: [10.96.0.10, bogus]}}", "spec.clusterIPs[1]", "not a valid IP address", id="clusterips-second-invalid"),
        pytest.param("{spec: {externalIPs: [192.168.1.300]}}", "spec.externalIPs[0]", "not a valid IP address", id="externalip-invalid"),
        pytest.param("{spec: {externalIPs: 192.168.1.200}}", "spec.externalIPs", "must be a list", id="externalips-not-a-list"),
        pytest.param("{spec: {type: LoadBalancer}, status: {loadBalancer: {ingress: [{ip: 192.168.1.240}, {ip: lb}]}}}", "status.loadBalancer.ingress[1].ip", "not a valid IP address", id="ingress-ip-invalid"),
        pytest.param("{spec: {sessionAffinity: Sticky}}", "spec.sessionAffinity", "must be one of None, ClientIP", id="affinity-unknown"),
        pytest.param("{spec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}}", "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "between 1 and 86400", id="affinity-timeout-zero"),
        pytest.param("{spec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}}}", "spec.sessionAffinityConfig.clientIP.timeoutSeconds", "got 86401", id="affinity-timeout-too-long"),
        pytest.param("{spec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: 30}}}", "spec.sessionAffinityConfig.clientIP", "must be an object", id="affinity-config-not-object"),
        pytest.param("{spec: {externalTrafficPolicy: Global}}", "spec.externalTrafficPolicy", "must be one of Cluster, Local", id="external-policy-unknown"),
        pytest.param("{spec: {internalTrafficPolicy: Node}}", "spec.internalTrafficPolicy", "must be one of Cluster, Local", id="internal-policy-unknown"),
        pytest.param("{spec: {loadBalancerSourceRanges: [10.0.0.0/8, 10.0.0.0/33]}}", "spec.loadBalancerSourceRanges[1]", "not a valid CIDR", id="source-range-invalid"),
        pytest.param("{spec: {healthCheckNodePort: 0}}", "spec.healthCheckNodePort", "between 1 and 65535", id="health-check-port-zero"),
        pytest.param("{spec: {selector: [app]}}", "spec.selector", "must be a map", id="selector-not-a-map"),
        pytest.param("{spec: {selector: {app: [web]}}}", "spec.selector", "entry 'app' must map a string to a string", id="selector-value-list"),
        pytest.param("{metadata: {labels: web}}", "metadata.labels", "must be a map", id="labels-not-a-map"),
        pytest.param("{metadata: {name: null}}", "metadata.name", "is required", id="name-missing"),
        pytest.param("{metadata: {name: 42}}", "metadata.name", "must be a string, got 42", id="name-number"),
        pytest.param("{spec: [ports]}", "spec", "must be an object, got list", id="spec-not-an-object"),
        pytest.param("{metadata: web}", "metadata", "must be an object", id="metadata-not-an-object"),
    ],
)
def test_service_error(patch, field, problem):
    error = parse_error(overlay(WEB, patch))
    assert error.field == field
    assert problem in error.problem
    assert str(error).startswith(f"test.yaml: Service {error.ref}: {field}: ")


@pytest.mark.parametrize(
    "base, patch, kind, field, problem",
    [
        pytest.param(WEB_SLICE, "{addressType: IPv5}", "EndpointSlice", "addressType", "must be one of IPv4, IPv6, FQDN", id="slice-address-type"),
        pytest.param(WEB_SLICE, "{endpoints: [{addresses: [10.244.1.5]}, {addresses: [10.244.1.300]}]}", "EndpointSlice", "endpoints[1].addresses[0]", "not a valid IP address", id="slice-address-invalid"),
        pytest.param(WEB_SLICE, "{endpoints: [{addresses: [10.244.1.5], conditions: {ready: 'yes'}}]}", "EndpointSlice", "endpoints[0].conditions.ready", "must be true or false, got 'yes'", id="slice-ready-not-bool"),
        pytest.param(WEB_SLICE, "{endpoints: [{addresses: [10.244.1.5], conditions: {serving: 1}}]}", "EndpointSlice", "endpoints[0].conditions.serving", "must be true or false", id="slice-serving-not-bool"),
        pytest.param(WEB_SLICE, "{endpoints: [{addresses: [10.244.1.5], conditions: {terminating: 'false'}}]}", "EndpointSlice", "endpoints[0].conditions.terminating", "must be true or false", id="slice-terminating-not-bool"),
        pytest.param(WEB_SLICE, "{ports: [{name: http, port: 0}]}", "EndpointSlice", "ports[0].port", "between 1 and 65535", id="slice-port-zero"),
        pytest.param(WEB_SLICE, "{ports: [{name: http}]}", "EndpointSlice", "ports[0].port", "is required", id="slice-port-missing"),
        pytest.param(WEB_SLICE, "{ports: [{name: http, port: 80, protocol: ICMP}]}", "EndpointSlice", "ports[0].protocol", "must be one of TCP, UDP, SCTP", id="slice-protocol"),
        pytest.param(WEB_SLICE, "{endpoints: [{addresses: [10.244.1.5], hints: {forZones: [{name: 7}]}}]}", "EndpointSlice", "endpoints[0].hints.forZones[0].name", "must be a string", id="slice-hint-not-string"),
        pytest.param(WEB_ENDPOINTS, "{subsets: [{addresses: [{ip: 10.244.1.300}], ports: [{port: 80}]}]}", "Endpoints", "subsets[0].addresses[0].ip", "not a valid IP address", id="endpoints-ip-invalid"),
        pytest.param(WEB_ENDPOINTS, "{subsets: [{addresses: [{hostname: web-0}], ports: [{port: 80}]}]}", "Endpoints", "subsets[0].addresses[0].ip", "must be an IP address, got None", id="endpoints-ip-missing"),
        pytest.param(WEB_ENDPOINTS, "{subsets: [{notReadyAddresses: [{ip: x}], ports: [{port: 80}]}]}", "Endpoints", "subsets[0].notReadyAddresses[0].ip", "not a valid IP address", id="endpoints-not-ready-ip-invalid"),
        pytest.param(WEB_ENDPOINTS, "{subsets: [{ports: [{port: 80}]}, {ports: [{port: 99999}]}]}", "Endpoints", "subsets[1].ports[0].port", "between 1 and 65535", id="endpoints-port"),
        pytest.param(WEB_POD, "{status: {podIP: 10.244.1.300, podIPs: null}}", "Pod", "status.podIP", "not a valid IP address", id="pod-podip-invalid"),
        pytest.param(WEB_POD, "{status: {podIPs: [{ip: 10.244.1.5}, {ip: nope}]}}", "Pod", "status.podIPs[1].ip", "not a valid IP address", id="pod-podips-invalid"),
        pytest.param(WEB_POD, "{spec: {containers: [{name: a, ports: [{name: http}]}]}}", "Pod", "spec.containers[0].ports[0].containerPort", "is required", id="pod-container-port-missing"),
        pytest.param(WEB_POD, "{spec: {containers: [{name: a}, {name: b, ports: [{containerPort: 0}]}]}}", "Pod", "spec.containers[1].ports[0].containerPort", "between 1 and 65535", id="pod-container-port-zero"),
        pytest.param(WEB_POD, "{spec: {containers: [{name: a, ports: [{containerPort: 80, protocol: HTTP}]}]}}", "Pod", "spec.containers[0].ports[0].protocol", "must be one of TCP, UDP, SCTP", id="pod-container-protocol"),
        pytest.param(WEB_POD, "{status: {conditions: [{type: Ready, status: true}]}}", "Pod", "status.conditions[0].status", "must be a string", id="pod-condition-status-bool"),
    ],
)
def test_endpoint_and_pod_errors(base, patch, kind, field, problem):
    error = parse_error(overlay(base, patch))
    assert (error.kind, error.field) == (kind, field)
    assert problem in error.problem
    assert str(error).startswith(f"test.yaml: {kind} shop/")


# Names become parts of nftables chain names and comments: anything outside
# Kubernetes' naming rules is refused, with the field that holds it.
INJECTIONS = [
    'web"; flush ruleset; "',
    "web;drop",
    "web}{",
    "web\nadd table ip evil",
    "web#comment",
    "web name",
    "Web",
    "web/x",
    "web\\x",
    "-web",
    "web-",
]


@pytest.mark.parametrize(
    "base, patch, kind, field, rule",
    [
        pytest.param(WEB, "{metadata: {name: NAME}}", "Service", "metadata.name", "DNS-1035 label", id="service-name"),
        pytest.param(WEB, "{metadata: {namespace: NAME}}", "Service", "metadata.namespace", "DNS-1123 label", id="service-namespace"),
        pytest.param(WEB, "{spec: {ports: [{name: NAME, port: 80}]}}", "Service", "spec.ports[0].name", "DNS-1123 label", id="service-port-name"),
        pytest.param(WEB, "{spec: {ports: [{name: http, port: 80, targetPort: NAME}]}}", "Service", "spec.ports[0].targetPort", "IANA service name", id="service-target-port"),
        pytest.param(WEB_SLICE, "{metadata: {name: NAME}}", "EndpointSlice", "metadata.name", "DNS-1123 subdomain", id="slice-name"),
        pytest.param(WEB_SLICE, "{metadata: {namespace: NAME}}", "EndpointSlice", "metadata.namespace", "DNS-1123 label", id="slice-namespace"),
        pytest.param(WEB_SLICE, "{ports: [{name: NAME, port: 8080}]}", "EndpointSlice", "ports[0].name", "DNS-1123 label", id="slice-port-name"),
        pytest.param(WEB_SLICE, "{endpoints: [{addresses: [10.244.1.5], nodeName: NAME}]}", "EndpointSlice", "endpoints[0].nodeName", "DNS-1123 subdomain", id="slice-node-name"),
        pytest.param(WEB_ENDPOINTS, "{metadata: {name: NAME}}", "Endpoints", "metadata.name", "DNS-1123 subdomain", id="endpoints-name"),
        pytest.param(WEB_ENDPOINTS, "{subsets: [{ports: [{name: NAME, port: 80}]}]}", "Endpoints", "subsets[0].ports[0].name", "DNS-1123 label", id="endpoints-port-name"),
        pytest.param(WEB_ENDPOINTS, "{subsets: [{addresses: [{ip: 10.244.1.5, nodeName: NAME}]}]}", "Endpoints", "subsets[0].addresses[0].nodeName", "DNS-1123 subdomain", id="endpoints-node-name"),
        pytest.param(WEB_POD, "{metadata: {name: NAME}}", "Pod", "metadata.name", "DNS-1123 subdomain", id="pod-name"),
        pytest.param(WEB_POD, "{metadata: {namespace: NAME}}", "Pod", "metadata.namespace", "DNS-1123 label", id="pod-namespace"),
        pytest.param(WEB_POD, "{spec: {nodeName: NAME}}", "Pod", "spec.nodeName", "DNS-1123 subdomain", id="pod-node-name"),
        pytest.param(WEB_POD, "{spec: {containers: [{name: c, ports: [{name: NAME, containerPort: 80}]}]}}", "Pod", "spec.containers[0].ports[0].name", "IANA service name", id="container-port-name"),
    ],
)
@pytest.mark.parametrize("name", INJECTIONS, ids=range(len(INJECTIONS)))
def test_name_that_could_inject_nft_syntax_is_refused(base, patch, kind, field, rule, name):
    obj = overlay(base, patch.replace("NAME", "PLACEHOLDER"))
    _replace(obj, "PLACEHOLDER", name)
    error = parse_error(obj)
    assert (error.kind, error.field) == (kind, field)
    assert rule in error.problem and repr(name) in error.problem
    assert "\n" not in str(error), "an error message must stay on one line"


@pytest.mark.parametrize(
    "base, patch, field, rule",
    [
        pytest.param(WEB, "{metadata: {name: 1web}}", "metadata.name", "DNS-1035 label", id="service-name-leading-digit"),
        pytest.param(WEB, "{metadata: {name: web.shop}}", "metadata.name", "DNS-1035 label", id="service-name-dot"),
        pytest.param(WEB, "{metadata: {name: " + "a" * 64 + "}}", "metadata.name", "at most 63", id="service-name-64-chars"),
        pytest.param(WEB, "{metadata: {namespace: shop.eu}}", "metadata.namespace", "DNS-1123 label", id="namespace-dot"),
        pytest.param(WEB, "{metadata: {namespace: " + "a" * 64 + "}}", "metadata.namespace", "DNS-1123 label", id="namespace-64-chars"),
        pytest.param(WEB, "{spec: {ports: [{name: " + "p" * 64 + ", port: 80}]}}", "spec.ports[0].name", "DNS-1123 label", id="port-name-64-chars"),
        pytest.param(WEB, "{spec: {ports: [{name: http, port: 80, targetPort: web--alt}]}}", "spec.ports[0].targetPort", "IANA service name", id="target-port-double-dash"),
        pytest.param(WEB, "{spec: {ports: [{name: http, port: 80, targetPort: 8080-9090}]}}", "spec.ports[0].targetPort", "at least one letter", id="target-port-no-letter"),
        pytest.param(WEB, "{spec: {ports: [{name: http, port: 80, targetPort: abcdefghijklmnop}]}}", "spec.ports[0].targetPort", "at most 15", id="target-port-16-chars"),
        pytest.param(WEB_POD, "{metadata: {name: " + "a" * 254 + "}}", "metadata.name", "DNS-1123 subdomain", id="pod-name-254-chars"),
        pytest.param(WEB_POD, "{metadata: {name: web..x}}", "metadata.name", "DNS-1123 subdomain", id="pod-name-empty-label"),
        pytest.param(WEB_POD, "{spec: {containers: [{name: c, ports: [{name: http-metrics-port, containerPort: 80}]}]}}", "spec.containers[0].ports[0].name", "at most 15", id="container-port-name-16-chars"),
    ],
)
def test_kubernetes_naming_rules(base, patch, field, rule):
    error = parse_error(overlay(base, patch))
    assert error.field == field and rule in error.problem


@pytest.mark.parametrize(
    "base, patch",
    [
        pytest.param(WEB, "{metadata: {name: a" + "-b" * 31 + "}}", id="service-name-63-chars"),
        pytest.param(WEB, "{spec: {ports: [{name: a--b, port: 80}]}}", id="service-port-name-double-dash-is-dns-label"),
        pytest.param(WEB, "{spec: {ports: [{name: '80', port: 80}]}}", id="service-port-name-digits-is-dns-label"),
        pytest.param(WEB, "{spec: {ports: [{name: http, port: 80, targetPort: h-t-t-p-8080-ab}]}}", id="target-port-15-chars"),
        pytest.param(WEB, "{spec: {ports: [{name: http, port: 80, targetPort: 8080x}]}}", id="target-port-digits-and-letter"),
        pytest.param(WEB_POD, "{metadata: {name: web.shop.v1}}", id="pod-name-subdomain"),
        pytest.param(WEB_POD, "{spec: {nodeName: node-1.eu-west.example.com}}", id="node-name-fqdn"),
    ],
)
def test_valid_names_are_accepted(base, patch):
    objects, errors = parse_objects([overlay(base, patch)], "test.yaml")
    assert errors == []
    assert len(objects.services + objects.slices + objects.legacy + objects.pods) >= 1


def test_hostile_name_stays_on_one_line_in_the_object_reference():
    obj = overlay(WEB, "{}")
    obj["metadata"]["name"] = "web\n2024-01-01 INFO all good"
    error = parse_error(obj)
    assert error.ref == "shop/web\\n2024-01-01 INFO all good"
    assert "\n" not in str(error)


def test_one_bad_object_in_a_multi_document_file_is_skipped_alone():
    objects, errors = parse(
        """
        apiVersion: v1
        kind: Service
        metadata: {name: good-a, namespace: shop}
        spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: bad, namespace: shop}
        spec: {clusterIP: 10.96.0.12, ports: [{name: http, port: 80, protocol: ICMP}]}
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: bad-pod, namespace: shop}
        status: {podIP: 10.244.1.999}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: good-b, namespace: shop}
        spec: {clusterIP: 10.96.0.13, ports: [{name: http, port: 80}]}
        """,
        source="/srv/manifests/shop.yaml",
    )
    assert [str(s.key) for s in objects.services] == ["shop/good-a", "shop/good-b"]
    assert objects.pods == ()
    assert [str(e) for e in errors] == [
        "/srv/manifests/shop.yaml: Service shop/bad: spec.ports[0].protocol: must be one of TCP, UDP, SCTP, got 'ICMP'",
        "/srv/manifests/shop.yaml: Pod shop/bad-pod: status.podIP: is not a valid IP address: '10.244.1.999'",
    ]


def test_kind_list_yields_its_items_and_skips_bad_ones():
    objects, errors = parse(
        """
        apiVersion: v1
        kind: List
        metadata:
          resourceVersion: ""
        items:
        - apiVersion: v1
          kind: Service
          metadata: {name: web, namespace: shop}
          spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}], selector: {app: web}}
        - apiVersion: v1
          kind: Pod
          metadata: {name: web-1, namespace: shop, labels: {app: web}}
          status: {podIP: 10.244.1.5}
        - apiVersion: discovery.k8s.io/v1
          kind: EndpointSlice
          metadata: {name: web-x, namespace: shop, labels: {kubernetes.io/service-name: web}}
          addressType: IPv4
          endpoints: [{addresses: [10.244.1.5]}]
          ports: [{name: http, port: 8080}]
        - apiVersion: v1
          kind: Service
          metadata: {name: broken, namespace: shop}
          spec: {clusterIP: 10.96.0.14, ports: [{name: http, port: -1}]}
        """
    )
    assert [str(s.key) for s in objects.services] == ["shop/web"]
    assert [p.name for p in objects.pods] == ["web-1"]
    assert [s.name for s in objects.slices] == ["web-x"]
    assert [(e.ref, e.field) for e in errors] == [("shop/broken", "spec.ports[0].port")]


def test_typed_lists_and_empty_documents():
    objects, errors = parse(
        """
        ---
        apiVersion: v1
        kind: ServiceList
        items:
        - kind: Service
          metadata: {name: a}
          spec: {clusterIP: 10.96.0.21}
        ---
        # only a comment
        ---
        apiVersion: v1
        kind: List
        items: null
        """
    )
    assert errors == []
    assert [str(s.key) for s in objects.services] == ["default/a"]


@pytest.mark.parametrize(
    "text, problem",
    [
        pytest.param("just a string", "is not a mapping", id="scalar-document"),
        pytest.param("- a\n- b", "is not a mapping", id="list-document"),
        pytest.param("kind: List\nitems: [42]", "is not a mapping", id="list-item-scalar"),
    ],
)
def test_document_that_is_not_an_object(text, problem):
    objects, errors = parse(text)
    assert [(e.source, e.problem) for e in errors] == [("test.yaml", problem)]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 3}", id="deployment"),
        pytest.param("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: 'not;valid'}\ndata: {a: b}", id="configmap-with-odd-name"),
        pytest.param("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}", id="namespace"),
        pytest.param("metadata: {name: no-kind}", id="no-kind"),
    ],
)
def test_kinds_we_do_not_serve_are_ignored_silently(text):
    assert parse(text) == (parse("")[0], [])


def _replace(node, old: str, new: str) -> None:
    """Replaces a placeholder string anywhere in a parsed manifest, in place."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in list(items):
        if value == old:
            node[key] = new
        else:
            _replace(value, old, new)
