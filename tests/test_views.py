"""Views: MemoryView, SQLiteView and HandlerView against a plain-dict model, including
crash atomicity (SIGKILL mid-apply) and concurrent readers."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ledgerlog.codec import WireTxn, transaction_to_wire
from ledgerlog.errors import (
    BackendError,
    ClosedError,
    ConfigError,
    HandlerError,
    LedgerlogError,
    UsageError,
)
from ledgerlog.model import Delete, Event, Position, Put, Transaction, TxnId
from ledgerlog.views import Checkpoint, HandlerView, MemoryView, SQLiteView, View

TESTS_DIR = Path(__file__).resolve().parent

# -- helpers --------------------------------------------------------------------------------


def wtxn(*writes: Put | Delete, events: tuple[Event, ...] = (), n: int = 0) -> WireTxn:
    return transaction_to_wire(Transaction(TxnId("client", n), 0, writes=writes, events=events))


def ckpt(next_seq: int) -> Checkpoint:
    return Checkpoint(
        Position(7, next_seq * 10),
        next_seq,
        next_seq.to_bytes(16, "big"),
        b"validator-state-%d" % next_seq,
    )


Model = dict[str, tuple[Any, int]]


def model_apply(model: Model, applied: list[tuple[int, WireTxn]]) -> None:
    for seq, txn in applied:
        for op, key, value in txn.writes:
            if op == 1:
                model[key] = (value, seq)
            else:
                model.pop(key, None)


def random_batch(
    rng: random.Random, first_seq: int, size: int, nkeys: int = 60
) -> list[tuple[int, WireTxn]]:
    out = []
    for seq in range(first_seq, first_seq + size):
        writes: list[Put | Delete] = []
        for _ in range(rng.randint(0, 4)):
            key = f"k{rng.randrange(nkeys):03d}"
            if rng.random() < 0.25:
                writes.append(Delete(key))
            else:
                value = rng.choice([seq, f"v{seq}", [seq, {"x": 1.5}], None, b"\x00b", True])
                writes.append(Put(key, value))
        events = (Event("e", {"s": seq}, ("k000",)),) if rng.random() < 0.2 else ()
        out.append((seq, wtxn(*writes, events=events, n=seq)))
    return out


def check_against_model(view: MemoryView | SQLiteView, model: Model) -> None:
    expected = sorted((k, v, s) for k, (v, s) in model.items())
    assert view.range_versioned("") == expected
    assert view.items() == [(k, v) for k, v, _ in expected]
    assert len(view) == len(model)
    for key, (value, version) in list(model.items())[:20]:
        assert view.get(key) == value
        assert view.get_versioned(key) == (value, version)


@pytest.fixture(params=["memory", "sqlite"])
def kv_view(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MemoryView | SQLiteView]:
    view: MemoryView | SQLiteView
    view = MemoryView() if request.param == "memory" else SQLiteView(tmp_path / "v.db")
    yield view
    view.close()


# -- both key-value views ------------------------------------------------------------------


def test_puts_deletes_events_and_versions(kv_view: MemoryView | SQLiteView) -> None:
    assert kv_view.checkpoint() is None
    assert kv_view.applied_seq == 0
    assert kv_view.get("a") is None and kv_view.get_versioned("a") is None
    kv_view.apply(
        [
            (1, wtxn(Put("a", 1), Put("b", "two"), Put("a", 11))),  # last write wins
            (2, wtxn(Put("c", [3, {"x": b"y"}]))),
            (4, wtxn(Delete("b"), Put("d", None), events=(Event("ev", 5, ("a", "c")),))),
        ],
        ckpt(5),
    )
    assert kv_view.applied_seq == 4
    assert kv_view.checkpoint() == ckpt(5)
    assert kv_view.get("a") == 11
    assert kv_view.get_versioned("a") == (11, 1)  # the event bumped no version
    assert kv_view.get("b") is None and kv_view.get_versioned("b") is None
    assert kv_view.get_versioned("c") == ([3, {"x": b"y"}], 2)
    assert kv_view.get_versioned("d") == (None, 4)  # a stored None is still present
    assert "d" in kv_view and "b" not in kv_view
    assert kv_view.version("a") == 1
    assert len(kv_view) == 3
    assert kv_view.items() == [("a", 11), ("c", [3, {"x": b"y"}]), ("d", None)]
    # an empty batch still moves the checkpoint (aborted seqs, epoch entries)
    kv_view.apply([], ckpt(9))
    assert kv_view.applied_seq == 8 and kv_view.checkpoint() == ckpt(9)


def test_range_reads(kv_view: MemoryView | SQLiteView) -> None:
    keys = ["a", "a/1", "a/2", "a/3", "ab", "b", "é", "\U0001f600", "z"]
    kv_view.apply([(i + 1, wtxn(Put(k, i))) for i, k in enumerate(keys)], ckpt(len(keys) + 1))
    assert [k for k, _ in kv_view.range("a/", "a0")] == ["a/1", "a/2", "a/3"]
    assert kv_view.range("a/", "a0", limit=2) == [("a/1", 1), ("a/2", 2)]
    assert kv_view.range("a/", "a0", limit=0) == []
    assert kv_view.range("b") == [("b", 5), ("z", 8), ("é", 6), ("\U0001f600", 7)]
    # code point order, identical in both views (SQLite compares UTF-8 bytes)
    assert [k for k, _ in kv_view.items()] == sorted(keys)
    assert kv_view.range("b", "b") == [] and kv_view.range("z", "a") == []
    assert kv_view.range_versioned("a/2", "ab") == [("a/2", 2, 3), ("a/3", 3, 4)]
    assert kv_view.max_version_in_range("a/", "a0") == 4
    assert kv_view.max_version_in_range("c", "d") == 0
    with pytest.raises(UsageError):
        kv_view.range("a", limit=-1)


def test_random_batches_match_model(kv_view: MemoryView | SQLiteView) -> None:
    rng = random.Random(1234)
    model: Model = {}
    seq = 1
    for _ in range(40):
        size = rng.randint(0, 30)
        batch = random_batch(rng, seq, size)
        # some seqs between batches were aborts: the checkpoint jumps past them
        next_seq = seq + size + rng.randint(0, 2)
        kv_view.apply(batch, ckpt(next_seq))
        model_apply(model, batch)
        seq = next_seq
        assert kv_view.applied_seq == seq - 1
    check_against_model(kv_view, model)


@pytest.mark.parametrize(
    "second",
    [
        pytest.param(lambda: ([(3, wtxn(Put("x", 1)))], ckpt(6)), id="seq-already-applied"),
        pytest.param(lambda: ([], ckpt(4)), id="checkpoint-backwards"),
        pytest.param(
            lambda: ([(7, wtxn(Put("x", 1))), (6, wtxn(Put("y", 1)))], ckpt(8)),
            id="seqs-not-increasing",
        ),
        pytest.param(
            lambda: ([(6, wtxn(Put("x", 1))), (6, wtxn(Put("y", 1)))], ckpt(8)),
            id="seq-repeated",
        ),
        pytest.param(lambda: ([(6, wtxn(Put("x", 1)))], ckpt(6)), id="seq-beyond-checkpoint"),
    ],
)
def test_misuse_is_refused_and_changes_nothing(
    kv_view: MemoryView | SQLiteView,
    second: Callable[[], tuple[list[tuple[int, WireTxn]], Checkpoint]],
) -> None:
    kv_view.apply([(3, wtxn(Put("a", 1))), (4, wtxn(Put("b", 2)))], ckpt(5))
    applied, checkpoint = second()
    with pytest.raises(UsageError) as info:
        kv_view.apply(applied, checkpoint)
    assert isinstance(info.value, LedgerlogError)
    assert kv_view.checkpoint() == ckpt(5)
    assert kv_view.items() == [("a", 1), ("b", 2)]


def test_snapshot_read_is_consistent_while_applying(kv_view: MemoryView | SQLiteView) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def apply_loop() -> None:
        try:
            for seq in range(1, 400):
                kv_view.apply([(seq, wtxn(Put("a", seq), Put("b", seq)))], ckpt(seq + 1))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    def read(v: Any) -> tuple[Any, Any, int]:
        return v.get("a"), v.get("b"), v.applied_seq

    t = threading.Thread(target=apply_loop)
    t.start()
    seen = 0
    while not stop.is_set() or seen == 0:
        a, b, at = kv_view.snapshot_read(read)
        assert a == b
        assert (a or 0) == at
        seen += 1
    t.join()
    assert not errors
    assert kv_view.snapshot_read(read) == (399, 399, 399)


# -- MemoryView ----------------------------------------------------------------------------


def test_memory_lock_free_lookup_sees_each_change_whole() -> None:
    # lookup() reads without the lock while apply() writes, so apply() orders its
    # stores (a put's version before its value, a delete's tombstone before removing
    # the key). Here every store inside apply() is followed by a lookup, from the same
    # thread, of the state exactly as a concurrent reader could find it: while seq s is
    # being applied, a lookup must show a version >= s (the reader then aborts), and a
    # value (each value written is its own seq) never with an older version.
    view = MemoryView(window=1_000_000)
    probes: list[tuple[int, tuple[bool, Any, int]]] = []
    applying = [0]

    class Probed(dict[str, Any]):
        def __setitem__(self, key: str, value: Any) -> None:
            super().__setitem__(key, value)
            probes.append((applying[0], view.lookup(key)))

        def __delitem__(self, key: str) -> None:
            super().__delitem__(key)
            probes.append((applying[0], view.lookup(key)))

    view._values = Probed()
    view._versions = Probed()
    for seq in range(1, 30):
        applying[0] = seq
        op = Delete("k") if seq % 3 == 0 else Put("k", seq)
        view.apply([(seq, wtxn(op, n=seq))], ckpt(seq + 1))
    assert len(probes) == 2 * 29
    for seq, (present, value, version) in probes:
        assert version >= seq, (seq, present, value, version)
        if present:
            assert version >= value, (seq, value, version)
    assert view.lookup("k") == (True, 29, 29)
    assert view.lookup("never") == (False, None, 0)


def test_memory_tombstones_expire_after_window() -> None:
    view = MemoryView(window=10)
    view.apply([(1, wtxn(Put("a", 1), Put("b", 1))), (3, wtxn(Delete("a")))], ckpt(4))
    assert view.get("a") is None
    assert view.version("a") == 3  # deleted at seq 3, not "never written"
    assert view.version("never") == 0
    assert view.tombstones() == {"a": 3}
    assert view.max_version_in_range("a", "b") == 3
    view.apply([(5, wtxn(Delete("zz")))], ckpt(13))  # newest seq 12: 3 is still inside
    assert view.version("a") == 3 and view.version("zz") == 5
    view.apply([], ckpt(14))  # newest seq 13: seq 3 left the window
    assert view.version("a") == 0
    assert view.tombstones() == {"zz": 5}
    assert view.max_version_in_range("a", "b") == 0
    assert view.max_version_in_range("") == 5


def test_memory_put_after_delete_outranks_tombstone() -> None:
    view = MemoryView(window=100)
    view.apply([(1, wtxn(Put("a", 1))), (2, wtxn(Delete("a"))), (3, wtxn(Put("a", 3)))], ckpt(4))
    assert view.get_versioned("a") == (3, 3)
    assert view.version("a") == 3
    assert view.tombstones() == {}
    assert view.max_version_in_range("a", "b") == 3
    view.apply([(4, wtxn(Delete("a")))], ckpt(5))
    assert view.version("a") == 4 and view.tombstones() == {"a": 4}


def test_memory_bad_window() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError):
            MemoryView(window=bad)  # type: ignore[arg-type]


# -- SQLiteView ----------------------------------------------------------------------------


def test_sqlite_checkpoint_and_data_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    rng = random.Random(7)
    model: Model = {}
    with_view = SQLiteView(path, synchronous="FULL")
    batch = random_batch(rng, 1, 50)
    with_view.apply(batch, ckpt(51))
    model_apply(model, batch)
    with_view.close()
    with pytest.raises(ClosedError):
        with_view.get("k001")
    with pytest.raises(ClosedError):
        with_view.apply([], ckpt(52))

    again = SQLiteView(path)
    assert again.checkpoint() == ckpt(51)
    assert again.applied_seq == 50
    check_against_model(again, model)
    batch = random_batch(rng, 51, 50)
    again.apply(batch, ckpt(101))
    model_apply(model, batch)
    check_against_model(again, model)
    again.close()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    raw.close()


def test_sqlite_failed_apply_leaves_nothing(tmp_path: Path) -> None:
    """A statement failing halfway through a batch rolls back the batch's earlier rows
    and its checkpoint with it."""
    path = tmp_path / "v.db"
    view = SQLiteView(path)
    view.apply([(1, wtxn(Put("a", 1), Put("zz", 0)))], ckpt(2))
    raw = sqlite3.connect(path)
    raw.execute(
        "CREATE TRIGGER poison BEFORE INSERT ON kv WHEN NEW.key = 'poison' "
        "BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
    )
    raw.commit()
    raw.close()
    batch = [
        (2, wtxn(Put("a", 2), Delete("zz"))),
        (3, wtxn(Put("poison", 1))),
        (4, wtxn(Put("b", 1))),
    ]
    with pytest.raises(BackendError, match="poisoned"):
        view.apply(batch, ckpt(5))
    assert view.items() == [("a", 1), ("zz", 0)]
    assert view.checkpoint() == ckpt(2)
    view.apply(batch[:1], ckpt(3))  # still usable, and at the same place
    assert view.items() == [("a", 2)] and view.applied_seq == 2
    view.close()


def test_sqlite_table_prefix_shares_a_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    one, two = SQLiteView(path, table_prefix="one_"), SQLiteView(path, table_prefix="two_")
    one.apply([(1, wtxn(Put("k", "one")))], ckpt(2))
    two.apply([(1, wtxn(Put("k", "two"))), (2, wtxn(Put("j", 2)))], ckpt(3))
    assert one.items() == [("k", "one")] and one.applied_seq == 1
    assert two.items() == [("j", 2), ("k", "two")] and two.applied_seq == 2
    one.close()
    two.close()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"path": ":memory:"}, ConfigError),
        ({"path": ""}, ConfigError),
        ({"synchronous": "OFF"}, ConfigError),
        ({"table_prefix": "x; DROP TABLE kv"}, ConfigError),
        ({"readonly": True}, BackendError),  # no such file yet
    ],
)
def test_sqlite_bad_config(tmp_path: Path, kwargs: dict[str, Any], error: type[Exception]) -> None:
    args: dict[str, Any] = {"path": tmp_path / "x.db", **kwargs}
    with pytest.raises(error):
        SQLiteView(**args)


def test_sqlite_readonly_reader_and_second_applier(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    sqlite3.connect(path).close()
    with pytest.raises(ConfigError):  # file exists, tables do not
        SQLiteView(path, readonly=True)
    writer = SQLiteView(path)
    writer.apply([(1, wtxn(Put("a", 1)))], ckpt(2))
    reader = SQLiteView(path, readonly=True)
    assert reader.items() == [("a", 1)]
    with pytest.raises(UsageError):
        reader.apply([(2, wtxn(Put("a", 2)))], ckpt(3))
    writer.apply([(2, wtxn(Put("a", 2)))], ckpt(3))
    assert reader.get_versioned("a") == (2, 2) and reader.checkpoint() == ckpt(3)
    # A second applier that believes it is at seq 2 is refused by the stored
    # checkpoint, instead of writing seq 2 twice.
    other = SQLiteView(path)
    writer.apply([(3, wtxn(Put("a", 3)))], ckpt(4))
    with pytest.raises(UsageError):
        other.apply([(3, wtxn(Put("a", 33)))], ckpt(4))
    assert reader.get("a") == 3
    for v in (writer, reader, other):
        v.close()


def test_sqlite_concurrent_reader_connections(tmp_path: Path) -> None:
    """Readers on their own connections (a readonly view in this thread, a bare sqlite3
    connection in another) only ever see whole batches, checkpoint included."""
    path = tmp_path / "v.db"
    writer = SQLiteView(path)
    writer.apply([], ckpt(1))
    reader = SQLiteView(path, readonly=True)
    done = threading.Event()
    problems: list[str] = []
    raw_reads = 0
    # Applies start only once both readers are reading, and pause now and then, so the
    # reads interleave with them even on a loaded machine.
    gate = threading.Barrier(3, timeout=30)

    def apply_loop() -> None:
        try:
            gate.wait()
            for seq in range(1, 301):
                writer.apply([(seq, wtxn(Put("a", seq), Put("b", seq)))], ckpt(seq + 1))
                if seq % 20 == 0:
                    time.sleep(0.002)
        except BaseException as exc:  # pragma: no cover - reported below
            problems.append(repr(exc))
        finally:
            done.set()

    def raw_reader() -> None:
        nonlocal raw_reads
        conn = sqlite3.connect(path, isolation_level=None)
        while raw_reads == 0 or not done.is_set():
            conn.execute("BEGIN")
            rows = dict(conn.execute("SELECT key, version FROM kv").fetchall())
            (next_seq,) = conn.execute("SELECT next_seq FROM ledgerlog_checkpoint").fetchone()
            conn.execute("COMMIT")
            if rows and not rows["a"] == rows["b"] == next_seq - 1:
                problems.append(f"torn read: {rows} at next_seq {next_seq}")
            raw_reads += 1
            if raw_reads == 1:
                gate.wait()
        conn.close()

    def read(v: Any) -> tuple[Any, Any, int]:
        return v.get_versioned("a"), v.get("b"), v.applied_seq

    threads = [threading.Thread(target=apply_loop), threading.Thread(target=raw_reader)]
    for t in threads:
        t.start()
    view_reads = 0
    while view_reads == 0 or not done.is_set():
        a, b, at = reader.snapshot_read(read)
        if a is not None and not a == (b, at) == (at, at):
            problems.append(f"torn read through the view: {a}, {b} at {at}")
        view_reads += 1
        if view_reads == 1:
            gate.wait()
    for t in threads:
        t.join()
    assert not problems
    assert raw_reads > 1 and view_reads > 1
    assert reader.snapshot_read(read) == ((300, 300), 300, 300)
    writer.close()
    reader.close()


# -- crash atomicity -----------------------------------------------------------------------

CRASH_BATCH = 200

_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import test_views
test_views.crash_child(sys.argv[2], sys.argv[3])
"""


