"""The conformance suite every backend passes.

Use it from a test module by defining a ``harness`` fixture that returns a
:class:`Harness` for the backend under test, then importing the tests::

    from ledgerlog.testing.conformance import *  # noqa: F403

    @pytest.fixture
    def harness(tmp_path):
        return MyHarness(tmp_path)

Every test talks to the backend only through :class:`ledgerlog.backends.base.Backend`,
plus the harness's few hooks (a fresh ledger, a second handle as another process would
open it, and a way to depose a live writer).
"""

from __future__ import annotations

import abc
import itertools
import threading
import time
from collections.abc import Iterator

import pytest

from ledgerlog.backends.base import Backend, Entry, IntakeItem, LogReader, PendingAppend
from ledgerlog.codec import encode_intake, encode_record, encode_transaction
from ledgerlog.errors import FencedError, NotElectedError
from ledgerlog.model import START, Outcome, Put, Transaction, TxnId
from ledgerlog.reader import Reader
from ledgerlog.validator import SequencerState
from ledgerlog.writer import Writer

__all__ = [
    "Harness",
    "ledger",
    "test_append_and_read_back_in_order",
    "test_caught_up_after_reading_to_end",
    "test_deposed_writer_cannot_append",
    "test_end_to_end_writer_failover_exactly_once",
    "test_intake_meta_resumes_after_visible_record",
    "test_intake_preserves_each_producers_order",
    "test_one_writer_at_a_time",
    "test_pipelined_appends_land_in_order",
    "test_read_resumes_from_any_next_position",
    "test_second_handle_sees_same_log",
    "test_standby_takes_over_after_writer_closes",
]


class Harness(abc.ABC):
    """What a backend's test module provides."""

    #: Seconds a standby may need to take over after the writer closed.
    takeover_timeout: float = 30.0

    @abc.abstractmethod
    def open(self, ledger: str) -> Backend:
        """A new handle on `ledger` (as a separate process would open it)."""

    @abc.abstractmethod
    def new_ledger(self) -> str:
        """A name for a ledger no test used before."""

    @abc.abstractmethod
    def depose(self, backend: Backend) -> None:
        """Make the currently elected writer of `backend`'s ledger lose it, as if it had
        hung (e.g. expire its lease): the next campaign must succeed."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the harness holds."""


@pytest.fixture
def ledger(harness: Harness) -> Iterator[Backend]:
    backend = harness.open(harness.new_ledger())
    yield backend
    backend.close()


def _read_all(reader: LogReader, want: int, timeout: float = 30.0) -> list[Entry]:
    out: list[Entry] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        out.extend(reader.read(1024, timeout=0.2))
    return out


def _payloads(n: int, tag: str = "e") -> list[bytes]:
    return [f"{tag}-{i}".encode() * (1 + i % 7) for i in range(n)]


def test_append_and_read_back_in_order(ledger: Backend) -> None:
    with ledger.campaign("w1", timeout=30) as lw:
        data = _payloads(250)
        for i in range(0, 250, 50):
            lw.append(data[i : i + 50], SequencerState().to_bytes())
    with ledger.reader(START) as r:
        got = _read_all(r, 250)
    assert [e.data for e in got] == data
    positions = [e.position for e in got]
    assert positions == sorted(positions) and len(set(positions)) == 250
    assert all(a.next <= b.position for a, b in itertools.pairwise(got))


def test_pipelined_appends_land_in_order(ledger: Backend) -> None:
    data = _payloads(120)
    with ledger.campaign("w1", timeout=30) as lw:
        depth = max(1, lw.max_pending_appends)
        pending: list[PendingAppend] = []
        for i in range(0, 120, 10):
            # As the writer does: never more than the backend's bound in flight.
            if len(pending) >= depth:
                pending[-depth].result(30)
            pending.append(lw.append_async(data[i : i + 10], SequencerState().to_bytes()))
        ends = [p.result(30) for p in pending]
        assert all(p.done() for p in pending)
        # Each append's result is the position after its own entries.
        assert ends == sorted(ends) and len(set(ends)) == len(ends)
    with ledger.reader(START) as r:
        got = _read_all(r, 120)
    assert [e.data for e in got] == data
    assert all(got[i + 9].next <= end for i, end in zip(range(0, 120, 10), ends, strict=True))


