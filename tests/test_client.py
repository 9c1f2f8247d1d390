"""The client API on the embedded backend: transactions on a local replica,
read-your-writes, snapshot reads, conflicts, the retry helper, at-most-once submission,
the asyncio twin, and several threads / processes sharing one ledger."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ledgerlog
from ledgerlog.backends.file import FileBackend
from ledgerlog.client import GEN0_THRESHOLD
from ledgerlog.model import AbortReason, Decision, Outcome, TxnId
from ledgerlog.testing.threads import run_in_threads

pytestmark = pytest.mark.timeout(30)

ACCOUNTS = 20
BALANCE = 1_000


# -- helpers --------------------------------------------------------------------------------


def open_client(path: Path, client_id: str, **options: Any) -> ledgerlog.Client:
    options.setdefault("fsync", False)
    options.setdefault("timeout", 10.0)
    return ledgerlog.open(path, client_id=client_id, **options)


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "x"


@pytest.fixture
def db(ledger: Path) -> Iterator[ledgerlog.Client]:
    c = open_client(ledger, "c1")
    c.wait_writer(10)
    yield c
    c.close()


@pytest.fixture
def db2(ledger: Path, db: ledgerlog.Client) -> Iterator[ledgerlog.Client]:
    """A second client (its own replica and intake) on the same ledger as `db`."""
    c = open_client(ledger, "c2")
    c.wait_writer(10)
    yield c
    c.close()


def put(client: ledgerlog.Client, items: dict[str, Any] | None = None, **kv: Any) -> Decision:
    """Commit blind puts of `items` and keyword arguments; return the decision."""
    with client.transaction() as tx:
        for k, v in {**(items or {}), **kv}.items():
            tx.put(k, v)
    assert tx.decision is not None and tx.decision.committed
    return tx.decision


def ledger_decisions(path: Path) -> tuple[list[Decision], ledgerlog.Reader]:
    """Every decision in the ledger, from a fresh Reader (an independent replica)."""
    reader = ledgerlog.Reader(FileBackend(path, create=False), name="check")
    results: list[Any] = []
    reader.subscribe(results.extend)
    reader.catch_up(10)
    decisions = [d for res in results if res.kind == "record" for d in res.decisions]
    return decisions, reader


def fresh_digest(path: Path) -> tuple[int, bytes]:
    _decisions, reader = ledger_decisions(path)
    try:
        return reader.last_seq, reader.digest
    finally:
        reader.close()


def init_accounts(client: ledgerlog.Client, n: int = ACCOUNTS) -> None:
    with client.transaction() as tx:
        for i in range(n):
            tx.put(f"acct:{i:02d}", BALANCE)


def total(client: ledgerlog.Client) -> int:
    return sum(v for _k, v in client.range("acct:", "acct;"))


# -- basics -----------------------------------------------------------------------------------


def test_put_get_round_trip(db: ledgerlog.Client) -> None:
    values = {
        "s": "text",
        "i": 42,
        "f": 1.5,
        "l": [1, "two", None],
        "d": {"a": {"b": [3]}},
        "b": b"\x00\xff",
        "n": None,
        "t": True,
    }
    with db.transaction() as tx:
        for k, v in values.items():
            tx[k] = v
    d = tx.decision
    assert d is not None and d.committed and d.seq == db.last_seq
    for k, v in values.items():
        assert db.get(k) == v
    with db.transaction() as tx:
        for k, v in values.items():
            assert tx[k] == v
        assert tx.get("missing") is None
        assert tx.get("missing", "dflt") == "dflt"
        with pytest.raises(KeyError):
            tx["missing"]
    # The put survives a restart of the client (it is in the ledger, not only in memory).
    db.close()
    with open_client(db.backend.path, "c1-again") as again:  # type: ignore[attr-defined]
        again.sync()
        assert again.get("d") == {"a": {"b": [3]}}


def test_read_your_writes(db: ledgerlog.Client) -> None:
    put(db, a=1, b=2, c=3, z=26)
    tx = db.transaction()
    assert tx.get("a") == 1
    tx.put("a", 10)
    assert tx.get("a") == 10
    tx.delete("b")
    assert tx.get("b") is None
    assert tx.get("b", "gone") == "gone"
    with pytest.raises(KeyError):
        tx["b"]
    tx.put("new", "n")
    assert tx.get("new") == "n"
    del tx["new"]
    assert tx.get("new") is None
    # A range overlays the buffered writes on the snapshot: puts replace or add rows,
    # deletes remove them, and writes outside the range do not show.
    tx.put("c", 30)
    tx.put("bb", 22)
    tx.put("zz", 99)
    assert tx.range("a", "d") == [("a", 10), ("bb", 22), ("c", 30)]
    assert tx.range("a", "d", limit=2) == [("a", 10), ("bb", 22)]
    assert tx.range("a") == [("a", 10), ("bb", 22), ("c", 30), ("z", 26), ("zz", 99)]
    assert tx.prefix("b") == [("bb", 22)]
    d = tx.commit()
    assert d.committed
    assert db.range("") == [("a", 10), ("bb", 22), ("c", 30), ("z", 26), ("zz", 99)]


def test_delete_then_get_and_put_after_delete(db: ledgerlog.Client) -> None:
    put(db, k="v")
    with db.transaction() as tx:
        tx.delete("k")
        assert tx.get("k") is None
        assert "k" not in dict(tx.range("k", "l"))
        tx.put("k", "again")
        assert tx.get("k") == "again"
        tx.delete("k")
    assert db.get("k") is None
    assert db.get("k", 7) == 7
    with db.transaction() as tx:
        assert tx.get("k", "absent") == "absent"


def test_transaction_reads_the_snapshot_at_its_read_version(
    db: ledgerlog.Client, db2: ledgerlog.Client
) -> None:
    put(db, a=1, b=1, gone=1)
    db2.sync()
    tx = db.transaction()
    rv = tx.read_version
    assert rv == db.last_seq
    probes = {key: db.transaction() for key in ("b", "c", "gone")}  # same snapshot as tx
    assert {t.read_version for t in probes.values()} == {rv}
    # Another client changes b, inserts c and deletes `gone`; our replica applies it.
    with db2.transaction() as t2:
        t2.put("b", 2)
        t2.put("c", 2)
        t2.delete("gone")
    later = t2.decision.seq  # type: ignore[union-attr]
    assert later is not None and later > rv
    db.sync()
    assert db.get("b") == 2  # the replica moved on ...
    assert tx.read_version == rv  # ... the transaction did not
    # Unchanged keys read as at rv; changed, inserted or deleted ones never show their
    # newer state: reading them aborts the transaction instead.
    assert tx.get("a") == 1
    assert tx.range("a", "b") == [("a", 1)]
    for key, t in probes.items():
        with pytest.raises(ledgerlog.ConflictError) as ei:
            t.get(key)
        assert ei.value.decision.conflict_key == key
        assert ei.value.decision.conflict_seq == later
    tx.put("a", 2)
    assert tx.commit().committed  # it read only what did not change
    # A transaction started now sees the new state.
    with db.transaction() as t3:
        assert t3.get("b") == 2 and t3.get("c") == 2 and t3.get("gone") is None


def test_early_conflict_when_a_read_key_changed_after_read_version(
    db: ledgerlog.Client, db2: ledgerlog.Client
) -> None:
    put(db, k=1)
    db2.sync()
    tx1 = db2.transaction()
    rv = tx1.read_version
    d = put(db, k=2)
    db2.sync()
    started = time.perf_counter()
    with pytest.raises(ledgerlog.ConflictError) as ei:
        tx1.get("k")
    assert time.perf_counter() - started < 0.5  # raised at once, not after a round trip
    dec = ei.value.decision
    assert not dec.committed and dec.reason is AbortReason.CONFLICT
    assert dec.conflict_key == "k" and dec.conflict_seq == d.seq and d.seq > rv
    assert dec.seq is None  # decided locally, never submitted
    assert dec.txn_id == tx1.txn_id
    assert ei.value.retryable
    assert "'k'" in str(ei.value) and f"seq {d.seq}" in str(ei.value)
    assert tx1.decision == dec
    # Nothing was submitted for it.
    decisions, reader = ledger_decisions(db.backend.path)  # type: ignore[attr-defined]
    reader.close()
    assert all(x.txn_id != tx1.txn_id for x in decisions)


def test_early_conflict_on_a_range(db: ledgerlog.Client, db2: ledgerlog.Client) -> None:
    put(db, {"user:1": "ann"})
    db2.sync()
    tx = db2.transaction()
    put(db, {"user:2": "bob"})
    db2.sync()
    with pytest.raises(ledgerlog.ConflictError) as ei:
        tx.range("user:", "user;")
    assert ei.value.decision.conflict_key in ledgerlog.KeyRange("user:", "user;")


def test_conflicting_commit_raises_conflict_error_naming_key_and_seq(
    db: ledgerlog.Client, db2: ledgerlog.Client
) -> None:
    put(db, k=1, other=1)
    db2.sync()
    tx = db2.transaction()
    assert tx.get("k") == 1
    assert tx.get("other") == 1
    d = put(db, k=2)  # lands after tx's read_version, before its commit
    tx.put("k", tx.get("other") + 1)
    with pytest.raises(ledgerlog.ConflictError) as ei:
        tx.commit()
    dec = ei.value.decision
    assert dec.outcome is Outcome.ABORTED and dec.reason is AbortReason.CONFLICT
    assert dec.conflict_key == "k"
    assert dec.conflict_seq == d.seq
    assert dec.seq is not None and dec.seq > d.seq
    assert dec.txn_id == tx.txn_id and tx.decision == dec
    assert f"on key 'k' written at seq {d.seq}" in str(ei.value)
    db.sync()
    assert db.get("k") == 2
    # Every replica reached the same abort.
    decisions, reader = ledger_decisions(db.backend.path)  # type: ignore[attr-defined]
    reader.close()
    assert [x for x in decisions if x.txn_id == tx.txn_id] == [dec]


# -- transactional --------------------------------------------------------------------------


def test_transactional_retries_conflicts_and_succeeds(
    db: ledgerlog.Client, db2: ledgerlog.Client
) -> None:
    put(db, n=0)
    calls = 0

    @ledgerlog.transactional
    def incr(tx: ledgerlog.Tx, key: str) -> int:
        nonlocal calls
        calls += 1
        v = tx.get(key)
        if calls == 1:
            put(db2, n=100)  # a concurrent writer gets in between read and commit
        tx.put(key, v + 1)
        return int(v + 1)

    assert incr(db, "n") == 101
    assert calls == 2
    db.sync()
    assert db.get("n") == 101


def test_transactional_gives_up_after_retries(db: ledgerlog.Client, db2: ledgerlog.Client) -> None:
    put(db, n=0)
    calls = 0

    @ledgerlog.transactional(retries=2, backoff=0.0)
    def always_loses(tx: ledgerlog.Tx) -> None:
        nonlocal calls
        calls += 1
        v = tx.get("n")
        put(db2, n=1000 + calls)
        tx.put("n", v + 1)

    with pytest.raises(ledgerlog.RetryLimitError) as ei:
        always_loses(db)
    assert calls == 3
    assert ei.value.attempts == 3
    assert isinstance(ei.value.last, ledgerlog.ConflictError)
    assert ei.value.last.decision.conflict_key == "n"
    assert "gave up after 3 attempts" in str(ei.value)
    db.sync()
    assert db.get("n") == 1003  # none of the losing increments committed


def test_transactional_does_not_retry_non_retryable_aborts(db: ledgerlog.Client) -> None:
    calls = 0
    dup = Decision(7, TxnId("c1", 1), Outcome.ABORTED, AbortReason.DUPLICATE, conflict_seq=3)

    @ledgerlog.transactional(retries=5)
    def f(tx: ledgerlog.Tx) -> None:
        nonlocal calls
        calls += 1
        tx.put("x", calls)
        raise ledgerlog.TransactionAborted(dup)

    with pytest.raises(ledgerlog.TransactionAborted) as ei:
        f(db)
    assert calls == 1
    assert not ei.value.retryable and ei.value.decision is dup

    # Nor anything that is not an abort: it propagates at once and nothing commits.
    seq = db.sync()

    @ledgerlog.transactional
    def boom(tx: ledgerlog.Tx) -> None:
        nonlocal calls
        calls += 1
        tx.put("x", "boom")
        raise ValueError("application error")

    calls = 0
    with pytest.raises(ValueError, match="application error"):
        boom(db)
    assert calls == 1
    assert db.sync() == seq
    assert db.get("x") is None


def test_transactional_nests_when_called_with_a_tx(db: ledgerlog.Client) -> None:
    @ledgerlog.transactional
    def deposit(tx: ledgerlog.Tx, key: str, amount: int) -> int:
        v = tx.get(key, 0) + amount
        tx.put(key, v)
        return int(v)

    seen: list[Any] = []

    @ledgerlog.transactional
    def two_deposits(tx: ledgerlog.Tx) -> None:
        assert deposit(tx, "a", 5) == 5
        assert deposit(tx, "a", 7) == 12  # sees the inner call's buffered write
        seen.append(tx.decision)  # the inner calls did not commit
        assert deposit(tx, "b", 1) == 1

    before = db.sync()
    two_deposits(db)
    assert seen == [None]
    assert db.sync() == before + 1  # one transaction, one seq
    assert db.get("a") == 12 and db.get("b") == 1


# -- phantoms and events --------------------------------------------------------------------


def test_range_read_prevents_phantoms(db: ledgerlog.Client, db2: ledgerlog.Client) -> None:
    put(db, {"user:1": "ann", "user:2": "bob"})
    db2.sync()
    tx = db2.transaction()
    users = tx.range("user:", "user;")
    assert [k for k, _ in users] == ["user:1", "user:2"]
    d = put(db, {"user:3": "cat"})  # a phantom: a new key inside the range read
    tx.put("user-count", len(users))
    with pytest.raises(ledgerlog.ConflictError) as ei:
        tx.commit()
    assert ei.value.decision.conflict_key == "user:3"
    assert ei.value.decision.conflict_seq == d.seq

    # An insert outside the range does not abort a reader of the range.
    db2.sync()
    tx = db2.transaction()
    users = tx.range("user:", "user;")
    put(db, {"admin:1": "root", "user;": "just past the range"})
    tx.put("user-count", len(users))
    assert tx.commit().committed


def test_events_abort_concurrent_readers_of_their_conflict_keys(
    db: ledgerlog.Client, db2: ledgerlog.Client
) -> None:
    put(db, {"acct:1": 100, "acct:2": 100})
    db2.sync()
    tx = db2.transaction()
    assert tx.get("acct:1") == 100
    with db.transaction() as ev:
        ev.emit("account-frozen", {"why": "audit"}, conflict_keys=["acct:1"])
    event_seq = ev.decision.seq  # type: ignore[union-attr]
    db.sync()
    assert db.get("acct:1") == 100  # an event changes no value ...
    tx.put("acct:1", 50)
    with pytest.raises(ledgerlog.ConflictError) as ei:
        tx.commit()
    # ... but it aborts whoever read its conflict keys concurrently.
    assert ei.value.decision.conflict_key == "acct:1"
    assert ei.value.decision.conflict_seq == event_seq

    # An event on other keys does not.
    db2.sync()
    tx = db2.transaction()
    tx.get("acct:1")
    with db.transaction() as ev:
        ev.emit("noise", conflict_keys=["acct:2"])
    tx.put("acct:1", 50)
    assert tx.commit().committed


# -- read-only, sync, submission -------------------------------------------------------------


def test_read_only_transactions_commit_without_a_round_trip(ledger: Path) -> None:
    with open_client(ledger, "setup") as setup:
        setup.wait_writer(10)
        put(setup, a=1, b=2)
    # No writer serves the ledger now: anything submitted could not be decided.
    with open_client(ledger, "ro", writer=None, timeout=0.5) as ro:
        seq = ro.sync()
        started = time.perf_counter()
        with ro.transaction() as tx:
            assert tx.get("a") == 1
            assert tx.range("a") == [("a", 1), ("b", 2)]
            tx.add_read("c")
        assert time.perf_counter() - started < 0.5  # below the client timeout
        d = tx.decision
        assert d is not None and d.committed and d.seq is None and d.detail == "read-only"
        assert ro.sync() == seq
    assert fresh_digest(ledger)[0] == seq  # nothing was appended


def test_sync_makes_a_later_transaction_see_another_process_commit(
    db: ledgerlog.Client, ledger: Path
) -> None:
    put(db, k="parent")
    before = db.transaction()
    script = textwrap.dedent(
        """
        import logging, sys, structlog, ledgerlog
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                            logger_factory=structlog.PrintLoggerFactory(sys.stderr))
        db = ledgerlog.open(sys.argv[1], client_id="child", writer=None, fsync=False)
        db.sync(timeout=10)
        with db.transaction() as tx:
            tx.put("k", "child")
        print("seq", tx.decision.seq, flush=True)
        db.close()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(ledger)],
        capture_output=True,
        text=True,
        timeout=25,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    child_seq = int(out.stdout.split()[-1])
    reached = db.sync()
    assert reached >= child_seq
    with db.transaction() as after:
        assert after.read_version >= child_seq
        assert after.get("k") == "child"
    # A transaction started before the sync still has the old snapshot: reading the key
    # now aborts it rather than showing the child's value.
    with pytest.raises(ledgerlog.ConflictError):
        before.get("k")


