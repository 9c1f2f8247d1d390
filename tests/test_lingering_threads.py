"""The session's end reports non-daemon threads left running instead of hanging."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from ledgerlog.testing.threads import lingering_threads, run_in_threads

ROOT = Path(__file__).resolve().parents[1]


def test_a_running_non_daemon_thread_is_reported_with_its_stack() -> None:
    release = threading.Event()
    t = threading.Thread(target=release.wait, name="left-behind", daemon=False)
    t.start()
    try:
        left = lingering_threads(0.2)
        assert len(left) == 1
        assert "'left-behind'" in left[0] and "in wait" in left[0]
    finally:
        release.set()
    assert lingering_threads(5.0) == []  # it ended within the grace
    t.join()


def test_daemon_threads_and_ended_threads_are_not_reported() -> None:
    release = threading.Event()
    d = threading.Thread(target=release.wait, daemon=True)
    d.start()
    quick = threading.Thread(target=lambda: None)
    quick.start()
    try:
        assert lingering_threads(0.5) == []
    finally:
        release.set()


def test_a_session_that_leaves_a_thread_running_fails_instead_of_hanging(
    tmp_path: Path,
) -> None:
    # The project's root conftest, in a session of its own around one passing test that
    # leaves a thread waiting for ever.
    (tmp_path / "conftest.py").write_text((ROOT / "conftest.py").read_text())
    (tmp_path / "test_leak.py").write_text(
        textwrap.dedent(
            """
            import threading

            def test_leaks():
                threading.Thread(target=threading.Event().wait, name="leaker").start()
            """
        )
    )
    env = {**os.environ, "LEDGERLOG_THREAD_GRACE": "0.5"}
    env.pop("LEDGERLOG_REQUIRE_INTEGRATION", None)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "1 passed" in out.stdout
    assert "thread 'leaker' (non-daemon) is still running" in out.stdout
    assert "1 non-daemon thread(s) left running by the tests" in out.stdout
    assert out.returncode == 1


def test_run_in_threads_runs_each_index_at_once_and_reraises_a_workers_error() -> None:
    barrier = threading.Barrier(4, timeout=5)  # passes only if all 4 run at the same time
    seen: list[int] = []

    def work(i: int) -> None:
        barrier.wait()
        seen.append(i)

    run_in_threads(work, 4, timeout=10)
    assert sorted(seen) == [0, 1, 2, 3]

    def fails(i: int) -> None:
        if i == 2:
            raise ValueError("worker 2")

    with pytest.raises(ValueError, match="worker 2"):
        run_in_threads(fails, 4, timeout=10)
