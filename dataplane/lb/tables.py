"""Balancing tables the kernel applies: which Service ports get one, what each slot holds, and
which slot a flow hashes to. Pure functions; nat/tables.py turns them into map elements.

A Service port is balanced by a table when its algorithm is `maglev`, or when it carries
`dataplane.io/weights` and its algorithm is `random` or `round-robin`: none of these needs
per-flow state, so the kernel can apply a table written ahead of time (no upcall per flow).
`least-conn` needs the flows counted: it stays with the userspace forwarder, as do unweighted
`random` and `round-robin` in userspace mode (kernel mode's `numgen` pick is their kernel form).

The table is `maglev.build` over the endpoints (named `ip:port`, weights as turns, so as slot
shares; weight 0 takes no slot unless every endpoint has weight 0). The flow's slot is
`slot_of(saddr, sport)`: the kernel's `jhash` over the source address and port registers,
scaled to the table size, bit for bit (checked with real packets in tests/e2e/test_tables_kernel.py).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Sequence

from ..config import DEFAULT_HASH_SEED
from ..model import Backend, Service
from . import maglev
from .policy import ALGORITHM_ANNOTATION, ALGORITHMS, WEIGHTS_ANNOTATION, parse_weights, weight_of

TABLE_SIZE_ANNOTATION = "dataplane.io/lb-table-size"
# The default size of a port's table: the smallest of these primes holding SLOTS_PER_ENDPOINT slots per
# endpoint. Maglev moves more than 1/N of the slots when one of N leaves unless M/N is large (at
# M/N = 800, 1/N + 1.1% for N = 5 and 20; at 1,000, at most 1/N + 0.85% for N = 2..200: nat/README.md).
# Steps of 4x: a new size rehashes every flow, so sizes change rarely.
TABLE_SIZES = (4093, 16381, 65537, 262139, 1048573)
SLOTS_PER_ENDPOINT = 1000
DEFAULT_TABLE_SIZE = TABLE_SIZES[0]  # up to 4 endpoints
MAX_TABLE_SIZE = TABLE_SIZES[-1]
DEFAULT_SEED = DEFAULT_HASH_SEED  # "dplb": the same on every node, so every node hashes a flow alike
TABLE_ALGORITHMS = ("maglev",)
WEIGHTED_TABLE_ALGORITHMS = ("random", "round-robin")  # with weights, a table is their stateless form

_MASK = 0xFFFFFFFF


def algorithm_of(service: Service, default: str) -> str:
    """The Service's algorithm: its annotation when valid (policy.port_tables reports a bad one), else `default`."""
    chosen = dict(service.annotations).get(ALGORITHM_ANNOTATION, "").strip()
    return chosen if chosen in ALGORITHMS else default


def table_balanced(service: Service, default_algorithm: str) -> bool:
    """The Service's ports are balanced by kernel tables (the same answer for every port)."""
    algorithm = algorithm_of(service, default_algorithm)
    if algorithm in TABLE_ALGORITHMS:
        return True
    return algorithm in WEIGHTED_TABLE_ALGORITHMS and bool(
        dict(service.annotations).get(WEIGHTS_ANNOTATION, "").strip())


def _prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def default_table_size(endpoints: int, bound: int = MAX_TABLE_SIZE) -> int:
    """The smallest of TABLE_SIZES with SLOTS_PER_ENDPOINT slots per endpoint, at most `bound` (the
    node's slot bound); past the largest, the largest (the 1/N + 1% bound then no longer holds).

    `endpoints` counts every endpoint listed for the port, ready or not, so readiness flapping
    never resizes a table: only adding or removing Pods does, at a step. A resize rehashes every
    flow: one endpoint leaving at a step (5 -> 4, 17 -> 16, 66 -> 65, ...) moves about 1 - 1/N of
    new flows, not 1/N (bench/results/tables-moved); established ones stay (conntrack). Being a
    function of the listed endpoints alone is what lets every node pick the same size."""
    fitting = [size for size in TABLE_SIZES if size <= bound] or [TABLE_SIZES[0]]
    return next((size for size in fitting if size >= SLOTS_PER_ENDPOINT * endpoints), fitting[-1])


def table_size(service: Service, problems: list[str] | None = None, endpoints: int = 0,
               bound: int = MAX_TABLE_SIZE) -> int:
    """`dataplane.io/lb-table-size` (a prime in 2..MAX_TABLE_SIZE: the Service's own choice, whatever
    its endpoint count), else `default_table_size(endpoints, bound)`; a bad value is reported and
    the default used."""
    text = dict(service.annotations).get(TABLE_SIZE_ANNOTATION, "").strip()
    default = default_table_size(endpoints, bound)
    if not text:
        return default
    try:
        size = int(text)
        if size > MAX_TABLE_SIZE or not _prime(size):  # the bound first: no trial division of a huge number
            raise ValueError
    except ValueError:
        if problems is not None:
            problems.append(f"Service {service.namespace}/{service.name}: annotation {TABLE_SIZE_ANNOTATION}: "
                            f"{text[:20]!r} is not a prime from 2 to {MAX_TABLE_SIZE}; using {default}")
        return default
    return size


