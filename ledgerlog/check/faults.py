"""Faults for the consistency harness: a TCP proxy that drops and delays connections, and
a nemesis that kills, pauses and restarts processes on a bounded schedule.

:class:`TcpProxy` is an asyncio proxy on 127.0.0.1 (in its own thread). With
``pulsar=True`` it also routes what follows a topic lookup through itself: a Pulsar
client connects to the broker address a lookup returns, not to its service URL, so the
proxy rewrites that address (the broker's ``pulsar://host:port`` in the command part of
lookup frames, never in message payloads) to its own, of the same length.

:class:`Nemesis` runs in a thread: it waits, applies one fault for a bounded time, heals
it, and so on until stopped; :meth:`Nemesis.stop` heals whatever is still broken. Every
fault is recorded through a callback (the harness adds them to the history as
``"process": "nemesis"`` operations, which checkers skip).
"""

from __future__ import annotations

import asyncio
import queue
import random
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import structlog

from ledgerlog.check.procs import Proc

__all__ = ["FAULTS", "Nemesis", "ProcGroup", "TcpProxy", "check_faults"]

log = structlog.get_logger("ledgerlog.check.faults")

FAULTS = (
    "kill-writer",
    "pause-writer",
    "kill-client",
    "restart-broker",
    "pause-broker",
    "proxy",
)

_MAX_FRAME = 64 * 1024 * 1024


