"""Threads in tests: running a worker in several at once, and the ones a session left
running.

A test that starts a non-daemon thread and fails before stopping it keeps the pytest
process alive after the last test: the run then hangs until CI's time limit, with no
report of which test did it (session 8 saw this). The session's end calls
:func:`lingering_threads` and exits with a report instead.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable


def lingering_threads(grace: float) -> list[str]:
    """Non-daemon threads other than the caller's still alive after waiting up to
    `grace` seconds in all for them to end; each described by its name and stack."""
    deadline = time.monotonic() + grace
    me = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not me and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    frames = sys._current_frames()
    out = []
    for thread in threading.enumerate():
        if thread is me or thread.daemon or not thread.is_alive():
            continue
        frame = frames.get(thread.ident) if thread.ident is not None else None
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)\n"
        out.append(f"thread {thread.name!r} (non-daemon) is still running:\n{stack}")
    return out


def run_in_threads(work: Callable[[int], None], count: int, timeout: float | None) -> None:
    """Run ``work(0)`` .. ``work(count - 1)`` in threads at once, waiting up to `timeout`
    seconds for each (None: until it ends); re-raise the first exception any of them
    raised (an assertion failing in a worker fails the test as it would in the test's
    own thread)."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    if errors:
        raise errors[0]
