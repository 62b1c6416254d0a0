"""nat.interface.Interface is what Nftables and FakeNftables both are, checked by mypy, not by duck typing.

tests/unit/interface_conformance.py returns each class where the Protocol is
expected; mypy fails it when either misses a method or types one otherwise.
The second test proves the check has teeth, on a class that gets both wrong.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dataplane.nat.fake import FakeNftables
from dataplane.nat.interface import Interface
from dataplane.nat.nftables import Nftables

ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE = ROOT / "tests" / "unit" / "interface_conformance.py"
CHECKED = [CONFORMANCE, ROOT / "dataplane" / "nat" / "interface.py", ROOT / "dataplane" / "nat" / "fake"]


def _mypy(tmp_path: Path, *paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--cache-dir", str(tmp_path / "mypy-cache"),
         "--no-color-output", *map(str, paths)],
        cwd=ROOT, capture_output=True, text=True, check=False)


def test_both_implementations_are_the_interface_and_the_fake_type_checks(tmp_path: Path) -> None:
    done = _mypy(tmp_path, *CHECKED)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_missing_or_mistyped_method_fails_the_check(tmp_path: Path) -> None:
    broken = tmp_path / "broken_conformance.py"
    broken.write_text(CONFORMANCE.read_text() + '''
from dataplane.nat.ruleset import Transaction

class Partial(FakeNftables):
    def apply(self, tx: str) -> None:  # type: ignore[override]
        pass


class Missing:
    backend_name = "missing"

    def run(self, text: str, check_only: bool = False) -> str:
        return ""

    def apply(self, tx: Transaction) -> None:
        pass

    def list_objects(self, family: str, table: str) -> list[tuple[str, str]]:
        return []

    def generation(self) -> int | None:
        return None

    def delete_table(self, family: str, table: str) -> None:
        pass


def partial(nft: Partial) -> Interface:
    return nft


def missing(nft: Missing) -> Interface:
    return nft
''')
    done = _mypy(tmp_path, broken)
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'Following member(s) of "Partial" have conflicts' in done.stdout
    assert 'def apply(self, tx: str) -> None' in done.stdout
    assert re.search(r'"Missing" is missing following "Interface" protocol members?:\n.*note: +check\b', done.stdout)
    assert done.stdout.count("error:") == 2  # the real classes in the same module pass


MEMBERS = [name for name, _ in inspect.getmembers(Interface) if not name.startswith("_")]


@pytest.mark.parametrize("cls", [Nftables, FakeNftables], ids=lambda c: c.__name__)
def test_every_member_is_annotated_so_mypy_cannot_take_it_as_untyped(cls: type) -> None:
    """mypy treats an unannotated method as matching anything: this is what keeps the check above honest."""
    assert set(MEMBERS) == {"apply", "backend_name", "check", "counters", "delete_table", "generation", "list_objects", "run"}
    for name in MEMBERS:
        member = inspect.getattr_static(cls, name)
        if name == "backend_name":
            assert isinstance(member, (str, property))
            continue
        signature = inspect.signature(member)
        unannotated = [p.name for p in list(signature.parameters.values())[1:] if p.annotation is p.empty]
        assert not unannotated and signature.return_annotation is not signature.empty, f"{cls.__name__}.{name}"
