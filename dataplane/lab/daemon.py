"""`dataplane run` as a child inside the node namespace, for tests, the demo and benchmarks.

Invariant: `start()` returns only once `/healthz` answers 200 inside the node
namespace, that is once the first sync is in the kernel; otherwise it stops
the child and raises `DaemonError` with the tail of its log. stdout and
stderr go to one log file that survives restarts (each start is marked).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .client import http_get

HEALTHZ = ("127.0.0.1", 10256)
METRICS = ("127.0.0.1", 10249)


class DaemonError(RuntimeError):
    """The daemon did not come up, or did not stop, as asked; the message carries its log tail."""


def dataplane_executable() -> str:
    """The `dataplane` console script: the one beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).with_name("dataplane")
    if beside.exists():
        return str(beside)
    found = shutil.which("dataplane")
    if found is None:
        raise DaemonError("the `dataplane` command is not installed (pip install -e .)")
    return found


def run_argv(source: Path | str, *, hostname: str = "node1", cluster_cidr: str = "10.244.0.0/16",
             healthz: tuple[str, int] = HEALTHZ, metrics: tuple[str, int] = METRICS,
             extra: Sequence[str] = ()) -> list[str]:
    """The argv of `dataplane run` with the flags every lab run needs, then `extra`."""
    return [
        dataplane_executable(), "run",
        "--source", str(source),
        "--hostname-override", hostname,
        "--cluster-cidr", cluster_cidr,
        "--healthz-bind-address", f"{healthz[0]}:{healthz[1]}",
        "--metrics-bind-address", f"{metrics[0]}:{metrics[1]}",
        *extra,
    ]


class Daemon:
    """A restartable `dataplane run` in namespace `ns`.

    `argv` is the command to run (default: `run_argv(source)`); tests of this
    helper pass a stand-in. `healthz` is where the stand-in or daemon serves
    `/healthz`, inside `ns`.
    """

    def __init__(self, ns, log_path: Path | str, argv: Sequence[str], healthz: tuple[str, int] = HEALTHZ):
        self.ns = ns
        self.log_path = Path(log_path)
        self.argv = list(argv)
        self.healthz = healthz
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @classmethod
    def for_source(cls, ns, source: Path | str, log_path: Path | str, extra: Sequence[str] = (),
                   cluster_cidr: str = "10.244.0.0/16") -> "Daemon":
        return cls(ns, log_path, run_argv(source, cluster_cidr=cluster_cidr, extra=extra))

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 15.0) -> "Daemon":
        """Starts the daemon and waits for /healthz 200; raises DaemonError (child stopped) if it does not come."""
        if self.running:
            raise DaemonError("already running")
        self.starts += 1
        with self.log_path.open("a") as log:
            log.write(f"=== start {self.starts}: {' '.join(self.argv)}\n")
            log.flush()
            self.process = self.ns.popen(*self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DaemonError(f"exited {self.process.returncode} before /healthz answered 200\n{self.log_tail()}")
            if self.health() == 200:
                return self
            time.sleep(0.05)
        self.stop()
        raise DaemonError(f"/healthz not 200 within {timeout} s\n{self.log_tail()}")

    def health(self) -> int | None:
        """The /healthz status code now, or None when nothing answers."""
        try:
            status, _ = http_get(self.ns, *self.healthz, "/healthz", timeout=0.5)
        except OSError:
            return None
        return status

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit within `timeout` s (then raises DaemonError).

        Returns the exit code, or None when it was not running. Idempotent.
        """
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise DaemonError(f"did not exit within {timeout} s of SIGTERM; killed\n{self.log_tail()}")
        return process.returncode

    def restart(self, timeout: float = 15.0) -> "Daemon":
        self.stop()
        return self.start(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def cleanup(ns) -> subprocess.CompletedProcess:
    """Runs `dataplane cleanup` inside `ns`; returns the finished process (never raises for its exit code)."""
    return ns.run(dataplane_executable(), "cleanup", check=False)
