"""The one module that talks to the kernel's nftables.

`apply()` sends a typed transaction as one nfnetlink batch it encodes
itself (nat/encode.py, nat/netlink.py: no text is written or parsed), or,
with the `nft` applier, as nft text through libnftables in-process (no fork
per sync) or `nft -f -`. Either way a transaction is one netlink batch: the
kernel applies all of it or none. libnftables/`nft` stay for listing, the
capability probe and `run(text)`. Errors are classified here, once; callers
never parse nft's stderr.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import shutil
import subprocess
import tempfile
import threading
from typing import TYPE_CHECKING, Iterable

from .ruleset import Transaction

if TYPE_CHECKING:
    from .encode import Encoder
    from .netlink import NetlinkBatches

log = logging.getLogger(__name__)

APPLIERS = ("netlink", "nft")
DEFAULT_APPLIER = "netlink"


class NftError(RuntimeError):
    def __init__(self, message: str, text: str = "", code: int | None = None):
        super().__init__(message.strip())
        self.text = text  # the script that failed, for the log
        self._code = code  # the kernel's errno, when the netlink applier read it

    @property
    def errno(self) -> int | None:
        if self._code is not None:
            return self._code
        for code, phrase in ((errno.ENOENT, "No such file or directory"), (errno.EEXIST, "File exists"),
                             (errno.EPERM, "Operation not permitted"), (errno.EBUSY, "Device or resource busy"),
                             (errno.EOPNOTSUPP, "Operation not supported")):
            if phrase in str(self):
                return code
        return None

    def is_not_found(self) -> bool:
        return self.errno == errno.ENOENT


class _LibNftables:
    """libnftables through ctypes: nft's own parser, without a process per call."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        self._lock = threading.Lock()  # one context, one caller at a time

    def run(self, text: str, check_only: bool = False) -> tuple[int, str, str]:
        with self._lock:
            self._lib.nft_ctx_set_dry_run(self._ctx, check_only)
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, text.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
            return rc, out, err


class NftCommand:
    """The nft binary; `argv` may wrap it (["ip", "netns", "exec", "ns1", "nft"] in tests)."""

    def __init__(self, argv: list[str]):
        self._argv = list(argv)

    @property
    def netns(self) -> str | None:
        """The `ip netns` namespace the command runs in, when it is wrapped in `ip netns exec NAME`."""
        if self._argv[:3] == ["ip", "netns", "exec"] and len(self._argv) > 3:
            return self._argv[3]
        return None

    def run(self, text: str, check_only: bool = False) -> tuple[int, str, str]:
        return self.run_args(["-c", "-f", "-"] if check_only else ["-f", "-"], text)

    def run_args(self, args: list[str], text: str | None = None) -> tuple[int, str, str]:
        done = subprocess.run(self._argv + args, input=text, capture_output=True, text=True)
        return done.returncode, done.stdout, done.stderr

    def run_commands(self, commands: Iterable[str]) -> tuple[int, str, str]:
        """Runs a script written command by command to a file: the daemon never holds
        the whole text (6 MB at 10,000 Services, twice over once encoded)."""
        with tempfile.NamedTemporaryFile("w", prefix="dataplane-", suffix=".nft") as script:
            for command in commands:
                script.write(command)
                script.write("\n")
            script.flush()
            return self.run_args(["-f", script.name])


