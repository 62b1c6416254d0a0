"""Kubernetes manifests on disk: the default, embedded source of state.

Invariant: a file that fails to parse keeps its last good content in the
store; a bad object inside a good file is skipped alone. Each problem is
reported once per change through the store (`Store.report`), naming the file
and the object. Files are read with limits, and parsed in a child process
(`reader.py`): a FIFO, a device, a symlink out of the folder, an endless or
deeply nested file is refused alone and never stalls or crashes the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable

from ..model import ServiceKey, parse_objects
from . import manifests_watch
from .reader import Limits, ParserProcess, Refused, collector_paused
from .store import Store

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")


def named_like_manifest(name: str) -> bool:
    """A manifest's file name; dotfiles and editor temporaries are not."""
    return name.endswith(SUFFIXES) and not name.startswith((".", "#", "~"))


def is_manifest(path: Path) -> bool:
    """Manifest files; dotfiles, editor temporaries and files in hidden directories are not."""
    return (
        named_like_manifest(path.name)
        and not any(part.startswith(".") for part in path.parts[-8:-1] if part not in (".", ".."))
    )


def read_documents(path: Path, limits: Limits = Limits()) -> list:
    """All documents in one file, parsed in a child process; raises Refused (a ValueError) naming the file."""
    parser = ParserProcess(Path(path).absolute().parent, limits)
    try:
        ((_, documents),) = parser.read([Path(path).absolute()])
    finally:
        parser.close()
    if isinstance(documents, Refused):
        raise documents
    return documents


class ManifestSource:
    """Feeds a Store from a file or a directory tree of manifests."""

    def __init__(self, root: Path, store: Store, limits: Limits = Limits()):
        # Absolute, because the watcher reports absolute paths and origins must compare equal.
        self.root = Path(root).absolute()
        self.store = store
        self.limits = limits
        self.parser = ParserProcess(self.root if self.root.is_dir() else self.root.parent, limits)
        self._read: set[str] = set()  # files read (or refused) at least once, each with an entry in `errors`
        self._loaded = False  # something was read: a watch begun later must catch up on edits made since
        self._stats: dict[str, tuple[int, int, int] | None] = {}  # file -> _stat() at its last read

    @property
    def errors(self) -> dict[str, list[str]]:
        """File -> the problems its last read found (and the store's about its objects): what is counted."""
        found = self.store.problems()
        return {origin: found.get(origin, []) for origin in self._read} | found

    def files(self) -> list[Path]:
        """Manifest files below the root; a FIFO or device named like one is listed, to be refused by name."""
        if self.root.is_file() or (self.root.exists() and not self.root.is_dir()):
            return [self.root]
        if not self.root.is_dir():
            return []
        found = []
        for directory, subdirectories, names in os.walk(self.root, followlinks=self.limits.allow_links):
            subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
            # Hidden directories are pruned above: only the names themselves are left to check.
            found += [os.path.join(directory, name) for name in names if named_like_manifest(name)]
        return [Path(path) for path in sorted(found)]  # sorted as text: 10,000 Path comparisons cost 0.1 s

    def load(self, path: Path) -> set[ServiceKey]:
        """(Re)reads one file; a missing file withdraws its objects."""
        if not os.path.lexists(path):
            return self._withdraw(str(path))
        return self._load_many([path])

    def load_all(self, only_changed: bool = False, idle: Callable[[int], object] | None = None) -> set[ServiceKey]:
        """(Re)reads every file, or with `only_changed` those whose mtime, size or inode moved.

        `idle(files)`, if given, is called between two files while the parser process is still
        at work on the next (`files`: how many this call has stored so far); the store is
        consistent there, and may be read (a snapshot taken)."""
        listed = self.files()
        present = {str(p) for p in listed}
        changed: set[ServiceKey] = set()
        for origin in (self.store.origins | set(self._stats)) - present:
            changed |= self._withdraw(origin)
        wanted = [p for p in listed if not (only_changed and self._stats.get(str(p)) == _stat(p))]
        return changed | self._load_many(wanted, idle)

    def close(self) -> None:
        self.parser.close()

    def _load_many(self, paths: Iterable[Path], idle: Callable[[int], object] | None = None) -> set[ServiceKey]:
        self._loaded = True
        paths = list(paths)
        for path in paths:
            self._stats[str(path)] = _stat(path)
        with collector_paused():
            return self._load_paths(paths, idle)

    def _load_paths(self, paths: list[Path], idle: Callable[[int], object] | None = None) -> set[ServiceKey]:
        # Run with the cyclic collector paused: model values make no cycles, and at 10,000 files its
        # passes over the growing heap cost 0.8 s of CPU (what becomes garbage, reference counting frees).
        changed: set[ServiceKey] = set()
        stored = 0
        for path, documents in self.parser.read(paths, None if idle is None else lambda: idle(stored)):
            stored += 1
            origin = str(path)
            self._read.add(origin)
            if isinstance(documents, Refused):
                kept = "keeping its last good content" if origin in self.store.origins else "nothing loaded from it"
                self.store.report(origin, [f"{documents} ({kept})"])
                continue
            objects, problems = parse_objects(documents, origin)
            self.store.report(origin, problems)
            changed |= self.store.replace(origin, objects)
        return changed

    async def watch(self, debounce_ms: int = 50, settle_ms: int = 5) -> AsyncIterator[set[ServiceKey]]:
        """Yields the Services changed by each batch of file events, forever (`manifests_watch.changes`:
        a batch waits for files still being written, `settle_ms` of quiet, at most `debounce_ms`).

        Edits made between a read before this call and the moment the watches exist have no
        event; a rescan of changed files once they exist catches them. With nothing read
        before (the daemon watches first, then loads), there is nothing to catch up on.
        """
        watched = self.root if self.root.is_dir() else self.root.parent
        catch_up = self._loaded
        async for paths in manifests_watch.changes(watched, recursive=self.root.is_dir(), reads=named_like_manifest,
                                                   settle=settle_ms / 1000, debounce=debounce_ms / 1000,
                                                   follow_links=self.limits.allow_links):
            changed: set[ServiceKey] = set()
            if catch_up:
                catch_up = False
                changed |= self.load_all(only_changed=True)
            for path in sorted(Path(path) for path in paths):
                if self.root.is_file() and path != self.root:
                    continue
                if path.is_dir() or (not path.exists() and self._holds_files_below(path)):
                    # A directory appeared or vanished: rescan below the root; its files may have no events.
                    changed |= self.load_all(only_changed=True)
                    continue
                if self._wanted(path):
                    changed |= self.load(path)
            if changed:
                yield changed
            await asyncio.sleep(0)

    def _withdraw(self, origin: str) -> set[ServiceKey]:
        self._read.discard(origin)
        self.store.report(origin, None)
        self._stats.pop(origin, None)
        return self.store.replace(origin, None)

    def _holds_files_below(self, path: Path) -> bool:
        prefix = f"{path}/"
        return any(origin.startswith(prefix) for origin in self.store.origins | set(self._stats))

    def _wanted(self, path: Path) -> bool:
        if self.root.is_file():
            return path == self.root
        try:
            return is_manifest(path.relative_to(self.root))
        except ValueError:
            return False


def _stat(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file apart (the inode catches editors that save by rename), or None when it is gone."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino
