"""Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), with weights.

`build()` fills a lookup table of prime size M (65537 by default): each
endpoint walks its own permutation of the slots, (offset + j * skip) mod M,
and in each round every endpoint takes its next free preferred slot, so
endpoints differ by at most one slot per round (weights: an endpoint of
weight w takes a turn in w of every W rounds, W the largest weight). When
one of N endpoints leaves, about 1/N of the slots change hands.

Offsets and skips come from a hash of the endpoint's name (`ip:port`), so
every process builds the same table from the same endpoints. The build is
pure and runs off the packet path (the forwarder runs it in a thread).
It is a plain loop over a bytearray: about 35 ms for 65,537 slots whatever
the endpoint count here (the probes total about M ln M). A vectorised
variant resolving a round's conflicts at once was no faster at 1,000
endpoints and builds different tables, which would move flows whenever the
endpoint count crossed the switch-over.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

DEFAULT_SIZE = 65537


def permutation(name: str, size: int) -> tuple[int, int]:
    """(offset, skip) of an endpoint's preference list."""
    digest = hashlib.blake2b(name.encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little") % size, int.from_bytes(digest[8:], "little") % (size - 1) + 1


def build(names: Sequence[str], weights: Sequence[int] | None = None, size: int = DEFAULT_SIZE) -> list[int]:
    """The lookup table: slot -> index into `names`. `size` must be prime and larger than len(names).

    Endpoints of weight 0 get no slot; with no endpoint of positive weight the table is empty.
    """
    if weights is None:
        weights = [1] * len(names)
    live = [i for i, w in enumerate(weights) if w > 0]
    if not live:
        return []
    if len(live) >= size:
        raise ValueError(f"Maglev table of {size} slots for {len(live)} endpoints: size must be larger")
    perms = [permutation(names[i], size) for i in live]
    live_weights = [weights[i] for i in live]
    table = _build_loop(perms, live_weights, size)
    return [live[i] for i in table] if len(live) != len(names) else table


def _turns(round_: int, weight: int, top: int) -> bool:
    return weight == top or (round_ + 1) * weight // top > round_ * weight // top


def _build_loop(perms: list[tuple[int, int]], weights: list[int], size: int) -> list[int]:
    table = [-1] * size
    taken = bytearray(size)
    position = [offset for offset, _ in perms]
    skips = [skip for _, skip in perms]
    top = max(weights)
    filled, round_ = 0, 0
    while True:
        for i, weight in enumerate(weights):
            if weight != top and not _turns(round_, weight, top):
                continue
            c, skip = position[i], skips[i]
            while taken[c]:
                c += skip
                if c >= size:
                    c -= size
            taken[c] = 1
            table[c] = i
            c += skip
            position[i] = c - size if c >= size else c
            filled += 1
            if filled == size:
                return table
        round_ += 1