def crash_batch(i: int) -> tuple[list[tuple[int, WireTxn]], Checkpoint]:
    """Batch i of the crash tests: the same in the child that applies it and the parent
    that checks it."""
    first = i * CRASH_BATCH + 1
    return random_batch(random.Random(i), first, CRASH_BATCH, nkeys=500), ckpt(first + CRASH_BATCH)


def _handler_store(path: str) -> tuple[sqlite3.Connection, HandlerView]:
    conn = sqlite3.connect(path)  # the default (legacy) transaction handling, on purpose
    conn.execute("CREATE TABLE IF NOT EXISTS seen (seq INTEGER NOT NULL, client_seq INTEGER)")

    def record(seq: int, txn: Transaction) -> None:
        conn.execute("INSERT INTO seen VALUES (?, ?)", (seq, txn.txn_id.client_seq))

    return conn, HandlerView(record, store=conn)


def crash_child(mode: str, path: str) -> None:  # pragma: no cover - runs in a subprocess
    view: View
    if mode == "sqlite":
        view = SQLiteView(path)
        applied_seq = view.applied_seq
    else:
        _conn, hview = _handler_store(path)
        view, applied_seq = hview, hview.applied_seq
    i = applied_seq // CRASH_BATCH
    print("ready", flush=True)
    while True:
        view.apply(*crash_batch(i))
        i += 1


