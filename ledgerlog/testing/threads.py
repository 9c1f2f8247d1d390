"""Threads a test session left running.

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
