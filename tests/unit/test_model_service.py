"""v1 Service parsing: every field the data plane reads, as kubectl shows it.

Address plan: see yamlcases.py (ClusterIPs 10.96.0.0/12, Pods 10.244.0.0/16,
nodes 192.168.1.0/24, LoadBalancer and external IPs 192.168.1.200-250).
"""

from __future__ import annotations

import pytest

from dataplane.model import Protocol, Service, ServicePort, ServiceType, TrafficPolicy
from yamlcases import WEB, overlay, parse, parse_ok, parse_single

# A LoadBalancer Service using every field at once.
SHOP_LB = """
    apiVersion: v1
    kind: Service
    metadata:
      creationTimestamp: "2024-05-01T10:00:00Z"
      labels:
        app: shop
        tier: frontend
      name: shop-lb
      namespace: shop
      uid: 1f0e2d3c-4b5a-6978-8796-a5b4c3d2e1f0
    spec:
      allocateLoadBalancerNodePorts: true
      clusterIP: 10.96.12.34
      clusterIPs:
      - 10.96.12.34
      - fd00:10:96::1234
      externalIPs:
      - 192.168.1.200
      externalTrafficPolicy: Local
      healthCheckNodePort: 32100
      internalTrafficPolicy: Local
      ipFamilies:
      - IPv4
      - IPv6
      ipFamilyPolicy: PreferDualStack
      loadBalancerSourceRanges:
      - 203.0.113.0/24
      - 198.51.100.7/32
      ports:
      - name: http
        nodePort: 30080
        port: 80
        protocol: TCP
        targetPort: web
      - name: dns
        nodePort: 30053
        port: 53
        protocol: UDP
        targetPort: 5353
      - name: sig
        nodePort: 30900
        port: 9000
        protocol: SCTP
        targetPort: 9000
      selector:
        app: shop
      sessionAffinity: ClientIP
      sessionAffinityConfig:
        clientIP:
          timeoutSeconds: 600
      type: LoadBalancer
    status:
      loadBalancer:
        ingress:
        - ip: 192.168.1.240
          ipMode: VIP
        - hostname: lb.example.com
"""


def test_every_field_of_a_load_balancer_service():
    (service,) = parse_ok(SHOP_LB).services
    assert service == Service(
        namespace="shop",
        name="shop-lb",
        type=ServiceType.LOAD_BALANCER,
        cluster_ips=("10.96.12.34", "fd00:10:96::1234"),
        ports=(
            ServicePort("http", Protocol.TCP, 80, "web", 30080),
            ServicePort("dns", Protocol.UDP, 53, 5353, 30053),
            ServicePort("sig", Protocol.SCTP, 9000, 9000, 30900),
        ),
        external_ips=("192.168.1.200",),
        load_balancer_ips=("192.168.1.240",),
        session_affinity_timeout=600,
        external_traffic_policy=TrafficPolicy.LOCAL,
        internal_traffic_policy=TrafficPolicy.LOCAL,
        load_balancer_source_ranges=("203.0.113.0/24", "198.51.100.7/32"),
        health_check_node_port=32100,
        selector=(("app", "shop"),),
        labels=(("app", "shop"), ("tier", "frontend")),
        created="2024-05-01T10:00:00Z",
    )
    assert service.key.namespace == "shop" and str(service.key) == "shop/shop-lb"
    assert service.external_ips_all == ("192.168.1.200", "192.168.1.240")
    assert service.proxied and not service.headless
    assert service.port_named("dns") == service.ports[1] and service.port_named("nope") is None


def test_kubectl_service_as_shown():
    service = parse_single(WEB)
    assert service.key.name == "web" and service.key.namespace == "shop"
    assert service.type is ServiceType.CLUSTER_IP
    assert service.cluster_ips == ("10.96.0.10",)
    assert service.ports == (ServicePort("http", Protocol.TCP, 80, 8080, None),)
    assert service.selector == (("app", "web"),)
    assert service.labels == (("app", "web"),)
    assert service.session_affinity_timeout is None
    assert service.external_traffic_policy is TrafficPolicy.CLUSTER
    assert service.internal_traffic_policy is TrafficPolicy.CLUSTER
    assert service.external_ips == service.load_balancer_ips == service.load_balancer_source_ranges == ()
    assert service.health_check_node_port is None


