"""Sockets that live in another network namespace, for a process that stays in its own.

A socket belongs to the namespace it was created in, for its whole life: its
binds, routes and connections are that namespace's. So a helper child started
under `ip netns exec` creates sockets on request and passes each back over a
Unix SOCK_SEQPACKET pair (SCM_RIGHTS); the caller then connects, sends,
receives and times out with the ordinary socket API, in its own process.

Run as `python -m dataplane.lab.sockets FD` (the child side; FD is its end of the pair).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
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
            child = ns.python("-m", __name__, str(theirs.fileno()), pass_fds=(theirs.fileno(),))
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
        except Exception:
            self._child.kill()
            self._child.wait()


def serve(fd: int) -> None:
    """The child's loop: one socket per request until the parent closes the channel."""
    channel = socket.socket(fileno=fd)
    while True:
        request = channel.recv(64)
        if not request:
            return
        try:
            family, type_, proto = (int(x) for x in request.split())
            made = socket.socket(family, type_, proto)
        except OSError as error:
            channel.send(b"E%d" % (error.errno or errno.EINVAL))
            continue
        except ValueError:
            channel.send(b"E%d" % errno.EINVAL)
            continue
        socket.send_fds(channel, [b"ok"], [made.fileno()])
        made.close()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