def test_read_resumes_from_any_next_position(ledger: Backend) -> None:
    with ledger.campaign("w1", timeout=30) as lw:
        lw.append(_payloads(40), SequencerState().to_bytes())
    with ledger.reader(START) as r:
        first = _read_all(r, 40)
    for cut in (0, 1, 17, 39):
        with ledger.reader(first[cut].next) as r:
            rest = _read_all(r, 39 - cut, timeout=10)
        assert [e.data for e in rest] == [e.data for e in first[cut + 1 :]]


def test_caught_up_after_reading_to_end(ledger: Backend) -> None:
    with ledger.reader(START) as r:
        assert r.caught_up(ledger.end())
    with ledger.campaign("w1", timeout=30) as lw:
        lw.append(_payloads(10), SequencerState().to_bytes())
        end = ledger.end()
        with ledger.reader(START) as r:
            assert not r.caught_up(end)
            _read_all(r, 10)
            assert r.caught_up(end)


def test_second_handle_sees_same_log(harness: Harness) -> None:
    name = harness.new_ledger()
    a, b = harness.open(name), harness.open(name)
    try:
        with a.campaign("w1", timeout=30) as lw:
            lw.append(_payloads(5), SequencerState().to_bytes())
        with b.reader(START) as r:
            assert [e.data for e in _read_all(r, 5)] == _payloads(5)
    finally:
        a.close()
        b.close()


def test_one_writer_at_a_time(harness: Harness) -> None:
    name = harness.new_ledger()
    a, b = harness.open(name), harness.open(name)
    try:
        with a.campaign("w1", timeout=30), pytest.raises(NotElectedError):
            b.campaign("w2", timeout=1.0)
    finally:
        a.close()
        b.close()


def test_standby_takes_over_after_writer_closes(harness: Harness) -> None:
    name = harness.new_ledger()
    a, b = harness.open(name), harness.open(name)
    try:
        lw = a.campaign("w1", timeout=30)
        lw.append([b"from-w1"], SequencerState().to_bytes())
        got: list[object] = []
        t = threading.Thread(
            target=lambda: got.append(b.campaign("w2", timeout=harness.takeover_timeout))
        )
        t.start()
        time.sleep(0.5)
        assert not got, "a standby was elected while the writer still held the ledger"
        lw.close()
        t.join(harness.takeover_timeout + 5)
        assert got and not isinstance(got[0], BaseException)
        lw2 = got[0]
        lw2.append([b"from-w2"], SequencerState().to_bytes())  # type: ignore[attr-defined]
        lw2.close()  # type: ignore[attr-defined]
        with a.reader(START) as r:
            datas = [e.data for e in _read_all(r, 2)]
        assert datas == [b"from-w1", b"from-w2"]
    finally:
        a.close()
        b.close()


def test_deposed_writer_cannot_append(harness: Harness) -> None:
    name = harness.new_ledger()
    a, b = harness.open(name), harness.open(name)
    try:
        old = a.campaign("old", timeout=30)
        old.append([b"before"], SequencerState().to_bytes())
        harness.depose(a)
        new = b.campaign("new", timeout=harness.takeover_timeout)
        new.append([b"after"], SequencerState().to_bytes())
        with pytest.raises(FencedError):
            old.append([b"stale"], SequencerState().to_bytes())
        with pytest.raises(FencedError):
            old.check()
        new.append([b"after-2"], SequencerState().to_bytes())
        with b.reader(START) as r:
            datas = [e.data for e in _read_all(r, 3)]
            assert datas == [b"before", b"after", b"after-2"]
            assert not r.read(16, timeout=0.5)
        old.close()
        new.close()
    finally:
        a.close()
        b.close()


