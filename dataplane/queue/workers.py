"""`--queues N` (N > 1): one forwarder process per queue, so new flows are decided on every core.

The kernel spreads new flows over the queues by a hash of their addresses
(`--queue-balance`), so a client and a Service address always meet in the
same queue, and so in the same worker: ClientIP affinity holds within a
worker without sharing state. Maglev is a pure function of the endpoints
(every worker builds the same table) and least-conn workers each follow
conntrack's events, which count every worker's flows.

The daemon keeps the control: `WorkerPool` has the Forwarder's interface
(services_changed, node_addresses, snapshot, close). Each worker is
`python -m dataplane.queue.workers QUEUE` with two socketpairs:
control (daemon -> worker: the daemon's whole view, then changes) and
report (worker -> daemon: ready, then a snapshot each second). Messages are
length-prefixed pickles between processes of this same program.

Invariant: the daemon never blocks on a worker. Control messages leave
through a sender thread per worker; a worker that dies leaves its queue
unbound (new flows fail open to the kernel's pick) and is started again,
with the whole view, a second later.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")


def frame(message) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


class Frames:
    """Reassembles length-prefixed messages from a byte stream (pure)."""

    def __init__(self):
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list:
        self.buffer += data
        messages = []
        while len(self.buffer) >= 4:
            (length,) = _LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < 4 + length:
                break
            messages.append(pickle.loads(bytes(self.buffer[4 : 4 + length])))
            del self.buffer[: 4 + length]
        return messages


def merge_snapshots(snapshots: list[dict]) -> dict:
    """One view of several workers: counts add up; least-conn's active flows (each worker counts all) take the max."""
    summed = ("packets", "undecided", "table_builds", "affinity_entries", "conntrack_overflows", "conntrack_resyncs")
    merged = {**dict.fromkeys(summed, 0), "latency": None, "services": [], "per_queue": {}}
    ports: dict[str, dict] = {}
    for snap in snapshots:
        for key in summed:
            merged[key] += snap.get(key, 0)
        merged["per_queue"].update(snap.get("per_queue", {}))
        latency = snap["latency"]
        if merged["latency"] is None:
            merged["latency"] = {"buckets": latency["buckets"], "counts": list(latency["counts"]),
                                 "total": latency["total"], "count": latency["count"]}
        else:
            merged["latency"]["counts"] = [a + b for a, b in zip(merged["latency"]["counts"], latency["counts"])]
            merged["latency"]["total"] += latency["total"]
            merged["latency"]["count"] += latency["count"]
        for port in snap["services"]:
            into = ports.get(port["service"])
            if into is None:
                ports[port["service"]] = {**port, "endpoints": [dict(e) for e in port["endpoints"]]}
                continue
            into["affinity_entries"] += port["affinity_entries"]
            by_name = {e["endpoint"]: e for e in into["endpoints"]}
            for endpoint in port["endpoints"]:
                mine = by_name.get(endpoint["endpoint"])
                if mine is None:
                    into["endpoints"].append(dict(endpoint))
                else:
                    mine["decided"] += endpoint["decided"]
                    mine["active"] = max(mine["active"], endpoint["active"])
    merged["services"] = [ports[name] for name in sorted(ports)]
    return merged


class _Worker:
    def __init__(self, queue_number: int, maglev_size: int):
        self.queue = queue_number
        self.maglev_size = maglev_size
        self.process: subprocess.Popen | None = None
        self.control: socket.socket | None = None
        self.report: socket.socket | None = None
        self.outbox: queue.Queue = queue.Queue()
        self.frames = Frames()
        self.snapshot: dict | None = None
        self.sender: threading.Thread | None = None

    def spawn(self) -> None:
        control_here, control_there = socket.socketpair()
        report_here, report_there = socket.socketpair()
        argv = [sys.executable, "-m", "dataplane.queue.workers", str(self.queue), str(control_there.fileno()),
                str(report_there.fileno()), str(self.maglev_size)]
        self.process = subprocess.Popen(argv, pass_fds=(control_there.fileno(), report_there.fileno()),
                                        stdin=subprocess.DEVNULL)
        control_there.close()
        report_there.close()
        self.control, self.report, self.frames, self.outbox = control_here, report_here, Frames(), queue.Queue()
        self.sender = threading.Thread(target=self._send, args=(self.control, self.outbox), daemon=True,
                                       name=f"queue-{self.queue}-control")
        self.sender.start()

    @staticmethod
    def _send(sock: socket.socket, outbox: queue.Queue) -> None:
        while (message := outbox.get()) is not None:
            try:
                sock.sendall(frame(message))
            except OSError:
                return

    def send(self, message) -> None:
        self.outbox.put(message)

    def wait_ready(self, timeout: float) -> None:
        """Blocks until the worker bound its queue; raises OSError with its reason otherwise."""
        self.report.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.report.recv(65536)
            if not data:
                raise OSError(f"queue {self.queue}: worker exited (status {self.process.wait()})")
            for message in self.frames.feed(data):
                if message[0] == "ready":
                    self.report.setblocking(False)
                    return
                if message[0] == "error":
                    raise OSError(message[1], f"queue {self.queue}: {message[2]}")
        raise OSError(f"queue {self.queue}: worker not ready within {timeout} s")

    def stop(self) -> None:
        self.outbox.put(None)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for sock in (self.control, self.report):
            if sock is not None:
                sock.close()