def _pick_port(width: int) -> socket.socket:
    """A listening socket on 127.0.0.1 whose port number has `width` digits."""
    for _ in range(200):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        if len(str(s.getsockname()[1])) == width:
            return s
        s.close()
    raise OSError(f"no free loopback port with {width} digits")


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; counts bytes; drops and delays on demand.

    ``drop(seconds)`` resets every open connection and refuses new ones for that long;
    ``delay(ms, seconds)`` holds every forwarded chunk ``ms`` for that long.
    """

    def __init__(self, target_host: str, target_port: int, *, pulsar: bool = False) -> None:
        self.target = (target_host, target_port)
        self.pulsar = pulsar
        self._sock = _pick_port(len(str(target_port)))
        self.port: int = self._sock.getsockname()[1]
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0
        self.connections = 0
        self.rewrites = 0
        self._old = f"pulsar://{target_host}:{target_port}".encode()
        self._new = f"pulsar://127.0.0.1:{self.port}".encode()
        if len(self._old) != len(self._new):
            raise ValueError(f"cannot rewrite {self._old!r} to {self._new!r}: lengths differ")
        self._drop_until = 0.0
        self._delay_until = 0.0
        self._delay = 0.0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"pulsar://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, sock=self._sock)
        )
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # Faults -----------------------------------------------------------------------------

    def drop(self, seconds: float) -> None:
        self._drop_until = time.monotonic() + seconds

        def reset() -> None:
            for w in list(self._writers):
                w.transport.abort()

        self._loop.call_soon_threadsafe(reset)

    def delay(self, ms: float, seconds: float) -> None:
        self._delay = ms / 1000
        self._delay_until = time.monotonic() + seconds

    def heal(self) -> None:
        self._drop_until = self._delay_until = 0.0

    # Forwarding -------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._drop_until:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_w))
        down = self._frames if self.pulsar else self._raw
        try:
            await asyncio.gather(
                self._raw(reader, up_w, up=True), down(up_r, writer), return_exceptions=True
            )
        finally:
            for w in (writer, up_w):
                self._writers.discard(w)
                w.transport.abort()

    async def _send(self, w: asyncio.StreamWriter, data: bytes, up: bool) -> None:
        if time.monotonic() < self._delay_until:
            await asyncio.sleep(self._delay)
        # Counted before the peer can see the bytes: a reader of the counters after a
        # round trip sees them.
        if up:
            self.bytes_up += len(data)
        else:
            self.bytes_down += len(data)
        w.write(data)
        await w.drain()

    async def _raw(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, up: bool = False
    ) -> None:
        while data := await r.read(65536):
            await self._send(w, data, up)
        w.transport.abort()

    async def _frames(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        """Broker -> client, frame by frame: [total size][command size][command][rest]."""
        while True:
            head = await r.readexactly(4)
            (total,) = struct.unpack(">I", head)
            if total > _MAX_FRAME:
                raise ConnectionError(f"frame of {total} bytes")
            body = await r.readexactly(total)
            (cmd_size,) = struct.unpack(">I", body[:4])
            cmd = body[4 : 4 + cmd_size]
            if self._old in cmd:
                cmd = cmd.replace(self._old, self._new)
                self.rewrites += 1
                body = body[:4] + cmd + body[4 + cmd_size :]
            await self._send(w, head + body, False)


# -- processes --------------------------------------------------------------------------------


@dataclass
class ProcGroup:
    """Slots of child processes started by ``start(slot, generation)``; a nemesis kills,
    pauses and restarts them by slot."""

    name: str
    start: Callable[[int, int], Proc]
    size: int
    procs: list[Proc] = field(default_factory=list)
    generations: list[int] = field(default_factory=list)
    paused: set[int] = field(default_factory=set)
    history: list[Proc] = field(default_factory=list)  # every process ever started

    def start_all(self) -> None:
        for i in range(self.size):
            p = self.start(i, 0)
            self.procs.append(p)
            self.generations.append(0)
            self.history.append(p)

    def leader(self) -> int | None:
        """The live process that logged the highest ``ELECTED epoch=N`` (the writer)."""
        best: tuple[int, int] | None = None
        for i, p in enumerate(self.procs):
            if not p.alive():
                continue
            epochs = [int(e) for e in re.findall(r"ELECTED epoch=(\d+)", p.log())]
            if epochs and (best is None or max(epochs) > best[0]):
                best = (max(epochs), i)
        return None if best is None else best[1]

    def kill(self, i: int) -> None:
        self.paused.discard(i)
        self.procs[i].kill()

    def restart(self, i: int) -> None:
        if self.procs[i].alive():
            return
        self.generations[i] += 1
        p = self.start(i, self.generations[i])
        self.procs[i] = p
        self.history.append(p)

    def pause(self, i: int) -> None:
        self.procs[i].signal(signal.SIGSTOP)
        self.paused.add(i)

    def resume(self, i: int) -> None:
        self.procs[i].signal(signal.SIGCONT)
        self.paused.discard(i)

    def heal(self) -> None:
        for i in range(len(self.procs)):
            if i in self.paused:
                self.resume(i)
            if not self.procs[i].alive():
                self.restart(i)

    def stop_all(self, timeout: float = 10.0) -> None:
        for p in self.procs:
            p.terminate(timeout)
        for p in self.history:
            p.kill()


def check_faults(
    faults: Sequence[str],
    *,
    writers: object = True,
    clients: object = True,
    pulsar: object = None,
    bookkeeper: object = None,
    proxy: object = None,
) -> None:
    """ValueError for an unknown fault or one with nothing to act on."""
    for f in faults:
        if f not in FAULTS:
            raise ValueError(f"unknown fault {f!r} (one of {', '.join(FAULTS)})")
        need = {
            "kill-writer": writers,
            "pause-writer": writers,
            "kill-client": clients,
            "restart-broker": pulsar or bookkeeper,
            "pause-broker": pulsar,
            "proxy": proxy,
        }[f]
        if need is None:
            raise ValueError(f"fault {f!r} needs a server or proxy this run does not have")


@dataclass
class Nemesis:
    """Applies `faults` one at a time from its own thread, each for a bounded time."""

    faults: Sequence[str]
    rng: random.Random
    record: Callable[[str, str], None]
    writers: ProcGroup | None = None
    clients: ProcGroup | None = None
    pulsar: Any = None  # a LocalPulsar
    bookkeeper: Any = None  # a LocalBookKeeper
    proxy: TcpProxy | None = None
    gap: tuple[float, float] = (1.0, 3.0)
    duration: tuple[float, float] = (1.0, 4.0)
    limits: dict[str, int] = field(default_factory=dict)  # at most this many of a fault
    error: BaseException | None = None
    applied: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_faults(
            self.faults,
            writers=self.writers,
            clients=self.clients,
            pulsar=self.pulsar,
            bookkeeper=self.bookkeeper,
            proxy=self.proxy,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nemesis", daemon=True)
        self._calls: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()

    def start(self) -> Nemesis:
        if self.faults:
            self._thread.start()
        return self

    def wait(self, seconds: float) -> None:
        """Let faults happen for `seconds`. Call from the thread that started the servers:
        it runs their restarts (see :meth:`_in_caller`)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._serve(left)

    def stop(self) -> None:
        """Stop applying faults and heal everything (waits for a fault in progress).
        Only the first call heals: afterwards processes exit on purpose."""
        if self._stop.is_set():
            return
        self._stop.set()
        while self._thread.is_alive():
            self._serve(0.1)
        self.heal()

    def _serve(self, timeout: float) -> None:
        try:
            fn, fut = self._calls.get(timeout=min(timeout, 0.1))
        except queue.Empty:
            return
        try:
            fut.set_result(fn())
        except BaseException as exc:
            fut.set_exception(exc)

    def _in_caller(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in the thread serving :meth:`wait`/:meth:`stop`. The dev servers start
        their JVMs with a parent-death signal bound to the launching *thread*: a broker or
        bookie restarted from the nemesis thread would be SIGKILLed when it ends."""
        if threading.current_thread() is not self._thread:
            return fn()
        fut: Future[Any] = Future()
        self._calls.put((fn, fut))
        return fut.result(timeout=600)

    def heal(self) -> None:
        if self.proxy is not None:
            self.proxy.heal()
        if self.pulsar is not None:
            if self.pulsar.is_running():
                self.pulsar.resume()
            else:
                self.pulsar.restart()
        if self.bookkeeper is not None:
            for i, pid in enumerate(self.bookkeeper.bookie_pids):
                if pid is None:
                    self.bookkeeper.restart_bookie(i)
        for g in (self.writers, self.clients):
            if g is not None:
                g.heal()

    def _sleep(self, lo_hi: tuple[float, float]) -> float:
        d = self.rng.uniform(*lo_hi)
        self._stop.wait(d)
        return d

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._sleep(self.gap)
                if self._stop.is_set():
                    return
                left = [
                    f for f in self.faults if self.applied.count(f) < self.limits.get(f, 1 << 30)
                ]
                if not left:
                    return
                fault = self.rng.choice(left)
                self.applied.append(fault)
                self._apply(fault)
        except BaseException as exc:
            self.error = exc
            log.error("nemesis failed", error=repr(exc))

    def _target(self, group: ProcGroup) -> int:
        """Mostly the elected writer (the interesting one), sometimes any process."""
        leader = group.leader() if group is self.writers else None
        if leader is not None and self.rng.random() < 0.8:
            return leader
        return self.rng.randrange(group.size)

    def _apply(self, fault: str) -> None:
        if fault in ("kill-writer", "kill-client"):
            group = self.writers if fault == "kill-writer" else self.clients
            assert group is not None
            i = self._target(group)
            self.record(fault, f"kill -9 {group.name} {i} (pid {group.procs[i].pid})")
            group.kill(i)
            self._sleep(self.duration)
            group.restart(i)
            self.record(fault, f"restarted {group.name} {i} (pid {group.procs[i].pid})")
        elif fault == "pause-writer":
            assert self.writers is not None
            i = self._target(self.writers)
            self.record(fault, f"SIGSTOP writer {i} (pid {self.writers.procs[i].pid})")
            self.writers.pause(i)
            d = self._sleep(self.duration)
            self.writers.resume(i)
            self.record(fault, f"SIGCONT writer {i} after {d:.1f}s")
        elif fault == "restart-broker":
            if self.pulsar is not None:
                self.record(fault, "kill -9 the Pulsar broker")
                self.pulsar.kill()
                self._sleep((0.2, 1.0))
                self._in_caller(self.pulsar.restart)
                self.record(fault, "Pulsar broker restarted")
            else:
                i = self.rng.randrange(len(self.bookkeeper.bookie_pids))
                self.record(fault, f"kill -9 bookie {i}")
                self.bookkeeper.kill_bookie(i)
                self._sleep(self.duration)
                self._in_caller(lambda: self.bookkeeper.restart_bookie(i))
                self.record(fault, f"bookie {i} restarted")
        elif fault == "pause-broker":
            self.record(fault, "SIGSTOP the Pulsar broker")
            self.pulsar.pause()
            d = self._sleep(self.duration)
            self.pulsar.resume()
            self.record(fault, f"SIGCONT the Pulsar broker after {d:.1f}s")
        elif fault == "proxy":
            assert self.proxy is not None
            d = self.rng.uniform(*self.duration)
            if self.rng.random() < 0.5:
                self.record(fault, f"proxy drops every connection for {d:.1f}s")
                self.proxy.drop(d)
            else:
                ms = self.rng.choice((20, 100, 300))
                self.record(fault, f"proxy delays by {ms} ms for {d:.1f}s")
                self.proxy.delay(ms, d)
            self._stop.wait(d)
            self.proxy.heal()
            self.record(fault, "proxy healed")
