"""What the dev servers share: the cache directory, free loopback ports, tying a
server's life to its launcher's, and pausing one for fault tests."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

LOOPBACK = "127.0.0.1"


def cache_dir() -> Path:
    """Where resolved classpaths and builds are cached (``LEDGERLOG_CACHE_DIR``, else the
    XDG cache directory)."""
    override = os.environ.get("LEDGERLOG_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ledgerlog"


def free_loopback_ports(count: int) -> list[int]:
    """Distinct ports free on 127.0.0.1 right now (all held open until every one is picked)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_LIBC: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _LIBC = ctypes.CDLL(None, use_errno=True)


def parent_death_signal(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` asking the kernel to send `sig` to the child when the launching
    thread dies, so a killed test run leaves no server behind. Only prctl runs in the
    child (safe after fork); Linux only, elsewhere a no-op."""

    def arm() -> None:
        if _LIBC is not None:
            _LIBC.prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG

    return arm


def thread_stats(pid: int) -> list[tuple[str, list[str]]]:
    """Each thread of `pid` as (name, the fields of its ``/proc/<pid>/task/<tid>/stat``
    after the name: the state first, utime and stime at 11 and 12). Raises OSError if
    ``/proc`` shows no such process; a thread that ends meanwhile is left out."""
    task_dir = f"/proc/{pid}/task"
    out = []
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/stat", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1 :].rsplit(")", 1)
        out.append((name, fields.split()))
    return out


def _all_stopped(pid: int) -> bool:
    try:
        threads = thread_stats(pid)
    except FileNotFoundError:
        raise ProcessLookupError(f"process {pid} is gone") from None
    return all(fields[0] in ("T", "t", "Z", "X") for _name, fields in threads)


def pause_process(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP `pid` and return once every thread of it has stopped.

    The signal lands asynchronously: right after ``kill`` returns, a thread of a busy
    machine's server can still run, and answer a request sent at once (a ZooKeeper read
    issued just after a SIGSTOP was seen to succeed). Fault tests that pause a server to
    see requests go unanswered call this rather than ``os.kill``. Elsewhere than Linux
    (no ``/proc``) it waits a fixed 0.3 s instead."""
    os.kill(pid, signal.SIGSTOP)
    if not os.path.isdir("/proc/self/task"):
        time.sleep(0.3)
        return
    deadline = time.monotonic() + timeout
    while not _all_stopped(pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} still running {timeout} s after SIGSTOP")
        time.sleep(0.001)
