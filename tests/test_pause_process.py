"""`pause_process` returns only once every thread of the process has stopped: a fault
test that pauses a server and at once expects no answer must not race the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ledgerlog.devservers._common import pause_process, thread_stats

# Four threads spinning on the CPU: each must be caught by the stop.
_BUSY = """
import threading
def spin():
    while True:
        pass
for _ in range(3):
    threading.Thread(target=spin, daemon=True).start()
print("ready", flush=True)
spin()
"""


def _states(pid: int) -> list[str]:
    return [fields[0] for _name, fields in thread_stats(pid)]


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
@pytest.mark.timeout(60)
def test_every_thread_is_stopped_when_it_returns() -> None:
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _BUSY], stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"ready"
            pause_process(proc.pid)
            states = _states(proc.pid)
            assert len(states) == 4
            assert set(states) <= {"T", "t"}, states
            before = _cpu_ticks(proc.pid)
            time.sleep(0.2)
            assert _cpu_ticks(proc.pid) == before  # nothing ran while paused
            os.kill(proc.pid, signal.SIGCONT)
            deadline = time.monotonic() + 10
            while _cpu_ticks(proc.pid) == before:
                assert time.monotonic() < deadline, "did not run again after SIGCONT"
                time.sleep(0.01)
        finally:
            proc.kill()
            proc.wait()


def test_a_process_that_is_gone_is_an_error() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(ProcessLookupError):
        pause_process(proc.pid)
