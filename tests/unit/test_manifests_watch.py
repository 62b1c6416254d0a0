"""manifests_watch.Inotify on real inotify instances: what a lost event or a kernel limit does.

Each test reads the queue itself (no event loop): what is queued when read() runs is what it sees.
"""

from __future__ import annotations

import os
from pathlib import Path

from dataplane.sync.manifests_watch import Inotify

def test_a_directory_made_while_the_queue_overflowed_is_watched_after_the_rescan(tmp_path):
    queue_size = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.touch()
    second.touch()
    notify = Inotify(tmp_path, recursive=True)
    try:
        for i in range(queue_size + 10):  # alternating names: the kernel merges only repeats of the last event
            os.utime(first if i % 2 else second)
        (tmp_path / "late").mkdir()  # its IN_CREATE is lost: the queue is full
        seen: dict[str, bool] = {}
        notify.read(seen)
        assert str(tmp_path) in seen  # the caller rescans
        (tmp_path / "late" / "db.yaml").write_text("kind: Service\n")
        seen = {}
        notify.read(seen)
        assert seen.get(str(tmp_path / "late" / "db.yaml")) is True
    finally:
        notify.close()
