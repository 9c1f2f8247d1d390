"""Group commit in the writer: on a backend that pipelines appends, small submissions that
arrive while an append is in flight wait for it and then go together as one append; big
ones do not wait. The file backend is made to pipeline here (its appends are written at
once but reported done only when the test lands them); tests/../integration covers
Pulsar, where appends really are in flight."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from test_client import ledger_decisions, open_client
from test_local_submit import blind_puts, committed_once, counted, hosting

import ledgerlog
from ledgerlog.backends.base import PendingAppend
from ledgerlog.backends.file import FileBackend, FileLogWriter
from ledgerlog.codec import WireRecord, decode_entry
from ledgerlog.errors import BackendError, ConfigError
from ledgerlog.model import Position
from ledgerlog.writer import DEFAULT_GROUP_COMMIT_TXNS, Writer

pytestmark = pytest.mark.timeout(60)


class _Landing(PendingAppend):
    """An append already written, reported done only once `land` is called."""

    def __init__(self, position: Position) -> None:
        self._position = position
        self._done = threading.Event()
        self._mutex = threading.Lock()
        self._hooks: list[Callable[[], None]] = []

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Position:
        if not self._done.wait(30 if timeout is None else timeout):
            raise TimeoutError("append still pending")
        return self._position

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        with self._mutex:
            if not self._done.is_set():
                self._hooks.append(fn)
                return
        fn()

    def land(self) -> None:
        with self._mutex:
            self._done.set()
            hooks, self._hooks = self._hooks, []
        for fn in hooks:
            fn()


class Pipelined:
    """Patches the file writer to pipeline: every append_async is recorded (the
    transactions of each of its records); while `hold_next` is set the next one stays in
    flight until :meth:`land`; `fail_next` makes the next one raise."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.appends: list[list[int]] = []
        self.hold_next = False
        self.fail_next = False
        self.in_flight: list[_Landing] = []
        self._mutex = threading.Lock()
        monkeypatch.setattr(FileLogWriter, "max_pending_appends", 8)

        def append_async(lw: FileLogWriter, entries: Sequence[bytes], state: bytes) -> Any:
            return self._append_async(lw, entries, state)

        monkeypatch.setattr(FileLogWriter, "append_async", append_async)

    def _append_async(self, lw: FileLogWriter, entries: Sequence[bytes], state: bytes) -> Any:
        txns = []
        for e in entries:
            entry = decode_entry(e)
            txns.append(len(entry.txns) if isinstance(entry, WireRecord) else 0)
        with self._mutex:
            self.appends.append(txns)
            if self.fail_next:
                self.fail_next = False
                raise BackendError("injected append failure")
            pending = _Landing(lw.append(entries, state))
            if self.hold_next:
                self.hold_next = False
                self.in_flight.append(pending)
                return pending
        pending.land()
        return pending

    def land(self) -> None:
        with self._mutex:
            landing, self.in_flight = self.in_flight, []
        for p in landing:
            p.land()

    def count(self) -> int:
        with self._mutex:
            return len(self.appends)


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@contextlib.contextmanager
def first_in_flight(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ledgerlog.Client, Pipelined, list[Any]]]:
    """A client hosting the elected writer, whose first append (3 puts, written) stays
    in flight until the test lands it; yields the client, the log and those futures."""
    log = Pipelined(monkeypatch)
    with open_client(path, "host") as host:
        hosting(host)
        log.hold_next = True
        yield host, log, blind_puts(host, "a", 3)


def test_small_submissions_wait_for_the_append_in_flight_then_go_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger"
    with first_in_flight(path, monkeypatch) as (host, log, first):
        spy = counted(host)
        before = log.count()
        held = [f for b in range(5) for f in blind_puts(host, f"b{b}-", 3)]
        time.sleep(0.2)
        # Nothing more was appended while the first append was in flight.
        assert log.count() == before
        # (The first is written, so replicas may decide it already; the rest are not.)
        assert not any(f.done() for f in held)
        log.land()
        assert all(f.result(10).committed for f in first + held)
        # The five held submissions went as one append of one record of 15.
        assert log.appends[before:] == [[15]]
        assert spy.batches == 0  # all local: nothing went through the intake
    counts = committed_once(path)
    assert len(counts) == 18 and set(counts.values()) == {1}


