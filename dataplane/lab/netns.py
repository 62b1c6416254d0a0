"""Named network namespaces, driven from outside.

Invariant: the calling process never changes its own namespace. Every command
runs as a child under `ip netns exec` (a fresh process that enters the
namespace and execs), and sockets are made inside the namespace by a helper
child and handed back as file descriptors (see `sockets`). A `Netns` knows the
processes it started and ends them, by pid, when it is deleted.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from .sockets import SocketFactory

NETNS_DIR = Path("/run/netns")
# Names made by labs: "dplab-<owner pid>-<serial>-<role>". The owner pid is what
# tells a leftover (owner dead) from a lab running in parallel (owner alive).
LAB_NAME = re.compile(r"^dplab-(?P<pid>\d+)-(?P<serial>\d+)-")


class NetnsError(RuntimeError):
    """A command inside a namespace failed; carries the argv, exit code and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{' '.join(argv)} exited {returncode}: {stderr.strip()}")


def environment_problem() -> str | None:
    """Why namespace tests cannot run here (not root, a tool missing), or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` on PATH"
    return None


def list_netns() -> list[str]:
    """Names of all named network namespaces (`ip netns list`)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(names: Iterable[str], prefix: str, alive=_alive) -> list[str]:
    """Lab namespaces safe to delete: those with our own `prefix`, and those whose owner process is gone.

    Namespaces of a lab whose owner still runs (a parallel run) are never returned.
    """
    found = []
    for name in names:
        if name.startswith(prefix):
            found.append(name)
            continue
        match = LAB_NAME.match(name)
        if match and not alive(int(match["pid"])):
            found.append(name)
    return found


def netns_pids(name: str) -> list[int]:
    """Pids of the processes living in namespace `name` (empty when it does not exist)."""
    done = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def delete_netns(name: str, grace: float = 2.0) -> None:
    """Ends every process inside `name` (SIGTERM, then SIGKILL after `grace` s) and deletes it.

    Idempotent. A namespace with a live process would outlive `ip netns del` unnamed,
    which is why its processes go first.
    """
    pids = netns_pids(name)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p) and not _zombie(p)]
        if pids:
            time.sleep(0.02)
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class Netns:
    """One named network namespace made by this process.

    `run` and `popen` start children inside it; `socket` returns a socket that
    lives in it. `delete()` stops what was started and removes the namespace.
    """

    def __init__(self, name: str):
        self.name = name
        self._children: list[subprocess.Popen] = []
        self._sockets: SocketFactory | None = None

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @classmethod
    def create(cls, name: str) -> "Netns":
        """Makes the namespace with its loopback up; raises NetnsError when it exists or cannot be made."""
        _check(["ip", "netns", "add", name])
        ns = cls(name)
        ns.ip("link", "set", "lo", "up")
        return ns

    def argv(self, *command: str) -> list[str]:
        """The argv that runs `command` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *command]

    def run(self, *command: str, check: bool = True, input: str | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Runs `command` inside the namespace and waits; raises NetnsError on a non-zero exit when `check`."""
        argv = self.argv(*command)
        done = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout)
        if check and done.returncode != 0:
            raise NetnsError(argv, done.returncode, done.stderr)
        return done

    def ip(self, *args: str) -> str:
        """`ip -n NAME ARGS`; returns stdout, raises NetnsError on failure."""
        return _check(["ip", "-n", self.name, *args])

    def ip_batch(self, lines: Iterable[str]) -> None:
        """Runs many `ip` commands in one process (`ip -batch`), stopping at the first failure."""
        script = "".join(f"{line}\n" for line in lines)
        _check(["ip", "-n", self.name, "-batch", "-"], input=script)

    def sysctl(self, **values: str | int) -> None:
        """Sets sysctls inside this namespace only; keys use dots or double underscores for dots."""
        pairs = [f"{k.replace('__', '.')}={v}" for k, v in values.items()]
        self.run("sysctl", "-q", "-w", *pairs)

    def nft(self, script: str) -> str:
        """Feeds `script` to `nft -f -` inside the namespace; returns stdout."""
        return self.run("nft", "-f", "-", input=script).stdout

    def ruleset(self) -> str:
        """`nft list ruleset` as seen inside the namespace."""
        return self.run("nft", "list", "ruleset").stdout

    def popen(self, *command: str, **kwargs) -> subprocess.Popen:
        """Starts `command` inside the namespace; it is ended by `stop_children` / `delete`.

        `ip netns exec` execs the command, so the Popen's pid is the command itself
        and signals reach it directly.
        """
        child = subprocess.Popen(self.argv(*command), **kwargs)
        self._children.append(child)
        return child

    def python(self, *args: str, **kwargs) -> subprocess.Popen:
        """Starts this interpreter (`sys.executable`) inside the namespace."""
        return self.popen(sys.executable, *args, **kwargs)

    def socket(self, family: int, type: int, proto: int = 0):
        """A new socket that lives in this namespace (made by a helper child, passed back by fd)."""
        if self._sockets is None:
            self._sockets = SocketFactory.start(self)
        return self._sockets.socket(family, type, proto)

    def stop_children(self, grace: float = 2.0) -> None:
        """SIGTERM, then SIGKILL after `grace` s, to every child this object started."""
        if self._sockets is not None:
            self._sockets.close()
            self._sockets = None
        stop_processes(self._children, grace)
        self._children.clear()

    def delete(self) -> None:
        """Stops children and removes the namespace; never raises for what is already gone."""
        self.stop_children()
        delete_netns(self.name)


def stop_processes(children: Iterable[subprocess.Popen], grace: float = 2.0) -> None:
    """Ends the given children: SIGTERM to all, wait up to `grace` s, then SIGKILL and reap."""
    children = [c for c in children if c.poll() is None]
    for child in children:
        _signal(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _check(argv: list[str], input: str | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, input=input)
    if done.returncode != 0:
        raise NetnsError(argv, done.returncode, done.stderr)
    return done.stdout
