"""PostgresView against a real PostgreSQL server (the session's LocalPostgres).

Round trip against a plain-dict model; a Reader restarting from the view's checkpoint;
exactly once across kill -9 of a reader process applying to PostgreSQL; a second reader
applying to the same tables refused rather than double-applying. Every test gets its own
database.

Run as a script, this module is the child side of the crash test:
``python integration/test_postgres_view.py reader LEDGER DSN INFO [options]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ledgerlog.backends.file import FileBackend
from ledgerlog.codec import WireTxn, encode_intake, encode_transaction, transaction_to_wire
from ledgerlog.errors import BackendError, ClosedError, ConfigError, UsageError
from ledgerlog.model import START, Delete, Position, Put, Transaction, TxnId
from ledgerlog.reader import ApplyError, Reader
from ledgerlog.validator import ValidatorState
from ledgerlog.views import Checkpoint, MemoryView
from ledgerlog.views.postgres import PostgresView

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def pg_dsn(local_postgres: Any) -> str:
    """A fresh database on the session's server."""
    dsn: str = local_postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    return dsn


def sql(dsn: str, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description else []


def wtxn(*writes: Put | Delete, n: int = 0) -> WireTxn:
    return transaction_to_wire(Transaction(TxnId("client", n), 0, writes=writes))


def ckpt(next_seq: int, state: bytes | None = None) -> Checkpoint:
    return Checkpoint(
        Position(7, next_seq * 10),
        next_seq,
        next_seq.to_bytes(16, "big"),
        b"validator-state-%d" % next_seq if state is None else state,
    )


Model = dict[str, tuple[Any, int]]


def random_batch(rng: random.Random, first: int, size: int) -> list[tuple[int, WireTxn]]:
    out = []
    for seq in range(first, first + size):
        writes: list[Put | Delete] = []
        for _ in range(rng.randint(0, 4)):
            key = rng.choice(["k", "é", "z", "\U0001f600", "a/"]) + f"{rng.randrange(40):02d}"
            if rng.random() < 0.25:
                writes.append(Delete(key))
            else:
                value = rng.choice([seq, f"v{seq}", [seq, {"x": 1.5}], None, b"\x00b", True])
                writes.append(Put(key, value))
        out.append((seq, wtxn(*writes, n=seq)))
    return out


def model_apply(model: Model, applied: list[tuple[int, WireTxn]]) -> None:
    for seq, txn in applied:
        for op, key, value in txn.writes:
            if op == 1:
                model[key] = (value, seq)
            else:
                model.pop(key, None)


class Feed:
    """A file ledger with its writer in a thread of this process, fed through an intake."""

    def __init__(self, path: Path, max_record_txns: int = 2) -> None:
        from ledgerlog.writer import Writer

        self.path = path
        self.backend = FileBackend(path, fsync=False)
        self.writer = Writer(self.backend, "w1", max_record_txns=max_record_txns).start()
        self.producer = self.backend.intake_producer("client")
        self.submitted = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def txn(self, cseq: int) -> Transaction:
        """Blind puts, deletes and read-modify-writes (some of which conflict)."""
        kind = cseq % 5
        key = f"k/{cseq % 37:02d}"
        if kind == 0:
            return Transaction(TxnId("client", cseq), 0, writes=[Delete(key)])
        if kind == 1:
            return Transaction(
                TxnId("client", cseq), 0, reads=[key], writes=[Put(f"r/{cseq % 11}", cseq)]
            )
        return Transaction(TxnId("client", cseq), 0, writes=[Put(key, [cseq, "v"])])

    def submit(self, n: int) -> None:
        for _ in range(n):
            raw = encode_transaction(self.txn(self.submitted))
            self.producer.submit(encode_intake([raw]), timeout=30)
            self.submitted += 1

    def start(self, pause: float = 0.002) -> Feed:
        def run() -> None:
            try:
                while not self._stop.is_set():
                    batch = [encode_transaction(self.txn(self.submitted + i)) for i in range(3)]
                    self.producer.submit(encode_intake(batch), timeout=30)
                    self.submitted += 3
                    time.sleep(pause)
            except BaseException as exc:
                self.error = exc

        self._thread = threading.Thread(target=run, daemon=True, name="feed")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(Exception):
            self.producer.close()
        self.writer.stop()
        self.backend.close()


def replay(path: Path, seq: int) -> tuple[MemoryView, Reader, FileBackend, list[int]]:
    """A fresh MemoryView replay up to `seq`; also the seqs that committed."""
    backend = FileBackend(path, create=False, fsync=False)
    mem = MemoryView()
    fresh = Reader(backend, [mem], name="replay")
    committed: list[int] = []
    fresh.subscribe(lambda rs: committed.extend(s for r in rs for s, _ in r.committed))
    assert fresh.wait_for_seq(seq, 60)
    assert fresh.last_seq == seq
    return mem, fresh, backend, committed


AUDIT = """
CREATE TABLE ckpt_audit (id bigserial PRIMARY KEY, old_next bigint, new_next bigint);
CREATE TABLE kv_audit (id bigserial PRIMARY KEY, key text, version bigint);
CREATE FUNCTION audit_ckpt() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO ckpt_audit (old_next, new_next) VALUES (OLD.next_seq, NEW.next_seq);
RETURN NEW; END $$;
CREATE FUNCTION audit_kv() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO kv_audit (key, version) VALUES (NEW.key, NEW.version); RETURN NEW; END $$;
CREATE TRIGGER ckpt_audit AFTER UPDATE ON ledgerlog_checkpoint
    FOR EACH ROW EXECUTE FUNCTION audit_ckpt();
CREATE TRIGGER kv_audit AFTER INSERT OR UPDATE ON kv FOR EACH ROW EXECUTE FUNCTION audit_kv();
"""


def install_audit(dsn: str) -> None:
    """Triggers that log, inside each apply's own transaction, every checkpoint move and
    every row write: what committed is exactly what the view did."""
    PostgresView(dsn).close()  # creates the tables
    sql(dsn, AUDIT)


def check_audit(dsn: str, last: int, committed: list[int]) -> None:
    """Committed checkpoint moves chain 1 -> last + 1 with no overlap (each seq applied in
    exactly one committed transaction), and no (key, version) row was written twice."""
    moves = sql(dsn, "SELECT old_next, new_next FROM ckpt_audit ORDER BY id")
    expect = 1
    for old, new in moves:
        assert old == expect and new >= old, (moves, expect)
        expect = new
    assert expect == last + 1, (expect, last)
    dup = sql(dsn, "SELECT key, version, count(*) FROM kv_audit GROUP BY 1, 2 HAVING count(*) > 1")
    assert dup == [], dup
    stray = {v for (v,) in sql(dsn, "SELECT DISTINCT version FROM kv_audit")} - set(committed)
    assert not stray, f"rows written at seqs that did not commit: {sorted(stray)[:10]}"


def test_postgres_shares_the_launching_session(local_postgres: Any) -> None:
    """Its own process group (killpg), the launcher's session (see the Pulsar twin)."""
    pid = local_postgres.pid
    assert pid is not None
    assert os.getpgid(pid) == pid != os.getpgid(0)
    assert os.getsid(pid) == os.getsid(0)


# -- round trip -------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_apply_read_round_trip(pg_dsn: str) -> None:
    rng = random.Random(7)
    view = PostgresView(pg_dsn, name="pg")
    model: Model = {}
    try:
        assert view.checkpoint() is None and view.applied_seq == 0 and len(view) == 0
        seq = 1
        for i in range(40):
            batch = random_batch(rng, seq, rng.randint(0, 12))
            seq += len(batch) + rng.randint(0, 2)  # gaps: aborted seqs
            # Every 3rd checkpoint carries no snapshot: the stored one must be kept.
            view.apply(batch, ckpt(seq, b"" if i % 3 else None))
            model_apply(model, batch)
        assert view.applied_seq == seq - 1
        ck = view.checkpoint()
        assert ck is not None and ck.next_seq == seq and ck.digest == seq.to_bytes(16, "big")
        assert ck.position == Position(7, seq * 10)
        assert ck.validator_state.startswith(b"validator-state-")  # the last non-empty one
        expect = sorted((k, v, s) for k, (v, s) in model.items())
        assert view.range_versioned("") == expect
        assert view.items() == [(k, v) for k, v, _ in expect]
        assert len(view) == len(model)
        for k, (v, s) in model.items():
            assert view.get(k) == v and view.get_versioned(k) == (v, s) and k in view
        assert view.get("nope") is None and view.version("nope") == 0 and "nope" not in view
        # Code point order (C collation), like Python's str and MemoryView.
        assert [k for k, _ in view.range("k", "\U0010ffff")] == sorted(k for k in model if k >= "k")
        assert view.range("z", "k") == [] and len(view.range("", limit=3)) == 3
        assert view.max_version_in_range("é", "ê") == max(
            (s for k, (_v, s) in model.items() if "é" <= k < "ê"), default=0
        )
        assert view.snapshot_read(lambda v: (v.applied_seq, len(v))) == (seq - 1, len(model))

        # Refused batches change nothing.
        before = view.range_versioned("")
        with pytest.raises(UsageError):
            view.apply([(seq - 1, wtxn(Put("x", 1)))], ckpt(seq + 1))  # already applied
        with pytest.raises(UsageError):
            view.apply([], ckpt(seq - 1))  # checkpoint backwards
        assert view.range_versioned("") == before and view.applied_seq == seq - 1

        # Reopen (and read-only): the same data and checkpoint.
        view.close()
        with pytest.raises(ClosedError):
            view.get("k00")
        view = PostgresView(pg_dsn, name="pg")
        assert view.range_versioned("") == expect and view.checkpoint() == ck
        ro = PostgresView(pg_dsn, readonly=True)
        try:
            assert ro.range_versioned("") == expect
            with pytest.raises(UsageError):
                ro.apply([], ckpt(seq + 1))
        finally:
            ro.close()
        # Prefixed tables live beside the others.
        other = PostgresView(pg_dsn, table_prefix="other_")
        try:
            other.apply([(1, wtxn(Put("a", 1)))], ckpt(2))
            assert other.items() == [("a", 1)] and view.get("a") is None
        finally:
            other.close()
    finally:
        view.close()


@pytest.mark.timeout(60)
def test_bad_config_and_missing_psycopg(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError):
        PostgresView(pg_dsn, table_prefix="bad-prefix")
    with pytest.raises(ConfigError):
        PostgresView(pg_dsn, table_prefix="p" * 60)
    with pytest.raises(ConfigError, match="no view tables"):
        PostgresView(pg_dsn, table_prefix="absent_", readonly=True)
    with pytest.raises(BackendError):
        PostgresView("postgresql://postgres@127.0.0.1:1/none", connect_timeout=2)
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigError, match=r"pip install 'ledgerlog\[postgres\]'"):
        PostgresView(pg_dsn)


