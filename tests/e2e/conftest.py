"""Shared fixtures for end-to-end tests in network namespaces (see dataplane/lab).

A failing test that used the `daemon` fixture gets the tail of the daemon's
log in its report.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    daemon = getattr(item, "funcargs", {}).get("daemon")
    if report.failed and daemon is not None and hasattr(daemon, "log_tail"):
        report.sections.append(("dataplane log (tail)", daemon.log_tail(80)))
