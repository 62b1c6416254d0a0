"""The one module that reads NFQUEUE: nfnetlink_queue spoken directly over a netlink socket.

Why not the netfilterqueue binding: it answers each packet with its own
sendmsg and cannot set the queue's fail-open flag. Here a wake-up reads
every packet waiting (non-blocking recv until EAGAIN), and all the verdicts
of that batch leave in one sendmsg (the kernel walks every message of a
netlink datagram). Queues are configured with
- NFQA_CFG_F_FAIL_OPEN: a full queue (or socket buffer) lets packets go on
  instead of dropping them, so they take the kernel's own pick;
- copy range 128 bytes: headers only, never the payload;
- NFQA_CFG_F_GSO: GSO packets are not segmented to be queued.

Encoding and decoding are pure functions (`decode_packets`, `encode_verdicts`,
`config_message`), tested without a socket; `QueueSocket` is the only thing
here that owns a file descriptor. Messages follow include/uapi/linux/netfilter/
nfnetlink_queue.h: nlmsghdr, nfgenmsg (res_id = queue number, big-endian),
then attributes whose payloads are big-endian.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Iterable, NamedTuple

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4

NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_MARK, NFQA_PAYLOAD = 1, 2, 3, 10
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_GSO = 1, 4
NF_DROP, NF_ACCEPT = 0, 1

_NLMSGHDR = struct.Struct("=IHHII")
_ATTR = struct.Struct("=HH")
_BE32 = struct.Struct("!I")
# One verdict: nlmsghdr, nfgenmsg, NFQA_VERDICT_HDR {verdict, id}, NFQA_MARK {mark}; 40 bytes.
_VERDICT = struct.Struct("=IHHII BBH HH II HH I")
_VERDICT_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT
_PACKET_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
_htonl, _htons = socket.htonl, socket.htons


class Queued(NamedTuple):
    """One packet the kernel queued: its queue, id (for the verdict), mark and first bytes."""

    queue: int
    packet_id: int
    mark: int
    payload: bytes


class QueueError(OSError):
    pass


def decode_packets(data: bytes, into: list[Queued]) -> int:
    """Appends the packets in one netlink datagram to `into`; returns the first error code seen (0 if none).

    Malformed messages end the walk; they never raise.
    """
    offset, size, error = 0, len(data), 0
    while offset + 16 <= size:
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < 16 or offset + length > size:
            break
        if kind == _PACKET_TYPE and length >= 20:
            queue = (data[offset + 18] << 8) | data[offset + 19]
            packet_id, mark, payload = None, 0, b""
            at, end = offset + 20, offset + length
            while at + 4 <= end:
                alen, atype = _ATTR.unpack_from(data, at)
                if alen < 4 or at + alen > end:
                    break
                atype &= 0x3FFF
                if atype == NFQA_PACKET_HDR and alen >= 8:
                    packet_id = _BE32.unpack_from(data, at + 4)[0]
                elif atype == NFQA_MARK and alen >= 8:
                    mark = _BE32.unpack_from(data, at + 4)[0]
                elif atype == NFQA_PAYLOAD:
                    payload = data[at + 4 : at + alen]
                at += (alen + 3) & ~3
            if packet_id is not None:
                into.append(Queued(queue, packet_id, mark, payload))
        elif kind == NLMSG_ERROR and length >= 20:
            code = -struct.unpack_from("=i", data, offset + 16)[0]
            error = error or code
        offset += (length + 3) & ~3
    return error


def encode_verdicts(verdicts: Iterable[tuple[int, int, int]], verdict: int = NF_ACCEPT) -> bytes:
    """One datagram of (queue, packet id, mark) verdicts, each setting the packet's mark."""
    pack = _VERDICT.pack
    accept = _htonl(verdict)
    return b"".join(
        pack(40, _VERDICT_TYPE, NLM_F_REQUEST, 0, 0, 0, 0, _htons(queue), 12, NFQA_VERDICT_HDR, accept,
             _htonl(packet_id), 8, NFQA_MARK, _htonl(mark))
        for queue, packet_id, mark in verdicts
    )


def _attr(kind: int, payload: bytes) -> bytes:
    return _ATTR.pack(4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def config_message(queue: int, attributes: list[tuple[int, bytes]], seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, _htons(queue)) + b"".join(_attr(k, p) for k, p in attributes)
    return _NLMSGHDR.pack(16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG,
                          NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def bind_messages(queue: int, copy_range: int = 128, maxlen: int = 4096) -> list[bytes]:
    """The configuration that binds this socket to `queue`, fail-open, headers only."""
    flags = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO
    return [
        config_message(queue, [(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))], 1),
        config_message(queue, [(NFQA_CFG_PARAMS, struct.pack("!IB", copy_range, NFQNL_COPY_PACKET))], 2),
        config_message(queue, [(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(maxlen))], 3),
        config_message(queue, [(NFQA_CFG_FLAGS, _BE32.pack(flags)), (NFQA_CFG_MASK, _BE32.pack(flags))], 4),
    ]


class QueueSocket:
    """A netlink socket bound to NFQUEUE queues; non-blocking once configured.

    Raises QueueError (with the errno) when a queue cannot be bound, e.g.
    EBUSY when another process holds it, EPERM without CAP_NET_ADMIN.
    """

    def __init__(self, queues: Iterable[int], copy_range: int = 128, maxlen: int = 16384, rcvbuf: int = 32 << 20):
        self.queues = tuple(queues)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.bind((0, 0))
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            # Overruns are the kernel's to count (fail-open); the socket must not turn them into errors.
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
            for queue in self.queues:
                for message in bind_messages(queue, copy_range, maxlen):
                    self._request(message)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    def _request(self, message: bytes) -> None:
        self.sock.send(message)
        reply = self.sock.recv(65536)
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(reply)
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", reply, 16)[0]
            if code:
                raise QueueError(code, f"nfnetlink_queue: {os.strerror(code)}")

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, into: list[Queued], limit: int = 1024) -> int:
        """Reads every waiting packet (at most `limit`) into `into`; returns how many datagrams were read."""
        recv = self.sock.recv
        count = 0
        while count < limit:
            try:
                data = recv(65536)
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno in (errno.ENOBUFS, errno.EINTR):
                    continue
                raise
            decode_packets(data, into)
            count += 1
        return count

    def send(self, verdicts: list[tuple[int, int, int]]) -> None:
        """Sends verdicts (queue, packet id, mark): ACCEPT with that mark; in datagrams of at most 256."""
        for start in range(0, len(verdicts), 256):
            data = encode_verdicts(verdicts[start : start + 256])
            while True:
                try:
                    self.sock.send(data)
                    break
                except BlockingIOError:
                    # The kernel takes netlink writes synchronously; EAGAIN here is transient.
                    continue

    def close(self) -> None:
        for queue in self.queues:
            try:
                self.sock.setblocking(True)
                self.sock.send(config_message(queue, [(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, 0))]))
            except OSError:
                pass
        self.sock.close()


def queue_stats(path: str = "/proc/net/netfilter/nfnetlink_queue") -> dict[int, dict[str, int]]:
    """Per queue: packets waiting, dropped by the kernel (queue full), dropped on the way to us (socket full)."""
    stats = {}
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 8:
                    stats[int(fields[0])] = {"waiting": int(fields[2]), "queue_dropped": int(fields[5]),
                                             "user_dropped": int(fields[6]), "id_sequence": int(fields[7])}
    except OSError:
        pass
    return stats
