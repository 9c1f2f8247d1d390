"""The one interface every storage backend implements.

It is deliberately small and knows nothing of transactions: a backend stores opaque
entries in a totally ordered log, elects at most one appender at a time, and carries
clients' submissions to that appender durably. Everything about seqs, epochs and
decisions lives above it (writer, validator, reader), so a new backend only has to pass
:mod:`ledgerlog.testing.conformance`.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from typing import Any

import attrs

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

    @abc.abstractmethod
    def close(self) -> None: ...


class LogWriter(abc.ABC):
    """The handle of the ledger's elected writer. Only one is valid at a time."""

    writer_id: str

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