# -- restart from the checkpoint --------------------------------------------------------------


@pytest.mark.timeout(120)
def test_reader_restarts_from_view_checkpoint(pg_dsn: str, tmp_path: Path) -> None:
    feed = Feed(tmp_path / "ledger")
    try:
        feed.submit(150)
        backend = FileBackend(feed.path, create=False, fsync=False)
        view = PostgresView(pg_dsn)
        r1 = Reader(backend, [view], name="r1", snapshot_every=40)
        assert r1.state.next_seq == 1 and r1.position == START
        assert r1.wait_for_seq(150, 60)
        r1.close()
        view.close()
        ck = PostgresView(pg_dsn, readonly=True)
        stored = ck.checkpoint()
        ck.close()
        assert stored is not None and stored.next_seq == 151

        feed.submit(100)
        view2 = PostgresView(pg_dsn)
        r2 = Reader(backend, [view2], name="r2", snapshot_every=40)
        # From the snapshot stored with the data (at most one interval + a batch behind).
        assert 1 < r2.state.next_seq <= 151 and r2.position != START
        assert 151 - r2.state.next_seq <= 40 + 8
        assert r2.wait_for_seq(250, 60)
        mem, fresh, fb, _committed = replay(feed.path, 250)
        try:
            assert r2.digest == fresh.digest
            assert view2.range_versioned("") == mem.range_versioned("")
            final = view2.checkpoint()
            assert final is not None and final.next_seq == 251 and final.digest == fresh.digest
        finally:
            fresh.close()
            fb.close()
            r2.close()
            view2.close()
            backend.close()
    finally:
        feed.close()


