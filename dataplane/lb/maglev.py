"""Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), with weights.

`build()` fills a lookup table of prime size M (65537 by default): each
endpoint walks its own permutation of the slots, (offset + j * skip) mod M,
and in each round every endpoint takes its next free preferred slot, so
endpoints differ by at most one slot per round (weights: an endpoint of
weight w takes a turn in w of every W rounds, W the largest weight). When
one of N endpoints leaves, about 1/N of the slots change hands.

Offsets and skips come from a hash of the endpoint's name (`ip:port`), so
every process builds the same table from the same endpoints. The build is
pure and runs off the packet path (the forwarder runs it in a thread):
vectorised with numpy for many endpoints, a plain loop for a few (where
numpy's per-call cost would dominate the M/N rounds).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

DEFAULT_SIZE = 65537
_VECTORISED_FROM = 1000  # endpoints; below this the plain loop is faster (measured: equal at 1000)


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
    if len(live) < _VECTORISED_FROM:
        table = _build_loop(perms, live_weights, size)
    else:
        table = _build_numpy(perms, live_weights, size)
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


def _build_numpy(perms: list[tuple[int, int]], weights: list[int], size: int) -> list[int]:
    table = np.full(size, -1, dtype=np.int64)
    position = np.array([offset for offset, _ in perms], dtype=np.int64)
    skips = np.array([skip for _, skip in perms], dtype=np.int64)
    weights_arr = np.array(weights, dtype=np.int64)
    top = int(weights_arr.max())
    filled, round_ = 0, 0
    while filled < size:
        if top == 1 or (weights_arr == top).all():
            pending = np.arange(len(perms))
        else:
            pending = np.nonzero((round_ + 1) * weights_arr // top > round_ * weights_arr // top)[0]
        # Within a round, endpoints take their turns in index order: on a contested slot the lowest
        # index wins, and the others go on to their next free preference in the same round.
        while pending.size and filled < size:
            c = position[pending]
            busy = np.nonzero(table[c] >= 0)[0]
            while busy.size:
                c[busy] = (c[busy] + skips[pending[busy]]) % size
                busy = busy[table[c[busy]] >= 0]
            slots, first = np.unique(c, return_index=True)
            if filled + slots.size > size:  # cannot happen: every candidate is a distinct free slot
                slots, first = slots[: size - filled], first[: size - filled]
            winners = pending[first]
            table[slots] = winners
            position[pending] = c
            position[winners] = (slots + skips[winners]) % size
            filled += slots.size
            lost = np.ones(pending.size, dtype=bool)
            lost[first] = False
            pending = pending[lost]
        round_ += 1
    return table.tolist()
