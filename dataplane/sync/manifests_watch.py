"""Changes below a manifest folder, from inotify, read on the event loop.

Invariant: every path that may have changed since the last batch is in the next
batch, and a batch is yielded only once each file in it looks complete: its last
event closed a file written to or moved it in; a file still being written
(modified, not yet closed) or gone (deleted, moved out) holds the batch back for
`settle` seconds of quiet, at most `debounce`: an editor that saves by renaming
the file away and writing it anew leaves it missing for a moment, which must not
withdraw its Services. Only files the caller `reads` hold a batch back (a temporary
renamed over a manifest does not). Events that arrive while the caller works
on a batch queue in the kernel and make one batch (bursts coalesce). A queue
overflow reports the root, which the caller rescans.

watchfiles polled a shared set every few milliseconds from a thread: 10 ms steps
were 20 of the 40 ms a one-endpoint change took to go live (issue 14). Here the
loop wakes when the kernel has an event, and not otherwise.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import struct
from pathlib import Path
from typing import AsyncIterator, Callable

# <sys/inotify.h>
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x4000, 0x8000, 0x40000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
WATCHED = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
           | IN_DELETE_SELF | IN_MOVE_SELF)
COMPLETE = IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ISDIR
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name

_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    """One inotify instance watching a directory (and, `recursive`, the directories below it
    that are not hidden: manifests are never read from those; with `follow_links`, as
    `--allow-links` reads them, those reached through symlinks too)."""

    def __init__(self, root: Path, recursive: bool, reads: Callable[[str], bool] = lambda name: True,
                 follow_links: bool = False):
        self.root = root
        self.recursive = recursive
        self.follow_links = follow_links
        self.reads = reads  # file name -> whether the caller reads it: only those wait to look complete
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"inotify_init1: {os.strerror(error)}")
        self._directories: dict[int, str] = {}  # watch descriptor -> directory
        self._root_wd = -1
        try:
            self.add(str(root))
            # The root's parent, for the root's name alone: a root deleted or renamed away and then
            # made again (a folder, or a symlink to one, swapped whole by rename) is watched anew,
            # its old watches dropped.
            parent = os.path.dirname(str(root))
            self._parent_wd = _libc.inotify_add_watch(self.fd, os.fsencode(parent), IN_CREATE | IN_MOVED_TO) \
                if parent != str(root) else -1
            if not self._directories:
                error = ctypes.get_errno()
                raise OSError(error, f"cannot watch {root}: {os.strerror(error)}")
        except BaseException:
            os.close(self.fd)
            raise

    def add(self, directory: str) -> None:
        """Watches `directory` and, when recursive, the directories below it; gone ones are skipped."""
        pending = [directory]
        while pending:
            path = pending.pop()
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), WATCHED)
            if wd < 0:
                error = ctypes.get_errno()
                if error in (errno.ENOSPC, errno.ENOMEM):  # a directory unwatched would stop its updates unseen
                    raise OSError(error, f"cannot watch {path}: the inotify watch limit is reached "
                                         f"(sysctl fs.inotify.max_user_watches, per user)")
                continue  # vanished, or not a directory after all: its parent's events say what happened
            if wd in self._directories and self._directories[wd] != path and os.path.islink(path):
                continue  # a directory watched already, reached again through a link (maybe a cycle)
            self._directories[wd] = path
            if path == str(self.root):
                self._root_wd = wd
            if self.recursive:
                try:
                    with os.scandir(path) as entries:
                        pending += [entry.path for entry in entries if not entry.name.startswith(".")
                                    and entry.is_dir(follow_symlinks=self.follow_links)]
                except OSError:
                    pass

    def read(self, into: dict[str, bool]) -> None:
        """Adds path -> complete (see the module docstring) for every event queued now."""
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(data):
                wd, mask, _, size = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size:offset + _EVENT.size + size].rstrip(b"\0")
                offset += _EVENT.size + size
                if mask & IN_Q_OVERFLOW:
                    # Events were lost, a new directory's among them maybe: watch again what is there
                    # (a watched one keeps its descriptor), and the caller rescans the whole folder.
                    self.add(str(self.root))
                    into[str(self.root)] = True
                    continue
                if wd == self._parent_wd:
                    if name == os.fsencode(self.root.name):  # a directory, or a symlink to one swapped in
                        self._watch_root_again()
                        into[str(self.root)] = True
                    continue
                if wd == self._root_wd and mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                    self._watch_root_again()
                    # Gone: the rescan withdraws everything, unless a replacement comes within `settle`.
                    into[str(self.root)] = self.root.is_dir()
                    continue
                directory = self._directories.get(wd)
                if directory is None:
                    continue
                if mask & IN_IGNORED:
                    del self._directories[wd]
                    continue
                path = os.path.join(directory, os.fsdecode(name)) if name else directory
                if mask & IN_ISDIR and mask & IN_MOVED_FROM:
                    self._forget(path)  # its watches would follow it out; moved within, IN_MOVED_TO adds it again
                if mask & (IN_CREATE | IN_MOVED_TO) and self.recursive and not os.path.basename(path).startswith(".") \
                        and (mask & IN_ISDIR or self.follow_links and os.path.isdir(path)):  # a link has no IN_ISDIR
                    self.add(path)
                into[path] = bool(mask & COMPLETE) or not self.reads(os.path.basename(path))

    def _forget(self, directory: str) -> None:
        """Drops the watches of `directory` and of the directories below it."""
        below = directory + "/"
        for wd, path in list(self._directories.items()):
            if path == directory or path.startswith(below):
                _libc.inotify_rm_watch(self.fd, wd)
                del self._directories[wd]

    def _watch_root_again(self) -> None:
        """Drops every watch (they may follow the old root's directories elsewhere), then watches
        the root again if it is there; the caller rescans."""
        for wd in self._directories:
            _libc.inotify_rm_watch(self.fd, wd)  # EINVAL when already gone: nothing to do
        self._directories.clear()
        self._root_wd = -1
        self.add(str(self.root))

    def close(self) -> None:
        os.close(self.fd)


async def changes(root: Path, recursive: bool = True, settle: float = 0.005, debounce: float = 0.05,
                  reads: Callable[[str], bool] = lambda name: True,
                  follow_links: bool = False) -> AsyncIterator[set[str]]:
    """Yields an empty set once the watches are in place, then each batch of changed paths, forever."""
    notify = Inotify(root, recursive, reads, follow_links)
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(notify.fd, readable.set)
    try:
        yield set()
        while True:
            await readable.wait()
            readable.clear()
            pending: dict[str, bool] = {}
            notify.read(pending)
            give_up = loop.time() + debounce
            while not all(pending.values()) and loop.time() < give_up:
                try:
                    await asyncio.wait_for(readable.wait(), min(settle, max(0.0, give_up - loop.time())))
                except TimeoutError:
                    break  # quiet for `settle`: what is there is what there is
                readable.clear()
                notify.read(pending)
            if pending:
                yield set(pending)
    finally:
        loop.remove_reader(notify.fd)
        notify.close()
