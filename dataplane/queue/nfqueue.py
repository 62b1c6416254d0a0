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
`config_message`, `acknowledgement`), tested without a socket; `QueueSocket`
is the only thing here that owns a file descriptor. Messages follow
include/uapi/linux/netfilter/nfnetlink_queue.h, framed by netlink/codec.py.

The hot loop may be compiled (`_nfqueue.c`, built by pip install when gcc
and the Python headers are there): `QueueSocket.serve()` then reads a batch
with recvmmsg, decides in C what the pick table (picks.py) knows and sends
those verdicts, and hands the rest back as PacketQueued. Without it (or
with DATAPLANE_NFQUEUE_COMPILED=0) `compiled` is None and the forwarder
reads, decides and answers in Python, with the same results.

Start-up: the queue is live from the bind request on, so packets can arrive
before the ACKs of the requests after it. Each request waits for the ACK
with its own sequence number; packets read meanwhile are kept and returned
by the first read(), so every queued packet gets its verdict.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Iterable

from ..netlink import codec
from ..netlink.codec import ATTR, BE32, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, message_type
from ..packet import PacketQueued

try:
    from . import _nfqueue as compiled
except ImportError:  # not built (no gcc or Python headers at install): the Python loop decides
    compiled = None
if os.environ.get("DATAPLANE_NFQUEUE_COMPILED", "1") == "0":  # the bench's Python-loop path
    compiled = None

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_MARK, NFQA_PAYLOAD = 1, 2, 3, 10
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_GSO = 1, 4
NF_DROP, NF_ACCEPT = 0, 1

# One verdict: nlmsghdr, nfgenmsg, NFQA_VERDICT_HDR {verdict, id}, NFQA_MARK {mark}; 40 bytes.
_VERDICT = struct.Struct("=IHHII BBH HH II HH I")
VERDICTS_PER_DATAGRAM = 256
_VERDICT_TYPE = message_type(NFNL_SUBSYS_QUEUE, NFQNL_MSG_VERDICT)
_PACKET_TYPE = message_type(NFNL_SUBSYS_QUEUE, NFQNL_MSG_PACKET)
_CONFIG_TYPE = message_type(NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG)
_htonl, _htons = socket.htonl, socket.htons
_LENGTH_TYPE = struct.Struct("=IH").unpack_from  # the first two fields of nlmsghdr
_RECV_SIZE = 4096  # one queued packet per datagram: 128 bytes copied plus about 100 of attributes


class QueueError(OSError):
    pass


def decode_packets(data: bytes, into: list[PacketQueued]) -> int:
    """Appends the packets in one netlink datagram to `into`; returns the first error code seen (0 if none).

    Malformed messages end the walk; they never raise. (The walk is written
    out here rather than through codec.attributes: it runs once per packet,
    and the payload, the kernel's last attribute, is tested for first.)
    """
    offset, size, error = 0, len(data), 0
    unpack_attr, unpack_be32 = ATTR.unpack_from, BE32.unpack_from
    while offset + 16 <= size:
        length, kind = _LENGTH_TYPE(data, offset)
        end = offset + length
        if length < 16 or end > size:
            break
        if kind == _PACKET_TYPE and length >= 20:
            packet_id, mark, payload = None, 0, b""
            at = offset + 20
            while at + 4 <= end:
                alen, atype = unpack_attr(data, at)
                if alen < 4 or at + alen > end:
                    break
                atype &= 0x3FFF
                if atype == NFQA_PAYLOAD:
                    payload = data[at + 4 : at + alen]
                elif atype == NFQA_PACKET_HDR and alen >= 8:
                    packet_id = unpack_be32(data, at + 4)[0]
                elif atype == NFQA_MARK and alen >= 8:
                    mark = unpack_be32(data, at + 4)[0]
                at += (alen + 3) & ~3
            if packet_id is not None:
                into.append(PacketQueued((data[offset + 18] << 8) | data[offset + 19], packet_id, mark, payload))
        elif kind == NLMSG_ERROR and length >= 20:
            error = error or codec.error_code(data, offset)
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


def config_message(queue: int, attributes: list[tuple[int, bytes]], seq: int = 0) -> bytes:
    return codec.request(_CONFIG_TYPE, NLM_F_REQUEST | NLM_F_ACK, seq, socket.AF_UNSPEC, queue, attributes)


def bind_messages(queue: int, copy_range: int = 128, maxlen: int = 4096, first_seq: int = 1) -> list[bytes]:
    """The configuration that binds this socket to `queue`, fail-open, headers only; sequence numbers from first_seq."""
    flags = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO
    return [
        config_message(queue, [(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))], first_seq),
        config_message(queue, [(NFQA_CFG_PARAMS, struct.pack("!IB", copy_range, NFQNL_COPY_PACKET))], first_seq + 1),
        config_message(queue, [(NFQA_CFG_QUEUE_MAXLEN, BE32.pack(maxlen))], first_seq + 2),
        config_message(queue, [(NFQA_CFG_FLAGS, BE32.pack(flags)), (NFQA_CFG_MASK, BE32.pack(flags))], first_seq + 3),
    ]


