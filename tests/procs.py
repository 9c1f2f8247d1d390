"""Subprocess helpers for the crash, stale-writer and corruption tests.

Run as a script, this module is the child side: ``python tests/procs.py ROLE ...`` runs a
writer, a submitting client or a reader that applies to durable views, each writing what
it did to files the test inspects afterwards (so a SIGKILL loses nothing the test relies
on). Imported, it gives the parent side: :func:`spawn` and :class:`Proc` (kill-safe
process handles), transaction builders, and :func:`replay` (a full replay of a ledger
directory, importable by a 'spawn' multiprocessing worker).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import structlog

from ledgerlog.backends.file import FileBackend
from ledgerlog.check.procs import Proc, serve_writer
from ledgerlog.check.procs import kill_all as kill_all  # re-exported for the tests
from ledgerlog.check.procs import say as _say
from ledgerlog.check.procs import spawn as _spawn
from ledgerlog.codec import WireRecord, decode_entry, encode_intake, encode_transaction
from ledgerlog.model import START, Outcome, Put, Transaction, TxnId
from ledgerlog.reader import Reader
from ledgerlog.validator import (
    DEFAULT_WINDOW,
    ValidatorState,
    process_entry,
    validate_batch,
)

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent


class Symptom(AssertionError):
    """The failure a known library bug causes. xfail tests name it in ``raises=``, so a
    test that fails for any other reason (a broken precondition) is reported, not hidden."""


def symptom(ok: object, message: str) -> None:
    if not ok:
        raise Symptom(message)


# -- parent side: processes -------------------------------------------------------------------


def spawn(role: str, *args: Any, log_dir: Path, name: str | None = None) -> Proc:
    return _spawn(
        [str(SCRIPT), role, *map(str, args)], log_dir=log_dir, name=name or role, cwd=ROOT
    )


# -- transactions ----------------------------------------------------------------------------

BLIND, OWN_RMW, SHARED_RMW = "blind", "own_rmw", "shared_rmw"
KINDS = (BLIND, OWN_RMW, SHARED_RMW)


def make_txn(client_id: str, cseq: int, kind: str) -> Transaction:
    """Blind puts and read-modify-writes. BLIND and OWN_RMW always commit (once);
    SHARED_RMW reads a key blind puts write, at read_version 0: it may conflict."""
    if kind == BLIND:
        return Transaction(
            TxnId(client_id, cseq), 0, writes=[Put(f"k/{cseq % 41}", [client_id, cseq])]
        )
    if kind == OWN_RMW:
        key = f"own/{client_id}/{cseq}"
        return Transaction(TxnId(client_id, cseq), 0, reads=[key], writes=[Put(key, cseq)])
    if kind == SHARED_RMW:
        key = f"k/{cseq % 41}"
        return Transaction(
            TxnId(client_id, cseq), 0, reads=[key], writes=[Put(f"r/{cseq % 13}", cseq)]
        )
    raise ValueError(kind)


def kind_of(cseq: int) -> str:
    return KINDS[(cseq * 7) % 5 % 3]


class Submitter:
    """Submits transactions from a thread of the test process through an intake producer;
    ``acked`` holds every (cseq, kind) whose submit() returned."""

    def __init__(
        self,
        path: Path,
        client_id: str = "client",
        *,
        fsync: bool = True,
        per_batch: int = 2,
        pause: float = 0.0,
        retry_every: int = 9,
    ) -> None:
        self.backend = FileBackend(path, fsync=fsync)
        self.producer = self.backend.intake_producer(client_id)
        self.client_id = client_id
        self.per_batch = per_batch
        self.pause = pause
        self.retry_every = retry_every
        self.acked: list[tuple[int, str]] = []
        self.retried: list[int] = []
        self.next_cseq = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="submitter")

    def start(self) -> Submitter:
        self._thread.start()
        return self

    def _run(self) -> None:
        rng = random.Random(1234)
        try:
            while not self._stop.is_set():
                batch: list[tuple[int, str]] = []
                raws: list[bytes] = []
                for _ in range(rng.randint(1, self.per_batch)):
                    cseq = self.next_cseq
                    self.next_cseq += 1
                    kind = kind_of(cseq)
                    batch.append((cseq, kind))
                    raws.append(encode_transaction(make_txn(self.client_id, cseq, kind)))
                if self.retry_every and self.acked and rng.randrange(self.retry_every) == 0:
                    # A retry of an acknowledged submission: same txn id, same bytes.
                    cseq, kind = self.acked[rng.randrange(len(self.acked))]
                    raws.append(encode_transaction(make_txn(self.client_id, cseq, kind)))
                    self.retried.append(cseq)
                self.producer.submit(encode_intake(raws), timeout=30)
                self.acked.extend(batch)
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as exc:
            self.error = exc

    def wait_acked(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.acked) < n and time.monotonic() < deadline and self.error is None:
            time.sleep(0.01)
        return len(self.acked) >= n

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        with contextlib.suppress(Exception):
            self.producer.close()
        self.backend.close()


def read_acks(path: Path) -> list[int]:
    """Client seqs in an ack file; an unfinished last line (a kill mid-write) is ignored."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    return [int(x) for x in lines[:-1] if x]