def test_submit_same_transaction_twice_commits_once(db: ledgerlog.Client) -> None:
    put(db, counter=0)
    tx = db.transaction()
    tx.put("counter", tx.get("counter") + 1)
    tx.put("log:" + str(tx.txn_id), "applied")
    txn = tx.to_transaction()
    tx.abandon()
    first = db.submit(txn)
    second = db.submit(txn)
    assert first.committed and first.txn_id == txn.txn_id
    assert not second.committed
    assert second.reason is AbortReason.DUPLICATE
    assert second.conflict_seq == first.seq  # points at the seq that did commit
    assert second.seq is not None and second.seq > first.seq
    assert not second.retryable
    decisions, reader = ledger_decisions(db.backend.path)  # type: ignore[attr-defined]
    reader.close()
    mine = [d for d in decisions if d.txn_id == txn.txn_id]
    assert [d.committed for d in mine] == [True, False]
    assert db.get("counter") == 1


def test_commit_unknown_without_a_writer_then_resubmission_is_at_most_once(
    ledger: Path,
) -> None:
    with open_client(ledger, "setup") as setup:
        setup.wait_writer(10)
        put(setup, k=0)
    c = open_client(ledger, "lonely", writer=None, timeout=0.3)
    try:
        c.sync()
        tx = c.transaction()
        tx.put("k", tx.get("k") + 1)
        started = time.perf_counter()
        with pytest.raises(ledgerlog.CommitUnknownError) as ei:
            tx.commit()
        assert time.perf_counter() - started < 3
        assert isinstance(ei.value, TimeoutError)
        assert str(tx.txn_id) in str(ei.value) and "may still commit" in str(ei.value)
        txn = tx.to_transaction()
        # A writer shows up: the submission was durable in the intake and gets appended;
        # resubmitting the same transaction must not commit it a second time.
        with open_client(ledger, "rescuer") as rescuer:
            rescuer.wait_writer(10)
            d = c.submit(txn, timeout=10)
            assert d.committed or d.reason is AbortReason.DUPLICATE
            rescuer.sync()
            c.sync()
            assert c.get("k") == 1
        decisions, reader = ledger_decisions(ledger)
        reader.close()
        mine = [x for x in decisions if x.txn_id == txn.txn_id]
        assert sum(x.committed for x in mine) == 1
        assert all(x.committed or x.reason is AbortReason.DUPLICATE for x in mine)
    finally:
        c.close()


