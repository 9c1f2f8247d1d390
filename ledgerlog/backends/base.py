"""The one interface every storage backend implements.

It is deliberately small and knows nothing of transactions: a backend stores opaque
entries in a totally ordered log, elects at most one appender at a time, and carries
clients' submissions to that appender durably. Everything about seqs, epochs and
decisions lives above it (writer, validator, reader), so a new backend only has to pass
:mod:`ledgerlog.testing.conformance`.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from ledgerlog.errors import BackendError, ClosedError
from ledgerlog.model import Position


class Backoff:
    """Polling delay for tailing: starts short (latency) and doubles up to `longest`
    while nothing arrives (CPU). Backends that cannot block on new data use it."""

    def __init__(self, shortest: float = 0.0005, longest: float = 0.005) -> None:
        self.shortest = shortest
        self.longest = longest
        self.delay = shortest

    def reset(self) -> None:
        self.delay = self.shortest

    def sleep(self, deadline: float) -> bool:
        """Sleep a little; False once the (monotonic) deadline has passed."""
        now = time.monotonic()
        if now >= deadline:
            return False
        time.sleep(min(self.delay, deadline - now))
        self.delay = min(self.delay * 2, self.longest)
        return True


class GroupCommit:
    """Leader/follower group commit for intake producers: concurrent :meth:`submit` calls
    share one `flush` (one fsync, one BookKeeper call). The first caller to find no flush
    running flushes everything pending; the others wait for the flush that carries their
    item, and learn if that flush failed (a later flush succeeding does not ack them)."""

    _MAX_FAILURES = 1024

    def __init__(self, flush: Callable[[list[bytes]], None]) -> None:
        self._flush = flush
        self._cond = threading.Condition()
        self._pending: list[bytes] = []
        self._batch_no = 0  # number of the batch now collecting
        self._flushed = 0  # batches below this number are durable (or failed)
        self._failed: dict[int, BaseException] = {}
        self._flushing = False
        self.closed = False

    def submit(self, item: bytes, timeout: float | None = None) -> None:
        """Return once `item` is durable; BackendError if its flush failed or timed out."""
        with self._cond:
            if self.closed:
                raise ClosedError("intake producer is closed")
            self._pending.append(item)
            mine = self._batch_no
            while True:
                if mine in self._failed:
                    exc = self._failed[mine]
                    raise BackendError(f"intake write failed: {exc}") from exc
                if self._flushed > mine:
                    return
                if self._flushing:
                    if not self._cond.wait(timeout):
                        raise BackendError("intake flush timed out")
                    continue
                self._flushing = True
                batch, self._pending = self._pending, []
                number = self._batch_no
                self._batch_no += 1
                err: BaseException | None = None
                self._cond.release()
                try:
                    self._flush(batch)
                except BaseException as exc:
                    err = exc
                finally:
                    self._cond.acquire()
                    self._flushing = False
                    self._flushed = number + 1
                    if err is not None:
                        if len(self._failed) >= self._MAX_FAILURES:
                            self._failed.pop(min(self._failed))
                        self._failed[number] = err
                    self._cond.notify_all()

    def close(self) -> bool:
        """Refuse further submits; False if it was already closed."""
        with self._cond:
            was_open = not self.closed
            self.closed = True
            return was_open


@attrs.frozen
class Entry:
    """One log entry as read back."""

    position: Position
    """Where it starts."""
    next: Position
    """Where reading resumes after it."""
    data: bytes


@attrs.frozen
class IntakeItem:
    """One client submission waiting for the writer."""

    data: bytes
    token: Any = None
    """Backend bookkeeping to acknowledge it (opaque to the writer)."""


class LogReader(abc.ABC):
    """Reads a ledger's entries in order from a position, tailing it."""

    @property
    @abc.abstractmethod
    def position(self) -> Position:
        """Where the next read starts."""

    @abc.abstractmethod
    def read(self, max_entries: int = 1024, timeout: float = 0.0) -> list[Entry]:
        """Entries from :attr:`position`; waits up to `timeout` seconds for at least one."""

    def caught_up(self, end: Position) -> bool:
        """True when every entry before `end` (from :meth:`Backend.end`) has been read."""
        return self.position >= end

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IntakeConsumer(abc.ABC):
    """The elected writer's side of the intake."""

    @abc.abstractmethod
    def poll(self, max_items: int = 1024, timeout: float = 0.0) -> list[IntakeItem]:
        """Submissions not yet handed out, oldest first; waits up to `timeout` for one."""

    def meta(self, items: Sequence[IntakeItem]) -> bytes:
        """Bookkeeping to store in the record that carries `items` (becomes durable and
        visible exactly with it). Backends that acknowledge out of band return b""."""
        return b""

    def ack(self, items: Sequence[IntakeItem]) -> None:  # noqa: B027 - optional hook
        """`items` are durably in the ledger: the intake may forget them."""

    @abc.abstractmethod
    def close(self) -> None: ...


