"""Helpers shared by the model and sync unit tests: real YAML in, model values out.

Address plan for every module here (as in kube-proxy's proxier_test.go):
Pods 10.244.0.0/16 (node-1: 10.244.1.0/24, node-2: 10.244.2.0/24),
ClusterIPs 10.96.0.0/12 (IPv6 fd00:10:96::/112), nodes 192.168.1.0/24,
LoadBalancer and external IPs 192.168.1.200-250.
"""

from __future__ import annotations

import copy
import textwrap
from typing import Any

import yaml

from dataplane.model import InvalidObject, ObjectSet, parse_objects


def documents(text: str) -> list[Any]:
    """The documents of a YAML stream, dedented so tests can indent their manifests."""
    return list(yaml.safe_load_all(textwrap.dedent(text)))


def parse(text: str, source: str = "test.yaml") -> tuple[ObjectSet, list[InvalidObject]]:
    return parse_objects(documents(text), source)


def parse_ok(text: str) -> ObjectSet:
    """Parses manifests that must be valid: any error fails the test with its message."""
    objects, errors = parse(text)
    assert not errors, [str(error) for error in errors]
    return objects


def overlay(base: dict[str, Any], patch: str) -> dict[str, Any]:
    """`base` patched as `kubectl patch --type merge` would (RFC 7386): maps merge
    key by key, null removes a key, anything else replaces. `base` is not changed."""

    def merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
        for key, value in extra.items():
            if value is None:
                into.pop(key, None)
            elif isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    result = copy.deepcopy(base)
    extra = yaml.safe_load(patch) or {}
    assert isinstance(extra, dict), f"a patch must be a YAML mapping, got {patch!r}"
    merge(result, extra)
    return result


def parse_dicts(*objs: dict[str, Any]) -> ObjectSet:
    """Parses objects that must be valid: any error fails the test with its message."""
    objects, errors = parse_objects(objs, "test.yaml")
    assert not errors, [str(error) for error in errors]
    return objects


def parse_single(obj: dict[str, Any]) -> Any:
    """The one model value a single valid object gives (a Service, slice or Pod)."""
    objects = parse_dicts(obj)
    values = objects.services + objects.slices + objects.legacy + objects.pods
    assert len(values) == 1, values
    return values[0]


def parse_error(obj: dict[str, Any]) -> InvalidObject:
    """The one error a single invalid object gives; fails if it parsed."""
    objects, errors = parse_objects([obj], "test.yaml")
    assert len(errors) == 1, (objects, errors)
    assert objects == ObjectSet(), objects
    return errors[0]


# --- Objects as `kubectl get -o yaml` shows them, the base that test cases patch ---

# `kubectl get service web -n shop -o yaml`
WEB = documents("""
    apiVersion: v1
    kind: Service
    metadata:
      annotations:
        kubectl.kubernetes.io/last-applied-configuration: |
          {"apiVersion":"v1","kind":"Service","metadata":{"annotations":{},"name":"web","namespace":"shop"}}
      creationTimestamp: "2024-05-01T10:00:00Z"
      labels:
        app: web
      name: web
      namespace: shop
      resourceVersion: "48213"
      uid: 9d1c7a5e-0f2b-4c3e-9a51-4b1f7e2d6c10
    spec:
      clusterIP: 10.96.0.10
      clusterIPs:
      - 10.96.0.10
      internalTrafficPolicy: Cluster
      ipFamilies:
      - IPv4
      ipFamilyPolicy: SingleStack
      ports:
      - name: http
        port: 80
        protocol: TCP
        targetPort: 8080
      selector:
        app: web
      sessionAffinity: None
      type: ClusterIP
    status:
      loadBalancer: {}
""")[0]

