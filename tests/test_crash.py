"""Crash tests with real processes and SIGKILL: the elected writer, a reader applying to
durable views, and a client, each killed mid-work (DESIGN.md invariants 1, 4 and 6).

Children run ``tests/procs.py`` roles; every child is killed in a ``finally``.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from procs import (
    Decisions,
    Proc,
    Submitter,
    assert_exactly_once,
    kill_all,
    kind_of,
    new_ledger,
    read_acks,
    spawn,
    start_writer,
    symptom,
)

from ledgerlog.backends.file import FileBackend
from ledgerlog.reader import Reader
from ledgerlog.validator import ValidatorState
from ledgerlog.views.memory import MemoryView
from ledgerlog.views.sqlite import SQLiteView, load_checkpoint

pytestmark = pytest.mark.slow


# -- 1a: kill -9 of the elected writer --------------------------------------------------------


@pytest.mark.timeout(150)
def test_writer_kill9_midstream_standby_takes_over(tmp_path: Path) -> None:
    path = new_ledger(tmp_path)
    procs: list[Proc] = []
    sub: Submitter | None = None
    dec: Decisions | None = None
    try:
        a = start_writer(path, tmp_path, "wA", lease=5.0)
        procs.append(a)
        assert a.wait_for("ELECTED epoch=1", 30), a.log()
        b = start_writer(path, tmp_path, "wB", lease=5.0)
        procs.append(b)
        sub = Submitter(path, pause=0.002).start()

        assert sub.wait_acked(150, 40), sub.error
        a.kill()  # SIGKILL, mid-stream: submissions keep coming
        at_kill = len(sub.acked)
        assert a.popen.returncode == -9
        assert b.wait_for("ELECTED epoch=2", 30), b.log()
        assert sub.wait_acked(at_kill + 150, 40), sub.error

        # Once more the other way round: a fresh standby, and the new writer is killed.
        a2 = start_writer(path, tmp_path, "wA2", lease=5.0)
        procs.append(a2)
        assert sub.wait_acked(len(sub.acked) + 30, 40), sub.error
        b.kill()
        assert a2.wait_for("ELECTED epoch=3", 30), a2.log()
        assert sub.wait_acked(len(sub.acked) + 100, 40), sub.error
        sub.stop()
        assert sub.error is None, sub.error

        acked = [("client", c, k) for c, k in sub.acked]
        dec = Decisions(path)
        missing = dec.wait_decided([(c, s) for c, s, _ in acked], 60)
        assert not missing, f"{len(missing)} acknowledged txns undecided: {sorted(missing)[:10]}"
        dec.drain()
        assert_exactly_once(dec, acked, [("client", c) for c in sub.retried])
        assert [e for e, _w in dec.epochs] == [1, 2, 3]
        assert [w for _e, w in dec.epochs] == ["wA", "wB", "wA2"]
        assert dec.reader.state.epoch == 3
        for p in (a2, b, a):
            assert "FENCED" not in p.log() and "Traceback" not in p.log(), p.log()
    finally:
        if sub is not None:
            sub.stop()
        kill_all(procs)
        if dec is not None:
            dec.close()


# -- kill -9 at the worst instants of the segment chain --------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("crash_at", ["roll", "takeover"])
def test_writer_kill9_between_seal_and_header(tmp_path: Path, crash_at: str) -> None:
    path = new_ledger(tmp_path)
    procs: list[Proc] = []
    sub: Submitter | None = None
    dec: Decisions | None = None
    try:
        if crash_at == "roll":
            a = start_writer(
                path, tmp_path, "wA", "--crash-at", "roll", "--segment-bytes", 8192,
                "--max-record-txns", 4,
            )  # fmt: skip
            procs.append(a)
            assert a.wait_for("ELECTED epoch=1", 30), a.log()
            b = start_writer(path, tmp_path, "wB")
            procs.append(b)
            sub = Submitter(path, pause=0.002).start()
        else:
            w0 = start_writer(path, tmp_path, "w0")
            procs.append(w0)
            assert w0.wait_for("ELECTED epoch=1", 30), w0.log()
            sub = Submitter(path, pause=0.002).start()
            assert sub.wait_acked(50, 30), sub.error
            a = start_writer(path, tmp_path, "wA", "--crash-at", "takeover")
            procs.append(a)
            w0.kill()  # A, the only standby, takes over and dies half-way
        assert a.wait_for("CRASHING", 40), a.log()
        a.popen.wait(10)
        assert a.popen.returncode == -9
        if crash_at == "takeover":
            b = start_writer(path, tmp_path, "wB")
            procs.append(b)
        assert b.wait_for("ELECTED", 30), b.log()
        assert sub.wait_acked(len(sub.acked) + 50, 30), sub.error
        sub.stop()
        acked = [("client", c, k) for c, k in sub.acked]
        dec = Decisions(path)
        missing = dec.wait_decided([(c, s) for c, s, _ in acked], 10)
        symptom(
            not missing,
            f"{len(missing)} acknowledged txns undecided after the crash; "
            f"standby log: {b.log()[-600:]}",
        )
        assert_exactly_once(dec, acked)
        assert dec.reader.state.epoch == dec.epochs[-1][0] >= 2
    finally:
        if sub is not None:
            sub.stop()
        kill_all(procs)
        if dec is not None:
            dec.close()


# -- 1c: kill -9 of a client -----------------------------------------------------------------


@pytest.mark.timeout(120)
def test_client_kill9_while_submitting(tmp_path: Path) -> None:
    path = new_ledger(tmp_path)
    procs: list[Proc] = []
    dec: Decisions | None = None
    try:
        w = start_writer(path, tmp_path, "w1")
        procs.append(w)
        assert w.wait_for("ELECTED epoch=1", 30), w.log()
        acks = tmp_path / "victim.acks"
        victim = spawn("client", path, "victim", acks, "--threads", 4, log_dir=tmp_path)
        procs.append(victim)
        deadline = time.monotonic() + 40
        while len(read_acks(acks)) < 200 and time.monotonic() < deadline:
            assert victim.alive(), victim.log()
            time.sleep(0.01)
        victim.kill()  # mid-submit: its 4 threads have submissions in flight
        assert victim.popen.returncode == -9
        got = read_acks(acks)
        assert len(got) >= 200
        # The ledger goes on for other clients.
        survivor_acks = tmp_path / "survivor.acks"
        survivor = spawn("client", path, "survivor", survivor_acks, "--count", 60, log_dir=tmp_path)
        procs.append(survivor)
        assert survivor.popen.wait(60) == 0, survivor.log()

        acked = [("victim", c, kind_of(c)) for c in sorted(set(got))]
        acked += [("survivor", c, kind_of(c)) for c in read_acks(survivor_acks)]
        assert len(acked) == len(set(got)) + 60
        dec = Decisions(path)
        missing = dec.wait_decided([(c, s) for c, s, _ in acked], 60)
        assert not missing, f"{len(missing)} acknowledged txns undecided: {sorted(missing)[:10]}"
        dec.drain()
        assert_exactly_once(dec, acked)
        # Submissions that were in flight at the kill commit at most once (checked above
        # for every txn id) and nothing of the victim beyond its last submit appears.
        victim_seqs = {s for (c, s) in dec.by_tid if c == "victim"}
        assert max(victim_seqs) <= max(got) + 4  # at most one in flight per thread
    finally:
        kill_all(procs)
        if dec is not None:
            dec.close()


# -- 1b: kill -9 of a reader applying to durable views ---------------------------------------


def _checkpoints(db: Path) -> list[Any]:
    if not db.exists():
        return []
    conn = sqlite3.connect(str(db))
    try:
        out = []
        for table in ("ledgerlog_checkpoint", "handler_ledgerlog_checkpoint"):
            try:
                out.append(load_checkpoint(conn, table))
            except sqlite3.OperationalError:
                out.append(None)
        return out
    finally:
        conn.close()


def _snapshot_start(cks: list[Any]) -> tuple[int, list[int]] | None:
    """(next_seq, position) a reader must restart from, per the views' checkpoints."""
    if len(cks) != 2 or any(c is None or not c.validator_state for c in cks):
        return None
    snaps = []
    for c in cks:
        major, minor, state = msgspec.msgpack.decode(c.validator_state)
        snaps.append(((major, minor), ValidatorState.restore(state).next_seq))
    pos, next_seq = min(snaps)
    return next_seq, list(pos)


