"""One bad file never takes the daemon down (issue 13): FIFOs, devices, symlinks out of the folder,
endless, huge, deeply nested and YAML-bomb files are each refused alone, with an error naming the
file, while a good Service next to them keeps loading. Real files, real FIFOs, the real parser
process (it is killed by the deep-nesting SIGSEGV in some of these tests, and restarted).

Address plan: see yamlcases.py.
"""

from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from dataplane.model import ServiceKey
from dataplane.sync.manifests import ManifestSource
from dataplane.sync.reader import Limits, ParserProcess, Refused, nesting_depth, read_documents
from dataplane.sync.store import Store

GOOD = """apiVersion: v1
kind: Service
metadata: {name: good, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
"""
GOOD_KEY = ServiceKey("shop", "good")


@contextmanager
def bounded(seconds: int = 20):
    """Turns a hang (the FIFO bug blocked forever) into a failure."""
    def expired(*_):
        raise AssertionError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def folder(tmp_path: Path) -> Path:
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "good.yaml").write_text(GOOD)
    return root


def load(root: Path, limits: Limits = Limits()) -> ManifestSource:
    source = ManifestSource(root, Store(), limits)
    with bounded():
        source.load_all()
    return source


def refusal(source: ManifestSource, path: Path) -> str:
    """The one problem reported for `path`; the good Service loaded anyway."""
    assert GOOD_KEY in source.store.snapshot().services
    (problem,) = source.errors[str(path)]
    assert problem.startswith(f"{path}: "), problem
    return problem


def test_a_fifo_named_like_a_manifest_is_refused_without_blocking(tmp_path):
    root = folder(tmp_path)
    fifo = root / "blocked.yaml"
    os.mkfifo(fifo)
    source = load(root)
    assert "is a FIFO, not a regular file" in refusal(source, fifo)
    with bounded():
        assert source.load(fifo) == set()  # what a watch event for it does


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_symlink_to_an_endless_device_is_not_followed(tmp_path, device):
    root = folder(tmp_path)
    (root / "endless.yaml").symlink_to(device)
    assert f"is a symlink to {device}, outside" in refusal(load(root), root / "endless.yaml")
    # Even where links are allowed, a device is not a file: it is never read.
    allowed = load(root, Limits(allow_links=True))
    assert "is a character device, not a regular file" in refusal(allowed, root / "endless.yaml")


def test_symlinks_inside_the_folder_are_followed_and_outside_only_when_allowed(tmp_path):
    root = folder(tmp_path)
    # A ConfigMap volume: name.yaml -> ..data/name.yaml -> ..2024_01_01/name.yaml, all inside.
    (root / "..2024_01_01").mkdir()
    (root / "..2024_01_01" / "api.yaml").write_text(GOOD.replace("good", "api").replace("10.96.0.10", "10.96.0.11"))
    (root / "..data").symlink_to("..2024_01_01")
    (root / "api.yaml").symlink_to("..data/api.yaml")
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text(GOOD.replace("good", "far").replace("10.96.0.10", "10.96.0.12"))
    (root / "far.yaml").symlink_to(outside)
    linked_dir = tmp_path / "team"
    linked_dir.mkdir()
    (linked_dir / "db.yaml").write_text(GOOD.replace("good", "db").replace("10.96.0.10", "10.96.0.13"))
    (root / "team").symlink_to(linked_dir)

    source = load(root)
    assert set(source.store.snapshot().services) == {GOOD_KEY, ServiceKey("shop", "api")}
    assert "outside" in refusal(source, root / "far.yaml")
    allowed = load(root, Limits(allow_links=True))
    assert set(allowed.store.snapshot().services) == {GOOD_KEY} | {ServiceKey("shop", k) for k in ("api", "far", "db")}


def test_a_file_larger_than_the_limit_is_refused(tmp_path):
    root = folder(tmp_path)
    big = root / "big.yaml"
    big.write_text(GOOD.replace("good", "big").replace("10.96.0.10", "10.96.0.20") + "#" * 5000 + "\n")
    problem = refusal(load(root, Limits(max_bytes=4096)), big)
    assert f"is {big.stat().st_size} bytes, more than the limit of 4096" in problem