class Nftables:
    """Applies transactions and runs nft scripts; raises NftError, with the kernel's errno, on failure.

    The `netlink` applier encodes each transaction into one nfnetlink batch
    and reads every ack back. The `nft` applier writes it as text: small
    transactions (incremental syncs) run in-process through libnftables;
    large ones (full syncs) in a short-lived `nft` process, since nft caches
    what it parsed (250 MB for 10,000 Services) and that memory should leave
    with the process. A transaction the encoder cannot express (a command
    given as text, elements of a map no transaction here declared) goes the
    `nft` way whatever the applier.

    `netns` names the `ip netns` namespace the netlink socket is opened in
    (tests); the text path is namespaced by its `backend` command. Both
    paths must program one namespace: without `netns`, a backend wrapped in
    `ip netns exec NAME` gives NAME (else a test's batches would reach the
    caller's own namespace, whose ruleset no test may touch), and a `netns`
    naming another namespace is refused.
    """

    LARGE = 20_000  # map and set elements: about 1 MB of script text

    def __init__(self, backend: _LibNftables | NftCommand | None = None, bulk: NftCommand | None = None,
                 applier: str = DEFAULT_APPLIER, netns: str | None = None):
        if applier not in APPLIERS:
            raise ValueError(f"--nftables-backend: {applier!r} is not one of {', '.join(APPLIERS)}")
        self._backend = backend or _pick_backend()
        if bulk is None and isinstance(self._backend, NftCommand):
            bulk = self._backend
        elif bulk is None and shutil.which("nft"):
            bulk = NftCommand([shutil.which("nft")])
        self._bulk = bulk or self._backend
        self.applier = applier
        self.fallbacks = 0  # transactions the netlink applier handed to the text path
        self._encoder: Encoder | None = None
        self._batches: NetlinkBatches | None = None
        wrapped = {b.netns for b in (self._backend, self._bulk) if isinstance(b, NftCommand) and b.netns}
        if netns is None and len(wrapped) == 1:
            (netns,) = wrapped
        elif wrapped - {netns}:
            raise ValueError(f"the nft commands run in {', '.join(sorted(wrapped))}, the netlink socket in "
                             f"{netns or 'this process namespace'}: both must program one namespace")
        self._netns = netns
        if applier == "netlink":
            # Imported here: pyroute2 is for the netlink applier only (the fake and `render` do without).
            from .encode import Encoder
            from .netlink import NetlinkBatches

            self._encoder = Encoder()
            try:
                self._batches = NetlinkBatches(netns)
            except OSError as error:
                raise NftError(f"cannot open a netlink socket to nf_tables: {error}", code=error.errno) from None

    @property
    def backend_name(self) -> str:
        text = "libnftables" if isinstance(self._backend, _LibNftables) else "nft"
        return f"netlink (listing: {text})" if self._batches is not None else text

    def run(self, text: str, check_only: bool = False) -> str:
        rc, out, err = self._backend.run(text, check_only)
        if rc != 0:
            raise NftError(err or f"nft failed with status {rc}", text)
        return out

    def apply(self, tx: Transaction) -> None:
        """Applies `tx` whole or not at all; raises NftError with nothing changed when the kernel refuses it."""
        if not tx:
            return
        if self._encoder is None:
            self._apply_text(tx)
            return
        from .encode import Unsupported
        from .netlink import BatchError

        try:
            if self._text_only and any(_touches(op) & self._text_only for op in tx):
                raise Unsupported("maps and sets first declared by a transaction sent as text")
            messages = self._encoder.encode(tx)
        except Unsupported as why:
            # Their elements keep going as text: the encoder never saw how the kernel holds them.
            self._text_only |= {name for op in tx for name in _touches(op)}
            # What the encoder cannot express goes to nft as text, in one transaction all the same.
            # Nothing the daemon renders today (tests/unit/test_netlink_encode.py encodes every
            # golden ruleset, balancing tables included): what lands here is a command given as
            # text, or a statement newer than the encoder, which is a gap to close.
            self.fallbacks += 1
            log.warning("transaction applied as nft text: %s", why)
            self._apply_text(tx)
        else:
            try:
                self._batches.send(messages)
            except BatchError as error:
                raise NftError(str(error), "", error.code) from None
        self._encoder.commit(tx)

    _text_only: frozenset[str] = frozenset()

    def _apply_text(self, tx: Transaction) -> None:
        if isinstance(self._bulk, NftCommand) and tx.element_count() >= self.LARGE:
            rc, _, err = self._bulk.run_commands(map(str, tx.commands))
            if rc != 0:
                raise NftError(err or f"nft failed with status {rc}", "")
            return
        self.run(str(tx))

    def check(self, tx: Transaction) -> None:
        self.run(str(tx), check_only=True)

    def list_objects(self, family: str, table: str) -> list[tuple[str, str]] | None:
        """(kind, name) of every chain, map and set in the table; [] when it does not
        exist; None when they cannot be listed (the caller then replaces the table whole).

        Over netlink, names only. nft 1.0.6 would read the whole ruleset first, every
        element included: 1.6 s and 236 MB at 10,000 Services, for a listing of 28 names."""
        queries = self._queries()
        if queries is not None:
            from .netlink import BatchError

            try:
                return queries.objects(family, table)
            except BatchError as error:
                log.warning("cannot list the objects of %s %s over netlink: %s", family, table, error)
                return None
        if not isinstance(self._bulk, NftCommand):
            return None
        rc, out, err = self._bulk.run_args(["-j", "-t", "list", "table", family, table])
        if rc != 0:
            return [] if "No such file or directory" in err else None
        found = []
        for item in json.loads(out).get("nftables", []):
            for kind in ("chain", "map", "set"):
                if kind in item:
                    found.append((kind, item[kind]["name"]))
        return found

    def generation(self) -> int | None:
        """The namespace's ruleset generation, which every committed transaction (anyone's) moves
        on by one; None when it cannot be read. Equal before and after: nothing was changed between."""
        queries = self._queries()
        if queries is None:
            return None
        from .netlink import BatchError

        try:
            return queries.generation()
        except BatchError as error:
            log.warning("cannot read the nftables generation: %s", error)
            return None

    def probe(self) -> None:
        """Raises NftError unless both paths work here: the kernel's nf_tables over netlink (for the
        netlink applier) and nft's parser with the right to program it. Cheap at any ruleset size:
        `list tables` would make nft 1.0.6 read every element first (2.4 s, 236 MB at 10,000 Services)."""
        if self._batches is not None:
            from .netlink import BatchError

            try:
                self._batches.generation()
            except BatchError as error:
                raise NftError(str(error), code=error.code) from None
        self.run("add table ip dataplane-probe\n", check_only=True)  # parsed and validated, never committed

    def _queries(self) -> NetlinkBatches | None:
        """The netlink socket for reading: the applier's, else one of its own, opened once (None if it cannot be)."""
        if self._batches is None and not self._queries_tried:
            self._queries_tried = True
            from .netlink import NetlinkBatches

            try:
                self._batches_for_queries = NetlinkBatches(self._netns)
            except OSError as error:
                log.warning("no netlink socket to nf_tables (%s): listing through nft", error)
        return self._batches if self._batches is not None else self._batches_for_queries

    _queries_tried = False
    _batches_for_queries: NetlinkBatches | None = None

    def delete_table(self, family: str, table: str) -> None:
        """Idempotent: a missing table is already deleted."""
        self.run(f"add table {family} {table}\ndelete table {family} {table}\n")
        if self._encoder is not None:
            self._encoder.forget(family, table)

    def counters(self, family: str, table: str) -> dict[str, tuple[int, int]]:
        """The table's named counters, name -> (packets, bytes): over netlink, else from `nft -j`.

        Raises NftError: `is_not_found()` when the table does not exist; any
        other failure when nft cannot list (libnftables is used without JSON
        output here, so this needs the nft command).
        """
        queries = self._queries()
        if queries is not None:  # no nft process: a scrape must stay cheap at any ruleset size
            from .netlink import BatchError

            try:
                return queries.counters(family, table)
            except BatchError as error:
                raise NftError(str(error), code=error.code) from None
        if not isinstance(self._bulk, NftCommand):
            raise NftError("listing counters needs the nft command, which was not found")
        rc, out, err = self._bulk.run_args(["-j", "list", "counters", "table", family, table])
        if rc != 0:
            raise NftError(err or f"nft failed with status {rc}")
        found = {}
        for item in json.loads(out).get("nftables", []):
            counter = item.get("counter")
            if counter is not None:
                found[counter["name"]] = (int(counter["packets"]), int(counter["bytes"]))
        return found


def _pick_backend() -> _LibNftables | NftCommand:
    for path in ("libnftables.so.1", ctypes.util.find_library("nftables")):
        if not path:
            continue
        try:
            return _LibNftables(path)
        except (OSError, AttributeError):
            continue
    nft = shutil.which("nft")
    if nft is None:
        raise NftError("nftables is not installed: neither libnftables nor the nft command was found")
    return NftCommand([nft])


def _touches(operation) -> frozenset[str]:
    """The maps and sets an operation declares or fills."""
    from .ruleset import Container, Elements

    subject = operation.subject
    if isinstance(subject, Elements):
        return frozenset((subject.container,))
    if isinstance(subject, Container):
        return frozenset((subject.name,))
    return frozenset()
