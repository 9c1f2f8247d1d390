"""A client whose own writer serves the ledger hands its submissions straight to it
(no intake hop); when that append fails they go through the intake after all, and each
transaction is still decided once (embedded backend; tests/../integration covers Pulsar)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing
from test_client import ledger_decisions, open_client

import ledgerlog
from ledgerlog.backends.base import CompletedAppend, IntakeProducer
from ledgerlog.backends.file import FileLogWriter
from ledgerlog.errors import BackendError
from ledgerlog.model import Outcome
from ledgerlog.testing.threads import run_in_threads

pytestmark = pytest.mark.timeout(60)


class CountingIntake(IntakeProducer):
    """Passes every call on to the real intake producer, counting the batches."""

    def __init__(self, inner: IntakeProducer) -> None:
        self.inner = inner
        self.batches = 0

    def submit(self, data: bytes, timeout: float | None = None) -> None:
        self.batches += 1
        self.inner.submit(data, timeout)

    def submit_async(self, data: bytes, on_done: Callable[[BaseException | None], None]) -> None:
        self.batches += 1
        self.inner.submit_async(data, on_done)

    def close(self) -> None:
        self.inner.close()


def counted(client: ledgerlog.Client) -> CountingIntake:
    spy = CountingIntake(client._intake)
    client._intake = spy
    return spy


def blind_puts(client: ledgerlog.Client, prefix: str, n: int) -> list[Any]:
    txs = []
    for i in range(n):
        tx = client.transaction()
        tx.put(f"{prefix}{i}", i)
        txs.append(tx)
    return client.submit_many(txs)


def hosting(client: ledgerlog.Client) -> None:
    """Wait until `client`'s own writer serves (wait_writer returns as soon as the
    replica sees the epoch start, a moment before its writer has read through it)."""
    assert client.writer is not None and client.writer.elected.wait(10), "not elected"


def committed_once(path: Path) -> Counter[str]:
    """How many times each transaction id was decided committed in the ledger."""
    decisions, reader = ledger_decisions(path)
    reader.close()
    return Counter(str(d.txn_id) for d in decisions if d.outcome is Outcome.COMMITTED)


def test_the_writers_own_client_skips_the_intake_and_others_do_not(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    with open_client(path, "host") as host, open_client(path, "guest", writer=None) as guest:
        hosting(host)
        host_intake, guest_intake = counted(host), counted(guest)
        futs = blind_puts(host, "h", 50) + blind_puts(guest, "g", 50)
        assert all(f.result(10).committed for f in futs)
        assert host.transaction().put("one", 1) is None
        with host.transaction() as tx:
            tx.put("single", 1)  # the one-at-a-time path (Tx.commit) too
        assert tx.decision is not None and tx.decision.committed
        assert host_intake.batches == 0
        assert guest_intake.batches >= 1
        guest.sync(10)
        assert [guest.get(f"h{i}") for i in range(50)] == list(range(50))
        assert host.digest == guest.digest
    counts = committed_once(path)
    assert len(counts) == 101 and set(counts.values()) == {1}


def test_a_standby_client_goes_through_the_intake(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    with open_client(path, "first") as first:
        # The second client starts once the first serves: started together, either can
        # win the election (CI saw the second win once, on a slow minute).
        hosting(first)
        with open_client(path, "second") as second:
            assert second.writer is not None and not second.writer.elected.is_set()
            spy = counted(second)
            assert all(f.result(10).committed for f in blind_puts(second, "s", 20))
            assert spy.batches >= 1


def test_a_new_writer_logs_what_recovering_the_ledgers_end_cost(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    with open_client(path, "first") as first:
        hosting(first)
        assert all(f.result(10).committed for f in blind_puts(first, "a", 20))
    # ledgerlog keeps its info events quiet unless the application configures logging.
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        with structlog.testing.capture_logs() as logs, open_client(path, "second") as second:
            hosting(second)
    finally:
        structlog.configure(**saved)
    recovered = [e for e in logs if e["event"] == "ledger end recovered"]
    assert len(recovered) == 1, logs
    # The file backend's restart point is the newest segment's start (here the new
    # term's own, so nothing to scan); the state is the first term's end all the same.
    assert recovered[0]["next_seq"] == 21
    assert recovered[0]["entries_scanned"] >= 0 and recovered[0]["seconds"] >= 0
    assert recovered[0]["scanned_from"]


@pytest.mark.parametrize("landed", [False, True], ids=["lost", "landed"])
def test_a_failed_local_append_is_resubmitted_through_the_intake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    """The append carrying local submissions fails (after writing them, if `landed`):
    the writer resigns and is elected again, the client resubmits them through the
    intake, and every one of them is decided committed exactly once."""
    path = tmp_path / "ledger"
    real = FileLogWriter.append_async
    failures: list[int] = []

    def flaky(self: FileLogWriter, entries: Sequence[bytes], state: bytes) -> Any:
        # Fail the first append made from the submitting (test) thread: a local one.
        if not failures and threading.current_thread() is threading.main_thread():
            failures.append(len(entries))
            if landed:
                real(self, entries, state)
            raise BackendError("injected append failure")
        return real(self, entries, state)

    with open_client(path, "host") as host:
        hosting(host)
        monkeypatch.setattr(FileLogWriter, "append_async", flaky)
        spy = counted(host)
        futs = blind_puts(host, "k", 30)
        decisions = [f.result(20) for f in futs]
        assert failures, "the injected failure never happened"
        assert all(d.committed for d in decisions)
        assert spy.batches >= 1  # the resubmission
        host.sync(10)
        assert [host.get(f"k{i}") for i in range(30)] == list(range(30))
        # Later submissions go on (locally again, once the writer is re-elected).
        assert all(f.result(20).committed for f in blind_puts(host, "after", 5))
    counts = committed_once(path)
    assert len(counts) == 35 and set(counts.values()) == {1}


def test_concurrent_local_submitters_share_records_and_all_commit(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    with open_client(path, "host", fsync=True) as host:
        hosting(host)
        spy = counted(host)

        def work(t: int) -> None:
            for b in range(10):
                assert all(f.result(20).committed for f in blind_puts(host, f"t{t}-{b}-", 5))

        run_in_threads(work, 8, timeout=60)
        assert spy.batches == 0
        host.sync(10)
        assert sum(1 for _k, _v in host.range("t", "u")) == 400
    decisions, reader = ledger_decisions(path)
    records = reader.entries_read
    reader.close()
    assert len([d for d in decisions if d.committed]) == 400
    # 80 submit_many calls; queued ones ride along with the append in progress.
    assert records <= 80


def test_local_submissions_an_ack_lied_about_are_resubmitted_at_the_next_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append is acknowledged without being written (what a broker dropping a message
    as a duplicate looks like to the writer): nothing reports a failure, so the client's
    replica must find out. Once it sees a newer epoch start (forced here by failing the
    next local append), records of the old term can no longer count: the undecided
    transactions go through the intake and commit exactly once."""
    path = tmp_path / "ledger"
    real = FileLogWriter.append_async
    calls: list[str] = []

    def lying(self: FileLogWriter, entries: Sequence[bytes], state: bytes) -> Any:
        if threading.current_thread() is threading.main_thread() and len(calls) < 2:
            if not calls:
                calls.append("acked, not written")
                return CompletedAppend(self.backend.end())
            calls.append("failed")
            raise BackendError("injected append failure")
        return real(self, entries, state)

    with open_client(path, "host") as host:
        hosting(host)
        first_epoch = host.reader.state.epoch
        monkeypatch.setattr(FileLogWriter, "append_async", lying)
        lost = blind_puts(host, "lost", 10)
        # Let the writer retire that append as acknowledged (its submitter told "done").
        term = host.writer._term if host.writer is not None else None
        deadline = time.monotonic() + 10
        while term is not None and term.pending:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        failed = blind_puts(host, "failed", 10)
        assert all(f.result(20).committed for f in lost + failed)
        assert calls == ["acked, not written", "failed"]
        assert host.reader.state.epoch > first_epoch
    counts = committed_once(path)
    assert len(counts) == 20 and set(counts.values()) == {1}
