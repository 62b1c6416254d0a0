"""/healthz, /livez and /metrics over a deliberately tiny HTTP/1.1 responder.

Only GET of fixed paths, one response per connection: enough for probes and
Prometheus, with nothing to configure or exploit.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Awaitable, Callable

log = logging.getLogger(__name__)

Handler = Callable[[], tuple | Awaitable[tuple]]  # -> (status, content type, body[, extra headers])
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def split_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


async def serve(bind: str, routes: dict[str, Handler]) -> asyncio.AbstractServer:
    """Serves `routes` (path -> handler; "*" answers every other path) on HOST:PORT."""
    host, port = split_host_port(bind)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, _, rest = request.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            headers = ""
            if method not in ("GET", "HEAD"):
                status, kind, body = 405, "text/plain", b"GET only\n"
            elif path in routes or "*" in routes:
                answer = (routes.get(path) or routes["*"])()
                if inspect.isawaitable(answer):  # a handler with I/O to wait for, off this loop
                    answer = await answer
                status, kind, body, *extra = answer
                headers = "".join(f"{name}: {value}\r\n" for name, value in (extra[0] if extra else {}).items())
            else:
                status, kind, body = 404, "text/plain", b"not found\n"
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\n{headers}Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if method == "GET" else b""))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except Exception:
            log.exception("http handler failed")
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_address=True)
