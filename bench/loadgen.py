"""The compiled load generator (`loadgen.c`): build it, serve with it, measure with it.

Invariant: every run is bounded (a count and a time limit, 1 s per request)
and its latencies come back as integers in nanoseconds, measured by the C
client around the request only (process start and `ip netns exec` are not
in them). CPU pinning is `taskset`, applied when a CPU is given.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SOURCE = Path(__file__).with_name("loadgen.c")
MODES = ("tcp-crr", "udp-crr", "tcp-rr", "udp-rr")
MODE_TEXT = {
    "tcp-crr": "TCP new connection (connect, request, response, close)",
    "udp-crr": "UDP first packet (new socket, request, response)",
    "tcp-rr": "TCP round trip on an established connection",
    "udp-rr": "UDP round trip on an established flow",
}


class LoadgenError(RuntimeError):
    """The generator could not be built, did not start, or printed something unexpected."""


def build(directory: Path) -> Path:
    """Compiles loadgen.c into `directory`; returns the binary. Raises LoadgenError without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise LoadgenError("no C compiler (cc/gcc): scripts/setup.sh installs gcc")
    binary = directory / "loadgen"
    done = subprocess.run([compiler, "-O2", "-Wall", "-o", str(binary), str(SOURCE)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise LoadgenError(f"cc loadgen.c failed:\n{done.stderr}")
    return binary


def _pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if cpu is not None else argv


def start_server(ns, binary: Path, port: int, cpu: int | None) -> subprocess.Popen:
    """Starts the echo server in `ns` (a Netns); returns once it listens. The Netns stops it on delete."""
    child = ns.popen(*_pinned(cpu, [str(binary), "server", str(port)]), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    if line.strip() != "ready":
        child.kill()
        raise LoadgenError(f"loadgen server in {ns.name} did not start: {child.stderr.read().strip()}")
    return child


@dataclass
class Run:
    """One client run: latencies of the requests that got an answer, and what happened to the others."""

    samples_ns: list[int]
    failed: int = 0
    errors: dict[int, int] = field(default_factory=dict)  # errno -> count


def parse(text: str) -> Run:
    """Parses the client's output (see loadgen.c); raises LoadgenError on anything else."""
    lines = text.split()
    if len(lines) < 4 or lines[0] != "ok" or lines[2] != "failed":
        raise LoadgenError(f"unexpected loadgen output: {text[:200]!r}")
    ok, failed = int(lines[1]), int(lines[3])
    samples = [int(x) for x in lines[4:4 + ok]]
    rest = lines[4 + ok:]
    if len(samples) != ok or len(rest) % 3:
        raise LoadgenError(f"truncated loadgen output ({len(samples)} of {ok} samples)")
    errors = {int(rest[i + 1]): int(rest[i + 2]) for i in range(0, len(rest), 3)}
    return Run(samples, failed, errors)


PORT_LOW, PORT_HIGH = 1024, 65000  # as in loadgen.c; the client namespace's ephemeral range too


def measure(ns, binary: Path, mode: str, ip: str, port: int, count: int, seconds: float,
            cpu: int | None, first_source_port: int | None = None) -> Run:
    """Runs the client in `ns`: at most `count` requests and `seconds` s. Raises LoadgenError if it fails to run.

    `first_source_port` (udp-crr): the source ports to use start there (see loadgen.c).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    argv = _pinned(cpu, [str(binary), mode, ip, str(port), str(count), str(seconds)])
    if first_source_port is not None:
        argv.append(str(first_source_port))
    done = ns.run(*argv, check=False, timeout=seconds + 30)
    if done.returncode != 0:
        raise LoadgenError(f"loadgen {mode} {ip}:{port} exited {done.returncode}: {done.stderr.strip()}")
    return parse(done.stdout)
