"""A lab of network namespaces where the data plane meets real packets.

A node namespace routes between a client namespace and N Pod namespaces and
runs `dataplane run`; Pods run echo servers that say who they are and whom
they saw. Used by the end-to-end tests, the README demo and the benchmarks.

Invariant: the lab never touches the root namespace (links, routes, sysctls,
nftables) and never moves the calling process into another namespace; what it
builds is deleted on exit, also when the body raised.

    with Lab.build() as lab:
        lab.start_echo(tcp=[80], udp=[80])
        tcp_request(lab.client, lab.pods[0].ip, 80)   # -> Outcome(reply=pod1 192.168.50.2:... ...)
"""

import importlib

# Exported lazily (PEP 562): `python -m dataplane.lab.echo` then runs a module
# that the package has not imported already, and children start quickly.
_EXPORTS = {
    "client": ["Failure", "Outcome", "TcpSession", "UdpSession", "http_get", "request", "sample", "tally",
               "tcp_request", "udp_request"],
    "daemon": ["Daemon", "DaemonError", "cleanup", "run_argv"],
    "echo": ["Reply"],
    "manifests": ["ManifestDir"],
    "netns": ["Netns", "NetnsError", "environment_problem"],
    "topology": ["AddressPlan", "Lab", "Pod"],
    "wait": ["wait_until"],
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
