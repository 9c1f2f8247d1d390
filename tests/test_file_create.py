"""Creating a file ledger while other processes open it too.

A writer and its standby (or two services) started together open a ledger that does not
exist yet. One used to see the other's half-made directory and refuse it as "not a
ledgerlog ledger" (a CI run of the consistency check lost its writer that way).
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import threading
from pathlib import Path

import pytest

import ledgerlog
from ledgerlog.backends.file import LEDGER_FORMAT, FileBackend


def _half_made(path: Path) -> None:
    """What a creator has made before it writes the marker."""
    (path / "segments").mkdir(parents=True)
    (path / "intake").mkdir()


def test_an_opener_waits_for_a_creation_in_progress_and_opens_its_ledger(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger"
    _half_made(path)
    creator = os.open(path / ".create.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(creator, fcntl.LOCK_EX)
    outcome: list[object] = []

    def open_it() -> None:
        try:
            outcome.append(FileBackend(path, fsync=False))
        except Exception as e:
            outcome.append(e)

    t = threading.Thread(target=open_it, daemon=True)
    t.start()
    t.join(0.3)
    assert t.is_alive(), f"did not wait for the creator: {outcome}"
    (path / "LEDGER").write_text(LEDGER_FORMAT + "\n")
    os.utime(path / "LEDGER", ns=(1, 1))  # to tell the creator's marker from a rewrite
    os.close(creator)
    t.join(10)
    assert not t.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], FileBackend), outcome
    assert (path / "LEDGER").stat().st_mtime_ns == 1  # opened the creator's ledger as is


def test_a_creation_whose_creator_died_is_completed(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    _half_made(path)
    (path / ".LEDGER.999.0badf00d").write_text(LEDGER_FORMAT)  # died before the rename
    with pytest.raises(ledgerlog.LedgerNotFoundError, match="no ledger at"):
        FileBackend(path, create=False)
    b = FileBackend(path, fsync=False)
    assert (path / "LEDGER").read_text() == LEDGER_FORMAT + "\n"
    assert not list(path.glob(".LEDGER.*"))
    b.close()
    with ledgerlog.open(path, fsync=False) as db:
        tx = db.transaction()
        tx.put("k", "v")
        assert tx.commit().committed


def test_a_directory_with_more_than_a_half_made_ledger_is_still_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger"
    _half_made(path)
    (path / "segments" / "notes.txt").write_text("mine")
    with pytest.raises(ledgerlog.ConfigError, match="exists and is not a ledgerlog ledger"):
        FileBackend(path)
    with pytest.raises(ledgerlog.ConfigError, match="is not a ledgerlog ledger"):
        FileBackend(path, create=False)
    assert (path / "segments" / "notes.txt").read_text() == "mine"
    assert not (path / "LEDGER").exists()
    a_file = tmp_path / "plain"
    a_file.write_text("x")
    with pytest.raises(ledgerlog.ConfigError, match="exists and is not a ledgerlog ledger"):
        FileBackend(a_file)


def _open_at(path: str, go: multiprocessing.synchronize.Event, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    go.wait(10)
    try:
        FileBackend(path, fsync=False).close()
        out.put("ok")
    except Exception as e:
        out.put(f"{type(e).__name__}: {e}")


def test_processes_opening_a_new_ledger_at_once_all_succeed(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for round_ in range(12):
        path = str(tmp_path / f"ledger{round_}")
        go = ctx.Event()
        out = ctx.Queue()
        procs = [ctx.Process(target=_open_at, args=(path, go, out)) for _ in range(6)]
        for p in procs:
            p.start()
        go.set()
        results = [out.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(10)
        assert results == ["ok"] * len(procs), f"round {round_}: {results}"
