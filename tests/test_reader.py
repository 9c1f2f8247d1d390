"""Reader behaviours not covered by the conformance suite."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import ledgerlog
from ledgerlog.backends.file import FileBackend


@pytest.mark.timeout(60)
def test_sync_returns_when_the_last_entry_is_followed_by_a_seal(tmp_path: Path) -> None:
    # Every append overflows the segment, so the writer seals it right after each record:
    # the reader's cursor then sits past a seal, with nothing left to apply.
    backend = FileBackend(tmp_path / "x", segment_bytes=4096)
    with ledgerlog.open(backend, client_id="a") as db:
        db.wait_writer()
        for i in range(5):
            with db.transaction() as tx:
                tx.put(f"k{i}", "x" * 5000)
        # The writer seals right after its append returns: wait for the last seal (six
        # segments: the first and one per record), so the sync below starts behind it.
        deadline = time.monotonic() + 10
        while len(list((tmp_path / "x" / "segments").iterdir())) < 6:
            assert time.monotonic() < deadline, "the writer never rolled after each record"
            time.sleep(0.01)
        started = time.monotonic()
        assert db.sync(timeout=10) == 5
        assert time.monotonic() - started < 5


def _ledger_of(path: Path, n: int) -> bytes:
    """A file ledger at `path` with `n` committed puts k0..k{n-1} = 0..n-1; its digest."""
    with ledgerlog.open(path, client_id="w") as db:
        db.wait_writer()
        for i in range(n):
            with db.transaction() as tx:
                tx.put(f"k{i}", i)
        db.sync()
        return db.digest


@pytest.mark.timeout(60)
def test_reader_restarts_from_its_views_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    digest = _ledger_of(path, 30)
    view = ledgerlog.SQLiteView(tmp_path / "view.db")
    backend = FileBackend(path)
    r = ledgerlog.Reader(backend, [view], name="durable")
    r.catch_up(timeout=10)
    assert r.last_seq == 30 and r.digest == digest
    r.close()
    view.close()
    # A new reader resumes where the view's checkpoint says, not from seq 1.
    view = ledgerlog.SQLiteView(tmp_path / "view.db")
    r = ledgerlog.Reader(backend, [view], name="durable")
    assert r.state.next_seq == 31
    assert r.position > ledgerlog.Position(0, 0)
    assert r.poll(timeout=0.2) == []
    assert view.get("k29") == 29 and len(view) == 30
    r.close()
    view.close()


@pytest.mark.timeout(60)
def test_caught_up_hooks_run_once_when_sync_returns(tmp_path: Path) -> None:
    # On a busy ledger every poll finds something, so "a poll found nothing" may never
    # happen; sync() reaching the ledger's end counts as caught up too.
    path = tmp_path / "ledger"
    _ledger_of(path, 5)
    r = ledgerlog.Reader(FileBackend(path), name="hooked")  # no thread: nothing polls idle
    calls: list[int] = []
    r.when_caught_up(lambda: calls.append(r.last_seq))
    assert calls == []
    assert r.sync(timeout=10) == 5
    assert calls == [5]
    r.sync(timeout=10)
    assert calls == [5]  # once
    r.close()


class _FailingView(ledgerlog.MemoryView):
    """Applies normally until told to fail, like a database whose connection drops."""

    fail = False

    def apply(self, applied, checkpoint):  # type: ignore[no-untyped-def]
        if self.fail:
            raise ledgerlog.BackendError("connection to the view's database lost")
        super().apply(applied, checkpoint)


@pytest.mark.timeout(60)
def test_a_failing_view_stops_the_reader_instead_of_skipping_a_batch(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    _ledger_of(path, 10)
    backend = FileBackend(path)
    view = _FailingView()
    r = ledgerlog.Reader(backend, [view], name="fragile")
    try:
        r.poll(max_entries=4)  # the epoch start and 3 records
        assert view.applied_seq == 3
        view.fail = True
        with pytest.raises(ledgerlog.ApplyError, match="restart the reader"):
            r.poll(max_entries=4)
        view.fail = False
        # It stays stopped: carrying on would skip the failed batch in the view.
        with pytest.raises(ledgerlog.ApplyError):
            r.poll()
        assert view.applied_seq == 3
    finally:
        r.close()
        backend.close()


@pytest.mark.timeout(60)
def test_views_that_never_restart_a_reader_get_no_validator_snapshots(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    with ledgerlog.open(path, client_id="w") as db:
        db.wait_writer()
        for i in range(10):
            with db.transaction() as tx:
                tx.put(f"k{i}", i)
        db.sync()
        digest = db.digest
        # A client's own replica is rebuilt with the client: it takes no snapshots.
        ck = db.view.checkpoint()
        assert ck is not None and ck.next_seq == 11 and ck.validator_state == b""
    backend = FileBackend(path)
    try:
        volatile = ledgerlog.MemoryView(snapshots=False)
        r = ledgerlog.Reader(backend, [volatile], name="volatile", snapshot_every=2)
        r.poll(max_entries=4)  # the epoch start and 3 records
        ck = volatile.checkpoint()
        assert ck is not None and ck.next_seq == 4 and ck.validator_state == b""
        r.close()
        # Restarted over the same view, the reader re-validates from the ledger's start
        # but applies only what the view lacks, and reaches the same digest.
        r = ledgerlog.Reader(backend, [volatile], name="volatile")
        r.catch_up(timeout=10)
        assert r.digest == digest and volatile.applied_seq == 10
        assert [volatile.get(f"k{i}") for i in range(10)] == list(range(10))
        r.close()
        # A view that can use a snapshot still gets one, beside one that cannot.
        kept = ledgerlog.MemoryView()
        r = ledgerlog.Reader(backend, [kept, ledgerlog.MemoryView(snapshots=False)], name="mixed")
        r.catch_up(timeout=10)
        ck = kept.checkpoint()
        assert ck is not None and ck.validator_state != b""
        r.close()
    finally:
        backend.close()


@pytest.mark.timeout(60)
def test_decision_futures_of_one_batch_wait_for_their_own_result(tmp_path: Path) -> None:
    # The futures of one watch_many share a Condition: setting one wakes waiters of the
    # others, which must keep waiting for their own decision (and time out on their own).
    import asyncio
    import concurrent.futures
    import threading

    from ledgerlog.model import Decision, Outcome, TxnId

    da = Decision(None, TxnId("c", 1), Outcome.COMMITTED)
    db = Decision(None, TxnId("c", 2), Outcome.COMMITTED)
    backend = FileBackend(tmp_path / "x")
    r = ledgerlog.Reader(backend, name="futures")
    seen: list[float] = []
    try:
        a, b, c = r.watch_many([("c", 1), ("c", 2), ("c", 3)], seen.extend)
        assert isinstance(a, concurrent.futures.Future)
        got: list[object] = []

        def wait_b() -> None:
            try:
                got.append(b.result(timeout=0.5))
            except concurrent.futures.TimeoutError:
                got.append("timeout")

        t = threading.Thread(target=wait_b)
        t.start()
        time.sleep(0.1)
        a.set_result(da)
        t.join(5)
        assert got == ["timeout"]
        assert a.result(0) is da and a.exception(0) is None
        with pytest.raises(concurrent.futures.TimeoutError):
            c.exception(timeout=0.05)
        done, pending = concurrent.futures.wait([a, b, c], timeout=0.05)
        assert done == {a} and pending == {b, c}
        c.set_exception(ValueError("boom"))
        assert isinstance(c.exception(1), ValueError)
        with pytest.raises(ValueError):
            c.result(1)

        async def via_asyncio() -> object:
            return await asyncio.wrap_future(b)

        threading.Timer(0.05, lambda: b.set_result(db)).start()
        assert asyncio.run(via_asyncio()) is db
        r.unwatch("c", 1, a)
        r.unwatch("c", 2, b)
        r.unwatch("c", 3, c)
        assert not r._waiters
    finally:
        r.close()


class _RecordingView(ledgerlog.MemoryView):
    """Records (transactions applied, checkpoint next_seq, checkpoint position) per call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int, ledgerlog.Position]] = []

    def apply(self, applied, checkpoint):  # type: ignore[no-untyped-def]
        self.calls.append((len(applied), checkpoint.next_seq, checkpoint.position))
        super().apply(applied, checkpoint)