# Each case: a YAML patch over WEB, what to read from the Service, and the value expected.
@pytest.mark.parametrize(
    "patch, read, expected",
    [
        pytest.param("{}", lambda s: s.type, ServiceType.CLUSTER_IP, id="type-clusterip"),
        pytest.param("{spec: {type: NodePort}}", lambda s: s.type, ServiceType.NODE_PORT, id="type-nodeport"),
        pytest.param("{spec: {type: LoadBalancer}}", lambda s: s.type, ServiceType.LOAD_BALANCER, id="type-lb"),
        pytest.param("{spec: {type: null}}", lambda s: s.type, ServiceType.CLUSTER_IP, id="type-defaults-to-clusterip"),
        pytest.param("{spec: {type: ExternalName, externalName: db.example.com, clusterIP: null, clusterIPs: null}}", lambda s: (s.type, s.external_name, s.cluster_ips, s.proxied, s.headless), (ServiceType.EXTERNAL_NAME, "db.example.com", (), False, False), id="externalname-not-proxied-not-headless"),
        pytest.param("{spec: {type: ExternalName, externalName: db.example.com}}", lambda s: (s.cluster_ips, s.proxied), ((), False), id="externalname-ignores-stale-clusterip"),
        pytest.param("{spec: {clusterIP: None, clusterIPs: [None]}}", lambda s: (s.cluster_ips, s.headless, s.proxied), ((), True, False), id="headless-clusterip-none"),
        pytest.param("{spec: {clusterIP: None, clusterIPs: null}}", lambda s: (s.cluster_ips, s.headless), ((), True), id="headless-only-clusterip-field"),
        pytest.param("{spec: {clusterIP: '', clusterIPs: null}}", lambda s: s.cluster_ips, (), id="empty-clusterip-is-headless"),
        pytest.param("{spec: {clusterIP: 10.96.0.11, clusterIPs: null}}", lambda s: s.cluster_ips, ("10.96.0.11",), id="clusterip-without-clusterips"),
        pytest.param("{spec: {clusterIPs: [10.96.0.10, 'fd00:10:96::a']}}", lambda s: s.cluster_ips, ("10.96.0.10", "fd00:10:96::a"), id="dual-stack-clusterips"),
        pytest.param("{spec: {clusterIPs: ['fd00:10:96:0:0:0:0:a'], clusterIP: 'fd00:10:96:0:0:0:0:a'}}", lambda s: s.cluster_ips, ("fd00:10:96::a",), id="ipv6-canonicalised"),
        pytest.param("{spec: {ports: [{port: 80}]}}", lambda s: s.ports, (ServicePort("", Protocol.TCP, 80, 80),), id="unnamed-port-defaults-tcp-and-targetport"),
        pytest.param("{spec: {ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5353}]}}", lambda s: s.ports[0].protocol, Protocol.UDP, id="protocol-udp"),
        pytest.param("{spec: {ports: [{name: sig, port: 9000, protocol: SCTP}]}}", lambda s: s.ports[0].protocol, Protocol.SCTP, id="protocol-sctp"),
        pytest.param("{spec: {ports: [{name: http, port: 80, targetPort: http-alt}]}}", lambda s: s.ports[0].target_port, "http-alt", id="targetport-named"),
        pytest.param("{spec: {ports: [{name: http, port: 80, targetPort: '8080'}]}}", lambda s: s.ports[0].target_port, 8080, id="targetport-digits-string-is-number"),
        pytest.param("{spec: {ports: [{name: http, port: 80, targetPort: 65535}]}}", lambda s: s.ports[0].target_port, 65535, id="targetport-max"),
        pytest.param("{spec: {ports: [{name: http, port: 80, targetPort: ''}]}}", lambda s: s.ports[0].target_port, 80, id="targetport-empty-means-port"),
        pytest.param("{spec: {ports: [{name: http-metrics-endpoint, port: 9100}]}}", lambda s: s.ports[0].name, "http-metrics-endpoint", id="port-name-is-dns-label-not-15-chars"),
        pytest.param("{spec: {ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]}}", lambda s: [(p.port, p.protocol) for p in s.ports], [(53, Protocol.UDP), (53, Protocol.TCP)], id="same-port-two-protocols"),
        pytest.param("{spec: {ports: []}}", lambda s: s.ports, (), id="no-ports"),
        pytest.param("{spec: {type: NodePort, ports: [{name: http, port: 80, nodePort: 30080}]}}", lambda s: s.ports[0].node_port, 30080, id="nodeport"),
        pytest.param("{spec: {type: LoadBalancer, ports: [{name: http, port: 80, nodePort: 30080}]}}", lambda s: s.ports[0].node_port, 30080, id="nodeport-on-loadbalancer"),
        pytest.param("{spec: {type: NodePort, ports: [{name: http, port: 80}]}}", lambda s: s.ports[0].node_port, None, id="nodeport-unallocated"),
        pytest.param("{spec: {externalIPs: [192.168.1.201, 192.168.1.202]}}", lambda s: s.external_ips, ("192.168.1.201", "192.168.1.202"), id="externalips"),
        pytest.param("{spec: {type: LoadBalancer}, status: {loadBalancer: {ingress: [{ip: 192.168.1.240}, {ip: 192.168.1.241}]}}}", lambda s: s.load_balancer_ips, ("192.168.1.240", "192.168.1.241"), id="lb-ingress-ips"),
        pytest.param("{spec: {type: LoadBalancer}, status: {loadBalancer: {ingress: [{hostname: lb.example.com}]}}}", lambda s: s.load_balancer_ips, (), id="lb-ingress-hostname-only-skipped"),
        pytest.param("{status: {loadBalancer: {ingress: [{ip: 192.168.1.240}]}}}", lambda s: s.load_balancer_ips, (), id="lb-ingress-ignored-unless-loadbalancer"),
        pytest.param("{spec: {type: LoadBalancer, externalIPs: [192.168.1.240]}, status: {loadBalancer: {ingress: [{ip: 192.168.1.240}]}}}", lambda s: s.external_ips_all, ("192.168.1.240",), id="external-and-ingress-deduplicated"),
        pytest.param("{spec: {sessionAffinity: None}}", lambda s: s.session_affinity_timeout, None, id="affinity-none"),
        pytest.param("{spec: {sessionAffinity: ClientIP}}", lambda s: s.session_affinity_timeout, 10800, id="affinity-clientip-default-timeout"),
        pytest.param("{spec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}}}", lambda s: s.session_affinity_timeout, 30, id="affinity-clientip-timeout"),
        pytest.param("{spec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}}}}", lambda s: s.session_affinity_timeout, 86400, id="affinity-timeout-max"),
        pytest.param("{spec: {sessionAffinity: None, sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}}}", lambda s: s.session_affinity_timeout, None, id="affinity-config-without-clientip-ignored"),
        pytest.param("{spec: {type: NodePort, externalTrafficPolicy: Local}}", lambda s: s.external_traffic_policy, TrafficPolicy.LOCAL, id="external-policy-local"),
        pytest.param("{spec: {type: NodePort, externalTrafficPolicy: Cluster}}", lambda s: s.external_traffic_policy, TrafficPolicy.CLUSTER, id="external-policy-cluster"),
        pytest.param("{spec: {internalTrafficPolicy: Local}}", lambda s: s.internal_traffic_policy, TrafficPolicy.LOCAL, id="internal-policy-local"),
        pytest.param("{spec: {internalTrafficPolicy: null}}", lambda s: s.internal_traffic_policy, TrafficPolicy.CLUSTER, id="internal-policy-default"),
        pytest.param("{spec: {loadBalancerSourceRanges: [10.0.0.1/8, ' 203.0.113.0/24 ', '2001:db8::/32']}}", lambda s: s.load_balancer_source_ranges, ("10.0.0.0/8", "203.0.113.0/24", "2001:db8::/32"), id="source-ranges-normalised"),
        pytest.param("{spec: {type: LoadBalancer, healthCheckNodePort: 32100}}", lambda s: s.health_check_node_port, 32100, id="health-check-node-port"),
        pytest.param("{spec: {selector: {tier: web, app: shop}}}", lambda s: s.selector, (("app", "shop"), ("tier", "web")), id="selector-sorted"),
        pytest.param("{spec: {selector: null}}", lambda s: s.selector, (), id="no-selector"),
        pytest.param("{spec: {selector: {version: 2}}}", lambda s: s.selector, (("app", "web"), ("version", "2")), id="selector-number-value-as-string"),
        pytest.param("{metadata: {labels: {app: web, team: a}}}", lambda s: s.labels, (("app", "web"), ("team", "a")), id="labels"),
        pytest.param("{metadata: {namespace: null}}", lambda s: s.namespace, "default", id="namespace-defaults"),
        pytest.param("{metadata: {name: a-b0}}", lambda s: s.name, "a-b0", id="name-dns1035"),
        pytest.param("{metadata: {name: " + "a" * 63 + "}}", lambda s: len(s.name), 63, id="name-63-chars"),
        pytest.param("{metadata: {namespace: 0-shop}}", lambda s: s.namespace, "0-shop", id="namespace-may-start-with-digit"),
        pytest.param("{spec: {futureField: {nested: [1, 2]}, ipFamilies: [IPv4]}, extra: true}", lambda s: s.cluster_ips, ("10.96.0.10",), id="unknown-fields-ignored"),
    ],
)
def test_service_field(patch, read, expected):
    assert read(parse_single(overlay(WEB, patch))) == expected


