"""API misuse raises clear, typed errors (DESIGN.md invariant 5): the type is right and
the message names the problem."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ledgerlog
from ledgerlog.backends.file import FileBackend

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "x"


@pytest.fixture
def db(ledger: Path) -> Iterator[ledgerlog.Client]:
    c = ledgerlog.open(ledger, client_id="misuse", fsync=False, timeout=10.0)
    c.wait_writer(10)
    yield c
    c.close()


def assert_finished(tx: ledgerlog.Tx) -> None:
    """Every operation on a finished Tx raises UsageError naming the transaction."""
    ops: list[Any] = [
        lambda: tx.get("k"),
        lambda: tx["k"],
        lambda: tx.range("a", "b"),
        lambda: tx.prefix("a"),
        lambda: tx.put("k", 1),
        lambda: tx.delete("k"),
        lambda: tx.emit("e"),
        lambda: tx.add_read("k"),
        lambda: tx.commit(),
        lambda: tx.submit(),
    ]
    for op in ops:
        with pytest.raises(ledgerlog.UsageError, match="already finished") as ei:
            op()
        assert str(tx.txn_id) in str(ei.value)
        assert not isinstance(ei.value, ledgerlog.ClosedError)


# -- finished transactions ----------------------------------------------------------------


def test_tx_used_after_commit(db: ledgerlog.Client) -> None:
    tx = db.transaction()
    tx.put("k", 1)
    assert tx.commit().committed
    assert_finished(tx)
    # The context-manager form finishes it the same way.
    with db.transaction() as tx2:
        tx2.put("k", 2)
    assert_finished(tx2)
    # So does a read-only commit, and abandon().
    tx3 = db.transaction()
    tx3.get("k")
    tx3.commit()
    assert_finished(tx3)
    tx4 = db.transaction()
    tx4.abandon()
    assert_finished(tx4)


def test_tx_used_after_an_early_conflict(db: ledgerlog.Client) -> None:
    with db.transaction() as t:
        t.put("k", 1)
    tx = db.transaction()
    with db.transaction() as t:
        t.put("k", 2)
    db.sync()
    with pytest.raises(ledgerlog.ConflictError):
        tx.get("k")
    assert_finished(tx)


def test_tx_used_after_a_commit_conflict(db: ledgerlog.Client) -> None:
    tx = db.transaction()
    tx.get("k")
    with db.transaction() as t:
        t.put("k", 2)
    tx.put("k", 3)
    with pytest.raises(ledgerlog.ConflictError) as ei:
        tx.commit()
    assert ei.value.decision.seq is not None
    assert_finished(tx)


# -- closed client ------------------------------------------------------------------------


def test_client_used_after_close(ledger: Path) -> None:
    c = ledgerlog.open(ledger, client_id="closing", fsync=False, timeout=5.0)
    c.wait_writer(10)
    pending = c.transaction()
    pending.put("k", 1)
    txn = pending.to_transaction()
    c.close()
    c.close()  # idempotent
    for op in (c.transaction, c.sync, lambda: c.submit(txn), pending.commit):
        with pytest.raises(ledgerlog.ClosedError, match="closed") as ei:
            op()
        assert isinstance(ei.value, ledgerlog.UsageError)
        assert "closing" in str(ei.value)


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("client_id", ["has space", "a/b", "x" * 65, "naïve", "semi;colon"])
def test_bad_client_id(ledger: Path, client_id: str) -> None:
    with pytest.raises(ledgerlog.ConfigError, match="client id") as ei:
        ledgerlog.open(ledger, client_id=client_id, fsync=False)
    assert repr(client_id) in str(ei.value)
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("url", ["foo://host/ledger", "http://example.com/x", "kafka://b:9092/t"])
def test_unknown_url_scheme(url: str) -> None:
    scheme = url.split("://")[0]
    with pytest.raises(ledgerlog.ConfigError, match="unknown ledger URL scheme") as ei:
        ledgerlog.open(url)
    assert repr(scheme) in str(ei.value)


def test_missing_ledger_without_create(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ledgerlog.LedgerNotFoundError, match="no ledger at") as ei:
        FileBackend(missing, create=False)
    assert str(missing) in str(ei.value)
    assert not missing.exists()
    with pytest.raises(ledgerlog.LedgerNotFoundError):
        ledgerlog.open(missing, create=False)
    with pytest.raises(ledgerlog.LedgerNotFoundError):
        ledgerlog.open(f"file://{missing}", create=False)
    assert not missing.exists()


def test_directory_that_is_not_a_ledger(tmp_path: Path) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ledgerlog.ConfigError, match="not a ledgerlog ledger") as ei:
        ledgerlog.open(d)
    assert str(d) in str(ei.value)
    assert sorted(p.name for p in d.iterdir()) == ["cat.jpg"]  # left alone
    # A ledger of another format version is refused too.
    other = tmp_path / "future"
    other.mkdir()
    (other / "LEDGER").write_text("ledgerlog-file 99\n")
    with pytest.raises(ledgerlog.ConfigError, match="unsupported ledger format"):
        FileBackend(other)


@pytest.mark.parametrize("window", [0, -5, 1.5, "100"])
def test_bad_window(ledger: Path, window: Any) -> None:
    with pytest.raises(ledgerlog.ConfigError, match="window") as ei:
        ledgerlog.open(ledger, window=window, fsync=False)
    assert repr(window) in str(ei.value)


@pytest.mark.parametrize("writer", ["yes", "", True, "AUTO"])
def test_bad_writer_option(ledger: Path, writer: Any) -> None:
    with pytest.raises(ledgerlog.ConfigError, match="writer must be 'auto' or None") as ei:
        ledgerlog.open(ledger, writer=writer, fsync=False)
    assert repr(writer) in str(ei.value)


def test_config_errors_leave_nothing_behind(tmp_path: Path) -> None:
    for i, bad in enumerate([{"window": 0}, {"writer": "yes"}, {"client_id": "bad id"}]):
        target = tmp_path / f"l{i}"
        with pytest.raises(ledgerlog.ConfigError):
            ledgerlog.open(target, fsync=False, **bad)
        assert not target.exists(), f"{bad} created {target}"


def test_bad_backend_options(ledger: Path) -> None:
    with pytest.raises(ledgerlog.ConfigError, match="segment_bytes"):
        ledgerlog.open(ledger, segment_bytes=10)
    with pytest.raises(ledgerlog.ConfigError, match="lease_timeout"):
        ledgerlog.open(ledger, lease_timeout=0)
    with pytest.raises(TypeError, match="no_such_option"):
        ledgerlog.open(ledger, no_such_option=1)


# -- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [1, b"bytes", None, ("t",)])
def test_non_str_keys_in_writes_and_ranges(db: ledgerlog.Client, key: Any) -> None:
    tx = db.transaction()
    name = type(key).__name__
    with pytest.raises(TypeError, match=f"str key, not {name}"):
        tx.put(key, 1)
    with pytest.raises(TypeError, match=f"str key, not {name}"):
        tx[key] = 1
    with pytest.raises(TypeError, match=f"str key, not {name}"):
        tx.delete(key)
    with pytest.raises(TypeError, match=f"str keys, not {name}"):
        tx.emit("e", conflict_keys=["ok", key])
    with pytest.raises(TypeError, match=f"str key, not {name}"):
        tx.range(key, "z")
    # A refused write leaves the transaction usable.
    tx.put("fine", 1)
    assert tx.commit().committed


def test_non_str_key_in_reads(db: ledgerlog.Client) -> None:
    tx = db.transaction()
    with pytest.raises(TypeError, match="str key"):
        tx.get(1)  # type: ignore[arg-type]


def test_range_bounds_misuse(db: ledgerlog.Client) -> None:
    tx = db.transaction()
    with pytest.raises(ValueError, match="empty key range"):
        tx.range("b", "a")
    with pytest.raises(ledgerlog.UsageError, match="limit must be >= 0"):
        db.view.range("a", "b", limit=-1)


def test_negative_range_limit_in_a_transaction(db: ledgerlog.Client) -> None:
    with db.transaction() as t:
        t.put("a", 1)
        t.put("b", 2)
    tx = db.transaction()
    with pytest.raises(ledgerlog.UsageError, match="limit must be >= 0"):
        tx.range("a", "z", limit=-1)


# -- transactional ------------------------------------------------------------------------


@ledgerlog.transactional
def bump(tx: ledgerlog.Tx, key: str) -> None:
    tx.put(key, tx.get(key, 0) + 1)


@ledgerlog.atransactional
async def abump(tx: ledgerlog.AsyncTx, key: str) -> None:
    tx.put(key, tx.get(key, 0) + 1)


@pytest.mark.parametrize("thing", ["acct:1", None, 42, FileBackend])
def test_transactional_with_something_not_a_client(thing: Any) -> None:
    with pytest.raises(ledgerlog.UsageError, match="bump needs a Client or a Tx") as ei:
        bump(thing, "k")
    assert type(thing).__name__ in str(ei.value)


def test_transactional_with_a_backend_or_async_client(db: ledgerlog.Client) -> None:
    with pytest.raises(ledgerlog.UsageError, match="FileBackend"):
        bump(db.backend, "k")


async def test_atransactional_with_a_sync_client(db: ledgerlog.Client) -> None:
    with pytest.raises(ledgerlog.UsageError, match="abump needs an AsyncClient"):
        await abump(db, "k")
    with pytest.raises(ledgerlog.UsageError, match="abump needs an AsyncClient"):
        await abump(db.transaction(), "k")
