"""Reading untrusted manifest files with limits, in a child process that may crash.

A manifest folder is input from whoever can write to it: one file must never
take the daemon down. So:
- only regular files are read (a FIFO would block the daemon, a device such as
  /dev/zero never ends), opened without blocking and checked with fstat;
- a symlink is followed only when its target stays inside the folder, unless
  links are allowed (`--allow-links`); Kubernetes' ConfigMap volumes link
  `name.yaml -> ..data/name.yaml`, which stays inside;
- at most `max_bytes` are read, nesting deeper than `max_depth` is refused,
  and YAML aliases may replay at most `max_alias_events` events (YAML bombs);
- the parsers run in a child process (`ParserProcess`) under a memory limit
  and a timeout: yaml_rs overflows its stack on deep block nesting (a
  SIGSEGV that no try/except catches), and the child's crash costs one file,
  not the node. The child answers in JSON, which the daemon decodes safely
  whatever the child was made to send.

Each refusal is a `Refused` (a ValueError) whose message names the file.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import re
import resource
import selectors
import signal
import stat
import struct
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..model.objects import SERVED_KINDS

_FRAME = struct.Struct("!I")


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int = 16 * 2**20  # about 40,000 Services with their EndpointSlices in one file
    max_depth: int = 100  # Kubernetes objects nest about 12 deep; CRD schemas more
    max_alias_events: int = 100_000  # events YAML aliases may replay in one file
    allow_links: bool = False  # follow symlinks whose target leaves the folder
    timeout: float = 20.0  # seconds one file may take to parse
    memory: int = 2 * 2**30  # bytes of address space for the parser process


RECYCLE_ABOVE = 256 * 2**20  # bytes resident in the parser process after a batch
PIPE_BYTES = 2**20  # the child's answers in flight: about 700 of 1.4 KB (/proc/sys/fs/pipe-max-size allows 1 MiB)


class Refused(ValueError):
    """A file that was not read, or did not parse; the message names the file and why."""


def read_bytes(path: Path, root: Path, limits: Limits, real_dirs: dict[str, str] | None = None) -> bytes:
    """A manifest's bytes, if it is a regular file within the limits; raises Refused or OSError.

    `real_dirs` caches the real path of directories across one batch of files.
    """
    # The real path decides, so that a linked directory on the way counts as a link too.
    real_dirs = real_dirs if real_dirs is not None else {}
    parent = str(path.parent)
    real_parent = real_dirs.get(parent)
    if real_parent is None:
        real_parent = real_dirs[parent] = os.path.realpath(parent)
    target = Path(real_parent, path.name)
    if os.path.islink(target):
        target = Path(os.path.realpath(target))
    inside = real_dirs.get("")
    if inside is None:
        inside = real_dirs[""] = os.path.realpath(root)
    inside = Path(inside)
    if not limits.allow_links and target != inside and inside not in target.parents:
        how = "is a symlink to" if os.path.islink(path) else "is in a linked directory, at"
        raise Refused(f"{path}: {how} {target}, outside {root}; not followed (--allow-links follows it)")
    # O_NONBLOCK: opening a FIFO must not wait for a writer. O_NOFOLLOW: the target checked above is what opens.
    fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Refused(f"{path}: is {_kind(info.st_mode)}, not a regular file; not read")
        if info.st_size > limits.max_bytes:
            raise Refused(f"{path}: is {info.st_size} bytes, more than the limit of {limits.max_bytes}; not read")
        chunks, size = [], 0
        while size <= limits.max_bytes:  # a file that grows while being read stops at the limit too
            chunk = os.read(fd, min(1 << 20, limits.max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limits.max_bytes:
            raise Refused(f"{path}: grew past the limit of {limits.max_bytes} bytes while read; not read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def parse_text(text: str, path: Path, limits: Limits) -> list:
    """The documents of one file; raises Refused naming the file. Run it where a crash is affordable."""
    import yaml_rs  # here: only the parser process needs it

    try:
        if path.suffix == ".json":
            documents = [json.loads(text)] if text.strip() else []
        else:
            # parse_datetime=False: timestamps stay the strings they were written as.
            value = yaml_rs.loads(text, parse_datetime=False,
                                  alias_limits=yaml_rs.AliasLimits(max_total_replayed_events=limits.max_alias_events))
            documents = value if isinstance(value, list) and _stream_count(text) > 1 else [value]
    except RecursionError:
        raise Refused(f"{path}: nests too deep to parse (more than {limits.max_depth} levels)") from None
    except (yaml_rs.YAMLDecodeError, json.JSONDecodeError, ValueError) as error:
        raise Refused(f"{path}: does not parse: {error}".replace("\n", " ")) from None
    depth = nesting_depth(documents, limits.max_depth + 1)  # the stream's list is not a level of the file
    if depth > limits.max_depth + 1:
        raise Refused(f"{path}: nests deeper than {limits.max_depth} levels; not read")
    return documents


def _stream_count(text: str) -> int:
    """How many documents a YAML stream holds, from its `---` lines: yaml_rs returns one document
    as itself and several as a list, so a document that is a list needs telling apart."""
    markers = sum(1 for _ in _DOCUMENT_START.finditer(text))
    first = _FIRST_CONTENT.search(text)  # before it, only blank lines, comments and directives
    return markers + (0 if first is not None and _DOCUMENT_START.match(first.group()) else 1)


_DOCUMENT_START = re.compile(r"^---(?=[ \t]|$)", re.MULTILINE)
_FIRST_CONTENT = re.compile(r"^(?![ \t]*(?:#|%|$)).+", re.MULTILINE)


def nesting_depth(value: Any, give_up: int) -> int:
    """How deep lists and maps nest in `value`, counted without recursion, stopping past `give_up`."""
    # Level by level: one list per level rather than a tuple per node (a third of the parser's time at 10,000 files).
    depth, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level:
        depth += 1
        if depth > give_up:
            return depth
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, (dict, list))]
    return depth


def read_documents(path: Path, root: Path, limits: Limits, real_dirs: dict[str, str] | None = None) -> list:
    """Reads and parses one file in this process: only for the parser process and tests of it."""
    data = read_bytes(path, root, limits, real_dirs)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Refused(f"{path}: is not UTF-8 ({error.reason} at byte {error.start}); not read") from None
    return parse_text(text, path, limits)


class ParserProcess:
    """The child process that reads and parses manifests for the daemon; restarted after each crash.

    `read(paths)` yields (path, documents or Refused) in order. A file that
    kills the child (a signal, the memory limit) or outlasts the timeout is
    refused alone; the child is started again for the files after it.
    `idle`, if given, is called before waiting for an answer the child has not
    sent yet, between two files: the caller's work done there costs no wall time
    (it does not count against the parse timeout either).
    """

    def __init__(self, root: Path, limits: Limits = Limits()):
        self.root = root
        self.limits = limits
        self.starts = 0  # children started, for tests and logs
        self._child: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None
        self._selector: selectors.BaseSelector | None = None
        self._buffer = bytearray()

    def read(self, paths: Iterable[Path], idle: Callable[[], object] | None = None
             ) -> Iterator[tuple[Path, list | Refused]]:
        pending = list(paths)
        while pending:
            child = self._start()
            try:
                # The whole batch in one frame: the child reads all of it before it answers, so neither waits on the other.
                _write_frame(child.stdin, json.dumps([str(self.root), [str(p) for p in pending]]).encode())
                child.stdin.flush()
            except OSError:
                pass  # the child died: the first read below says why
            done = 0
            for path in pending:
                if idle is not None and not self._answer_ready():
                    idle()
                try:
                    answer = self._answer(child)
                except Refused as why:
                    self._stop()
                    yield path, Refused(f"{path}: {why}; not read")
                    done += 1
                    break
                done += 1
                if "error" in answer:
                    yield path, Refused(str(answer["error"]))
                else:
                    yield path, answer["documents"]
            pending = pending[done:]
        self._recycle()

    def _recycle(self) -> None:
        """Ends a child that a big file left big (Python keeps its heap): the next read starts a fresh one."""
        if self._child is None:
            return
        try:
            resident = int(Path(f"/proc/{self._child.pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return
        if resident > RECYCLE_ABOVE:
            self._stop()

    def close(self) -> None:
        self._stop()

    def _start(self) -> subprocess.Popen:
        if self._child is not None and self._child.poll() is None:
            return self._child
        self._stop()
        limits = self.limits
        arguments = json.dumps([limits.max_bytes, limits.max_depth, limits.max_alias_events, limits.allow_links,
                                limits.memory])
        self._child = subprocess.Popen(
            [sys.executable, "-m", "dataplane.sync.reader", arguments],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=_package_parent(), close_fds=True,
        )
        self.starts += 1
        try:
            # Room for a few hundred answers: the child parses on while the daemon builds objects,
            # rather than waiting on every 64 KiB (the default) for the daemon to catch up.
            fcntl.fcntl(self._child.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # over the user's pipe quota: the default size works, in step
        self._finalizer = weakref.finalize(self, _kill, self._child)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._child.stdout.fileno(), selectors.EVENT_READ)
        self._buffer = bytearray()
        # Started when it says so: the per-file timeout is for parsing, not for the interpreter's start.
        try:
            self._take(self._child, _FRAME.unpack(self._take(self._child, _FRAME.size, time.monotonic() + 30))[0],
                       time.monotonic() + 30)
        except Refused:
            pass  # it died at once: the first answer says how
        return self._child

    def _stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        self._child = None
        self._buffer = bytearray()

    def _answer_ready(self) -> bool:
        """True when a whole answer is buffered or more of one waits in the pipe."""
        buffer = self._buffer
        if len(buffer) >= _FRAME.size and len(buffer) >= _FRAME.size + _FRAME.unpack_from(buffer)[0]:
            return True
        return self._selector is not None and bool(self._selector.select(0))

    def _answer(self, child: subprocess.Popen) -> dict:
        """The child's next answer; raises Refused saying how the child failed."""
        deadline = time.monotonic() + self.limits.timeout
        header = self._take(child, _FRAME.size, deadline)
        body = self._take(child, _FRAME.unpack(header)[0], deadline)
        try:
            with collector_paused():
                answer = json.loads(body)
        except (ValueError, RecursionError):
            raise Refused("the parser process answered garbage") from None
        if not isinstance(answer, dict) or not ("error" in answer or isinstance(answer.get("documents"), list)):
            raise Refused("the parser process answered garbage")
        return answer

    def _take(self, child: subprocess.Popen, size: int, deadline: float) -> bytes:
        buffer, fd = self._buffer, child.stdout.fileno()
        while len(buffer) < size:
            left = deadline - time.monotonic()
            if left <= 0 or not self._selector.select(left):
                _kill(child)
                raise Refused("took longer than the parse timeout")
            chunk = os.read(fd, max(1 << 20, size - len(buffer)))
            if not chunk:
                code = child.wait()
                if code < 0:
                    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
                    raise Refused(f"killed the parser process ({name}: nesting too deep, or the memory limit)")
                raise Refused(f"made the parser process exit with status {code} (the memory limit?)")
            buffer += chunk
        taken = bytes(buffer[:size])
        del buffer[:size]
        return taken


