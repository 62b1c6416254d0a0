"""One nfnetlink batch on one NETLINK_NETFILTER socket: applied by the kernel whole or not at all.

Invariant: `NetlinkBatches.send()` returns only when the kernel acknowledged
every message of the batch (each carries NLM_F_ACK) with no error, which
means it committed the batch; any error, reported for any message, means
the kernel aborted the whole batch and nothing changed. A reply that cannot
be read in full raises too (the caller then treats the state as unknown and
resyncs in full).

The kernel processes a batch inside the sendmsg() call, so every reply is
queued on the socket when sendmsg() returns: a kill -9 before it leaves the
old ruleset, after it the new one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
import threading

from pyroute2.netlink import NETLINK_NETFILTER
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES

from .encode import Message, be32, strz

NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_DUMP_INTR = 0x10  # the objects changed while they were dumped: the dump may be inconsistent
NFT_MSG_GETTABLE, NFT_MSG_GETCHAIN, NFT_MSG_GETSET, NFT_MSG_GETGEN = 1, 4, 10, 16
NFT_MSG_NEWOBJ, NFT_MSG_GETOBJ = 18, 19
NFTA_TABLE_NAME = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3
NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_FLAGS = 1, 2, 3
NFT_SET_ANONYMOUS, NFT_SET_MAP = 0x1, 0x8
NFTA_GEN_ID = 1
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}
NLM_F_ACK_TLVS = 0x200  # extended ack: NLMSGERR_ATTR_* after the error
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_EXT_ACK = 10, 11
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
CLONE_NEWNET = 0x40000000
_HEADER = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")


class BatchError(Exception):
    """The kernel refused a batch (errno set) or its replies were lost (errno None)."""

    def __init__(self, message: str, code: int | None):
        super().__init__(message)
        self.code = code


def open_socket(netns: str | None = None) -> socket.socket:
    """A NETLINK_NETFILTER socket, in the named network namespace (`ip netns`) if given.

    A socket stays in the namespace it was created in; the setns() happens
    in a short-lived thread, so no thread of ours changes namespace for good.
    """
    if netns is None:
        return _new_socket()
    found: list = []

    def inside() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns {netns}: {os.strerror(code)}")
            finally:
                os.close(fd)
            found.append(_new_socket())
        except BaseException as error:  # handed to the caller's thread
            found.append(error)

    thread = threading.Thread(target=inside, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if isinstance(found[0], BaseException):
        raise found[0]
    return found[0]


def _new_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)  # the kernel's reason, in words
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # acks without a copy of the request
        _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, 8 << 20)
    except OSError:
        sock.close()
        raise
    return sock


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)  # beyond rmem_max/wmem_max: needs CAP_NET_ADMIN
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


class NetlinkBatches:
    """Sends batches of nf_tables messages on one socket, one batch at a time."""

    def __init__(self, netns: str | None = None):
        self._sock = open_socket(netns)
        self._lock = threading.Lock()
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def send(self, messages: list[Message]) -> None:
        """Applies the messages as one transaction; raises BatchError with nothing changed on refusal.

        It empties `messages` as it writes them into the batch, so that a
        full sync is held once, not twice (17 MB at 30,000 Services)."""
        if not messages:
            return
        with self._lock:
            self._send(messages)

    def _send(self, messages: list[Message]) -> None:
        first = self._seq + 1
        last = first + 1 + len(messages)
        self._seq = last
        labels = [message.label for message in messages]
        size = 2 * _FRAMED + sum(_FRAMED + ((len(m.body) + 3) & ~3) for m in messages)
        data = bytearray(size)
        offset = _put(data, 0, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first, socket.AF_UNSPEC, b"", NFNL_SUBSYS_NFTABLES)
        for index in range(len(messages)):
            message = messages[index]
            messages[index] = None  # type: ignore[call-overload]  # its bytes are in the batch now
            offset = _put(data, offset, (NFNL_SUBSYS_NFTABLES << 8) | message.type, message.flags | NLM_F_ACK,
                          first + 1 + index, message.family, message.body)
        messages.clear()
        offset = _put(data, offset, NFNL_MSG_BATCH_END, NLM_F_REQUEST, last, socket.AF_UNSPEC, b"",
                      NFNL_SUBSYS_NFTABLES)
        assert offset == size
        self._drain()  # nothing of an earlier batch may be taken for this one's replies
        _set_buffer(self._sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, size + (64 << 10))
        try:
            sent = self._sock.send(data)
        except OSError as error:
            raise BatchError(f"sending the batch ({size} bytes): {error.strerror}", error.errno) from None
        del data
        if sent != size:
            raise BatchError(f"the kernel took {sent} of {size} bytes of the batch", None)
        self._replies(first, last, labels)

    def counters(self, family: str, table: str) -> dict[str, tuple[int, int]]:
        """The table's named counters, name -> (packets, bytes): one dump request, no nft process.

        Raises BatchError with errno ENOENT when the table does not exist (a dump
        of a missing table's objects is merely empty, so that is asked apart)."""
        proto = NFPROTO[family]
        name = strz(NFTA_OBJ_TABLE, table)
        with self._lock:
            found = {}
            for body in self._request(NFT_MSG_GETOBJ, NLM_F_DUMP, proto,
                                      name + be32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER)):
                attrs = _attrs(body)
                if NFTA_OBJ_NAME in attrs and NFTA_OBJ_DATA in attrs:
                    data = _attrs(attrs[NFTA_OBJ_DATA])
                    found[bytes(attrs[NFTA_OBJ_NAME]).rstrip(b"\0").decode()] = (
                        _u64(data.get(NFTA_COUNTER_PACKETS)), _u64(data.get(NFTA_COUNTER_BYTES)))
            if not found:
                self._request(NFT_MSG_GETTABLE, 0, proto, strz(NFTA_TABLE_NAME, table))
            return found

    def generation(self) -> int:
        """The namespace's ruleset generation: every committed transaction, by anyone, adds one."""
        with self._lock:
            replies = self._request(NFT_MSG_GETGEN, 0, socket.AF_UNSPEC, b"")
        if len(replies) != 1 or NFTA_GEN_ID not in (attrs := _attrs(replies[0])):
            raise BatchError("the kernel's reply to GETGEN holds no generation", None)
        return _u32(attrs[NFTA_GEN_ID])

    def objects(self, family: str, table: str) -> list[tuple[str, str]]:
        """(kind, name) of every chain, map and named set in the table, as `nft list` shows them;
        [] when the table does not exist. Two dumps of names: no rule and no element is read."""
        proto, wanted = NFPROTO[family], table.encode()
        found: list[tuple[str, str]] = []
        with self._lock:
            # The kernel filters a set dump by table; a chain dump it does not, so both are checked here.
            for body in self._request(NFT_MSG_GETCHAIN, NLM_F_DUMP, proto, strz(NFTA_CHAIN_TABLE, table)):
                attrs = _attrs(body)
                if _text(attrs.get(NFTA_CHAIN_TABLE)) == wanted and NFTA_CHAIN_NAME in attrs:
                    found.append(("chain", _text(attrs[NFTA_CHAIN_NAME]).decode()))
            try:
                sets = self._request(NFT_MSG_GETSET, NLM_F_DUMP, proto, strz(NFTA_SET_TABLE, table))
            except BatchError as error:
                if error.code == errno.ENOENT:  # no such table
                    return []
                raise
            for body in sets:
                attrs = _attrs(body)
                flags = _u32(attrs.get(NFTA_SET_FLAGS))
                if _text(attrs.get(NFTA_SET_TABLE)) == wanted and NFTA_SET_NAME in attrs \
                        and not flags & NFT_SET_ANONYMOUS:  # a rule's own `{ ... }`, not an object of the table
                    found.append(("map" if flags & NFT_SET_MAP else "set", _text(attrs[NFTA_SET_NAME]).decode()))
        return found

    def _request(self, kind: int, flags: int, family: int, body: bytes) -> list[memoryview]:
        """Sends one get request and returns its replies' payloads (after nfgenmsg); raises BatchError,
        also when a dump was interrupted by a change (its replies may mix before and after)."""
        self._drain()
        self._seq += 1
        seq = self._seq
        data = bytearray(_FRAMED + ((len(body) + 3) & ~3))
        ack = 0 if flags & NLM_F_DUMP else NLM_F_ACK  # a dump ends with DONE; a plain get with its ack
        _put(data, 0, (NFNL_SUBSYS_NFTABLES << 8) | kind, NLM_F_REQUEST | ack | flags, seq, family, body)
        self._sock.send(data)
        replies: list[memoryview] = []
        interrupted = False
        buffer = bytearray(1 << 16)
        while True:
            ready, _, _ = select.select([self._sock], [], [], 5.0)
            if not ready:
                raise BatchError("no reply from the kernel to a get request", None)
            size = self._sock.recv_into(buffer)
            view = memoryview(bytes(buffer[:size]))
            offset = 0
            while offset + _HEADER.size <= size:
                length, reply_kind, reply_flags, reply_seq, _ = _HEADER.unpack_from(view, offset)
                if length < _HEADER.size or offset + length > size:
                    raise BatchError("a truncated reply from the kernel", None)
                if reply_seq == seq:
                    interrupted |= bool(reply_flags & NLM_F_DUMP_INTR)
                    if reply_kind == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", view, offset + 16)
                        if code:
                            raise BatchError(_describe(-code, _ext_ack_message(view[offset:offset + length], reply_flags),
                                                       "a get request"), -code)
                        return replies  # the ack, after the reply
                    if reply_kind == NLMSG_DONE:
                        if interrupted:
                            raise BatchError("a dump was interrupted by a change to the ruleset", errno.EINTR)
                        return replies
                    replies.append(view[offset + _FRAMED:offset + length])
                offset += (length + 3) & ~3

    def _drain(self) -> None:
        while True:
            try:
                self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno == errno.ENOBUFS:
                    continue
                raise

    def _replies(self, first: int, last: int, labels: list[str]) -> None:
        """Reads an ack or error for every message; raises for the first error by sequence."""
        pending = set(range(first + 1, last))
        errors: dict[int, tuple[int, str]] = {}
        begin_refused: tuple[int, str] | None = None
        buffer = bytearray(1 << 20)
        while True:
            try:
                size = self._sock.recv_into(buffer, len(buffer), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                # The kernel queues every reply before sendmsg() returns; wait only if some are missing.
                if errors or begin_refused is not None or not pending:
                    break
                ready, _, _ = select.select([self._sock], [], [], 30.0)
                if not ready:
                    raise BatchError(f"no reply from the kernel for {len(pending)} messages of the batch", None)
                continue
            except OSError as error:
                raise BatchError(f"reading the kernel's replies: {error.strerror}", None) from None
            offset = 0
            view = memoryview(buffer)[:size]
            while offset + _HEADER.size <= size:
                length, kind, flags, seq, _ = _HEADER.unpack_from(view, offset)
                if length < _HEADER.size:
                    break
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", view, offset + 16)
                    # struct nlmsgerr: error, then the request's header; its seq names the message
                    _, _, _, request_seq, _ = _HEADER.unpack_from(view, offset + 20)
                    reason = _ext_ack_message(view[offset:offset + length], flags)
                    if request_seq == first and code:
                        begin_refused = (-code, reason)
                    elif code:
                        errors[request_seq] = (-code, reason)
                    pending.discard(request_seq)
                offset += (length + 3) & ~3
        if begin_refused is not None:
            code, reason = begin_refused
            raise BatchError(_describe(code, reason, "the batch"), code)
        if errors:
            seq = min(errors)
            code, reason = errors[seq]
            raise BatchError(_describe(code, reason, labels[seq - first - 1]), code)


def _describe(code: int, reason: str, what: str) -> str:
    text = f"Error: {os.strerror(code)}"
    if reason:
        text += f" ({reason})"
    return f"{text}: {what}"


_FRAMED = _HEADER.size + _NFGEN.size


def _put(data: bytearray, offset: int, kind: int, flags: int, seq: int, family: int, body: bytes,
         res_id: int = 0) -> int:
    """Writes one message at `offset` (padding stays zero); returns where the next one goes."""
    length = _FRAMED + len(body)
    _HEADER.pack_into(data, offset, length, kind, flags, seq, 0)
    _NFGEN.pack_into(data, offset + _HEADER.size, family, 0, socket.htons(res_id))
    data[offset + _FRAMED:offset + length] = body
    return offset + ((length + 3) & ~3)


def _attrs(data: memoryview) -> dict[int, memoryview]:
    """A message's attributes by type (the nested flag masked off); a malformed one ends the walk."""
    found, offset = {}, 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4 or offset + length > len(data):
            break
        found[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return found


def _u32(value: memoryview | None) -> int:
    return struct.unpack(">I", value)[0] if value is not None and len(value) == 4 else 0


def _text(value: memoryview | None) -> bytes:
    return bytes(value).rstrip(b"\0") if value is not None else b""


def _u64(value: memoryview | None) -> int:
    return struct.unpack(">Q", value)[0] if value is not None and len(value) == 8 else 0


def _ext_ack_message(reply: memoryview, flags: int) -> str:
    """NLMSGERR_ATTR_MSG of an extended ack, if the kernel sent one."""
    if not flags & NLM_F_ACK_TLVS:
        return ""
    offset = 16 + 4 + 16  # nlmsghdr, error, the request's header (NETLINK_CAP_ACK: no payload)
    while offset + 4 <= len(reply):
        length, kind = struct.unpack_from("=HH", reply, offset)
        if length < 4:
            break
        if kind & 0x3FFF == NLMSGERR_ATTR_MSG:
            return bytes(reply[offset + 4:offset + length]).rstrip(b"\0").decode(errors="replace")
        offset += (length + 3) & ~3
    return ""
