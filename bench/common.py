"""Helpers the benchmarks share: quiet logging, percentiles, a ``ledgerlog writer``
process, and spawn-and-collect of client processes started together on a signal."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ledgerlog.devservers._common import thread_stats


def quiet() -> None:
    """Warnings and errors only: per-connection INFO lines would swamp the figures."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.getLogger("ledgerlog.pulsar.client").setLevel(logging.ERROR)


def pulsar_logger() -> Any:
    """A logger for raw ``pulsar.Client(..., logger=...)`` that keeps errors only: the C++
    client's own (what ledgerlog's Pulsar backend uses by default), because with a stdlib
    logger pulsar-client calls into Python for every DEBUG line it could log, which would
    slow the raw baseline down for nothing."""
    import pulsar

    return pulsar.FileLogger(pulsar.LoggerLevel.Error, "/dev/stderr")


def account_keys(n: int) -> list[str]:
    """``acct:000000`` ... for `n` accounts, built once: formatting a key per pick was a
    measurable share of a benchmark client's CPU, which is the load generator's cost and
    not the system's under test."""
    return [f"acct:{i:06d}" for i in range(n)]


def two_accounts(rnd: Any, n: int) -> tuple[int, int]:
    """Two distinct account numbers below `n`, uniformly (``random.sample`` costs several
    times more per pick)."""
    a = rnd.randrange(n)
    b = rnd.randrange(n - 1)
    return a, b + 1 if b >= a else b


def pct(sorted_values: Sequence[float], q: float) -> float:
    """The `q` quantile (0..1) of already sorted values; NaN when there are none."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def by_window(timed: Iterable[tuple[float, float]], width: float = 1.0) -> dict[int, list[float]]:
    """(time, value) pairs grouped by window: window k holds times in
    [k * width, (k + 1) * width)."""
    windows: dict[int, list[float]] = {}
    for at, value in timed:
        windows.setdefault(int(at // width), []).append(value)
    return windows


def p99_by_window(results: Iterable[dict[str, Any]], width: float = 1.0) -> dict[int, float]:
    """p99 in ms of each `width`-second window of the paced runs' `scheduled_at` times
    (all clients together), by window number in order: one bad second of a run shows as
    such, where the run's p99 alone cannot tell a spike from a slow run."""
    timed = (pair for r in results for pair in zip(r["scheduled_at"], r["latencies"], strict=True))
    windows = by_window(timed, width)
    return {k: 1000 * pct(sorted(windows[k]), 0.99) for k in sorted(windows)}


def window_p99(results: Iterable[dict[str, Any]], width: float = 1.0) -> list[float]:
    """:func:`p99_by_window`'s figures alone, in order."""
    return list(p99_by_window(results, width).values())


def get_result(q: Any, procs: Sequence[Any], timeout: float) -> Any:
    """The next result from `q`; fails fast when a child process died instead."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a benchmark process exited ({dead[0].exitcode})") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no benchmark result in {timeout}s") from None


def run_processes(
    target: Callable[..., None],
    argses: Sequence[tuple[Any, ...]],
    *,
    ready_timeout: float = 180.0,
    result_timeout: float = 240.0,
    on_go: Callable[[], None] | None = None,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[Any], float]:
    """Start one spawned process per args tuple, each running ``target(*args, go, q)``;
    a target puts ``("ready", None)`` on `q` once set up, waits for `go`, does its work
    and puts ``("result", value)``. Returns the results (in arrival order) and the
    seconds from the go signal to the last result, so set-up (a replica catching up, a
    broker connection) stays out of the measured window. `on_go` runs just before the
    signal and `on_done` just after the last result (to measure around the window)."""
    ctx = mp.get_context("spawn")
    q, go = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=target, args=(*a, go, q), daemon=True) for a in argses]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            kind, _value = get_result(q, procs, ready_timeout)
            assert kind == "ready", kind
        if on_go is not None:
            on_go()
        started = time.monotonic()
        go.set()
        results = []
        for _ in procs:
            kind, value = get_result(q, procs, result_timeout)
            assert kind == "result", kind
            results.append(value)
        elapsed = time.monotonic() - started
        if on_done is not None:
            on_done()
        for p in procs:
            p.join(60)
        return results, elapsed
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)


@contextlib.contextmanager
def writer_process(
    target: str, writer_id: str = "bench-writer", options: Sequence[str] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """A ``ledgerlog [OPTIONS] writer TARGET`` process for the duration of the block."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ledgerlog", *options, "writer", target, "--writer-id", writer_id],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds (user + system) used so far by these processes, their live descendants
    and the children they have reaped (a server's exited backends). Take the difference
    of two calls; needs psutil (a test extra, installed by scripts/setup)."""
    import psutil

    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in tree:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            try:
                t = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system + t.children_user + t.children_system
    return total


def cpu_ticks(stat: str | None = None) -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs so far, from ``/proc/stat`` (or `stat`, its
    text); take the difference of two calls. Busy is everything but idle and iowait;
    steal counts as busy, being time the machine could not run our work."""
    if stat is None:
        with open("/proc/stat") as f:
            stat = f.read()
    for line in stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(x) for x in fields[1:]]
            # user nice system idle iowait irq softirq steal [guest guest_nice]: guest
            # time is already counted in user and nice.
            total = sum(ticks[:8])
            return total - ticks[3] - (ticks[4] if len(ticks) > 4 else 0), total
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


