"""This node's addresses, from netlink, and a stream of changes to them."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from typing import AsyncIterator

from pyroute2 import IPRoute

log = logging.getLogger(__name__)


def node_addresses() -> tuple[list[str], str | None]:
    """All addresses of this network namespace, and the primary one.

    Primary: the preferred source of the default route, else the first
    global address of the default route's interface, else the first global
    address of the lowest-numbered interface.
    """
    with IPRoute() as ipr:
        found = [(a["index"], a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr()]
        primary = None
        for route in ipr.get_default_routes():
            primary = route.get_attr("RTA_PREFSRC")
            if primary is None:
                oif = route.get_attr("RTA_OIF")
                primary = next((ip for index, ip in found if index == oif and _global(ip)), None)
            if primary:
                break
    addresses = [ip for _, ip in sorted(found, key=lambda item: item[0]) if ip]
    if primary is None:
        primary = next((ip for ip in addresses if _global(ip)), None)
    return addresses, primary


def _global(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return not (address.is_loopback or address.is_link_local)


async def address_changes(poll_fallback: float = 30.0) -> AsyncIterator[None]:
    """Yields whenever an address is added or removed in this namespace.

    pyroute2 runs its own event loop and uvloop cannot host netlink
    sockets, so the netlink listener lives in a thread of its own.
    """
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    stop = threading.Event()
    thread = threading.Thread(
        target=_listen, args=(loop, changed, stop), name="address-monitor", daemon=True
    )
    thread.start()
    try:
        while True:
            try:
                await asyncio.wait_for(changed.wait(), poll_fallback)
            except asyncio.TimeoutError:
                pass  # a missed event costs at most one poll period
            changed.clear()
            yield
    finally:
        stop.set()


def _listen(loop: asyncio.AbstractEventLoop, changed: asyncio.Event, stop: threading.Event) -> None:
    try:
        with IPRoute() as ipr:
            ipr.bind()  # rtnetlink multicast groups: links, addresses, routes
            while not stop.is_set():
                for message in ipr.get():
                    if message.get("event") in ("RTM_NEWADDR", "RTM_DELADDR"):
                        loop.call_soon_threadsafe(changed.set)
    except Exception as error:  # the poll fallback keeps addresses followed
        log.warning("address monitor stopped: %s", error)