# `kubectl get endpointslice -n shop web-8xk2p -o yaml`
WEB_SLICE = documents("""
    addressType: IPv4
    apiVersion: discovery.k8s.io/v1
    endpoints:
    - addresses:
      - 10.244.1.5
      conditions:
        ready: true
        serving: true
        terminating: false
      hints:
        forZones:
        - name: zone-a
      nodeName: node-1
      targetRef:
        kind: Pod
        name: web-7d4b9c8f6-x2x9k
        namespace: shop
        uid: 0b6f1f4e-2f5c-4c1b-9a0e-6f0d3c2b1a01
      zone: zone-a
    - addresses:
      - 10.244.2.7
      conditions:
        ready: false
        serving: true
        terminating: true
      nodeName: node-2
      targetRef:
        kind: Pod
        name: web-7d4b9c8f6-q8w4z
        namespace: shop
        uid: 0b6f1f4e-2f5c-4c1b-9a0e-6f0d3c2b1a02
      zone: zone-b
    kind: EndpointSlice
    metadata:
      annotations:
        endpoints.kubernetes.io/last-change-trigger-time: "2024-05-01T10:00:00Z"
      creationTimestamp: "2024-05-01T10:00:00Z"
      generateName: web-
      generation: 3
      labels:
        endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
        kubernetes.io/service-name: web
      name: web-8xk2p
      namespace: shop
      ownerReferences:
      - apiVersion: v1
        blockOwnerDeletion: true
        controller: true
        kind: Service
        name: web
        uid: 9d1c7a5e-0f2b-4c3e-9a51-4b1f7e2d6c10
      resourceVersion: "48290"
      uid: 5e4d3c2b-1a09-8f7e-6d5c-4b3a2f1e0d9c
    ports:
    - name: http
      port: 8080
      protocol: TCP
""")[0]

# `kubectl get endpoints -n shop web -o yaml`
WEB_ENDPOINTS = documents("""
    apiVersion: v1
    kind: Endpoints
    metadata:
      annotations:
        endpoints.kubernetes.io/last-change-trigger-time: "2024-05-01T10:00:00Z"
      creationTimestamp: "2024-05-01T10:00:00Z"
      labels:
        app: web
      name: web
      namespace: shop
      resourceVersion: "48291"
      uid: 7a6b5c4d-3e2f-1a0b-9c8d-7e6f5a4b3c2d
    subsets:
    - addresses:
      - ip: 10.244.1.5
        nodeName: node-1
        targetRef:
          kind: Pod
          name: web-7d4b9c8f6-x2x9k
          namespace: shop
      notReadyAddresses:
      - ip: 10.244.2.7
        nodeName: node-2
      ports:
      - name: http
        port: 8080
        protocol: TCP
    - addresses:
      - ip: 10.244.1.9
        hostname: web-0
      ports:
      - name: metrics
        port: 9100
        protocol: TCP
""")[0]

# `kubectl get pod -n shop web-7d4b9c8f6-x2x9k -o yaml`, trimmed of container status details.
WEB_POD = documents("""
    apiVersion: v1
    kind: Pod
    metadata:
      creationTimestamp: "2024-05-01T09:59:00Z"
      generateName: web-7d4b9c8f6-
      labels:
        app: web
        pod-template-hash: 7d4b9c8f6
      name: web-7d4b9c8f6-x2x9k
      namespace: shop
      ownerReferences:
      - apiVersion: apps/v1
        controller: true
        kind: ReplicaSet
        name: web-7d4b9c8f6
        uid: 3c2b1a09-8f7e-6d5c-4b3a-2f1e0d9c8b7a
      uid: 0b6f1f4e-2f5c-4c1b-9a0e-6f0d3c2b1a01
    spec:
      containers:
      - image: nginx:1.25
        imagePullPolicy: IfNotPresent
        name: nginx
        ports:
        - containerPort: 8080
          name: http-alt
          protocol: TCP
        - containerPort: 5353
          name: dns
          protocol: UDP
      - image: prom/node-exporter:v1.7.0
        name: exporter
        ports:
        - containerPort: 9100
          name: metrics
      nodeName: node-1
      restartPolicy: Always
      schedulerName: default-scheduler
    status:
      conditions:
      - lastTransitionTime: "2024-05-01T09:59:01Z"
        status: "True"
        type: Initialized
      - lastTransitionTime: "2024-05-01T09:59:05Z"
        status: "True"
        type: Ready
      - lastTransitionTime: "2024-05-01T09:59:05Z"
        status: "True"
        type: ContainersReady
      - lastTransitionTime: "2024-05-01T09:59:00Z"
        status: "True"
        type: PodScheduled
      hostIP: 192.168.1.11
      hostIPs:
      - ip: 192.168.1.11
      phase: Running
      podIP: 10.244.1.5
      podIPs:
      - ip: 10.244.1.5
      - ip: fd00:10:244:1::5
      qosClass: BestEffort
      startTime: "2024-05-01T09:59:00Z"
""")[0]