class MachineLoad:
    """What a measured phase cost the machine: call :meth:`start` and :meth:`stop` around
    it. ``busy`` is the share of all CPUs busy (whoever used them) and ``cpu_seconds``
    the CPU the given process trees used. A p99 measured with the machine nearly
    saturated says more about the machine than the system: on the 2-core build VMs the
    same client did the same work with 35-52 us of CPU per transaction from one minute
    to the next (the host's speed varies), and at ~90% busy a slower minute is a backlog."""

    def __init__(
        self, pids: Iterable[int], parts: Mapping[str, Iterable[int]] | None = None
    ) -> None:
        """`parts` names subtrees of `pids` (the broker, the writer) whose CPU seconds
        ``part_seconds`` reports on their own; ``rest_seconds`` is what the others used."""
        self.pids = list(pids)
        self.parts = {name: list(p) for name, p in (parts or {}).items()}
        self.busy = float("nan")
        self.cpu_seconds = float("nan")
        self.part_seconds: dict[str, float] = {}
        self._ticks = (0, 0)
        self._cpu = 0.0
        self._part_cpu: dict[str, float] = {}

    def start(self) -> None:
        self._part_cpu = {name: tree_cpu_seconds(p) for name, p in self.parts.items()}
        self._cpu = tree_cpu_seconds(self.pids)
        self._ticks = cpu_ticks()

    def stop(self) -> None:
        busy, total = cpu_ticks()
        self.cpu_seconds = tree_cpu_seconds(self.pids) - self._cpu
        self.part_seconds = {
            name: tree_cpu_seconds(p) - self._part_cpu[name] for name, p in self.parts.items()
        }
        elapsed = total - self._ticks[1]
        self.busy = (busy - self._ticks[0]) / elapsed if elapsed > 0 else float("nan")

    @property
    def rest_seconds(self) -> float:
        return self.cpu_seconds - sum(self.part_seconds.values())


class _Sampler:
    """A daemon thread running :meth:`_run` from :meth:`start` until :meth:`stop`, which
    appends to :attr:`samples` (emptied at each start)."""

    THREAD_NAME = "sampler"

    def __init__(self) -> None:
        self.samples: list[Any] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self.samples = []
        self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        raise NotImplementedError