@pytest.mark.parametrize("name, text, why", [
    # yaml_rs overflows its stack here (SIGSEGV): the parser process dies, the daemon does not.
    pytest.param("deep.yaml", "- " * 50_000 + "x\n", "killed the parser process (SIGSEGV", id="block-nesting-segfault"),
    pytest.param("deep.json", "[" * 100_000, "nests too deep", id="json-brackets-recursion"),
    pytest.param("deep-ok.json", "[" * 150 + "]" * 150, "nests deeper than 100 levels", id="json-deeper-than-limit"),
    pytest.param("deep-ok.yaml", "- " * 150 + "x\n", "nests deeper than 100 levels", id="yaml-deeper-than-limit"),
    pytest.param("flow.yaml", "a: " + "[" * 100_000, "does not parse", id="yaml-flow-nesting"),
    pytest.param("laughs.yaml", "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")),
        "alias replay limit exceeded", id="billion-laughs"),
    pytest.param("binary.yaml", "\udcff", "is not UTF-8", id="not-utf8"),
])
def test_a_file_that_would_crash_or_exhaust_the_parser_is_refused_alone(tmp_path, caplog, name, text, why):
    root = folder(tmp_path)
    path = root / name
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    (root / "zz-after.yaml").write_text(GOOD.replace("good", "after").replace("10.96.0.10", "10.96.0.30"))
    with caplog.at_level(logging.ERROR):
        source = load(root)
    assert why in refusal(source, path)
    assert ServiceKey("shop", "after") in source.store.snapshot().services, "the files after it are still read"
    assert [r.getMessage() for r in caplog.records if str(path) in r.getMessage()] == [source.errors[str(path)][0]]


def test_the_parser_process_is_restarted_after_a_crash_and_keeps_the_last_good_content(tmp_path):
    root = folder(tmp_path)
    source = load(root)
    starts = source.parser.starts
    (root / "good.yaml").write_text("- " * 50_000 + "x\n")
    with bounded():
        assert source.load(root / "good.yaml") == set()
    assert GOOD_KEY in source.store.snapshot().services  # its last good content
    assert "keeping its last good content" in source.errors[str(root / "good.yaml")][0]
    (root / "good.yaml").write_text(GOOD.replace("port: 80,", "port: 81,"))
    with bounded():
        assert source.load(root / "good.yaml") == {GOOD_KEY}
    assert source.parser.starts == starts + 1
    assert source.errors[str(root / "good.yaml")] == []


def test_a_parse_that_outlasts_the_timeout_is_refused(tmp_path):
    root = folder(tmp_path)
    slow = root / "slow.yaml"
    slow.write_text("".join(f"- {{name: n{i}, port: {i}}}\n" for i in range(200_000)))
    source = load(root, Limits(timeout=0.05))
    assert "took longer than the parse timeout" in refusal(source, slow)


def test_the_parser_process_never_outlives_its_owner(tmp_path):
    root = folder(tmp_path)
    parser = ParserProcess(root)
    assert [type(d) for _, d in parser.read([root / "good.yaml"])] == [list]
    child = parser._child
    del parser
    assert child.poll() is not None


def test_in_process_helpers(tmp_path):
    assert nesting_depth({"a": [{"b": [1]}]}, 100) == 4 and nesting_depth("x", 100) == 0
    path = tmp_path / "x.yaml"
    path.write_text("a: 1\na: 2\n")
    with pytest.raises(Refused, match="duplicate mapping key"):
        read_documents(path, tmp_path, Limits())


def test_a_document_that_is_a_list_is_one_problem_not_one_per_item(tmp_path):
    root = folder(tmp_path)
    listed = root / "listed.yaml"
    listed.write_text("".join(f"- {i}\n" for i in range(100_000)))
    source = load(root)
    assert source.errors[str(listed)] == [f"{listed}: document <none>: <document>: is not a mapping"]


def test_a_file_of_countless_bad_documents_is_reported_with_a_bound(tmp_path, caplog):
    root = folder(tmp_path)
    many = root / "many.yaml"
    many.write_text("---\n".join(f"{i}\n" for i in range(5000)))
    with caplog.at_level(logging.ERROR):
        source = load(root)
    problems = source.errors[str(many)]
    assert len(problems) == 101 and problems[-1] == f"{many}: 4900 more problems not shown"
    assert len(caplog.records) == 101


def test_only_served_kinds_cross_to_the_daemon(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    path = root / "mixed.yaml"
    path.write_text("---\n".join([
        "kind: ConfigMap\nmetadata: {name: big}\ndata: {blob: '" + "x" * 100_000 + "'}\n",
        "kind: List\nitems:\n- {kind: Secret, metadata: {name: s}}\n- 42\n- " + GOOD.replace("\n", "\n  ") + "\n",
        "[1, 2, 3]\n",
    ]))
    parser = ParserProcess(root)
    ((_, documents),) = parser.read([path])
    parser.close()
    assert documents[0] is None and documents[2] == "<not a mapping>"
    assert [item if isinstance(item, str) else item["kind"] for item in documents[1]["items"]] == [
        "<not a mapping>", "Service"]
