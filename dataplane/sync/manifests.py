"""Kubernetes manifests on disk: the default, embedded source of state.

Invariant: a file that fails to parse keeps its last good content in the
store; a bad object inside a good file is skipped alone. Each problem is
logged once per change, naming the file and the object.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import AsyncIterator

import yaml_rs
import watchfiles

from ..model import ServiceKey, parse_objects
from .store import Store

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")


def is_manifest(path: Path) -> bool:
    """Manifest files; dotfiles and editor temporaries are not."""
    name = path.name
    return (
        name.endswith(SUFFIXES)
        and not name.startswith((".", "#", "~"))
        and not any(part.startswith(".") for part in path.parts[-8:-1] if part not in (".", ".."))
    )


def read_documents(path: Path) -> list:
    """All documents in one file; raises ValueError naming the file when it does not parse."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            return [json.loads(text)] if text.strip() else []
        # yaml_rs (Rust) parses 10,000 Services five times faster than PyYAML's C loader.
        documents = yaml_rs.loads(text)
        return documents if isinstance(documents, list) else [documents]
    except (yaml_rs.YAMLDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: does not parse: {error}".replace("\n", " ")) from None


class ManifestSource:
    """Feeds a Store from a file or a directory tree of manifests."""

    def __init__(self, root: Path, store: Store):
        # Absolute, because watchfiles reports absolute paths and origins must compare equal.
        self.root = Path(root).absolute()
        self.store = store
        self.errors: dict[str, list[str]] = {}  # file -> problems seen at its last read
        self._stats: dict[str, tuple[int, int, int] | None] = {}  # file -> _stat() at its last read

    def files(self) -> list[Path]:
        if self.root.is_file():
            return [self.root]
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.rglob("*") if p.is_file() and is_manifest(p.relative_to(self.root)))

    def load(self, path: Path) -> set[ServiceKey]:
        """(Re)reads one file; a missing file withdraws its objects."""
        origin = str(path)
        if not path.exists():
            return self._withdraw(origin)
        try:
            self._stats[origin] = _stat(path)
            documents = read_documents(path)
        except (ValueError, OSError, UnicodeDecodeError) as error:
            kept = "keeping its last good content" if origin in self.store.origins else "nothing loaded from it"
            log.error("%s (%s)", error, kept)
            self.errors[origin] = [str(error)]
            return set()
        objects, problems = parse_objects(documents, origin)
        for problem in problems:
            log.error("skipping invalid object: %s", problem)
        self.errors[origin] = [str(p) for p in problems]
        return self.store.replace(origin, objects)

    def load_all(self, only_changed: bool = False) -> set[ServiceKey]:
        """(Re)reads every file, or with `only_changed` those whose mtime, size or inode moved."""
        present = {str(p) for p in self.files()}
        changed: set[ServiceKey] = set()
        for origin in (self.store.origins | set(self._stats)) - present:
            changed |= self._withdraw(origin)
        for path in sorted(present):
            if only_changed and self._stats.get(path) == _stat(Path(path)):
                continue
            changed |= self.load(Path(path))
        return changed

    async def watch(self, debounce_ms: int = 50) -> AsyncIterator[set[ServiceKey]]:
        """Yields the Services changed by each batch of file events, forever.

        Edits made between the caller's load_all() and the moment the watcher
        exists have no event; a rescan of changed files once it exists catches them.
        """
        watched = self.root if self.root.is_dir() else self.root.parent
        caught_up = False
        async for events in watchfiles.awatch(
            watched,
            debounce=debounce_ms,
            step=10,
            recursive=True,
            force_polling=False,
            yield_on_timeout=True,
            rust_timeout=200,
        ):
            changed: set[ServiceKey] = set()
            if not caught_up:
                caught_up = True
                changed |= self.load_all(only_changed=True)
            for path in sorted({Path(path) for _, path in events}):
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
        self.errors.pop(origin, None)
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
