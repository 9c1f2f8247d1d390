"""The embedded backend's intake files: a writer collects the files of clients that are
gone once it has consumed them, and never a live client's, even one starting up at that
very moment (which once lost every submission of that client)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import pytest

from ledgerlog.backends.file import FileBackend, FileIntakeConsumer, FileLogWriter
from ledgerlog.codec import encode_intake, encode_transaction
from ledgerlog.model import Put, Transaction, TxnId


def _submission(client: str, seq: int) -> bytes:
    txn = Transaction(TxnId(client, seq), 0, writes=[Put(f"{client}/{seq}", seq)])
    return encode_intake([encode_transaction(txn)])


def _elected(tmp_path: Path) -> tuple[FileBackend, FileLogWriter, FileIntakeConsumer]:
    backend = FileBackend(tmp_path / "ledger", fsync=False)
    lw = backend.campaign("w", timeout=10)
    return backend, lw, lw.intake(b"")


def _intake_files(backend: FileBackend) -> list[str]:
    return sorted(os.listdir(backend.path / "intake"))


@pytest.mark.timeout(30)
def test_a_client_starting_while_the_writer_collects_intake_files_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, lw, consumer = _elected(tmp_path)
    real_flock = fcntl.flock
    collected = []

    def flock_after_a_collection(fd: Any, operation: int) -> None:
        # The producer's blocking lock of its new file (the writer's own probes are
        # non-blocking): the writer's collection runs just before it, once.
        if not collected and not operation & fcntl.LOCK_NB:
            collected.append(_intake_files(backend))
            consumer._gc()
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_a_collection)
    producer = backend.intake_producer("starting")
    monkeypatch.setattr(fcntl, "flock", real_flock)
    try:
        assert collected, "the collection did not run while the producer started"
        producer.submit(_submission("starting", 1), timeout=10)
        items = consumer.poll(10, timeout=2.0)
        assert [it.data for it in items] == [_submission("starting", 1)]
        assert _intake_files(backend) == [producer.name]
    finally:
        producer.close()
        consumer.close()
        lw.close()
        backend.close()


@pytest.mark.timeout(30)
def test_consumed_intake_files_of_gone_clients_are_collected_and_live_ones_kept(
    tmp_path: Path,
) -> None:
    backend, lw, consumer = _elected(tmp_path)
    gone = backend.intake_producer("gone")
    live = backend.intake_producer("live")
    unconsumed = backend.intake_producer("unconsumed")
    try:
        gone.submit(_submission("gone", 1), timeout=10)
        live.submit(_submission("live", 1), timeout=10)
        items = consumer.poll(10, timeout=2.0)
        assert sorted(it.data for it in items) == sorted(
            [_submission("gone", 1), _submission("live", 1)]
        )
        # What the ledger records as consumed (the offsets travel in the record's meta).
        consumer.meta(items)
        gone.close()
        unconsumed.submit(_submission("unconsumed", 1), timeout=10)
        unconsumed.close()
        consumer._gc()
        # Consumed and closed: gone. Consumed but its client lives: kept (it may grow).
        # Closed with a submission not consumed yet: kept until it is.
        assert _intake_files(backend) == sorted([live.name, unconsumed.name])
        assert [it.data for it in consumer.poll(10, timeout=2.0)] == [_submission("unconsumed", 1)]
    finally:
        live.close()
        consumer.close()
        lw.close()
        backend.close()


@pytest.mark.timeout(30)
def test_a_file_a_client_died_with_before_naming_it_is_collected(tmp_path: Path) -> None:
    backend, lw, consumer = _elected(tmp_path)
    intake = backend.path / "intake"
    # As left by a client killed between creating its file and linking it as .q: no
    # process holds it.
    (intake / ".dead.0123456789abcdef.new").write_bytes(b"")
    # One being born right now: its client holds the lock.
    born = intake / ".born.fedcba9876543210.new"
    fd = os.open(born, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        consumer._gc()
        assert _intake_files(backend) == [born.name]
    finally:
        os.close(fd)
        consumer.close()
        lw.close()
        backend.close()