# -- asyncio ----------------------------------------------------------------------------------


async def test_async_api(ledger: Path) -> None:
    db = await ledgerlog.aopen(ledger, client_id="async-1", fsync=False, timeout=10.0)
    async with db:
        await asyncio.to_thread(db.sync_client.wait_writer, 10)
        async with db.transaction() as tx:
            for i in range(ACCOUNTS):
                tx.put(f"acct:{i:02d}", BALANCE)
        assert tx.decision is not None and tx.decision.committed
        assert db.get("acct:00") == BALANCE and db.last_seq == tx.decision.seq

        # An exception inside `async with` abandons the transaction.
        with pytest.raises(RuntimeError):
            async with db.transaction() as tx:
                tx.put("acct:00", 0)
                raise RuntimeError("no")
        assert await db.sync() == tx.read_version

        attempts = 0

        @ledgerlog.atransactional(retries=100, backoff=0.0005, max_backoff=0.01)
        async def transfer(tx: ledgerlog.AsyncTx, src: str, dst: str, amount: int) -> None:
            nonlocal attempts
            attempts += 1
            a = tx.get(src)
            await asyncio.sleep(0)  # let the other tasks interleave between read and commit
            b = tx.get(dst)
            tx.put(src, a - amount)
            tx.put(dst, b + amount)

        @ledgerlog.atransactional
        async def nested(tx: ledgerlog.AsyncTx) -> None:
            await transfer(tx, "acct:00", "acct:01", 1)
            await transfer(tx, "acct:01", "acct:00", 1)

        rnd = random.Random(7)
        pairs = [rnd.sample(range(ACCOUNTS), 2) for _ in range(60)]
        await asyncio.gather(
            *(transfer(db, f"acct:{s:02d}", f"acct:{d:02d}", rnd.randint(1, 50)) for s, d in pairs),
            nested(db),
        )
        assert attempts >= 62
        await db.sync()
        assert sum(v for _k, v in db.range("acct:", "acct;")) == ACCOUNTS * BALANCE