class FsyncProbe(_Sampler):
    """A thread writing 4 KB to a file in `directory` and ``fdatasync``-ing it every
    `interval` seconds, timing each sync, while it runs (:meth:`start` to :meth:`stop`).

    Put beside a server's journal it shows what the disk did meanwhile: a flush by
    anyone else on the same filesystem (ext4 commits its journal as a whole) makes every
    fsync there wait, the server's included, so a slow second of commit latency can be
    told apart from a slow second of the disk. It adds one small synced write per
    `interval` to the disk it measures."""

    SIZE = 4096
    THREAD_NAME = "fsync-probe"

    def __init__(self, directory: str | os.PathLike[str], interval: float = 0.01) -> None:
        super().__init__()
        self.path = Path(directory) / f"fsync-probe-{os.getpid()}"
        self.interval = interval
        #: (seconds since start, seconds the fdatasync took), in order.
        self.samples: list[tuple[float, float]] = []

    def stop(self) -> None:
        super().stop()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _run(self) -> None:
        block = b"\0" * self.SIZE
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            started = time.perf_counter()
            n = 0
            while not self._stop.is_set():
                # Cycle over 256 blocks so the file stays small and every sync has data.
                os.pwrite(fd, block, (n % 256) * self.SIZE)
                n += 1
                t = time.perf_counter()
                os.fdatasync(fd)
                self.samples.append((t - started, time.perf_counter() - t))
                self._stop.wait(self.interval)
        finally:
            os.close(fd)

    def window_max(self, windows: Iterable[int], width: float = 1.0) -> list[float]:
        """The slowest sync in ms of each of these `width`-second windows (numbered as
        :func:`by_window` numbers them); nan where a window has none."""
        syncs = by_window(self.samples, width)
        return [1000 * max(syncs[k]) if k in syncs else float("nan") for k in windows]


def _thread_cpu(pid: int) -> dict[str, float] | None:
    """CPU seconds used so far by the threads of `pid`, summed by thread name (``comm``);
    None where ``/proc`` does not show its threads."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        threads = thread_stats(pid)
    except OSError:
        return None
    out: dict[str, float] = {}
    for name, fields in threads:
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def jvm_thread_kind(name: str) -> str:
    """``jit`` for HotSpot's compiler threads, ``gc`` for the collectors' (ZGC's all start
    with Z, G1's and the others' with "GC Thread" or "G1 "), ``other`` for the rest."""
    if name.startswith(("C1 Compiler", "C2 Compiler")):
        return "jit"
    if name.startswith(("Z", "GC Thread", "G1 ")):
        return "gc"
    return "other"


class JvmBursts(_Sampler):
    """Samples, each `interval` seconds while it runs, how much of a core JVM `pid`'s JIT
    compiler threads and garbage-collector threads used (see :func:`jvm_thread_kind`).

    Beside the per-second commit-latency p99 it tells a second the broker spent compiling
    or collecting from one it did not: work of its own that the clients' commits queued
    behind, whatever the JIT warm-up said before the run."""

    THREAD_NAME = "jvm-bursts"

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__()
        self.pid = pid
        self.interval = interval
        #: (seconds since start at the middle of each interval, {"jit": cores, "gc": cores}).
        self.samples: list[tuple[float, dict[str, float]]] = []

    def _totals(self) -> dict[str, float]:
        totals = {"jit": 0.0, "gc": 0.0, "other": 0.0}
        for name, seconds in (_thread_cpu(self.pid) or {}).items():
            totals[jvm_thread_kind(name)] += seconds
        return totals

    def _run(self) -> None:
        started = last_t = time.perf_counter()
        last = self._totals()
        stopping = False
        while not stopping:
            stopping = self._stop.wait(self.interval)
            now, totals = time.perf_counter(), self._totals()
            took = now - last_t
            if stopping and took < self.interval / 4:
                break  # too short a tail to say anything
            self.samples.append(
                (
                    (last_t + now) / 2 - started,
                    {k: (totals[k] - last[k]) / took for k in ("jit", "gc")},
                )
            )
            last, last_t = totals, now

    def window(self, kind: str, windows: Iterable[int], width: float = 1.0) -> list[float]:
        """Cores `kind` ("jit" or "gc") used in each of these `width`-second windows (as
        :func:`by_window` numbers them; a sample counts in the window its interval's
        middle falls in); nan where none does."""
        by = by_window(((t, used[kind]) for t, used in self.samples), width)
        return [max(by[k]) if k in by else float("nan") for k in windows]


def load_average() -> str:
    """The 1/5/15-minute load averages, to print beside figures (others share the machine)."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def jit_cpu_seconds(pid: int) -> float | None:
    """CPU seconds used so far by the JIT compiler threads of JVM `pid` (HotSpot names
    them ``C1 CompilerThre...``/``C2 CompilerThre...``), or None where ``/proc`` does not
    show threads. A freshly started broker keeps compiling under load for a minute or
    more; benchmarks warm up until this stops growing."""
    threads = _thread_cpu(pid)
    if threads is None:
        return None
    return sum(cpu for name, cpu in threads.items() if jvm_thread_kind(name) == "jit")