# -- exactly once across kill -9 --------------------------------------------------------------


def _infos(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _snapshot_start(ck: Checkpoint | None) -> tuple[int, list[int]] | None:
    if ck is None or not ck.validator_state:
        return None
    major, minor, state = msgspec.msgpack.decode(ck.validator_state)
    return ValidatorState.restore(state).next_seq, [major, minor]


def _stored_checkpoint(dsn: str) -> Checkpoint | None:
    v = PostgresView(dsn, readonly=True)
    try:
        return v.checkpoint()
    finally:
        v.close()


def _spawn_reader(tmp: Path, *args: Any) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp / f"reader.{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "reader", *map(str, args)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    return proc, log


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return text in log.read_text(errors="replace")
        time.sleep(0.02)
    return False


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_reader_kill9_applies_exactly_once(pg_dsn: str, tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    info = tmp_path / "reader.jsonl"
    install_audit(pg_dsn)
    feed = Feed(tmp_path / "ledger").start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 60
        while feed.submitted < 1500 and time.monotonic() < deadline and feed.error is None:
            time.sleep(0.01)
        assert feed.submitted >= 1500, feed.error

        applied_at_kill: list[int] = []
        expected: list[tuple[int, list[int]] | None] = []
        ck_next: list[int] = []
        for _cycle in range(6):
            ck = _stored_checkpoint(pg_dsn)
            expected.append(_snapshot_start(ck))
            ck_next.append(ck.next_seq if ck else 1)
            r, log = _spawn_reader(tmp_path, feed.path, pg_dsn, info, "--max-entries", 2,
                                   "--snapshot-every", 50)  # fmt: skip
            procs.append(r)
            assert _wait_for(log, "READER ", r, 30), log.read_text()
            time.sleep(rng.uniform(0.05, 0.6))
            assert r.poll() is None, log.read_text()
            _kill(r)
            ck = _stored_checkpoint(pg_dsn)
            applied_at_kill.append(ck.next_seq - 1 if ck else 0)

        feed.stop()
        assert feed.error is None, feed.error
        last = feed.submitted  # no retries: one seq per submitted transaction
        ck = _stored_checkpoint(pg_dsn)
        expected.append(_snapshot_start(ck))
        ck_next.append(ck.next_seq if ck else 1)
        r, log = _spawn_reader(tmp_path, feed.path, pg_dsn, info, "--until-seq", last,
                               "--max-entries", 50, "--snapshot-every", 50)  # fmt: skip
        procs.append(r)
        assert r.wait(120) == 0, log.read_text()

        # Every restart began at the snapshot stored with the view's data, not at seq 1.
        starts = _infos(info)
        assert len(starts) == 7 and starts[0]["next_seq"] == 1
        for exp, got, nxt in zip(expected, starts, ck_next, strict=True):
            if exp is None:
                assert got["next_seq"] == 1 and got["position"] == [0, 0]
            else:
                assert (got["next_seq"], got["position"]) == exp, (seed, exp, got)
                assert 0 <= nxt - got["next_seq"] <= 50 + 8, (seed, nxt, got)
        assert sum(1 for s in starts if s["next_seq"] > 1) >= 4, (seed, starts)
        assert applied_at_kill[0] < last, "the first kill did not land mid-work"
        assert applied_at_kill == sorted(applied_at_kill)

        # The table equals a fresh in-memory replay; the checkpoint is the replay's.
        mem, fresh, fb, committed = replay(feed.path, last)
        try:
            view = PostgresView(pg_dsn, readonly=True)
            try:
                assert view.range_versioned("") == mem.range_versioned(""), seed
                final = view.checkpoint()
                assert final is not None and final.next_seq == last + 1
                assert final.digest == fresh.digest
            finally:
                view.close()
        finally:
            fresh.close()
            fb.close()
        check_audit(pg_dsn, last, committed)
    finally:
        for p in procs:
            _kill(p)
        feed.close()


# -- a second reader on the same tables -------------------------------------------------------


@pytest.mark.timeout(60)
def test_second_applier_waits_on_the_lock_then_is_refused(pg_dsn: str) -> None:
    """FOR UPDATE: an apply that waits for another session's apply re-reads the checkpoint
    it committed and refuses the seqs it already holds."""
    import psycopg

    view = PostgresView(pg_dsn)
    other = psycopg.connect(pg_dsn)
    try:
        view.apply([(1, wtxn(Put("a", 1)))], ckpt(2))
        # "Another reader" in the middle of applying seqs 2..4.
        other.execute("SELECT next_seq FROM ledgerlog_checkpoint WHERE id = 1 FOR UPDATE")
        other.execute("INSERT INTO kv VALUES ('b', %s, 3)", (b"\x02",))
        outcome: list[BaseException | None] = []

        def apply() -> None:
            try:
                view.apply([(2, wtxn(Put("b", 2))), (3, wtxn(Put("c", 3)))], ckpt(5))
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=apply)
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and not outcome, "apply did not wait for the checkpoint lock"
        waiting = sql(
            pg_dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()",
        )
        assert waiting == [(1,)]
        other.execute("UPDATE ledgerlog_checkpoint SET next_seq = 5 WHERE id = 1")
        other.commit()
        t.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], UsageError), outcome
        assert "already applied" in str(outcome[0])
        # Nothing of the refused batch reached the table.
        assert view.range_versioned("") == [("a", 1, 1), ("b", 2, 3)]
        assert view.applied_seq == 4
        # A refusal is not a failure: the view still applies what follows.
        view.apply([(5, wtxn(Put("d", 5)))], ckpt(6))
        assert view.get("d") == 5
    finally:
        other.close()
        view.close()


