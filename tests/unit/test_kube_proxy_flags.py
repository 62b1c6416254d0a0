"""Every kube-proxy flag has a status in the README's table, and every one it accepts parses.

The flags are tests/kubeproxy/flags-v1.34.txt: kube-proxy's at kubernetes commit 008b365,
each with a value in kube-proxy's syntax. The README's table ("### kube-proxy's flags") names
each flag in its first column; the second says what it does here. A flag whose status starts
with "not accepted" or "not applicable" must be refused (exit 2); every other one must parse.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dataplane import cli

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ROOT / "tests" / "kubeproxy" / "flags-v1.34.txt"
README = ROOT / "README.md"
REFUSED = ("not accepted", "not applicable")


def kube_proxy_flags() -> dict[str, tuple[str, str]]:
    """flag -> (pflag type, a value in kube-proxy's syntax)."""
    found = {}
    for line in FLAGS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            flag, kind, value = line.split()
            found[flag] = (kind, value)
    return found


def readme_table() -> dict[str, str]:
    """flag -> its status cell, from the README's table of kube-proxy's flags."""
    text = README.read_text()
    section = text.split("### kube-proxy's flags", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "the README has no table of kube-proxy's flags"
    table = {}
    for row in rows:
        first, status = row.strip("|").split("|", 2)[:2]
        ours = first.split("(ours also", 1)  # our own spellings, in parentheses, are not kube-proxy's
        for flag in re.findall(r"`(-{1,2}[a-z][\w-]*)`", ours[0]):
            assert flag not in table, f"{flag} is in the README's table twice"
            table[flag] = status.strip()
    return table


def test_the_readme_table_gives_every_kube_proxy_flag_a_status_and_invents_none():
    flags, table = kube_proxy_flags(), readme_table()
    assert len(flags) == 59  # the file is whole
    missing = sorted(set(flags) - set(table) - {"--help"})
    invented = sorted(set(table) - set(flags) - {"-h", "--help"})
    assert not missing, f"kube-proxy flags without a status in the README: {missing}"
    assert not invented, f"flags in the README's table that kube-proxy does not have: {invented}"


ACCEPTED = [flag for flag, status in readme_table().items()
            if flag in kube_proxy_flags() and not status.startswith(REFUSED)]
REFUSED_FLAGS = [flag for flag, status in readme_table().items() if status.startswith(REFUSED)]


@pytest.mark.parametrize("flag", ACCEPTED)
def test_each_accepted_flag_parses_in_kube_proxys_syntax(flag):
    kind, value = kube_proxy_flags()[flag]
    parser = cli._parser()
    parser.parse_args(["run", f"{flag}={value}"])
    if kind == "bool":  # pflag's bare spelling too
        parser.parse_args(["run", flag])
    else:  # and the value as the next argument
        parser.parse_args(["run", flag, value])


@pytest.mark.parametrize("flag", REFUSED_FLAGS)
def test_each_flag_the_readme_calls_not_accepted_is_refused(flag, capsys):
    value = kube_proxy_flags()[flag][1]
    with pytest.raises(SystemExit) as exit_:
        cli._parser().parse_args(["run", f"{flag}={value}"])
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("argv, verbosity", [
    (["-v=4"], 4), (["-v", "3"], 3), (["--v=2"], 2), (["--v", "5"], 5), (["-v"], 0),
    (["-v2"], 2),  # pflag's shorthand with its value attached, as klog's -v is registered
])
def test_klogs_short_verbosity_spelling(argv, verbosity):
    """kube-proxy's -v is klog's level (-v=4, -v 4); ours alone (-v, -vv) still counts."""
    args = cli._parser().parse_args(["run", *cli.klog_verbosity(argv)])
    assert args.v == verbosity
    assert cli._parser().parse_args(["run", *cli.klog_verbosity(["-vv"])]).verbose == 2