class collector_paused:
    """Pauses the cyclic garbage collector: decoding 10,000 documents otherwise spends 90% of its time in it
    (JSON gives no cycles; reference counting frees what becomes garbage)."""

    def __enter__(self) -> None:
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc) -> None:
        if self.was:
            gc.enable()


def _served(document: Any, in_list: bool = False) -> Any:
    """What the daemon needs of one document: kinds it serves whole, and a stand-in for the rest.

    A 16 MiB file of ConfigMaps (or of nested lists) then costs the daemon nothing to decode:
    only the parser process holds it. IGNORED marks a kind nobody here reads.
    """
    if document is None:
        return NOT_A_MAPPING if in_list else None  # None: an empty document
    if not isinstance(document, dict):
        return NOT_A_MAPPING  # still reported as "is not a mapping", without its bulk
    kind = document.get("kind")
    if str(kind or "").endswith("List") and "items" in document:
        items = document["items"]
        if isinstance(items, list):
            items = [kept for kept in (_served(item, True) for item in items) if kept is not IGNORED]
        return {**document, "items": items}
    if kind in SERVED_KINDS:
        return document
    return IGNORED if in_list else None


IGNORED = object()
NOT_A_MAPPING = "<not a mapping>"


def _write_frame(stream, body: bytes) -> None:
    stream.write(_FRAME.pack(len(body)) + body)


