"""manifests_watch.Inotify on real inotify instances: what a lost event or a kernel limit does.

Each test reads the queue itself (no event loop): what is queued when read() runs is what it sees.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dataplane.sync.manifests_watch import Inotify

REPO = Path(__file__).resolve().parents[2]


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


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a user namespace")
def test_the_watch_limit_is_an_error_naming_it_never_a_silent_gap(tmp_path):
    # A user namespace of our own gets its own max_inotify_watches: the root namespace's stays untouched.
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from dataplane.sync.manifests_watch import Inotify
        Path("/proc/sys/user/max_inotify_watches").write_text("1")
        root = Path({str(tmp_path)!r})
        notify = Inotify(root, recursive=True)  # the one watch allowed
        (root / "team-a").mkdir()
        try:
            notify.read({{}})
        except OSError as error:
            print("raised:", error)
        else:
            print("no error")
        notify.close()  # its watch is freed: a new instance gets the root's, not team-a's
        before = os.listdir("/proc/self/fd")
        try:
            Inotify(root, recursive=True)
        except OSError as error:
            print("raised:", error)
        else:
            print("no error")
        assert len(os.listdir("/proc/self/fd")) == len(before), "the failed instance's fd is left open"
    """)
    probe = subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here: {probe.stderr.decode().strip()}")
    done = subprocess.run(["unshare", "-U", "-r", sys.executable, "-c", script], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    for line in lines:
        assert line.startswith("raised:") and "max_user_watches" in line and "team-a" in line, line


def test_a_manifest_renamed_away_waits_a_temporary_renamed_over_one_does_not(tmp_path):
    web = tmp_path / "web.yaml"
    web.write_text("kind: Service\n")
    notify = Inotify(tmp_path, recursive=True, reads=lambda name: name.endswith(".yaml") and name[0] != ".")
    try:
        os.rename(web, tmp_path / "web.yaml~")  # an editor's save, first half: the manifest is missing
        seen: dict[str, bool] = {}
        notify.read(seen)
        assert seen == {str(web): False, str(tmp_path / "web.yaml~"): True}

        (tmp_path / ".web.yaml.tmp").write_text("kind: Service\n")  # an atomic writer's temporary
        os.rename(tmp_path / ".web.yaml.tmp", web)
        seen = {}
        notify.read(seen)
        assert seen == {str(web): True, str(tmp_path / ".web.yaml.tmp"): True}
    finally:
        notify.close()


def test_a_directory_moved_out_of_the_tree_is_no_longer_watched(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "team-a" / "apps").mkdir(parents=True)
    outside.mkdir()
    notify = Inotify(root, recursive=True)
    try:
        os.rename(root / "team-a", outside / "team-a")
        seen: dict[str, bool] = {}
        notify.read(seen)
        assert str(root / "team-a") in seen
        (outside / "team-a" / "web.yaml").write_text("kind: Service\n")  # not below the root any more
        (outside / "team-a" / "apps" / "db.yaml").write_text("kind: Service\n")
        seen = {}
        notify.read(seen)
        assert seen == {}  # before: reported as root/team-a/..., and its watches held until it was deleted
        assert sorted(notify._directories.values()) == [str(root)]
    finally:
        notify.close()


def test_following_links_watches_each_directory_once_and_links_made_later(tmp_path):
    root, shared, later = tmp_path / "root", tmp_path / "shared", tmp_path / "later"
    for directory in (root, shared, later):
        directory.mkdir()
    (root / "team").symlink_to(shared)
    (shared / "loop").symlink_to(shared)  # a cycle
    notify = Inotify(root, recursive=True, follow_links=True)
    try:
        assert sorted(notify._directories.values()) == [str(root), str(root / "team")]
        (root / "late").symlink_to(later)  # IN_CREATE of a link, without IN_ISDIR
        notify.read({})
        (later / "web.yaml").write_text("kind: Service\n")
        seen: dict[str, bool] = {}
        notify.read(seen)
        assert seen == {str(root / "late" / "web.yaml"): True}
    finally:
        notify.close()
