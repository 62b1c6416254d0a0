"""Sockets that live in another network namespace, for a process that stays in its own.

A socket belongs to the namespace it was created in, for its whole life: its
binds, routes and connections are that namespace's. So a helper child started
under `ip netns exec` creates sockets on request and passes each back over a
Unix SOCK_SEQPACKET pair (SCM_RIGHTS); the caller then connects, sends,
receives and times out with the ordinary socket API, in its own process.

The child runs `CHILD` with `python -I -c` (no imports beyond the standard
library, so it starts in a few milliseconds); FD is its end of the pair.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading


class SocketFactory:
    """The parent's end: one helper child per namespace, started lazily by `Netns.socket`."""

    def __init__(self, channel: socket.socket, child):
        self._channel = channel
        self._child = child
        self._lock = threading.Lock()

    @classmethod
    def start(cls, ns) -> "SocketFactory":
        """Starts the helper inside `ns` (a Netns); raises OSError when it does not answer."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            child = ns.python("-I", "-c", CHILD, str(theirs.fileno()), pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        factory = cls(ours, child)
        factory.socket(socket.AF_INET, socket.SOCK_DGRAM).close()  # waits until it serves
        return factory

    def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        """A new socket made inside the namespace; raises the child's OSError when it could not make one."""
        with self._lock:
            self._channel.sendall(f"{int(family)} {int(type)} {int(proto)}".encode())
            message, fds, _, _ = socket.recv_fds(self._channel, 64, 1)
        if not message:
            raise OSError(errno.EPIPE, "socket helper exited")
        if message.startswith(b"E"):
            code = int(message[1:])
            raise OSError(code, os.strerror(code))
        return socket.socket(family, type, proto, fileno=fds[0])

    def close(self) -> None:
        """Closes the channel; the child sees EOF and exits."""
        self._channel.close()
        try:
            self._child.wait(2.0)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()


CHILD = """
import errno, socket, sys
channel = socket.socket(fileno=int(sys.argv[1]))
while request := channel.recv(64):
    try:
        family, type_, proto = (int(x) for x in request.split())
        made = socket.socket(family, type_, proto)
    except (OSError, ValueError) as error:
        channel.send(b"E%d" % (getattr(error, "errno", None) or errno.EINVAL))
        continue
    socket.send_fds(channel, [b"ok"], [made.fileno()])
    made.close()
"""