@pytest.mark.timeout(120)
def test_a_long_poll_applies_and_announces_in_steps(tmp_path: Path) -> None:
    from ledgerlog.reader import APPLY_EVERY_TXNS

    path = tmp_path / "ledger"
    per_record = APPLY_EVERY_TXNS * 3 // 4
    with ledgerlog.open(path, client_id="w") as db:
        db.wait_writer()
        for b in range(4):
            txs = []
            for i in range(per_record):
                tx = db.transaction()
                tx.put(f"k{b}-{i}", i)
                txs.append(tx)
            assert all(f.result(30).committed for f in db.submit_many(txs))
        digest = db.digest
        total = db.sync()
    assert total == 4 * per_record
    backend = FileBackend(path)
    view = _RecordingView()
    r = ledgerlog.Reader(backend, [view], name="stepped")
    announced: list[int] = []
    r.subscribe(lambda results: announced.append(sum(len(x.outcomes) for x in results)))
    try:
        results = r.poll(timeout=1.0)  # everything, in one poll
        assert sum(len(x.outcomes) for x in results if x.kind == "record") == total
        assert r.digest == digest and r.last_seq == total
        # Applied and announced in steps of at least APPLY_EVERY_TXNS transactions, each
        # ending at an entry boundary with a checkpoint that moves forward; the last one
        # at the reader's position.
        assert len(view.calls) >= 2
        assert [n for n, _, _ in view.calls] == announced
        assert sum(announced) == total
        assert all(n >= APPLY_EVERY_TXNS for n in announced[:-1])
        seqs = [s for _, s, _ in view.calls]
        positions = [p for _, _, p in view.calls]
        assert seqs == sorted(seqs) and seqs[-1] == total + 1
        assert positions == sorted(positions) and positions[0] < positions[-1] == r.position
        assert view.applied_seq == total and view.get("k3-0") == 0
    finally:
        r.close()
        backend.close()
    # Restarted over the view, a reader re-validates from the last validator snapshot
    # the view holds and applies nothing twice.
    before = len(view.calls)
    r = ledgerlog.Reader(FileBackend(path), [view], name="stepped")
    try:
        r.catch_up(timeout=10)
        assert r.digest == digest and r.last_seq == total
        assert sum(n for n, _, _ in view.calls[before:]) == 0
    finally:
        r.close()


def test_a_decided_future_answers_without_taking_the_shared_condition() -> None:
    # The futures of one watch_many share one Condition; a done-callback (or any caller
    # of an already decided future) must not queue behind whoever holds it.
    import threading

    from ledgerlog.model import Decision, Outcome, TxnId
    from ledgerlog.reader import _DecisionFuture, _settle_all

    cond = threading.Condition()
    fut = _DecisionFuture(cond, time.perf_counter(), None)
    decision = Decision(7, TxnId("c", 1), Outcome.COMMITTED)
    _settle_all([(fut, decision)], time.perf_counter())
    got: list[Decision] = []
    with cond:  # held elsewhere, e.g. by the reader settling the batch's other futures
        t = threading.Thread(target=lambda: got.append(fut.result(5)))
        t.start()
        t.join(2)
        assert not t.is_alive(), "result() of a decided future waited for the Condition"
    assert got == [decision]

    failed = _DecisionFuture(cond, time.perf_counter(), None)
    failed.set_exception(ledgerlog.ClosedError("reader closed"))
    with pytest.raises(ledgerlog.ClosedError):
        failed.result(0)