# -- parent side: decisions --------------------------------------------------------------------


class Decisions:
    """Every final decision per txn id, gathered by an in-process Reader."""

    def __init__(self, path: Path) -> None:
        self.backend = FileBackend(path, create=False, fsync=False)
        self.reader = Reader(self.backend, name="checker")
        self.by_tid: dict[tuple[str, int], list[Any]] = {}
        self.seqs: list[int] = []
        self.epochs: list[tuple[int, str]] = []
        self.kinds: list[tuple[str, int, str]] = []

    def poll(self) -> None:
        for res in self.reader.poll(timeout=0.1):
            self.kinds.append((res.kind, res.epoch, res.writer_id))
            if res.kind == "epoch":
                self.epochs.append((res.epoch, res.writer_id))
            for d in res.decisions:
                if d.seq is None or d.txn_id is None:
                    continue
                self.seqs.append(d.seq)
                self.by_tid.setdefault((d.txn_id.client_id, d.txn_id.client_seq), []).append(d)

    def committed(self, tid: tuple[str, int]) -> int:
        return sum(1 for d in self.by_tid.get(tid, ()) if d.outcome is Outcome.COMMITTED)

    def wait_decided(self, tids: Iterable[tuple[str, int]], timeout: float) -> set[tuple[str, int]]:
        """Poll until every tid has a final decision; returns those still missing."""
        missing = set(tids)
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            missing = {t for t in missing if t not in self.by_tid}
            if not missing or time.monotonic() > deadline:
                return missing

    def drain(self, quiet: float = 0.5, timeout: float = 20.0) -> None:
        """Poll until nothing new arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < quiet:
            n = self.reader.entries_read
            self.poll()
            if self.reader.entries_read != n:
                last = time.monotonic()

    def close(self) -> None:
        self.reader.close()
        self.backend.close()


def new_ledger(tmp_path: Path) -> Path:
    path = tmp_path / "ledger"
    FileBackend(path).close()
    return path


def start_writer(
    path: Path, tmp_path: Path, wid: str, *extra: Any, lease: float = 2.0, fsync: int = 1
) -> Proc:
    p = spawn(
        "writer", path, wid, "--lease", lease, "--fsync", fsync, *extra, log_dir=tmp_path, name=wid
    )
    assert p.wait_for("STANDBY", 30), p.log()
    return p


def assert_exactly_once(
    dec: Decisions, acked: list[tuple[str, int, str]], retried: Iterable[tuple[str, int]] = ()
) -> None:
    """Every acknowledged txn is decided (finally); blind and own-key RMW txns commit
    exactly once; nothing anywhere commits twice; seqs are dense."""
    for client, cseq, kind in acked:
        ds = dec.by_tid.get((client, cseq))
        assert ds, f"acknowledged txn {client}/{cseq} was never decided"
        assert all(d.final for d in ds)
        n = dec.committed((client, cseq))
        if kind in (BLIND, OWN_RMW):
            assert n == 1, (client, cseq, kind, [d.describe() for d in ds])
        else:
            assert n <= 1, (client, cseq, kind, [d.describe() for d in ds])
    for tid in retried:
        assert dec.committed(tid) <= 1, tid
    for tid, ds in dec.by_tid.items():
        assert sum(1 for d in ds if d.outcome is Outcome.COMMITTED) <= 1, (
            tid,
            [d.describe() for d in ds],
        )
    assert sorted(dec.seqs) == list(range(1, len(dec.seqs) + 1)), "seqs are not dense"


# -- replay (used in-process and from a 'spawn' worker) ---------------------------------------


def replay(
    path: str | Path, max_entries: int = 1024, window: int = DEFAULT_WINDOW
) -> dict[str, Any]:
    """Read a ledger directory to its end twice, with the library's Reader and with a
    walk that validates one transaction at a time (for a digest after every seq).

    Never writes to the ledger. Returns only plain data (picklable)."""
    backend = FileBackend(path, create=False, fsync=False)
    try:
        # The walk: entry by entry, with positions, and a per-seq digest chain.
        entries: list[tuple[Any, ...]] = []
        perseq: list[tuple[int, int, str]] = []
        state = ValidatorState(window)
        split = ValidatorState(window)
        with backend.reader(START) as lr:
            while True:
                batch = lr.read(max_entries, timeout=0.0)
                if not batch:
                    break
                for e in batch:
                    res = process_entry(state, e.data)
                    entries.append(
                        (
                            e.position.major,
                            e.position.minor,
                            e.next.major,
                            e.next.minor,
                            res.kind,
                            res.epoch,
                            tuple((o[0], o[1], o[2]) for o in res.outcomes),
                            state.digest.hex() if res.kind == "record" else "",
                        )
                    )
                    if res.kind != "record":
                        continue
                    entry = decode_entry(e.data)
                    assert isinstance(entry, WireRecord)
                    split.next_seq = entry.first_seq
                    seq = entry.first_seq
                    for raw in entry.txns:
                        outs, _ = validate_batch(split, [raw], seq)
                        perseq.append((seq, outs[0][2], split.digest.hex()))
                        seq += 1
        # The library reader, in batches of max_entries.
        reader = Reader(backend, name="replay", window=window, keep_digests=1 << 20)
        got: list[tuple[str, int, tuple[Any, ...], str]] = []

        def collect(results: Any) -> None:
            for r in results:
                d = ""
                if r.kind == "record" and r.outcomes:
                    d = (reader.digest_at(r.outcomes[-1][0]) or b"").hex()
                got.append((r.kind, r.epoch, tuple((o[0], o[1], o[2]) for o in r.outcomes), d))

        reader.subscribe(collect)
        try:
            while reader.poll(timeout=0.0, max_entries=max_entries):
                pass
            last_seq, digest, epoch = reader.last_seq, reader.digest.hex(), reader.state.epoch
        finally:
            reader.close()
        return {
            "entries": entries,
            "perseq": perseq,
            "reader": got,
            "last_seq": last_seq,
            "digest": digest,
            "epoch": epoch,
            "walk_digest": state.digest.hex(),
            "walk_last_seq": state.next_seq - 1,
        }
    finally:
        backend.close()


# -- child side ------------------------------------------------------------------------------


def _configure_logging() -> None:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
    )


def _on_term(stop: threading.Event) -> None:
    signal.signal(signal.SIGTERM, lambda *_: stop.set())


def _crash_injection(point: str) -> None:
    """SIGKILL this process at a chosen instant inside the file backend."""
    from ledgerlog.backends import file as fb

    if point == "none":
        return
    orig_start = fb.FileLogWriter._start_segment

    def start_segment(self: Any, n: int, fd: int, state: Any) -> Any:
        rolling = getattr(self, "_segment", None) is not None
        if (point == "roll" and rolling) or (point == "takeover" and not rolling and n > 1):
            _say(f"CRASHING at {point} before the header of segment {n}")
            os.kill(os.getpid(), signal.SIGKILL)
        return orig_start(self, n, fd, state)

    fb.FileLogWriter._start_segment = start_segment  # type: ignore[method-assign]


def child_writer(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("writer_id")
    ap.add_argument("--lease", type=float, default=2.0)
    ap.add_argument("--segment-bytes", type=int, default=64 * 1024 * 1024)
    ap.add_argument("--fsync", type=int, default=1)
    ap.add_argument("--max-record-txns", type=int, default=1000)
    ap.add_argument("--crash-at", default="none")
    a = ap.parse_args(argv)
    _configure_logging()
    _crash_injection(a.crash_at)
    backend = FileBackend(
        a.path, fsync=bool(a.fsync), segment_bytes=a.segment_bytes, lease_timeout=a.lease
    )
    return serve_writer(backend, a.writer_id, max_record_txns=a.max_record_txns)


def child_client(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("client_id")
    ap.add_argument("ack_path")
    ap.add_argument("--count", type=int, default=10**9)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--fsync", type=int, default=1)
    a = ap.parse_args(argv)
    _configure_logging()
    backend = FileBackend(a.path, fsync=bool(a.fsync))
    producer = backend.intake_producer(a.client_id)
    ack_fd = os.open(a.ack_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    lock = threading.Lock()
    counter = iter(range(a.count))

    def work() -> None:
        while True:
            with lock:
                cseq = next(counter, None)
            if cseq is None:
                return
            raw = encode_transaction(make_txn(a.client_id, cseq, kind_of(cseq)))
            producer.submit(encode_intake([raw]), timeout=30)
            os.write(ack_fd, f"{cseq}\n".encode())  # after the ack, never before

    threads = [threading.Thread(target=work, daemon=True) for _ in range(a.threads)]
    _say(f"CLIENT pid={os.getpid()}")
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    producer.close()
    backend.close()
    _say("CLIENT DONE")
    return 0


HANDLER_TABLES = (
    "CREATE TABLE IF NOT EXISTS applied (seq INTEGER PRIMARY KEY, client TEXT, cseq INTEGER)",
    "CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER)",
    "INSERT OR IGNORE INTO counter (id, n) VALUES (1, 0)",
)


def open_views(db: str | Path) -> tuple[Any, Any, sqlite3.Connection]:
    """The SQLiteView and the store-backed HandlerView of the reader-crash test (one file)."""
    from ledgerlog.views.handler import HandlerView
    from ledgerlog.views.sqlite import SQLiteView

    sql = SQLiteView(db, name="sqlite")
    conn = sqlite3.connect(str(db), isolation_level=None, check_same_thread=False, timeout=30)
    for stmt in HANDLER_TABLES:
        conn.execute(stmt)

    def handler(seq: int, txn: Transaction) -> None:
        conn.execute(
            "INSERT INTO applied (seq, client, cseq) VALUES (?, ?, ?)",
            (seq, txn.txn_id.client_id, txn.txn_id.client_seq),
        )
        conn.execute("UPDATE counter SET n = n + 1 WHERE id = 1")

    hv = HandlerView(handler, store=conn, name="handler")
    return sql, hv, conn


def child_reader(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("db")
    ap.add_argument("info_path")
    ap.add_argument("--max-entries", type=int, default=3)
    ap.add_argument("--snapshot-every", type=int, default=0)
    ap.add_argument("--until-seq", type=int, default=0)
    a = ap.parse_args(argv)
    _configure_logging()
    backend = FileBackend(a.path, create=False, fsync=False)
    sql, hv, conn = open_views(a.db)
    reader = Reader(backend, [sql, hv], name="crashy", snapshot_every=a.snapshot_every or None)
    info = {
        "pid": os.getpid(),
        "next_seq": reader.state.next_seq,
        "position": [reader.position.major, reader.position.minor],
    }
    with open(a.info_path, "a") as f:
        f.write(json.dumps(info) + "\n")
    _say(f"READER {json.dumps(info)}")
    while not a.until_seq or reader.last_seq < a.until_seq:
        reader.poll(timeout=0.05, max_entries=a.max_entries)
    reader.close()
    sql.close()
    hv.close()
    conn.close()
    _say(f"READER DONE last_seq={reader.last_seq}")
    return 0


ROLES: dict[str, Callable[[list[str]], int]] = {
    "writer": child_writer,
    "client": child_client,
    "reader": child_reader,
}


if __name__ == "__main__":
    sys.exit(ROLES[sys.argv[1]](sys.argv[2:]))