def endpoint_name(backend: Backend) -> str:
    """The name Maglev's permutation hashes: `ip:port` (policy.Target.name's spelling)."""
    return f"[{backend.ip}]:{backend.port}" if ":" in backend.ip else f"{backend.ip}:{backend.port}"


def weights(service: Service, backends: Sequence[Backend]) -> list[int]:
    """Each endpoint's weight (`dataplane.io/weights`; bad items are ignored, policy.port_tables reports them)."""
    rules = parse_weights(dict(service.annotations).get(WEIGHTS_ANNOTATION, ""), "", [])
    found = [weight_of(rules, b.ip, b.node_name, b.zone) for b in backends]
    return found if any(found) else [1] * len(found)  # all drained: none preferred, as the forwarder does


def fill_input(service: Service, backends: Sequence[Backend]) -> tuple[list[Backend], tuple[str, ...], tuple[int, ...]]:
    """What a fill is a function of: the endpoints in Maglev's order (by address), their names and weights."""
    ordered = sorted(backends, key=lambda b: (b.ip, b.port))
    return ordered, tuple(endpoint_name(b) for b in ordered), tuple(weights(service, ordered))


def fill(service: Service, backends: Sequence[Backend], size: int) -> list[Backend]:
    """slot -> endpoint: the Maglev table of `size` slots over `backends` with the Service's weights.

    The order of `backends` does not matter. Raises ValueError when there are not fewer
    endpoints of positive weight than slots."""
    ordered, names, weights_ = fill_input(service, backends)
    return [ordered[i] for i in maglev.build(names, weights_, size)]


# The kernel's jhash (include/linux/jhash.h, Bob Jenkins' lookup3), bit for bit.

def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def jhash(data: bytes, seed: int) -> int:
    """jhash(key, length, initval) as the kernel computes it (little-endian words, as on x86 and arm64)."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + seed) & _MASK
    k = 0
    while length > 12:
        a = (a + int.from_bytes(data[k:k + 4], "little")) & _MASK
        b = (b + int.from_bytes(data[k + 4:k + 8], "little")) & _MASK
        c = (c + int.from_bytes(data[k + 8:k + 12], "little")) & _MASK
        a = (a - c) & _MASK; a ^= _rol(c, 4); c = (c + b) & _MASK  # noqa: E702 (the kernel's __jhash_mix)
        b = (b - a) & _MASK; b ^= _rol(a, 6); a = (a + c) & _MASK  # noqa: E702
        c = (c - b) & _MASK; c ^= _rol(b, 8); b = (b + a) & _MASK  # noqa: E702
        a = (a - c) & _MASK; a ^= _rol(c, 16); c = (c + b) & _MASK  # noqa: E702
        b = (b - a) & _MASK; b ^= _rol(a, 19); a = (a + c) & _MASK  # noqa: E702
        c = (c - b) & _MASK; c ^= _rol(b, 4); b = (b + a) & _MASK  # noqa: E702
        length -= 12
        k += 12
    if length == 0:
        return c
    tail = data[k:] + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK
    for y, z, r in ((1, 2, 14), (2, 0, 11), (0, 1, 25), (1, 2, 16), (2, 0, 4), (0, 1, 14), (1, 2, 24)):
        # __jhash_final: c ^= b; c -= rol(b, 14); a ^= c; a -= rol(c, 11); ...
        regs = [a, b, c]
        regs[z] ^= regs[y]
        regs[z] = (regs[z] - _rol(regs[y], r)) & _MASK
        a, b, c = regs
    return c


def scale(value: int, modulus: int) -> int:
    """The kernel's reciprocal_scale: value in 0..2^32-1 onto 0..modulus-1."""
    return (value * modulus) >> 32


def register_bytes(type_: str, value) -> bytes:
    """What an nft expression of `type_` leaves in its registers, padded to 4-byte words."""
    if type_ in ("ipv4_addr", "ipv6_addr"):
        return ipaddress.ip_address(value).packed
    if type_ == "inet_service":
        return struct.pack("!H2x", value)  # network order, then zeroed
    if type_ == "inet_proto":
        return struct.pack("B3x", value)
    if type_ in ("mark", "integer"):
        return struct.pack("<I", value)  # host order
    raise ValueError(f"no register layout for {type_}")


def slot_of(saddr: str, sport: int, size: int, seed: int = DEFAULT_SEED) -> int:
    """The slot the kernel hashes a flow from saddr:sport to: `jhash ip saddr . th sport mod size seed seed`."""
    address = ipaddress.ip_address(saddr)
    data = register_bytes("ipv4_addr" if address.version == 4 else "ipv6_addr", address) + \
        register_bytes("inet_service", sport)
    return scale(jhash(data, seed), size)