class IntakeProducer(abc.ABC):
    """A client's side of the intake."""

    @abc.abstractmethod
    def submit(self, data: bytes, timeout: float | None = None) -> None:
        """Store one intake batch durably; returns once it survives a writer crash.
        Thread-safe; concurrent calls may share one flush (group commit)."""

    def submit_async(self, data: bytes, on_done: Callable[[BaseException | None], None]) -> None:
        """Start storing one intake batch; ``on_done(None)`` once :meth:`submit` would
        have returned, ``on_done(error)`` if it failed later (possibly from another
        thread). What fails before the batch is on its way raises here, as from
        :meth:`submit`.

        Lets a client go on building transactions while the storage persists the last
        batch. The default is :meth:`submit`, then ``on_done(None)``."""
        self.submit(data)
        on_done(None)

    @abc.abstractmethod
    def close(self) -> None: ...


class PendingAppend(abc.ABC):
    """An append started by :meth:`LogWriter.append_async`."""

    @abc.abstractmethod
    def done(self) -> bool:
        """True once :meth:`result` would return or raise at once."""

    @abc.abstractmethod
    def result(self, timeout: float | None = None) -> Position:
        """Wait for the append: the position after its last entry, or the error
        :meth:`LogWriter.append` would raise (FencedError, BackendError). TimeoutError
        when `timeout` passes first (the append is still pending)."""

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        """Call `fn` once the append is done, at once if it is. It may run on a backend's
        I/O thread, so it must be quick and must not block. This default calls it at
        once: an append that can still be pending when it is returned overrides it."""
        fn()


class CompletedAppend(PendingAppend):
    """An append that already finished (the default :meth:`LogWriter.append_async`)."""

    def __init__(self, position: Position) -> None:
        self._position = position

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Position:
        return self._position


class LogWriter(abc.ABC):
    """The handle of the ledger's elected writer. Only one is valid at a time."""

    writer_id: str

    max_pending_appends: int = 1
    """How many :meth:`append_async` calls may be pending at once. 1: the backend does
    not pipeline, and the writer waits for each append before taking more intake."""

    @abc.abstractmethod
    def recovery_point(self) -> tuple[Position, bytes | None]:
        """Where to scan from to learn the ledger's end, and the sequencer state
        (:meth:`SequencerState.to_bytes`) valid at that position (None: the log's start)."""

    @abc.abstractmethod
    def append(self, entries: Sequence[bytes], state: bytes) -> Position:
        """Append entries durably, in order; returns the position after the last one.
        `state` is the sequencer state after them, for backends that keep restart points,
        or b"" when the writer does not know it yet (its own epoch start).
        Raises FencedError if another writer took over (the entries then never count)."""

    def append_async(self, entries: Sequence[bytes], state: bytes) -> PendingAppend:
        """Start :meth:`append` without waiting for it. Appends land in the order they
        were started, and once one fails no later one of this writer lands either
        (a backend that cannot promise that keeps :attr:`max_pending_appends` at 1).
        The default appends synchronously."""
        return CompletedAppend(self.append(entries, state))

    @abc.abstractmethod
    def check(self) -> None:
        """Raise FencedError if this writer has lost the ledger."""

    @abc.abstractmethod
    def intake(self, meta: bytes) -> IntakeConsumer:
        """The intake, resuming after what the newest visible record's `meta` covers."""

    @abc.abstractmethod
    def close(self) -> None:
        """Give up the ledger (a standby may take over)."""

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(abc.ABC):
    """One ledger on some storage."""

    ledger: str
    url: str

    @abc.abstractmethod
    def reader(self, start: Position) -> LogReader: ...

    @abc.abstractmethod
    def end(self) -> Position:
        """A position every entry appended before this call starts before."""

    @abc.abstractmethod
    def campaign(self, writer_id: str, timeout: float | None = None) -> LogWriter:
        """Wait (as a standby) until elected writer; NotElectedError after `timeout`."""

    @abc.abstractmethod
    def intake_producer(self, client_id: str) -> IntakeProducer: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
