"""The lab of the API-source tests (test_kube_source.py, test_kube_proxy_*.py), in one place.

The stand-in API server (dataplane/lab/kubeapi.py) runs in the test process but
listens on 127.0.0.1:6443 *inside the node namespace* (its socket is made there),
so a daemon in that namespace reaches it at `API` and nothing listens in the
root namespace. The `lab` and `api` fixtures (conftest.py) are module-scoped:
each module gets its own lab, echo servers on TCP 80 and UDP 53, and its own
API server holding this node's Node.

Address plan (Lab.build's)
    client          192.168.50.2/24, default route via the node
    node            node1: 192.168.50.1 (client side), 10.244.1.1 (Pod side); API server 127.0.0.1:6443
    pods            pod1 10.244.1.11, pod2 10.244.1.12, pod3 10.244.1.13
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dataplane.lab import Lab, request, sample, tally
from dataplane.lab.kubeapi import KubeApi, netns_listener

API = "http://127.0.0.1:6443"
NODE_NAME = "node1"
NODE_IP = "192.168.50.1"
POD_IPS = {"pod1": "10.244.1.11", "pod2": "10.244.1.12", "pod3": "10.244.1.13"}
ALL = frozenset(POD_IPS)


def node_object(**spec) -> dict:
    """This node's Node: its InternalIP, zone z1, and `spec` (taints, for example)."""
    return {"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": NODE_NAME, "labels": {"topology.kubernetes.io/zone": "z1"}},
            "spec": spec, "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}}


@contextmanager
def stand_in_api(lab: Lab) -> Iterator[KubeApi]:
    """The stand-in API server on 127.0.0.1:6443 in the lab's node namespace, holding this node's Node."""
    with KubeApi(netns_listener(lab.node, 6443), bookmark_interval=5.0) as api:
        api.apply(node_object())
        yield api


def answering(lab: Lab, address: str, port: int = 80, protocol: str = "TCP") -> set[str]:
    """The Pods that answer the client at address:port within 30 tries."""
    return set(tally(o for o in sample(lambda: request(protocol, lab.client, address, port, timeout=0.3),
                                       ALL, tries=30) if o.ok))
