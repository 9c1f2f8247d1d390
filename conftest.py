"""Session-wide rules: the integration suite may not be skipped silently.

With LEDGERLOG_REQUIRE_INTEGRATION=1 (scripts/test and CI set it), a session that ran no
integration test, or skipped one that is not allowed to skip, fails: a green run must
mean the real servers were exercised.
"""

from __future__ import annotations

import os
import sys

import pytest

from ledgerlog.testing.threads import lingering_threads

#: Seconds the session's end waits for non-daemon threads before it reports them.
THREAD_GRACE = float(os.environ.get("LEDGERLOG_THREAD_GRACE", "30"))

_integration_ran = 0
_integration_skipped: list[str] = []

# Variants that exist for users with other setups and skip cleanly here by design.
ALLOWED_SKIPS = ("testcontainers", "external")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    global _integration_ran
    if "integration" not in report.keywords:
        return
    if report.when == "call" and report.passed:
        _integration_ran += 1
    if report.skipped and not any(a in report.nodeid for a in ALLOWED_SKIPS):
        _integration_skipped.append(report.nodeid)


_exit_status = 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)
    if os.environ.get("LEDGERLOG_REQUIRE_INTEGRATION") != "1":
        return
    selected = session.config.getoption("keyword") or session.config.getoption("markexpr")
    named = [a for a in session.config.invocation_params.args if not str(a).startswith("-")]
    if selected or named:
        return  # a filtered run (-k/-m, or chosen paths) is a choice, not the suite
    problems = []
    if _integration_ran == 0:
        problems.append("no integration test ran")
    if _integration_skipped:
        problems.append("integration tests skipped: " + ", ".join(_integration_skipped))
    if problems:
        print("\nLEDGERLOG_REQUIRE_INTEGRATION: " + "; ".join(problems))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        _exit_status = int(session.exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """A non-daemon thread still running would keep the process alive for ever (the
    interpreter joins them at exit): report it and exit, failing the run."""
    left = lingering_threads(THREAD_GRACE)
    if left:
        sys.stdout.write("\n" + "\n".join(left))
        sys.stdout.write(f"{len(left)} non-daemon thread(s) left running by the tests\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status or pytest.ExitCode.TESTS_FAILED)
