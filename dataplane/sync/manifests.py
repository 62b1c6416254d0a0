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

import yaml
import watchfiles

from ..model import ServiceKey, parse_objects
from .store import Store

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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
        return list(yaml.load_all(text, Loader=_Loader))
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: does not parse: {error}".replace("\n", " ")) from None


class ManifestSource:
    """Feeds a Store from a file or a directory tree of manifests."""

    def __init__(self, root: Path, store: Store):
        self.root = Path(root)
        self.store = store
        self.errors: dict[str, list[str]] = {}  # file -> problems seen at its last read

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
            self.errors.pop(origin, None)
            return self.store.replace(origin, None)
        try:
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

    def load_all(self) -> set[ServiceKey]:
        present = {str(p) for p in self.files()}
        changed: set[ServiceKey] = set()
        for origin in self.store.origins - present:
            changed |= self.load(Path(origin))
        for path in sorted(present):
            changed |= self.load(Path(path))
        return changed

    async def watch(self, debounce_ms: int = 50) -> AsyncIterator[set[ServiceKey]]:
        """Yields the Services changed by each batch of file events, forever."""
        watched = self.root if self.root.is_dir() else self.root.parent
        async for events in watchfiles.awatch(
            watched, debounce=debounce_ms, step=10, recursive=True, force_polling=False
        ):
            paths = {Path(path) for _, path in events}
            changed: set[ServiceKey] = set()
            for path in sorted(paths):
                if self.root.is_file() and path != self.root:
                    continue
                if path.is_dir() or (not path.exists() and str(path) not in self.store.origins and path.suffix == ""):
                    # A directory appeared or vanished: rescan everything below the root.
                    changed |= self.load_all()
                    continue
                if self._wanted(path):
                    changed |= self.load(path)
            if changed:
                yield changed
            await asyncio.sleep(0)

    def _wanted(self, path: Path) -> bool:
        if self.root.is_file():
            return path == self.root
        try:
            return is_manifest(path.relative_to(self.root))
        except ValueError:
            return False