# -- concurrency ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_threads_doing_transfers_conserve_the_total(db: ledgerlog.Client) -> None:
    init_accounts(db)
    per_thread = 25
    done = [0] * 8

    @ledgerlog.transactional(retries=200, backoff=0.0005, max_backoff=0.02)
    def transfer(tx: ledgerlog.Tx, src: str, dst: str, amount: int) -> None:
        a = tx.get(src)
        b = tx.get(dst)
        tx.put(src, a - amount)
        tx.put(dst, b + amount)

    def run(i: int) -> None:
        rnd = random.Random(i)
        for _ in range(per_thread):
            s, d = rnd.sample(range(ACCOUNTS), 2)
            transfer(db, f"acct:{s:02d}", f"acct:{d:02d}", rnd.randint(1, 100))
            done[i] += 1

    run_in_threads(run, 8, timeout=50)
    assert done == [per_thread] * 8
    seq = db.sync()
    assert total(db) == ACCOUNTS * BALANCE
    # An independent replica agrees on the seq and the digest.
    assert fresh_digest(db.backend.path) == (seq, db.digest)  # type: ignore[attr-defined]
    decisions, reader = ledger_decisions(db.backend.path)  # type: ignore[attr-defined]
    reader.close()
    assert sum(d.committed for d in decisions) == 1 + 8 * per_thread


