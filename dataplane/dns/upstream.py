"""Where names outside the cluster zone go: the upstream resolvers.

Invariant: the list never holds this server itself. An upstream is ourselves
when it has our port and our address, or, when we listen on a wildcard
address, any address of this host in the same family (127.0.0.53 included),
since a query sent there would come straight back to us.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Callable, NamedTuple

RESOLV_CONF = Path("/etc/resolv.conf")
DNS_PORT = 53


class Upstream(NamedTuple):
    host: str
    port: int = DNS_PORT

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, default_port: int = DNS_PORT, what: str = "--dns-upstream",
                  min_port: int = 1) -> Upstream:
    """`1.2.3.4`, `1.2.3.4:5353`, `::1`, `[::1]:5353` -> Upstream; raises ValueError naming `what`.

    `min_port` 0 admits port 0 (a listening address where the kernel picks the port).
    """
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{what}: {text!r} is not an address")
        port = int(rest[1:]) if rest[1:].isdigit() else (default_port if not rest else -1)
    elif text.count(":") == 1:
        host, _, number = text.partition(":")
        port = int(number) if number.isdigit() else -1
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not an IP address") from None
    if not min_port <= port <= 65535:
        raise ValueError(f"{what}: {text!r} has no valid port")
    return Upstream(host, port)


def parse_list(text: str) -> list[Upstream]:
    """A comma-separated `--dns-upstream` value; raises ValueError on any bad entry."""
    return [parse_address(item) for item in text.split(",") if item.strip()]


def from_resolv_conf(text: str) -> list[Upstream]:
    """The `nameserver` lines of a resolv.conf, in order; lines that are not addresses are skipped."""
    found = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                found.append(Upstream(str(ipaddress.ip_address(words[1].split("%", 1)[0]))))
            except ValueError:
                continue
    return found


def system_upstreams(path: Path = RESOLV_CONF) -> list[Upstream]:
    """The resolvers of `path`; empty when it cannot be read."""
    try:
        return from_resolv_conf(path.read_text())
    except OSError:
        return []


def is_local_address(host: str) -> bool:
    """True when `host` is an address of this host (in this network namespace).

    Binding a socket to it succeeds exactly then, whatever the interface.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((host, 0))
        return True
    except OSError:
        return False


def without_self(upstreams: list[Upstream], bind: Upstream,
                 is_local: Callable[[str], bool] = is_local_address) -> tuple[list[Upstream], list[Upstream]]:
    """(usable, skipped): drops every upstream that is this server listening on `bind`."""
    bind_ip = ipaddress.ip_address(bind.host)
    usable, skipped = [], []
    for upstream in upstreams:
        ip = ipaddress.ip_address(upstream.host)
        if upstream.port == bind.port and (
            ip == bind_ip
            or (bind_ip.is_unspecified and (ip.version == bind_ip.version or bind_ip.version == 6)
                and (ip.is_loopback or ip.is_unspecified or is_local(upstream.host)))
        ):
            skipped.append(upstream)
        else:
            usable.append(upstream)
    return usable, skipped