def _infos(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.timeout(150)
def test_reader_kill9_views_apply_exactly_once(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    path = new_ledger(tmp_path)
    db = tmp_path / "view.db"
    info = tmp_path / "reader.jsonl"
    procs: list[Proc] = []
    sub: Submitter | None = None
    dec: Decisions | None = None
    try:
        w = start_writer(path, tmp_path, "w1", "--max-record-txns", 2, fsync=0)
        procs.append(w)
        assert w.wait_for("ELECTED epoch=1", 30), w.log()
        sub = Submitter(path, fsync=False, per_batch=3, pause=0.002).start()
        assert sub.wait_acked(2000, 60), sub.error

        applied_at_kill: list[int] = []
        expected_starts: list[tuple[int, list[int]] | None] = []
        ck_next: list[int] = []
        for _cycle in range(6):
            cks = _checkpoints(db)
            expected_starts.append(_snapshot_start(cks))
            ck_next.append(min((c.next_seq for c in cks if c), default=1) if cks else 1)
            r = spawn(
                "reader", path, db, info, "--max-entries", 2, "--snapshot-every", 50,
                log_dir=tmp_path, name="reader",
            )  # fmt: skip
            procs.append(r)
            assert r.wait_for("READER ", 30), r.log()
            time.sleep(rng.uniform(0.05, 0.5))
            assert r.alive(), r.log()
            r.kill()
            cks = _checkpoints(db)
            applied_at_kill.append(cks[0].next_seq - 1 if cks and cks[0] else 0)

        sub.stop()
        assert sub.error is None, sub.error
        dec = Decisions(path)
        missing = dec.wait_decided([("client", c) for c, _ in sub.acked], 60)
        assert not missing
        dec.drain()
        last = dec.reader.last_seq

        # A last, clean run to the end.
        cks = _checkpoints(db)
        expected_starts.append(_snapshot_start(cks))
        ck_next.append(min(c.next_seq for c in cks if c))
        r = spawn("reader", path, db, info, "--until-seq", last, "--max-entries", 50,
                  "--snapshot-every", 50, log_dir=tmp_path, name="reader-final")  # fmt: skip
        procs.append(r)
        assert r.popen.wait(90) == 0, r.log()

        # Every restart began at its views' checkpoint, not at seq 1.
        starts = _infos(info)
        assert len(starts) == 7
        assert starts[0]["next_seq"] == 1
        for exp, got, ck in zip(expected_starts, starts, ck_next, strict=True):
            if exp is None:
                assert got["next_seq"] == 1 and got["position"] == [0, 0]
            else:
                # From the snapshot stored with the views' data: at most one snapshot
                # interval (50 seqs, plus one batch) behind their checkpoint.
                assert (got["next_seq"], got["position"]) == exp, (seed, exp, got)
                assert 0 <= ck - got["next_seq"] <= 50 + 8, (seed, ck, got)
        assert sum(1 for s in starts if s["next_seq"] > 1) >= 4, (seed, starts)
        assert applied_at_kill[0] < 2000, "the first kill did not land mid-work"
        assert applied_at_kill == sorted(applied_at_kill)

        # The durable views equal a fresh in-memory replay, exactly.
        backend = FileBackend(path, create=False, fsync=False)
        mem = MemoryView()
        fresh = Reader(backend, [mem], name="fresh")
        committed: list[int] = []
        fresh.subscribe(lambda rs: committed.extend(s for r in rs for s, _ in r.committed))
        try:
            fresh.catch_up(60)
            assert fresh.last_seq == last
            sql = SQLiteView(db, readonly=True)
            try:
                assert sql.range_versioned("") == mem.range_versioned("")
                ck = sql.checkpoint()
                assert ck is not None and ck.next_seq == last + 1 and ck.digest == fresh.digest
            finally:
                sql.close()
        finally:
            fresh.close()
            backend.close()
        conn = sqlite3.connect(str(db))
        try:
            seqs = [s for (s,) in conn.execute("SELECT seq FROM applied ORDER BY seq")]
            (counter,) = conn.execute("SELECT n FROM counter WHERE id = 1").fetchone()
            hck = load_checkpoint(conn, "handler_ledgerlog_checkpoint")
        finally:
            conn.close()
        assert seqs == committed, "handler applied a different set of seqs"
        assert counter == len(committed) == len(seqs), (counter, len(committed), len(seqs))
        assert hck is not None and hck.next_seq == last + 1
    finally:
        if sub is not None:
            sub.stop()
        kill_all(procs)
        if dec is not None:
            dec.close()


@pytest.mark.timeout(90)
def test_reader_kill9_restarts_from_checkpoint_default_snapshot_interval(tmp_path: Path) -> None:
    """Regression: Reader._apply used to store validator_state=b"" with every batch that
    took no snapshot, erasing the views' snapshot, so a restart began at seq 1."""
    path = new_ledger(tmp_path)
    db = tmp_path / "view.db"
    info = tmp_path / "reader.jsonl"
    procs: list[Proc] = []
    sub: Submitter | None = None
    try:
        w = start_writer(path, tmp_path, "w1", "--max-record-txns", 2, fsync=0)
        procs.append(w)
        assert w.wait_for("ELECTED epoch=1", 30), w.log()
        sub = Submitter(path, fsync=False, per_batch=3, pause=0.002).start()
        assert sub.wait_acked(600, 60), sub.error
        r = spawn("reader", path, db, info, "--max-entries", 5, log_dir=tmp_path)
        procs.append(r)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            cks = _checkpoints(db)
            if cks and cks[0] is not None and cks[0].next_seq > 200:
                break
            time.sleep(0.02)
        r.kill()
        cks = _checkpoints(db)
        assert cks[0] is not None and cks[0].next_seq > 200
        r2 = spawn("reader", path, db, info, "--max-entries", 5, log_dir=tmp_path)
        procs.append(r2)
        assert r2.wait_for("READER ", 30), r2.log()
        r2.kill()
        starts = _infos(info)
        assert len(starts) == 2
        assert starts[1]["next_seq"] > 1 and starts[1]["position"] != [0, 0], starts[1]
        assert starts[1]["next_seq"] <= min(c.next_seq for c in cks)
    finally:
        if sub is not None:
            sub.stop()
        kill_all(procs)
