"""Cluster DNS: answers `<svc>.<ns>.svc.<zone>` from the same snapshot the data plane programs.

zone.py builds and looks up records (pure), wire.py turns queries into
responses (no I/O), upstream.py chooses where other names go, and server.py
owns the sockets. See README.md for the data flow.
"""

from .server import DnsServer
from .upstream import Upstream, parse_list
from .zone import Answer, Record, Zone, service_records

__all__ = ["Answer", "DnsServer", "Record", "Upstream", "Zone", "parse_list", "service_records"]
