"""ManifestSource: which files are read, what a bad file or object does, and the
watcher picking up edits, new files and deletions. Real files in tmp dirs.

Watch tests wait for a change with a bound (WAIT seconds): they are not timing
tests, the bound only turns a hang into a failure.

Address plan: see yamlcases.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from dataplane.model import ServiceKey
from dataplane.sync.manifests import ManifestSource, is_manifest, read_documents
from dataplane.sync.reader import Limits
from dataplane.sync.store import Store

WAIT = 5.0


def service(name: str, ip: str, port: int = 80, namespace: str = "shop") -> str:
    return f"""apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {namespace}
spec:
  clusterIP: {ip}
  ports:
  - name: http
    port: {port}
    protocol: TCP
    targetPort: 8080
  selector:
    app: {name}
"""


def key(name: str, namespace: str = "shop") -> ServiceKey:
    return ServiceKey(namespace, name)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def loaded(source: ManifestSource) -> dict[ServiceKey, int]:
    """Each Service served, with its first port: enough to see an edit land."""
    return {k: state.service.ports[0].port for k, state in source.store.snapshot().services.items()}


@pytest.mark.parametrize(
    "relative, wanted",
    [
        pytest.param("web.yaml", True, id="yaml"),
        pytest.param("web.yml", True, id="yml"),
        pytest.param("web.json", True, id="json"),
        pytest.param("team-a/apps/web.yaml", True, id="nested"),
        pytest.param("web.YAML", False, id="suffix-is-case-sensitive"),
        pytest.param("README.md", False, id="markdown"),
        pytest.param("web.yaml.bak", False, id="backup"),
        pytest.param("web.txt", False, id="text"),
        pytest.param("4913", False, id="vim-write-probe"),
        pytest.param(".web.yaml", False, id="dotfile"),
        pytest.param(".web.yaml.swp", False, id="vim-swap"),
        pytest.param(".#web.yaml", False, id="emacs-lock"),
        pytest.param("#web.yaml#", False, id="emacs-autosave"),
        pytest.param("web.yaml~", False, id="backup-tilde"),
        pytest.param("~web.yaml", False, id="leading-tilde"),
        pytest.param(".git/objects/web.yaml", False, id="inside-dot-directory"),
        pytest.param("team-a/.cache/web.yaml", False, id="inside-nested-dot-directory"),
    ],
)
def test_which_files_are_manifests(relative, wanted):
    assert is_manifest(Path(relative)) is wanted


def test_directory_is_read_recursively_and_only_manifests(tmp_path):
    write(tmp_path / "web.yaml", service("web", "10.96.0.10"))
    write(tmp_path / "team-a" / "api.yml", service("api", "10.96.0.11"))
    write(tmp_path / "team-a" / "deep" / "er" / "db.json", json.dumps({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.12", "ports": [{"name": "http", "port": 5432}]},
    }))
    for ignored in ("notes.txt", ".hidden.yaml", ".web.yaml.swp", "web.yaml~", ".git/x.yaml", "team-a/#x.yaml#"):
        write(tmp_path / ignored, service("ignored", "10.96.0.99"))
    source = ManifestSource(tmp_path, Store())
    assert [p.relative_to(tmp_path).as_posix() for p in source.files()] == ["team-a/api.yml", "team-a/deep/er/db.json", "web.yaml"]
    assert source.load_all() == {key("web"), key("api"), key("db")}
    assert loaded(source) == {key("web"): 80, key("api"): 80, key("db"): 5432}
    assert source.errors == {str(p): [] for p in source.files()}


def test_json_list_and_yaml_multi_document(tmp_path):
    write(tmp_path / "list.json", json.dumps({
        "apiVersion": "v1", "kind": "List",
        "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "shop"}, "spec": {"clusterIP": "10.96.0.21", "ports": [{"port": 80}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b", "namespace": "shop"}, "spec": {"clusterIP": "10.96.0.22", "ports": [{"port": 81}]}},
        ],
    }))
    write(tmp_path / "multi.yaml", service("c", "10.96.0.23", 82) + "---\n" + service("d", "10.96.0.24", 83) + "...\n")
    write(tmp_path / "empty.json", "")
    source = ManifestSource(tmp_path, Store())
    source.load_all()
    assert loaded(source) == {key("a"): 80, key("b"): 81, key("c"): 82, key("d"): 83}


def test_single_file_root(tmp_path):
    path = write(tmp_path / "all.yaml", service("web", "10.96.0.10"))
    write(tmp_path / "neighbour.yaml", service("api", "10.96.0.11"))
    source = ManifestSource(path, Store())
    assert source.files() == [path]
    assert source.load_all() == {key("web")}


def test_missing_root_serves_nothing(tmp_path):
    source = ManifestSource(tmp_path / "nope", Store())
    assert (source.files(), source.load_all()) == ([], set())


def test_relative_root_gives_absolute_origins(tmp_path, monkeypatch):
    write(tmp_path / "manifests" / "web.yaml", service("web", "10.96.0.10"))
    monkeypatch.chdir(tmp_path)
    source = ManifestSource(Path("manifests"), Store())
    source.load_all()
    assert source.store.origins == {str(tmp_path / "manifests" / "web.yaml")}


def test_invalid_object_is_skipped_alone_and_reported_with_file_and_name(tmp_path, caplog):
    path = write(tmp_path / "shop.yaml", service("web", "10.96.0.10") + "---\n" + service("bad", "10.96.0.11", port=0) + "---\n" + service("api", "10.96.0.12"))
    source = ManifestSource(tmp_path, Store())
    with caplog.at_level(logging.ERROR):
        assert source.load_all() == {key("web"), key("api")}
    problem = f"{path}: Service shop/bad: spec.ports[0].port: must be between 1 and 65535, got 0"
    assert source.errors == {str(path): [problem]}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [f"skipping invalid object: {problem}"]


def test_file_that_stops_parsing_keeps_its_last_good_content(tmp_path, caplog):
    path = write(tmp_path / "web.yaml", service("web", "10.96.0.10"))
    write(tmp_path / "api.yaml", service("api", "10.96.0.11"))
    source = ManifestSource(tmp_path, Store())
    source.load_all()
    write(path, service("web", "10.96.0.10", port=81) + "  ports: [unclosed\n")
    with caplog.at_level(logging.ERROR):
        assert source.load(path) == set()
    assert loaded(source) == {key("web"): 80, key("api"): 80}
    (error,) = source.errors[str(path)]
    assert error.startswith(f"{path}: does not parse: ") and "\n" not in error
    assert "keeping its last good content" in caplog.text and str(path) in caplog.text
    # Fixed again: the new content is served and the error is gone.
    write(path, service("web", "10.96.0.10", port=81))
    assert source.load(path) == {key("web")}
    assert loaded(source)[key("web")] == 81 and source.errors[str(path)] == []


@pytest.mark.parametrize(
    "name, content",
    [
        pytest.param("bad.yaml", "kind: Service\nmetadata: {name: web\n", id="yaml-syntax"),
        pytest.param("bad.yaml", "a: b\n\tc: d\n", id="yaml-tab"),
        pytest.param("bad.json", '{"kind": "Service",', id="json-truncated"),
        pytest.param("bad.json", "kind: Service\n", id="yaml-in-a-json-file"),
    ],
)
def test_file_that_never_parsed_loads_nothing_and_keeps_the_rest(tmp_path, name, content):
    path = write(tmp_path / name, content)
    write(tmp_path / "web.yaml", service("web", "10.96.0.10"))
    source = ManifestSource(tmp_path, Store())
    assert source.load_all() == {key("web")}
    assert str(path) not in source.store.origins
    assert source.errors[str(path)][0].startswith(f"{path}: does not parse")
    with pytest.raises(ValueError, match="does not parse"):
        read_documents(path)


def test_file_that_is_not_utf8_keeps_its_last_good_content(tmp_path):
    path = write(tmp_path / "web.yaml", service("web", "10.96.0.10"))
    source = ManifestSource(tmp_path, Store())
    source.load_all()
    path.write_bytes(b"kind: Service\nmetadata: {name: \xff\xfe}\n")
    assert source.load(path) == set()
    assert loaded(source) == {key("web"): 80}


def test_deleted_file_withdraws_its_objects(tmp_path):
    web = write(tmp_path / "web.yaml", service("web", "10.96.0.10"))
    write(tmp_path / "sub" / "api.yaml", service("api", "10.96.0.11"))
    source = ManifestSource(tmp_path, Store())
    source.load_all()
    web.unlink()
    assert source.load_all() == {key("web")}
    shutil.rmtree(tmp_path / "sub")
    assert source.load_all() == {key("api")}
    assert loaded(source) == {} and source.store.origins == frozenset() and source.errors == {}


def test_rescan_of_changed_files_only(tmp_path):
    web = write(tmp_path / "web.yaml", service("web", "10.96.0.10"))
    api = write(tmp_path / "api.yaml", service("api", "10.96.0.11"))
    source = ManifestSource(tmp_path, Store())
    source.load_all()
    # A different size, so the change shows even if the clock has not ticked since the load.
    write(web, service("web", "10.96.0.10", port=8080))
    write(tmp_path / "new.yaml", service("new", "10.96.0.12"))
    api.unlink()
    assert source.load_all(only_changed=True) == {key("web"), key("new"), key("api")}
    assert loaded(source) == {key("web"): 8080, key("new"): 80}


# --- watch(): the running source ---------------------------------------------------------------


async def until(changes: AsyncIterator[set[ServiceKey]], done: Callable[[], bool]) -> set[ServiceKey]:
    """Collects the change sets the watcher yields until `done()`; fails after WAIT seconds."""
    seen: set[ServiceKey] = set()

    async def collect() -> None:
        while not done():
            seen.update(await anext(changes))

    try:
        await asyncio.wait_for(collect(), WAIT)
    except TimeoutError:
        pytest.fail(f"no such change within {WAIT} s; saw {seen}")
    return seen


def run_watching(source: ManifestSource, scenario: Callable[[AsyncIterator[set[ServiceKey]]], object]) -> None:
    async def main() -> None:
        changes = source.watch(debounce_ms=20)
        try:
            await scenario(changes)
        finally:
            await changes.aclose()

    asyncio.run(main())


def test_watch_picks_up_an_edit_a_new_file_and_a_deletion(tmp_path):
    web = write(tmp_path / "web.yaml", service("web", "10.96.0.10"))
    write(tmp_path / "api.yaml", service("api", "10.96.0.11"))
    source = ManifestSource(tmp_path, Store())
    source.load_all()

    async def scenario(changes):
        write(web, service("web", "10.96.0.10", port=8080))
        assert await until(changes, lambda: loaded(source).get(key("web")) == 8080) == {key("web")}

        write(tmp_path / "team-b" / "db.yml", service("db", "10.96.0.12", port=5432))
        assert await until(changes, lambda: key("db") in loaded(source)) == {key("db")}

        web.unlink()
        assert await until(changes, lambda: key("web") not in loaded(source)) == {key("web")}

    run_watching(source, scenario)
    assert loaded(source) == {key("api"): 80, key("db"): 5432}


def test_watch_keeps_last_good_content_of_a_broken_edit(tmp_path):
    web = write(tmp_path / "web.yaml", service("web", "10.96.0.10"))
    source = ManifestSource(tmp_path, Store())
    source.load_all()

    async def scenario(changes):
        write(web, "kind: Service\nmetadata: {name: web\n")
        # The broken file changes no Service, so wait for the error, then for a later good edit.
        write(tmp_path / "marker.yaml", service("marker", "10.96.0.13"))
        await until(changes, lambda: key("marker") in loaded(source))
        assert source.errors[str(web)][0].startswith(f"{web}: does not parse")
        assert loaded(source)[key("web")] == 80

    run_watching(source, scenario)


def test_watch_ignores_editor_temporaries(tmp_path):
    source = ManifestSource(tmp_path, Store())
    source.load_all()

    async def scenario(changes):
        for name in (".web.yaml.swp", "web.yaml~", ".#web.yaml", "4913", "notes.txt"):
            write(tmp_path / name, service("ghost", "10.96.0.66"))
        write(tmp_path / "web.yaml", service("web", "10.96.0.10"))
        assert await until(changes, lambda: key("web") in loaded(source)) == {key("web")}

    run_watching(source, scenario)
    assert source.store.origins == {str(tmp_path / "web.yaml")}


def test_watch_follows_directories_created_and_moved_away(tmp_path):
    outside = tmp_path / "outside"
    root = tmp_path / "root"
    write(root / "web.yaml", service("web", "10.96.0.10"))
    source = ManifestSource(root, Store())
    source.load_all()

    async def scenario(changes):
        # A directory built elsewhere and moved in: its files have no events of their own.
        write(outside / "apps.d" / "api.yaml", service("api", "10.96.0.11"))
        os.rename(outside / "apps.d", root / "apps.d")
        assert await until(changes, lambda: key("api") in loaded(source)) == {key("api")}
        os.rename(root / "apps.d", outside / "apps.d")
        assert await until(changes, lambda: key("api") not in loaded(source)) == {key("api")}

    run_watching(source, scenario)
    assert source.store.origins == {str(root / "web.yaml")}


def test_watch_single_file_root_ignores_its_neighbours(tmp_path):
    path = write(tmp_path / "all.yaml", service("web", "10.96.0.10"))
    source = ManifestSource(path, Store())
    source.load_all()

    async def scenario(changes):
        write(tmp_path / "neighbour.yaml", service("api", "10.96.0.11"))
        write(path, service("web", "10.96.0.10", port=8080))
        assert await until(changes, lambda: loaded(source).get(key("web")) == 8080) == {key("web")}

    run_watching(source, scenario)
    assert loaded(source) == {key("web"): 8080}


def test_watch_with_a_relative_root(tmp_path, monkeypatch):
    write(tmp_path / "manifests" / "web.yaml", service("web", "10.96.0.10"))
    monkeypatch.chdir(tmp_path)
    source = ManifestSource(Path("manifests"), Store())
    source.load_all()

    async def scenario(changes):
        write(tmp_path / "manifests" / "web.yaml", service("web", "10.96.0.10", port=8080))
        assert await until(changes, lambda: loaded(source).get(key("web")) == 8080) == {key("web")}

    run_watching(source, scenario)
    assert source.store.origins == {str(tmp_path / "manifests" / "web.yaml")}


def test_watch_catches_an_edit_made_before_it_started(tmp_path):
    web = write(tmp_path / "web.yaml", service("web", "10.96.0.10"))
    source = ManifestSource(tmp_path, Store())
    source.load_all()
    # Between the first load and the watcher's start: no event will ever report these.
    write(web, service("web", "10.96.0.10", port=8080))
    write(tmp_path / "api.yaml", service("api", "10.96.0.11"))

    async def scenario(changes):
        done = lambda: loaded(source).get(key("web")) == 8080 and key("api") in loaded(source)  # noqa: E731
        assert await until(changes, done) == {key("web"), key("api")}

    run_watching(source, scenario)


def test_watch_follows_a_configmap_volume_update(tmp_path):
    # Kubernetes' atomic writer: web.yaml -> ..data/web.yaml, ..data -> ..<stamp>; an update writes a new
    # stamped directory and renames a fresh ..data link over the old one. Only the rename has an event.
    write(tmp_path / "..2026_01" / "web.yaml", service("web", "10.96.0.10"))
    (tmp_path / "..data").symlink_to("..2026_01")
    (tmp_path / "web.yaml").symlink_to("..data/web.yaml")
    source = ManifestSource(tmp_path, Store())
    source.load_all()

    async def scenario(changes):
        write(tmp_path / "..2026_02" / "web.yaml", service("web", "10.96.0.10", port=8080))
        (tmp_path / "..data_tmp").symlink_to("..2026_02")
        os.rename(tmp_path / "..data_tmp", tmp_path / "..data")
        assert await until(changes, lambda: loaded(source).get(key("web")) == 8080) == {key("web")}

    run_watching(source, scenario)


def test_watch_coalesces_a_burst_into_one_batch(tmp_path):
    source = ManifestSource(tmp_path, Store())
    source.load_all()
    names = [f"svc-{i}" for i in range(30)]

    async def scenario(changes):
        for i, name in enumerate(names):  # no await in between: the events queue up in the kernel meanwhile
            write(tmp_path / f"{name}.yaml", service(name, f"10.96.1.{i + 1}"))
        assert await asyncio.wait_for(anext(changes), WAIT) == {key(name) for name in names}

    run_watching(source, scenario)


def test_watch_waits_for_a_file_still_being_written(tmp_path):
    path = tmp_path / "web.yaml"
    source = ManifestSource(tmp_path, Store())
    source.load_all()
    text = service("web", "10.96.0.10")
    reads = []
    load = source.load
    source.load = lambda changed: reads.append(changed) or load(changed)  # type: ignore[method-assign]

    async def main() -> None:
        changes = source.watch(debounce_ms=2000, settle_ms=1000)  # generous: a loaded machine stays in bounds
        try:
            watching = asyncio.ensure_future(until(changes, lambda: key("web") in loaded(source)))
            await asyncio.sleep(0.1)  # the watches are in place
            with open(path, "w") as stream:  # modified, not yet closed: the batch waits for the close
                stream.write(text[:20])
                stream.flush()
                await asyncio.sleep(0.05)
                stream.write(text[20:])
            await watching
        finally:
            await changes.aclose()

    asyncio.run(main())
    assert reads == [path]  # read once, complete: never half-written


def test_watch_follows_files_written_later_in_a_directory_made_after_it_started(tmp_path):
    source = ManifestSource(tmp_path, Store())
    source.load_all()

    async def scenario(changes):
        write(tmp_path / "marker.yaml", service("marker", "10.96.0.13"))
        await until(changes, lambda: key("marker") in loaded(source))  # the watcher runs
        (tmp_path / "team-c").mkdir()
        write(tmp_path / "marker.yaml", service("marker", "10.96.0.13", port=81))
        await until(changes, lambda: loaded(source)[key("marker")] == 81)  # the directory's event is handled
        write(tmp_path / "team-c" / "db.yaml", service("db", "10.96.0.12"))  # only its own watch reports this
        assert await until(changes, lambda: key("db") in loaded(source)) == {key("db")}

    run_watching(source, scenario)


def test_watch_follows_a_root_replaced_by_rename_or_deleted_and_made_again(tmp_path):
    root = tmp_path / "manifests"
    write(root / "web.yaml", service("web", "10.96.0.10"))
    source = ManifestSource(root, Store())
    source.load_all()

    async def scenario(changes):
        # A folder swapped whole (built beside it, renamed over): the old one's watches follow it away.
        write(tmp_path / "next" / "web.yaml", service("web", "10.96.0.10", port=8080))
        os.rename(root, tmp_path / "previous")
        os.rename(tmp_path / "next", root)
        await until(changes, lambda: loaded(source).get(key("web")) == 8080)
        write(root / "api.yaml", service("api", "10.96.0.11"))  # only a watch on the new folder reports this
        assert await until(changes, lambda: key("api") in loaded(source)) == {key("api")}
        write(tmp_path / "previous" / "web.yaml", service("web", "10.96.0.10", port=9999))  # not ours any more

        shutil.rmtree(root)
        await until(changes, lambda: not loaded(source))
        write(root / "db.yaml", service("db", "10.96.0.12"))
        assert await until(changes, lambda: key("db") in loaded(source)) == {key("db")}

    run_watching(source, scenario)
    assert loaded(source) == {key("db"): 80}


def test_watch_never_withdraws_a_file_saved_by_rename(tmp_path):
    # vim's default save (backupcopy=auto on a plain file): the file is renamed to its backup, then
    # written anew. For the moment in between it is missing; its Service must not be withdrawn.
    web = write(tmp_path / "web.yaml", service("web", "10.96.0.10"))
    source = ManifestSource(tmp_path, Store())
    source.load_all()
    served: list[bool] = []

    async def scenario(changes):
        async def record():
            async for _ in changes:
                served.append(key("web") in loaded(source))

        recording = asyncio.ensure_future(record())
        await asyncio.sleep(0.1)  # the watches are in place
        os.rename(web, tmp_path / "web.yaml~")
        await asyncio.sleep(0.002)  # the watcher has seen the rename, and nothing after it
        write(web, service("web", "10.96.0.10", port=8080))
        deadline = asyncio.get_running_loop().time() + WAIT
        while loaded(source).get(key("web")) != 8080 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        recording.cancel()
        await asyncio.gather(recording, return_exceptions=True)

    run_watching(source, scenario)
    assert loaded(source) == {key("web"): 8080}
    assert served and all(served), served


def test_watch_with_allow_links_follows_edits_in_a_linked_directory(tmp_path):
    # --allow-links reads manifests through a symlinked directory; its edits must have events too.
    root, shared_dir = tmp_path / "root", tmp_path / "shared"
    write(shared_dir / "web.yaml", service("web", "10.96.0.10"))
    root.mkdir()
    (root / "team").symlink_to(shared_dir)
    source = ManifestSource(root, Store(), Limits(allow_links=True))
    source.load_all()
    assert key("web") in loaded(source)

    async def scenario(changes):
        write(root / "marker.yaml", service("marker", "10.96.0.13"))
        await until(changes, lambda: key("marker") in loaded(source))  # the watcher runs
        write(shared_dir / "web.yaml", service("web", "10.96.0.10", port=8080))
        assert await until(changes, lambda: loaded(source).get(key("web")) == 8080) == {key("web")}

    run_watching(source, scenario)


def test_watch_follows_a_root_that_is_a_symlink_swapped_to_another_directory(tmp_path):
    # The release-directory idiom: manifests -> releases/1, then a new link renamed over it.
    write(tmp_path / "releases" / "1" / "web.yaml", service("web", "10.96.0.10"))
    write(tmp_path / "releases" / "2" / "web.yaml", service("web", "10.96.0.10", port=8080))
    root = tmp_path / "manifests"
    root.symlink_to(tmp_path / "releases" / "1")
    source = ManifestSource(root, Store())
    source.load_all()

    async def scenario(changes):
        write(root / "marker.yaml", service("marker", "10.96.0.13"))
        await until(changes, lambda: key("marker") in loaded(source))  # the watcher runs
        (tmp_path / "next").symlink_to(tmp_path / "releases" / "2")
        os.rename(tmp_path / "next", root)
        await until(changes, lambda: loaded(source).get(key("web")) == 8080 and key("marker") not in loaded(source))
        write(root / "api.yaml", service("api", "10.96.0.11"))  # only a watch on releases/2 reports this
        assert await until(changes, lambda: key("api") in loaded(source)) == {key("api")}

    run_watching(source, scenario)
