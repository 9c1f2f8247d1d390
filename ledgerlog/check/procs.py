"""Child processes that a harness can kill -9, pause and restart (a nemesis's targets).

A :class:`Proc` writes its stdout and stderr to a log file, so a SIGKILL loses nothing the
parent later reads; :func:`spawn` starts one from an argv.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ledgerlog.backends.base import Backend

__all__ = ["Proc", "kill_all", "say", "serve_writer", "spawn"]


class Proc:
    """A child process whose stdout+stderr go to a log file."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path, name: str) -> None:
        self.popen = popen
        self.log_path = log_path
        self.name = name

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, text: str, timeout: float, count: int = 1) -> bool:
        """Wait until `text` occurs `count` times in the log; False on timeout or death."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return True
            if not self.alive():
                return self.log().count(text) >= count
            time.sleep(0.02)
        return False

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL (after SIGCONT, in case it is stopped) and reap."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
                os.kill(self.pid, signal.SIGCONT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL if it did not exit."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode


def spawn(argv: Sequence[str], *, log_dir: Path, name: str, cwd: Path | None = None) -> Proc:
    """Start `argv` (``sys.executable`` is prepended) with its output in ``log_dir``."""
    log_path = Path(log_dir) / f"{name}.{time.monotonic_ns()}.log"
    out = open(log_path, "wb")  # noqa: SIM115 - handed to the child
    try:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        popen = subprocess.Popen(
            [sys.executable, *map(str, argv)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
        )
    finally:
        out.close()
    return Proc(popen, log_path, name)


def kill_all(procs: Iterable[Proc | None]) -> None:
    for p in procs:
        if p is not None:
            p.kill()


def say(text: str) -> None:
    """One line on stdout, flushed at once: a child's progress survives its kill -9."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def serve_writer(backend: Backend, writer_id: str, **writer_options: Any) -> int:
    """The body of a writer child: a standby :class:`Writer` until SIGTERM, announcing
    ``STANDBY``, ``ELECTED epoch=N``, ``FENCED ...`` and ``STOPPED`` on stdout (what the
    parent's :meth:`Proc.wait_for` looks for). Returns the exit status: 2 if the writer
    thread failed."""
    from ledgerlog.writer import Writer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    w = Writer(
        backend,
        writer_id,
        on_elected=lambda epoch: say(f"ELECTED epoch={epoch}"),
        on_fenced=lambda exc: say(f"FENCED {exc}"),
        **writer_options,
    )
    say(f"STANDBY pid={os.getpid()}")
    w.start()
    while not stop.wait(0.05):
        if w.error is not None:
            say(f"WRITER ERROR {w.error!r}")
            return 2
    w.stop()
    backend.close()
    say("STOPPED")
    return 0