@pytest.mark.parametrize(
    "labels",
    [
        pytest.param("{service.kubernetes.io/service-proxy-name: cilium}", id="another-proxy"),
        pytest.param("{service.kubernetes.io/service-proxy-name: ''}", id="empty-proxy-name"),
    ],
)
def test_service_of_another_proxy_is_ignored(labels):
    objects, errors = parse(f"""
        apiVersion: v1
        kind: Service
        metadata: {{name: other, namespace: shop, labels: {labels}}}
        spec: {{clusterIP: 10.96.0.20, ports: [{{port: 80}}]}}
        ---
        apiVersion: v1
        kind: Service
        metadata: {{name: mine, namespace: shop}}
        spec: {{clusterIP: 10.96.0.21, ports: [{{port: 80}}]}}
    """)
    assert errors == []
    assert [str(s.key) for s in objects.services] == ["shop/mine"]


def test_service_of_another_proxy_is_ignored_even_when_invalid():
    objects, errors = parse("""
        apiVersion: v1
        kind: Service
        metadata: {name: other, namespace: shop, labels: {service.kubernetes.io/service-proxy-name: cilium}}
        spec: {clusterIP: not-an-ip, ports: [{port: 0}]}
    """)
    assert (objects.services, errors) == ((), [])


def test_overlay_is_a_json_merge_patch():
    merged = overlay(WEB, "{spec: {ports: [{port: 81}], selector: null}, metadata: {labels: {tier: x}}}")
    assert merged["spec"]["ports"] == [{"port": 81}]
    assert "selector" not in merged["spec"]
    assert merged["spec"]["clusterIP"] == "10.96.0.10"
    assert merged["metadata"]["labels"] == {"app": "web", "tier": "x"}
    assert "selector" in WEB["spec"]
    assert WEB["spec"]["ports"][0]["port"] == 80 and "tier" not in WEB["metadata"]["labels"]
