"""An echo server for a Pod namespace: every answer names the Pod and the peer it saw.

The reply line is `NAME PEER LOCAL`, e.g. `pod1 192.168.50.2:40000 10.244.1.11:80`:
NAME tells which endpoint was chosen, PEER shows whether the source was
masqueraded, LOCAL shows which target port was reached. IPv6 addresses are
bracketed (`[fd00::1]:80`).

- TCP: line based; one reply line per request line, the connection stays open
  until the client closes it (an established flow can outlive a daemon restart).
- UDP: one reply datagram per datagram.
- HTTP: GET answers 200 with the reply line as the body.

Run as `python -m dataplane.lab.echo --name pod1 --tcp 80 --udp 80 --http 8000`.
It prints `ready` on stdout once every socket listens, and exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import http.server
import ipaddress
import signal
import socket
import socketserver
import sys
import threading
from dataclasses import dataclass


def format_addr(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    host = host.removeprefix("::ffff:") if "." in host else host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_addr(text: str) -> tuple[str, int]:
    """`1.2.3.4:80` or `[fd00::1]:80` -> (host, port); raises ValueError on anything else."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"not HOST:PORT: {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return str(ipaddress.ip_address(host)), int(port)


@dataclass(frozen=True, slots=True)
class Reply:
    """One parsed echo answer."""

    pod: str
    peer: tuple[str, int]
    local: tuple[str, int]

    @classmethod
    def parse(cls, line: str) -> "Reply":
        """Parses `NAME PEER LOCAL`; raises ValueError naming the line when it is anything else."""
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"not an echo reply: {line!r}")
        return cls(parts[0], parse_addr(parts[1]), parse_addr(parts[2]))

    def __str__(self) -> str:
        return f"{self.pod} {format_addr(self.peer)} {format_addr(self.local)}"


def answer(name: str, peer: tuple, local: tuple) -> bytes:
    return f"{name} {format_addr(peer)} {format_addr(local)}\n".encode()


class _Dual:
    """Listens on [::] dual-stack when the namespace has IPv6, else 0.0.0.0."""

    allow_reuse_address = True
    daemon_threads = True

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _family() -> int:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
        return socket.AF_INET6
    except OSError:
        return socket.AF_INET


def _servers(name: str, tcp: list[int], udp: list[int], http_ports: list[int]) -> list[socketserver.BaseServer]:
    family = _family()
    host = "::" if family == socket.AF_INET6 else "0.0.0.0"

    class Lines(socketserver.StreamRequestHandler):
        def handle(self):
            local = self.connection.getsockname()
            for _ in self.rfile:
                self.wfile.write(answer(name, self.client_address, local))
                self.wfile.flush()

    class Datagrams(socketserver.BaseRequestHandler):
        def handle(self):
            _, sock = self.request
            sock.sendto(answer(name, self.client_address, sock.getsockname()), self.client_address)

    class Http(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = answer(name, self.client_address, self.connection.getsockname())
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class TCP(_Dual, socketserver.ThreadingTCPServer):
        address_family = family

    class UDP(_Dual, socketserver.UDPServer):
        address_family = family

    class HTTP(_Dual, http.server.ThreadingHTTPServer):
        address_family = family

    return (
        [TCP((host, p), Lines) for p in tcp]
        + [UDP((host, p), Datagrams) for p in udp]
        + [HTTP((host, p), Http) for p in http_ports]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dataplane.lab.echo", description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True, help="the Pod name every reply starts with")
    parser.add_argument("--tcp", type=int, action="append", default=[], metavar="PORT")
    parser.add_argument("--udp", type=int, action="append", default=[], metavar="PORT")
    parser.add_argument("--http", type=int, action="append", default=[], metavar="PORT")
    args = parser.parse_args(argv)

    servers = _servers(args.name, args.tcp, args.udp, args.http)
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    print("ready", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