def _run_and_kill(mode: str, path: Path, delay: float) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(TESTS_DIR), mode, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            if line.startswith("ready"):
                break
        else:
            raise AssertionError(f"child failed: {proc.stderr.read()}")
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("mode", ["sqlite", "handler"])
def test_sigkill_mid_apply_keeps_exactly_the_checkpointed_prefix(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"{mode}.db"
    rng = random.Random(99)
    progress = [0]
    for _round in range(6):
        _run_and_kill(mode, path, rng.uniform(0.05, 0.4))
        if mode == "sqlite":
            view = SQLiteView(path)
            n = view.applied_seq
            assert n % CRASH_BATCH == 0
            model: Model = {}
            for i in range(n // CRASH_BATCH):
                model_apply(model, crash_batch(i)[0])
            check_against_model(view, model)
            if n:
                assert view.checkpoint() == ckpt(n + 1)
            view.close()
        else:
            conn, hview = _handler_store(str(path))
            n = hview.applied_seq
            assert n % CRASH_BATCH == 0
            rows = conn.execute(
                "SELECT seq, count(*), min(client_seq) FROM seen GROUP BY seq ORDER BY seq"
            ).fetchall()
            # every committed seq handled exactly once, and nothing past the checkpoint
            assert rows == [(s, 1, s) for s in range(1, n + 1)]
            conn.close()
        assert n >= progress[-1]
        progress.append(n)
    assert progress[-1] > 0, "the child never finished a batch"


# -- HandlerView ---------------------------------------------------------------------------


def test_handler_calls_in_seq_order_with_transactions() -> None:
    calls: list[tuple[int, Transaction]] = []
    view = HandlerView(lambda seq, txn: calls.append((seq, txn)))
    assert view.checkpoint() is None
    ev = Event("paid", {"amount": 3}, ("acct/1",))
    view.apply([(1, wtxn(Put("a", 1), n=10)), (3, wtxn(Delete("a"), events=(ev,), n=11))], ckpt(4))
    assert [s for s, _ in calls] == [1, 3]
    assert calls[0][1].writes == (Put("a", 1),) and calls[0][1].txn_id == TxnId("client", 10)
    assert calls[1][1].writes == (Delete("a"),) and calls[1][1].events == (ev,)
    assert view.checkpoint() == ckpt(4) and view.applied_seq == 3


def test_handler_that_raises_is_not_checkpointed() -> None:
    calls: list[int] = []
    fail_at = {3}

    def fn(seq: int, _txn: Transaction) -> None:
        if seq in fail_at:
            raise ValueError("boom")
        calls.append(seq)

    view = HandlerView(fn)
    batch = [(s, wtxn(Put("k", s))) for s in range(1, 5)]
    with pytest.raises(HandlerError) as info:
        view.apply(batch, ckpt(5))
    assert info.value.seq == 3 and isinstance(info.value.__cause__, ValueError)
    assert view.checkpoint() is None
    fail_at.clear()
    view.apply(batch, ckpt(5))  # delivered again, same seqs
    assert calls == [1, 2, 1, 2, 3, 4]
    assert view.applied_seq == 4


def test_handler_checkpoint_file_survives_and_redelivers_unfinished_batch(
    tmp_path: Path,
) -> None:
    path = tmp_path / "handler.ckpt"
    seen: list[int] = []
    fail = [False]

    def fn(seq: int, _txn: Transaction) -> None:
        if fail[0] and seq == 6:
            raise RuntimeError("down")
        seen.append(seq)

    view = HandlerView(fn, checkpoint_path=path)
    view.apply([(s, wtxn(Put("k", s))) for s in range(1, 4)], ckpt(4))
    fail[0] = True
    with pytest.raises(HandlerError):
        view.apply([(s, wtxn(Put("k", s))) for s in range(4, 8)], ckpt(8))
    view.close()
    with pytest.raises(ClosedError):
        view.apply([], ckpt(9))

    again = HandlerView(fn, checkpoint_path=path)
    assert again.checkpoint() == ckpt(4)  # the failed batch was not checkpointed
    fail[0] = False
    # The reader resumes at next_seq 4: seqs 4 and 5 come again, with the same seqs,
    # so a handler that stores its highest seq can drop them.
    again.apply([(s, wtxn(Put("k", s))) for s in range(4, 8)], ckpt(8))
    assert seen == [1, 2, 3, 4, 5, 4, 5, 6, 7]
    again.close()
    assert HandlerView(fn, checkpoint_path=path).checkpoint() == ckpt(8)


def test_handler_store_is_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE balance (acct TEXT PRIMARY KEY, amount INTEGER)")
    conn.execute("CREATE TABLE applied (seq INTEGER)")
    fail_at: set[int] = set()

    def fn(seq: int, txn: Transaction) -> None:
        conn.execute("INSERT INTO applied VALUES (?)", (seq,))
        for w in txn.writes:
            if isinstance(w, Put):
                conn.execute(
                    "INSERT INTO balance VALUES (?, ?) ON CONFLICT (acct) "
                    "DO UPDATE SET amount = amount + excluded.amount",
                    (w.key, w.value),
                )
        if seq in fail_at:
            raise KeyError("handler bug")

    view = HandlerView(fn, store=conn)
    view.apply([(1, wtxn(Put("a", 10))), (2, wtxn(Put("b", 5)))], ckpt(3))
    second = [(3, wtxn(Put("a", 1))), (4, wtxn(Put("a", 100))), (5, wtxn(Put("b", 1)))]
    fail_at.add(4)
    with pytest.raises(HandlerError) as info:
        view.apply(second, ckpt(6))
    assert info.value.seq == 4
    assert not conn.in_transaction
    # seq 3's write was rolled back with the failed batch
    assert dict(conn.execute("SELECT * FROM balance")) == {"a": 10, "b": 5}
    assert view.checkpoint() == ckpt(3)

    # a fresh process: new connection, new view, checkpoint read from the same file
    conn.close()
    conn = sqlite3.connect(path)
    view = HandlerView(fn, store=conn)
    assert view.checkpoint() == ckpt(3)
    fail_at.clear()
    view.apply(second, ckpt(6))
    assert dict(conn.execute("SELECT * FROM balance")) == {"a": 111, "b": 6}
    assert [r[0] for r in conn.execute("SELECT seq FROM applied ORDER BY seq")] == [1, 2, 3, 4, 5]
    conn.close()


def test_handler_store_refuses_foreign_transactions(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "app.db")
    conn.execute("CREATE TABLE t (x INTEGER)")

    def committing(seq: int, _txn: Transaction) -> None:
        conn.execute("INSERT INTO t VALUES (?)", (seq,))
        conn.commit()

    view = HandlerView(committing, store=conn)
    with pytest.raises(UsageError, match="committed or rolled back"):
        view.apply([(1, wtxn(Put("a", 1)))], ckpt(2))
    assert view.checkpoint() is None and not conn.in_transaction

    polite = HandlerView(lambda s, t: None, store=conn)
    conn.execute("INSERT INTO t VALUES (0)")  # opens an implicit transaction
    with pytest.raises(UsageError, match="transaction open"):
        polite.apply([(1, wtxn(Put("a", 1)))], ckpt(2))
    conn.rollback()
    polite.apply([(1, wtxn(Put("a", 1)))], ckpt(2))
    assert polite.applied_seq == 1
    conn.close()


def test_handler_and_sqlite_view_share_a_file(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    kv = SQLiteView(path)
    conn = sqlite3.connect(path, timeout=10)
    handler = HandlerView(lambda s, t: None, store=conn)
    kv.apply([(1, wtxn(Put("a", 1)))], ckpt(2))
    handler.apply([], ckpt(1))
    assert kv.checkpoint() == ckpt(2) and handler.checkpoint() == ckpt(1)
    kv.close()
    conn.close()


@pytest.mark.parametrize("mode", ["memory", "file", "store"])
def test_handler_misuse(tmp_path: Path, mode: str) -> None:
    conn = sqlite3.connect(tmp_path / "app.db")
    options: dict[str, dict[str, Any]] = {
        "memory": {},
        "file": {"checkpoint_path": tmp_path / "h.ckpt"},
        "store": {"store": conn},
    }
    kwargs = options[mode]
    calls: list[int] = []
    view = HandlerView(lambda s, t: calls.append(s), **kwargs)
    view.apply([(1, wtxn()), (2, wtxn())], ckpt(3))
    with pytest.raises(UsageError):
        view.apply([(2, wtxn())], ckpt(4))  # seq going backwards
    with pytest.raises(UsageError):
        view.apply([(4, wtxn()), (3, wtxn())], ckpt(5))
    with pytest.raises(UsageError):
        view.apply([], ckpt(2))
    assert calls == [1, 2] and view.checkpoint() == ckpt(3)
    view.close()
    conn.close()


def test_handler_bad_config(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "app.db")
    with pytest.raises(ConfigError):
        HandlerView(lambda s, t: None, store=conn, checkpoint_path=tmp_path / "x")
    with pytest.raises(ConfigError):
        HandlerView("not callable")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        HandlerView(lambda s, t: None, store="app.db")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        HandlerView(lambda s, t: None, checkpoint_path=":memory:")
    with pytest.raises(ConfigError):
        HandlerView(lambda s, t: None, store=conn, table_prefix="bad-prefix")
    conn.close()
