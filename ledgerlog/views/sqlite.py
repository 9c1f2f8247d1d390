"""A durable key-value view in a SQLite file: the default for services.

Exactly once rests on one SQLite transaction per batch: ``BEGIN IMMEDIATE``, the batch's
rows, the checkpoint row, ``COMMIT``. SQLite commits all of it or none of it, so after a
crash the file holds exactly the prefix its checkpoint names, and the reader resumes at
that checkpoint's next_seq.

Durability: the file is in WAL mode. With ``synchronous="NORMAL"`` (the default) a
process crash loses nothing committed, but a power loss may roll back the last few
commits; data and checkpoint roll back together, so the reader re-applies them from the
ledger and nothing is lost or repeated either way. ``"FULL"`` syncs every commit, for
readers of this file that must never see it move backwards.

Reads go through a second connection of this object's own, so they never wait on an
apply in progress (WAL readers see the last commit). Other processes may open the same
file, with ``readonly=True`` or not, and read while one process applies; only one
process may apply to a given view (a second would be refused on its first batch, since
the stored checkpoint would not match what it applies).

Tables (``table_prefix`` lets several views share one file)::

    {prefix}kv(key TEXT PRIMARY KEY, value BLOB, version INTEGER)  -- msgpack values
    {prefix}ledgerlog_checkpoint(id = 1, major, minor, next_seq, digest, validator_state)
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog

from ledgerlog.codec import OP_PUT, encode_value
from ledgerlog.errors import BackendError, ClosedError, ConfigError, UsageError
from ledgerlog.model import Position
from ledgerlog.views._sqlkv import SqlKvReads
from ledgerlog.views.base import Applied, Checkpoint, View, check_batch

__all__ = ["SQLiteView"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

_PREFIX_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SYNCHRONOUS: Final = frozenset({"NORMAL", "FULL", "EXTRA"})
_DELETED: Final = object()


def check_prefix(table_prefix: str) -> str:
    """The prefix goes into SQL text, so only identifier characters are allowed."""
    if table_prefix and not _PREFIX_RE.match(table_prefix):
        raise ConfigError(
            f"table_prefix must be empty or an SQL identifier ([A-Za-z_][A-Za-z0-9_]*), "
            f"not {table_prefix!r}"
        )
    return table_prefix


def checkpoint_table_sql(table: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {table} ("
        "id INTEGER PRIMARY KEY CHECK (id = 1), "
        "major INTEGER NOT NULL, minor INTEGER NOT NULL, next_seq INTEGER NOT NULL, "
        "digest BLOB NOT NULL, validator_state BLOB NOT NULL)"
    )


def load_checkpoint(conn: sqlite3.Connection, table: str) -> Checkpoint | None:
    row = conn.execute(
        f"SELECT major, minor, next_seq, digest, validator_state FROM {table} WHERE id = 1"
    ).fetchone()
    if row is None:
        return None
    major, minor, next_seq, digest, state = row
    return Checkpoint(Position(major, minor), next_seq, bytes(digest), bytes(state))


def store_checkpoint(conn: sqlite3.Connection, table: str, ckpt: Checkpoint) -> None:
    conn.execute(
        f"INSERT INTO {table} (id, major, minor, next_seq, digest, validator_state) "
        "VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET major = excluded.major, "
        "minor = excluded.minor, next_seq = excluded.next_seq, digest = excluded.digest, "
        # An empty snapshot means "unchanged" (see Checkpoint.validator_state).
        "validator_state = CASE WHEN length(excluded.validator_state) > 0 "
        "THEN excluded.validator_state ELSE validator_state END",
        (
            ckpt.position.major,
            ckpt.position.minor,
            ckpt.next_seq,
            ckpt.digest,
            ckpt.validator_state,
        ),
    )


def _check_path(path: str | os.PathLike[str]) -> Path:
    text = os.fspath(path)
    if text in ("", ":memory:") or text.startswith("file:"):
        # Two connections to ":memory:" are two databases, and a URI would bypass the
        # WAL setup: both would break the guarantees above without an error.
        raise ConfigError(f"SQLiteView needs a file path, not {text!r} (use MemoryView)")
    return Path(text)


class SQLiteView(SqlKvReads, View):
    """Keys, values and versions in a SQLite file, with the checkpoint beside them."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table_prefix: str = "",
        synchronous: str = "NORMAL",
        readonly: bool = False,
        timeout: float = 30.0,
        name: str = "sqlite",
    ) -> None:
        self.path = _check_path(path)
        self.name = name
        self.readonly = readonly
        prefix = check_prefix(table_prefix)
        sync = synchronous.upper() if isinstance(synchronous, str) else ""
        if sync not in _SYNCHRONOUS:
            raise ConfigError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        self._kv = f"{prefix}kv"
        self._ckpt_table = f"{prefix}ledgerlog_checkpoint"
        self._put_sql = f"INSERT OR REPLACE INTO {self._kv} (key, value, version) VALUES (?, ?, ?)"
        self._del_sql = f"DELETE FROM {self._kv} WHERE key = ?"
        self._wlock = threading.Lock()
        self._rlock = threading.RLock()
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._closed = False
        try:
            if readonly:
                uri = self.path.absolute().as_uri() + "?mode=ro"
                self._rconn = sqlite3.connect(
                    uri, uri=True, isolation_level=None, timeout=timeout, check_same_thread=False
                )
                self._require_tables()
            else:
                # The reader thread applies while the constructor's thread may not:
                # the locks above, not sqlite3's thread check, keep each connection serial.
                w = sqlite3.connect(
                    self.path, isolation_level=None, timeout=timeout, check_same_thread=False
                )
                self._wconn = w
                mode = w.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise BackendError(f"{self.path}: cannot use WAL mode (got {mode!r})")
                w.execute(f"PRAGMA synchronous={sync}")
                w.execute("BEGIN IMMEDIATE")
                w.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._kv} "
                    "(key TEXT PRIMARY KEY, value BLOB, version INTEGER NOT NULL) WITHOUT ROWID"
                )
                w.execute(checkpoint_table_sql(self._ckpt_table))
                w.execute("COMMIT")
                self._rconn = sqlite3.connect(
                    self.path, isolation_level=None, timeout=timeout, check_same_thread=False
                )
                self._rconn.execute("PRAGMA query_only=1")
        except sqlite3.Error as exc:
            self._close_connections()
            raise BackendError(f"cannot open SQLite view {self.path}: {exc}") from exc
        except BaseException:
            self._close_connections()
            raise
        log.debug(
            "sqlite view opened",
            view=name,
            path=str(self.path),
            applied_seq=self.applied_seq,
            readonly=readonly,
        )

    def _require_tables(self) -> None:
        names = {
            r[0]
            for r in self._reader().execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN (?, ?)",
                (self._kv, self._ckpt_table),
            )
        }
        if names != {self._kv, self._ckpt_table}:
            raise ConfigError(
                f"{self.path} holds no view tables {self._kv!r}/{self._ckpt_table!r} "
                "(open it once without readonly=True to create them)"
            )

    # -- View ------------------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint | None:
        """The checkpoint as stored in the file (another process may have advanced it)."""
        return self._read_checkpoint()

    def apply(self, applied: Applied, checkpoint: Checkpoint) -> None:
        conn = self._wconn
        if conn is None:
            if self._closed:
                raise ClosedError(f"view {self.name!r} is closed")
            raise UsageError(f"view {self.name!r} was opened readonly; it cannot apply")
        # Fold the batch first: the last write to each key in seq order is all that
        # reaches SQLite, so a key written by many transactions costs one row.
        latest: dict[str, tuple[int, Any]] = {}
        put = OP_PUT
        deleted = _DELETED
        for seq, txn in applied:
            for op, key, value in txn.writes:
                latest[key] = (seq, value if op == put else deleted)
        enc = encode_value
        rows = [(k, enc(v), s) for k, (s, v) in latest.items() if v is not deleted]
        dels = [(k,) for k, (_s, v) in latest.items() if v is deleted]
        with self._wlock:
            if conn is not self._wconn:
                raise ClosedError(f"view {self.name!r} is closed")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # Checked against the stored checkpoint inside the write lock, so a
                    # second process applying to the same view is refused, not merged.
                    stored = load_checkpoint(conn, self._ckpt_table)
                    check_batch(self.name, applied, stored.next_seq if stored else 1, checkpoint)
                    if dels:
                        conn.executemany(self._del_sql, dels)
                    if rows:
                        conn.executemany(self._put_sql, rows)
                    store_checkpoint(conn, self._ckpt_table, checkpoint)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise BackendError(f"view {self.name!r}: apply failed: {exc}") from exc

    # -- reads -----------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn = self._rconn
        if conn is None:
            raise ClosedError(f"view {self.name!r} is closed")
        return conn

    def _read_checkpoint(self) -> Checkpoint | None:
        with self._rlock:
            return load_checkpoint(self._reader(), self._ckpt_table)

    @property
    def applied_seq(self) -> int:
        """The seq the file's contents are consistent at (0 before anything is applied)."""
        ckpt = self._read_checkpoint()
        return 0 if ckpt is None else ckpt.next_seq - 1

    def snapshot_read(self, fn: Callable[[SQLiteView], T]) -> T:
        """Run ``fn(self)`` inside one read transaction; return what it returns.

        Every read inside `fn` (and :attr:`applied_seq`) sees the same commit, while
        applies carry on (WAL). Other threads' reads through this object wait for it.
        """
        with self._rlock:
            conn = self._reader()
            if conn.in_transaction:  # nested: the outer call already holds a snapshot
                return fn(self)
            conn.execute("BEGIN")
            try:
                return fn(self)
            finally:
                conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        with self._rlock:
            rows: list[tuple[Any, ...]] = self._reader().execute(sql, args).fetchall()
            return rows