def test_a_big_submission_does_not_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with first_in_flight(tmp_path / "ledger", monkeypatch) as (host, log, first):
        before = log.count()
        small = blind_puts(host, "s", 3)
        big = blind_puts(host, "big", DEFAULT_GROUP_COMMIT_TXNS)
        # The big one (with the small one held before it) is appended at once.
        assert log.count() == before + 1
        assert log.appends[-1] == [3 + DEFAULT_GROUP_COMMIT_TXNS]
        assert all(f.result(10).committed for f in big + small)
        log.land()
        assert all(f.result(10).committed for f in first)


def test_a_failed_grouped_append_sends_every_submission_in_it_through_the_intake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger"
    with first_in_flight(path, monkeypatch) as (host, log, first):
        spy = counted(host)
        held = [f for b in range(4) for f in blind_puts(host, f"b{b}-", 2)]
        log.fail_next = True
        log.land()
        # The grouped append failed: the writer resigned and was elected again, and
        # the client sent the held submissions through the intake.
        assert all(f.result(20).committed for f in first + held)
        assert not log.fail_next
        assert spy.batches >= 1
        assert all(f.result(20).committed for f in blind_puts(host, "after", 3))
    counts = committed_once(path)
    assert len(counts) == 14 and set(counts.values()) == {1}


def test_intake_submissions_are_held_too_and_their_position_goes_with_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standby client's submissions (through the intake) arriving while an append is in
    flight wait like local ones; the grouped record carries their intake position, so
    the next writer does not append them again."""
    path = tmp_path / "ledger"
    with (
        first_in_flight(path, monkeypatch) as (_host, log, first),
        open_client(path, "other", writer=None) as other,
    ):
        before = log.count()
        theirs = blind_puts(other, "o", 4)
        time.sleep(0.3)  # the writer has read them from the intake by now
        assert log.count() == before
        log.land()
        assert all(f.result(10).committed for f in first + theirs)
        assert log.appends[before:] == [[4]]
    # A new writer (a new term) finds the intake consumed: nothing is appended twice
    # (a second copy would be decided again, as a duplicate).
    with open_client(path, "again") as again:
        again.wait_writer(10)
        assert all(f.result(10).committed for f in blind_puts(again, "z", 2))
    decisions, reader = ledger_decisions(path)
    reader.close()
    assert sorted(Counter(str(d.txn_id) for d in decisions).values()) == [1] * 9
    assert all(d.committed for d in decisions)


def test_group_commit_txns_is_checked(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "ledger", create=True)
    try:
        with pytest.raises(ConfigError, match="group_commit_txns"):
            Writer(backend, "w", group_commit_txns=-1)
        assert Writer(backend, "w", group_commit_txns=0).group_commit_txns == 0
    finally:
        backend.close()


def test_stopping_appends_what_is_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer stopping with submissions held appends them before it resigns."""
    path = tmp_path / "ledger"
    log = Pipelined(monkeypatch)
    host = open_client(path, "host")
    try:
        hosting(host)
        log.hold_next = True
        first = blind_puts(host, "a", 3)
        held = blind_puts(host, "b", 3)
        before = log.count()
        assert host.writer is not None
        stopper = threading.Thread(target=host.writer.stop)
        stopper.start()
        _wait_for(lambda: log.count() > before, "the held submissions were not appended")
        log.land()
        stopper.join(10)
        assert all(f.result(10).committed for f in first + held)
    finally:
        host.close()
    counts = committed_once(path)
    assert len(counts) == 6 and set(counts.values()) == {1}


def test_the_flusher_thread_ends_with_the_term(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def flushers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("ledgerlog-group-")]

    assert not flushers()
    Pipelined(monkeypatch)
    with open_client(tmp_path / "ledger", "host") as host:
        hosting(host)
        assert len(flushers()) == 1
        assert all(f.result(10).committed for f in blind_puts(host, "k", 3))
    _wait_for(lambda: not flushers(), "the flusher outlived its term")