def acknowledgement(data: bytes, seq: int, early: list[PacketQueued]) -> int | None:
    """Reads one datagram received while waiting for the ACK of request `seq`.

    Returns that ACK's errno (0: done) once it is there, else None; packets
    queued meanwhile (the queue is bound from the first request on) go to
    `early`, so that they still get their verdict.
    """
    found = None
    for kind, _, sequence, start, end in codec.messages(data):
        if kind == NLMSG_ERROR and sequence == seq:
            found = codec.error_code(data, start)
        elif kind == _PACKET_TYPE:
            decode_packets(data[start:end], early)
    return found


class QueueSocket:
    """A netlink socket bound to NFQUEUE queues; non-blocking once configured.

    Raises QueueError (with the errno) when a queue cannot be bound, e.g.
    EBUSY when another process holds it, EPERM without CAP_NET_ADMIN.
    `sock`: an already open socket standing in for the kernel's (tests).
    """

    def __init__(self, queues: Iterable[int], copy_range: int = 128, maxlen: int = 16384, rcvbuf: int = 32 << 20,
                 sock: socket.socket | None = None):
        self.queues = tuple(queues)
        # Overruns are the kernel's to count (fail-open); the socket must not turn them into errors.
        self.sock = sock if sock is not None else codec.netfilter_socket(rcvbuf, no_enobufs=True)
        self._early: list[PacketQueued] = []  # packets read while waiting for an ACK: the first read() returns them
        try:
            self.sock.settimeout(5.0)
            seq = 1
            for queue in self.queues:
                for message in bind_messages(queue, copy_range, maxlen, seq):
                    self._request(message, seq)
                    seq += 1
            self.sock.settimeout(None)  # blocking; read() asks for MSG_DONTWAIT unless told to wait
            self._fd = self.sock.fileno()
            self._scratch = bytearray(64 * _RECV_SIZE) if compiled is not None else None  # serve()'s recvmmsg
        except BaseException:
            self.sock.close()
            raise

    def _request(self, message: bytes, seq: int) -> None:
        self.sock.send(message)
        while (code := acknowledgement(self.sock.recv(65536), seq, self._early)) is None:
            pass
        if code:
            raise QueueError(code, f"nfnetlink_queue: {os.strerror(code)}")

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, into: list[PacketQueued], limit: int = 1024, block: bool = False) -> int:
        """Reads every waiting packet (at most `limit` datagrams) into `into`; returns how many datagrams were read.

        Never blocks, unless `block`: then it first waits in recv for one
        datagram (the blocking reader's sleep: no poll before the read).
        """
        if self._early:
            into += self._early
            self._early = []
            block = False
        recv, dontwait = self.sock.recv, socket.MSG_DONTWAIT
        flags = 0 if block else dontwait
        count = 0
        while count < limit:
            try:
                data = recv(_RECV_SIZE, flags)
                flags = dontwait
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno in (errno.ENOBUFS, errno.EINTR):
                    flags = dontwait
                    continue
                raise
            decode_packets(data, into)
            count += 1
        return count

    def serve(self, holder: list, keep_mask: int, limit: int = 1024, block: bool = False, lock=None,
              ) -> tuple[int, int, list[PacketQueued], float]:
        """The compiled loop: reads up to `limit` datagrams, decides and answers those `holder[0]` has picks for.

        Returns (datagrams read, packets decided, the packets left for the
        balancer, seconds the first recv took). `holder`: a list of one pick
        table (picks.build). `lock`: taken once the first datagram is there
        and held to the batch's last verdict; the table is read under it, so
        whoever folds counts or swaps the table under the same lock never
        meets a batch half done (a batch runs Python code, where the GIL may
        pass to another thread). Only when `compiled` is not None. Raises
        OSError as recv and send do.
        """
        if self._early:
            early, self._early = self._early, []
            return 0, 0, early, 1.0  # (not a burst: answer these, then sleep again)
        return compiled.serve(self._fd, self._scratch, holder, keep_mask, limit, block, PacketQueued, lock)

    def send(self, verdicts: list[tuple[int, int, int]]) -> None:
        """Sends verdicts (queue, packet id, mark): ACCEPT with that mark; in datagrams of at most 256."""
        send = self.sock.send
        for start in range(0, len(verdicts), VERDICTS_PER_DATAGRAM):
            data = encode_verdicts(verdicts[start : start + VERDICTS_PER_DATAGRAM])
            while True:
                try:
                    send(data)
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
