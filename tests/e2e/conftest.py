"""Shared fixtures for end-to-end tests in network namespaces (see dataplane/lab).

A failing test that used the `daemon` fixture gets the tail of the daemon's
log in its report.

`lab` and `api` are the API-source tests' lab and stand-in API server
(kube_lab.py says what they hold); a module that needs other echo servers
defines its own `lab`, which takes precedence.
"""

from __future__ import annotations

import pytest

from dataplane.lab import Lab
from kube_lab import stand_in_api


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    daemon = getattr(item, "funcargs", {}).get("daemon")
    if report.failed and daemon is not None and hasattr(daemon, "log_tail"):
        report.sections.append(("dataplane log (tail)", daemon.log_tail(80)))


@pytest.fixture(scope="module")
def lab():
    """A lab with echo servers on TCP 80 and UDP 53 in each Pod."""
    with Lab.build() as lab:
        lab.start_echo(tcp=[80], udp=[53])
        yield lab


@pytest.fixture(scope="module")
def api(lab):
    """The stand-in API server in the lab's node namespace, holding this node's Node."""
    with stand_in_api(lab) as api:
        yield api