def test_intake_preserves_each_producers_order(ledger: Backend) -> None:
    producers = [ledger.intake_producer(f"client-{i}") for i in range(3)]
    for n in range(30):
        for i, p in enumerate(producers):
            p.submit(f"{i}:{n}".encode())
    with ledger.campaign("w1", timeout=30) as lw:
        consumer = lw.intake(b"")
        items: list[IntakeItem] = []
        deadline = time.monotonic() + 30
        while len(items) < 90 and time.monotonic() < deadline:
            items.extend(consumer.poll(64, timeout=0.2))
        consumer.close()
    for p in producers:
        p.close()
    assert len(items) == 90
    for i in range(3):
        mine = [it.data.decode() for it in items if it.data.startswith(f"{i}:".encode())]
        assert mine == [f"{i}:{n}" for n in range(30)]


def test_intake_meta_resumes_after_visible_record(harness: Harness) -> None:
    name = harness.new_ledger()
    a = harness.open(name)
    try:
        p = a.intake_producer("client")
        for n in range(20):
            p.submit(f"item-{n}".encode())
        lw = a.campaign("w1", timeout=30)
        consumer = lw.intake(b"")
        first: list[IntakeItem] = []
        deadline = time.monotonic() + 30
        while len(first) < 20 and time.monotonic() < deadline:
            first.extend(consumer.poll(20 - len(first), timeout=0.2))
        done, pending = first[:12], first[12:]
        meta = consumer.meta(done)
        lw.append([encode_record(1, 1, 1, "w1", [], meta)], SequencerState().to_bytes())
        consumer.ack(done)
        consumer.close()
        lw.close()  # crashes before recording `pending`
        lw2 = a.campaign("w2", timeout=harness.takeover_timeout)
        consumer2 = lw2.intake(meta)
        again: list[IntakeItem] = []
        deadline = time.monotonic() + 30
        while len(again) < len(pending) and time.monotonic() < deadline:
            again.extend(consumer2.poll(64, timeout=0.2))
        extra = consumer2.poll(64, timeout=0.5)
        consumer2.close()
        lw2.close()
        p.close()
        assert [it.data for it in again] == [it.data for it in pending]
        assert not extra
    finally:
        a.close()


def test_end_to_end_writer_failover_exactly_once(harness: Harness) -> None:
    """Two writers, one stops mid-stream: every submitted transaction is decided, and
    each commits exactly once."""
    name = harness.new_ledger()
    a, b, c = harness.open(name), harness.open(name), harness.open(name)
    w1 = Writer(a, "w1").start()
    assert w1.elected.wait(30)
    w2 = Writer(b, "w2").start()
    reader = Reader(c, name="check")
    producer = c.intake_producer("client")
    try:
        n = 300
        for i in range(n):
            txn = Transaction(TxnId("client", i), 0, writes=[Put(f"k{i}", i)])
            producer.submit(encode_intake([encode_transaction(txn)]))
            if i == n // 2:
                w1.stop()
        assert w2.elected.wait(harness.takeover_timeout)
        decided: dict[int, list[Outcome]] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for res in reader.poll(timeout=0.2):
                for d in res.decisions:
                    if d.seq is not None and d.txn_id is not None:
                        decided.setdefault(d.txn_id.client_seq, []).append(d.outcome)
            committed = [k for k, v in decided.items() if Outcome.COMMITTED in v]
            if len(committed) == n:
                break
        assert sorted(decided) == list(range(n))
        for k, outcomes in decided.items():
            assert outcomes.count(Outcome.COMMITTED) == 1, (k, outcomes)
        assert reader.state.epoch == 2
    finally:
        producer.close()
        w1.stop()
        w2.stop()
        reader.close()
        for x in (a, b, c):
            x.close()