class WorkerPool:
    """The Forwarder's interface over one worker process per queue."""

    def __init__(self, queues: tuple[int, ...], maglev_size: int = 65537):
        self.queues = queues
        self.workers = [_Worker(q, maglev_size) for q in queues]
        self.tables: dict = {}
        self.node_ips: tuple[bytes, ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for worker in self.workers:
            await self._start(worker)
        log.info("forwarder: %d worker processes on NFQUEUE %s", len(self.workers), ",".join(map(str, self.queues)))

    async def _start(self, worker: _Worker) -> None:
        worker.spawn()
        try:
            await asyncio.to_thread(worker.wait_ready, 10.0)
        except OSError:
            worker.stop()
            raise
        worker.send(("nodes", self.node_ips))
        if self.tables:
            worker.send(("services", dict(self.tables)))
        self._loop.add_reader(worker.report.fileno(), self._on_report, worker)

    def _on_report(self, worker: _Worker) -> None:
        try:
            data = worker.report.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(worker.report.fileno())
            if not self._closing:
                log.error("forwarder for queue %d exited (%s); its new flows fail open until it is back",
                          worker.queue, worker.process.poll())
                worker.stop()
                self._loop.call_later(1.0, lambda: asyncio.ensure_future(self._restart(worker)))
            return
        for message in worker.frames.feed(data):
            if message[0] == "snapshot":
                worker.snapshot = message[1]

    async def _restart(self, worker: _Worker) -> None:
        if self._closing:
            return
        try:
            await self._start(worker)
            log.info("forwarder for queue %d is back", worker.queue)
        except OSError as error:
            log.error("forwarder for queue %d did not come back: %s; trying again", worker.queue, error)
            self._loop.call_later(5.0, lambda: asyncio.ensure_future(self._restart(worker)))

    def services_changed(self, tables) -> None:
        for key, ports in tables.items():
            if ports:
                self.tables[key] = ports
            else:
                self.tables.pop(key, None)
        for worker in self.workers:
            worker.send(("services", dict(tables)))

    def node_addresses(self, ips: tuple[bytes, ...]) -> None:
        self.node_ips = ips
        for worker in self.workers:
            worker.send(("nodes", ips))

    def snapshot(self) -> dict:
        return merge_snapshots([w.snapshot for w in self.workers if w.snapshot is not None])

    def close(self) -> None:
        self._closing = True
        for worker in self.workers:
            if self._loop is not None and worker.report is not None:
                try:
                    self._loop.remove_reader(worker.report.fileno())
                except (ValueError, OSError):
                    pass
            worker.stop()


# -- the worker process -----------------------------------------------------------------------------

async def _serve(queue_number: int, control: socket.socket, report: socket.socket, maglev_size: int) -> None:
    from ..lb.balancer import Balancer
    from .forwarder import Forwarder
    from .nfqueue import QueueError

    forwarder = Forwarder((queue_number,), Balancer(maglev_size))
    try:
        await forwarder.start()
    except (QueueError, OSError) as error:
        report.sendall(frame(("error", error.errno or 0, str(error))))
        return
    report.sendall(frame(("ready",)))
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    frames = Frames()
    control.setblocking(False)

    def on_control() -> None:
        try:
            data = control.recv(1 << 20)
        except BlockingIOError:
            return
        if not data:  # the daemon is gone: so are we (the queue then bypasses to the kernel)
            done.set()
            return
        for kind, payload in frames.feed(data):
            if kind == "services":
                forwarder.services_changed(payload)
            elif kind == "nodes":
                forwarder.node_addresses(payload)

    loop.add_reader(control.fileno(), on_control)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    try:
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            try:
                report.sendall(frame(("snapshot", forwarder.snapshot())))
            except OSError:
                break
    finally:
        forwarder.close()


def main(argv: list[str]) -> int:
    import uvloop

    queue_number, control_fd, report_fd, maglev_size = (int(a) for a in argv)
    try:
        # A packet-path process, as ovs-vswitchd is: new flows wait while it waits (Debian runs that at nice -10).
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except OSError:
        pass
    logging.basicConfig(level=logging.INFO, format=f"queue-{queue_number}: %(levelname)s %(name)s %(message)s")
    control = socket.socket(fileno=control_fd)
    report = socket.socket(fileno=report_fd)
    uvloop.run(_serve(queue_number, control, report, maglev_size))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