def _kill(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
    child.wait()
    for stream in (child.stdin, child.stdout):
        try:
            stream.close()
        except OSError:
            pass


def _package_parent() -> str:
    return str(Path(__file__).resolve().parents[2])


def _serve(arguments: str) -> None:
    """The parser process: frames of [root, [path...]] in, one frame of {documents} or {error} out per path."""
    max_bytes, max_depth, max_alias_events, allow_links, memory = json.loads(arguments)
    limits = Limits(max_bytes, max_depth, max_alias_events, allow_links)
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash here is expected now and then: no core dumps
    gc.disable()  # parsed documents hold no cycles; the collector would only cost time
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    import yaml_rs  # noqa: F401  (before "ready": its import is start-up, not parsing)

    _write_frame(stdout, b'{"ready": true}')
    stdout.flush()
    while True:
        header = stdin.read(_FRAME.size)
        if len(header) < _FRAME.size:
            return
        root, paths = json.loads(stdin.read(_FRAME.unpack(header)[0]))
        real_dirs: dict[str, str] = {}  # for this batch only: a directory may become a link later
        for path in paths:
            try:
                answer = {"documents": read_documents(Path(path), Path(root), limits, real_dirs)}
            except Refused as error:
                answer = {"error": str(error)}
            except OSError as error:
                answer = {"error": f"{path}: cannot be read: {error.strerror or error}"}
            except MemoryError:
                answer = {"error": f"{path}: parsing it needs more memory than the limit of {memory} bytes; not read"}
            if "documents" in answer:
                answer["documents"] = [_served(document) for document in answer["documents"]]
            try:
                body = json.dumps(answer, default=str).encode()
            except (ValueError, TypeError, RecursionError) as error:
                body = json.dumps({"error": f"{path}: cannot be passed on: {error}"}).encode()
            answer = None
            _write_frame(stdout, body)
            stdout.flush()


if __name__ == "__main__":
    _serve(sys.argv[1])