_WORKER = textwrap.dedent(
    """
    import logging, random, sys, structlog, ledgerlog
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    path, cid, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ACCOUNTS = int(sys.argv[4])
    db = ledgerlog.open(path, client_id=cid, fsync=False, timeout=20)
    db.sync(timeout=20)

    @ledgerlog.transactional(retries=200, backoff=0.0005, max_backoff=0.02)
    def transfer(tx, src, dst, amount):
        a, b = tx.get(src), tx.get(dst)
        tx.put(src, a - amount)
        tx.put(dst, b + amount)

    rnd = random.Random(cid)
    for _ in range(n):
        s, d = rnd.sample(range(ACCOUNTS), 2)
        transfer(db, f"acct:{s:02d}", f"acct:{d:02d}", rnd.randint(1, 100))
    print("DONE", flush=True)
    sys.stdin.readline()  # wait until every process has stopped submitting
    seq = db.sync(timeout=20)
    total = sum(v for _k, v in db.range("acct:", "acct;"))
    print("FINAL", seq, db.digest.hex(), total, flush=True)
    db.close()
    """
)


@pytest.mark.timeout(90)
def test_two_client_processes_agree_after_sync(db: ledgerlog.Client, ledger: Path) -> None:
    init_accounts(db)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(ledger), f"proc-{i}", "40", str(ACCOUNTS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            line = p.stdout.readline()  # type: ignore[union-attr]
            assert line.strip() == "DONE", p.stderr.read() if p.poll() is not None else line  # type: ignore[union-attr]
        for p in procs:
            p.stdin.write("go\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        finals = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            (line,) = [ln for ln in out.splitlines() if ln.startswith("FINAL")]
            _, child_seq, digest, tot = line.split()
            finals.append((int(child_seq), digest, int(tot)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    seq = db.sync()
    assert finals[0] == finals[1] == (seq, db.digest.hex(), ACCOUNTS * BALANCE)
    assert total(db) == ACCOUNTS * BALANCE
    assert fresh_digest(ledger) == (seq, db.digest)


def test_range_is_a_snapshot_even_when_a_batch_lands_mid_read(
    db: ledgerlog.Client, db2: ledgerlog.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(db, {"user:1": "ann"})
    tx = db.transaction()
    original = db.view.max_version_in_range

    def racing(start: str, end: str | None = None) -> int:
        newest = original(start, end)
        # Exactly here the reader thread applies someone else's insert into the range.
        d = put(db2, {"user:2": "bob"})
        assert db.reader.wait_for_seq(d.seq, timeout=10)  # type: ignore[arg-type]
        return newest

    monkeypatch.setattr(db.view, "max_version_in_range", racing)
    try:
        rows = tx.range("user:", "user;")
    except ledgerlog.ConflictError:
        return  # also acceptable: the change was noticed
    monkeypatch.undo()
    assert rows == [("user:1", "ann")]  # the state at tx.read_version


_FREEZE_SCRIPT = textwrap.dedent(
    """
    import gc, sys, time
    import ledgerlog

    freeze = sys.argv[2] == "on"
    if len(sys.argv) > 3:
        gc.set_threshold(int(sys.argv[3]), 10, 10)  # the application's own tuning
    before = gc.get_freeze_count()
    with ledgerlog.open(sys.argv[1], client_id="gc", freeze_gc=freeze) as db:
        db.wait_writer()
        with db.transaction() as tx:
            tx.put("k", 1)
        deadline = time.monotonic() + 10
        while freeze and gc.get_freeze_count() == before and time.monotonic() < deadline:
            time.sleep(0.01)
        if not freeze:
            time.sleep(1.0)  # long past the replica's first idle poll
        print(before, gc.get_freeze_count(), gc.get_threshold()[0])
    """
)


def _run_gc_script(script: str, tmp_path: Path, *args: str) -> list[int]:
    """The integers `script` prints, run in a process of its own on a ledger in
    `tmp_path` (gc.freeze() and the GC thresholds are process-wide)."""
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "ledger"), *args],
        capture_output=True,
        text=True,
        timeout=40,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [int(x) for x in out.stdout.split()]


def _run_freeze_script(tmp_path: Path, *args: str) -> tuple[int, int, int]:
    """Freeze count before and after, and the first-generation threshold at the end."""
    before, after, gen0 = _run_gc_script(_FREEZE_SCRIPT, tmp_path, *args)
    return before, after, gen0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["on", "off"])
def test_client_freezes_the_gc_once_caught_up_unless_told_not_to(tmp_path: Path, mode: str) -> None:
    # In a process of its own: gc.freeze() is process-wide and happens once.
    before, after, gen0 = _run_freeze_script(tmp_path, mode)
    assert before == 0
    assert (after > 0) if mode == "on" else (after == 0)
    # The first generation's threshold goes with it: up from the default, or left alone.
    assert gen0 == (GEN0_THRESHOLD if mode == "on" else 700)


_THRESHOLD_SCRIPT = textwrap.dedent(
    """
    import gc, sys
    from ledgerlog.backends.file import FileBackend
    from ledgerlog.client import Client

    backend = FileBackend(sys.argv[1], fsync=False)
    # Not started: its replica has read nothing yet.
    client = Client(backend, client_id="gc", writer=None, start=False,
                    freeze_gc=sys.argv[2] == "on")
    print(gc.get_threshold()[0], gc.get_freeze_count())
    client.close()
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["on", "off"])
def test_client_raises_the_gc_threshold_before_its_replica_catches_up(
    tmp_path: Path, mode: str
) -> None:
    # A catch-up decodes the ledger with the threshold already raised (it ran full
    # collections every ~250 ms with the default); the freeze waits for the catch-up.
    gen0, frozen = _run_gc_script(_THRESHOLD_SCRIPT, tmp_path, mode)
    assert gen0 == (GEN0_THRESHOLD if mode == "on" else 700)
    assert frozen == 0


@pytest.mark.timeout(60)
def test_client_keeps_a_gc_threshold_the_application_set(tmp_path: Path) -> None:
    before, after, gen0 = _run_freeze_script(tmp_path, "on", "5000")
    assert after > before  # still frozen
    assert gen0 == 5000


@pytest.mark.timeout(60)
def test_submit_many_returns_each_transactions_decision_in_order(tmp_path: Path) -> None:
    with ledgerlog.open(tmp_path / "ledger", client_id="many") as db:
        db.wait_writer()
        with db.transaction() as tx:
            tx.put("x", 0)
        db.sync()
        txs = []
        for i in range(5):
            tx = db.transaction()
            tx.get("x")  # all read x at the same version: only the first commits
            tx.put("x", i)
            txs.append(tx)
        reader_only = db.transaction()
        reader_only.get("x")
        txs.insert(2, reader_only)
        blind = db.transaction()
        blind.put("y", 1)
        txs.append(blind)
        futs = db.submit_many(txs)
        decisions = [f.result(10) for f in futs]
        assert [d.txn_id for d in decisions] == [tx.txn_id for tx in txs]
        assert [d.committed for d in decisions] == [True, False, True, False, False, False, True]
        assert decisions[2].detail == "read-only" and decisions[2].seq is None
        assert all(d.reason is AbortReason.CONFLICT for d in decisions if not d.committed)
        assert db.get("x") == 0 and db.get("y") == 1
        # Nothing is left waiting in the replica once every decision arrived.
        assert not db.reader._waiters