@pytest.mark.timeout(120)
def test_concurrent_readers_on_one_view_never_double_apply(pg_dsn: str, tmp_path: Path) -> None:
    install_audit(pg_dsn)
    feed = Feed(tmp_path / "ledger")
    try:
        feed.submit(300)
        backends = [FileBackend(feed.path, create=False, fsync=False) for _ in range(2)]
        views = [PostgresView(pg_dsn, name=f"pg{i}") for i in range(2)]
        readers = [Reader(backends[i], [views[i]], name=f"r{i}") for i in range(2)]
        errors: list[BaseException | None] = [None, None]
        go = threading.Barrier(2)

        def run(i: int) -> None:
            go.wait()
            # Bounded, and daemon threads: a reader that never gets there fails the test
            # below instead of keeping the interpreter (and CI) from exiting.
            deadline = time.monotonic() + 80
            try:
                while readers[i].last_seq < 300 and time.monotonic() < deadline:
                    readers[i].poll(timeout=0.05, max_entries=3)
            except BaseException as exc:
                errors[i] = exc

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads)
        stuck = [r.last_seq for r, e in zip(readers, errors, strict=True) if e is None]
        assert all(s == 300 for s in stuck), f"readers stopped short of seq 300: {stuck}"
        refused = [e for e in errors if e is not None]
        # Both started at seq 1: at least one was refused at its first overlapping batch,
        # with the typed error (the view's UsageError, which stops its reader), and none
        # failed in another way.
        assert refused, errors
        assert all(
            isinstance(e, ApplyError) and isinstance(e.__cause__, UsageError) for e in refused
        ), errors
        winner = next(i for i in range(2) if errors[i] is None) if len(refused) < 2 else None
        if winner is None:  # both refused: a fresh reader finishes from the checkpoint
            b = FileBackend(feed.path, create=False, fsync=False)
            v = PostgresView(pg_dsn)
            r = Reader(b, [v], name="finisher")
            assert r.wait_for_seq(300, 60)
            r.close()
            v.close()
            b.close()
        mem, fresh, fb, committed = replay(feed.path, 300)
        try:
            final = PostgresView(pg_dsn, readonly=True)
            try:
                assert final.range_versioned("") == mem.range_versioned("")
                ck = final.checkpoint()
                assert ck is not None and ck.next_seq == 301 and ck.digest == fresh.digest
            finally:
                final.close()
        finally:
            fresh.close()
            fb.close()
        check_audit(pg_dsn, 300, committed)
        for r, v, b in zip(readers, views, backends, strict=True):
            r.close()
            v.close()
            b.close()
    finally:
        feed.close()


# -- child side -------------------------------------------------------------------------------


def child_reader(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("dsn")
    ap.add_argument("info_path")
    ap.add_argument("--max-entries", type=int, default=3)
    ap.add_argument("--snapshot-every", type=int, default=0)
    ap.add_argument("--until-seq", type=int, default=0)
    a = ap.parse_args(argv)
    backend = FileBackend(a.path, create=False, fsync=False)
    view = PostgresView(a.dsn)
    reader = Reader(backend, [view], name="crashy", snapshot_every=a.snapshot_every or None)
    info = {
        "pid": os.getpid(),
        "next_seq": reader.state.next_seq,
        "position": [reader.position.major, reader.position.minor],
    }
    with open(a.info_path, "a") as f:
        f.write(json.dumps(info) + "\n")
    print(f"READER {json.dumps(info)}", flush=True)
    while not a.until_seq or reader.last_seq < a.until_seq:
        reader.poll(timeout=0.05, max_entries=a.max_entries)
    reader.close()
    view.close()
    backend.close()
    print(f"READER DONE last_seq={reader.last_seq}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit({"reader": child_reader}[sys.argv[1]](sys.argv[2:]))
