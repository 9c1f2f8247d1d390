"""A view in a PostgreSQL database: keys, values and versions, with the checkpoint beside them.

Two tables (names start with `table_prefix`):

- ``<prefix>kv (key text COLLATE "C" PRIMARY KEY, value bytea, version bigint)``: values
  encoded with :func:`ledgerlog.codec.encode_value` (msgpack); the C collation orders keys
  by code point, like Python's ``str`` and the other views;
- ``<prefix>ledgerlog_checkpoint``: one row, the reader's :class:`Checkpoint`.

Exactly once: :meth:`PostgresView.apply` writes a batch and its checkpoint in ONE
transaction, and re-checks the stored checkpoint under ``SELECT ... FOR UPDATE`` inside
it, so a crash (of the reader or of the server) neither loses nor repeats anything, and a
second reader applying to the same tables is refused with :class:`UsageError` instead of
applying twice. PostgreSQL text cannot hold NUL characters: a committed key containing one
cannot be stored here (apply raises :class:`BackendError`).

psycopg 3 is imported when a view is opened (``pip install 'ledgerlog[postgres]'``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import structlog

from ledgerlog.codec import OP_PUT, encode_value
from ledgerlog.errors import BackendError, ClosedError, ConfigError, UsageError
from ledgerlog.model import Position
from ledgerlog.views._sqlkv import SqlKvReads
from ledgerlog.views.base import Applied, Checkpoint, View, check_batch
from ledgerlog.views.sqlite import check_prefix

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresView"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

_DELETED: Final = object()
_MAX_IDENTIFIER: Final = 63  # NAMEDATALEN - 1
_CKPT_SUFFIX: Final = "ledgerlog_checkpoint"


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise ConfigError(
            "PostgresView needs psycopg 3: pip install 'ledgerlog[postgres]' "
            f"(or 'psycopg[binary]') ({exc})"
        ) from exc
    return psycopg


class PostgresView(SqlKvReads, View):
    """Keys, values and versions in PostgreSQL tables, with the checkpoint beside them.

    `dsn` is a libpq connection string or URI (``postgresql://user@host:5432/db``).
    Reads use their own connection, so they never wait for an apply in progress.
    """

    _ph = "%s"

    def __init__(
        self,
        dsn: str,
        *,
        table_prefix: str = "",
        readonly: bool = False,
        connect_timeout: float = 30.0,
        name: str = "postgres",
    ) -> None:
        pg = _import_psycopg()
        if not isinstance(dsn, str) or not dsn.strip():
            raise ConfigError(f"PostgresView needs a DSN string, not {dsn!r}")
        prefix = check_prefix(table_prefix)
        if len(prefix) + len(_CKPT_SUFFIX) > _MAX_IDENTIFIER:
            raise ConfigError(
                f"table_prefix {prefix!r} is too long: PostgreSQL names have at most "
                f"{_MAX_IDENTIFIER} characters (prefix at most "
                f"{_MAX_IDENTIFIER - len(_CKPT_SUFFIX)})"
            )
        self.name = name
        self.readonly = readonly
        self._pg = pg
        self._kv_name = f"{prefix}kv"
        self._ckpt_name = f"{prefix}{_CKPT_SUFFIX}"
        # Quoted: the names are exactly what the prefix says (no case folding).
        kv, ck = f'"{self._kv_name}"', f'"{self._ckpt_name}"'
        self._kv = kv
        self._ckpt = ck
        self._select_ckpt_sql = (
            f"SELECT major, minor, next_seq, digest, validator_state FROM {ck} WHERE id = 1"
        )
        self._lock_ckpt_sql = f"SELECT next_seq FROM {ck} WHERE id = 1 FOR UPDATE"
        # A placeholder row equivalent to "no checkpoint" (next_seq 1), so FOR UPDATE has a
        # row to lock even on the first apply; it commits only with the batch's checkpoint.
        self._seed_ckpt_sql = (
            f"INSERT INTO {ck} (id, major, minor, next_seq, digest, validator_state) "
            "VALUES (1, 0, 0, 1, '\\x'::bytea, '\\x'::bytea) ON CONFLICT (id) DO NOTHING"
        )
        self._store_ckpt_sql = (
            f"UPDATE {ck} SET major = %s, minor = %s, next_seq = %s, digest = %s, "
            # An empty snapshot means "unchanged" (see Checkpoint.validator_state).
            "validator_state = CASE WHEN length(%s::bytea) > 0 THEN %s::bytea "
            "ELSE validator_state END WHERE id = 1"
        )
        self._put_sql = (
            f"INSERT INTO {kv} (key, value, version) "
            "SELECT * FROM unnest(%s::text[], %s::bytea[], %s::bigint[]) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = excluded.version"
        )
        self._del_sql = f"DELETE FROM {kv} WHERE key = ANY(%s::text[])"
        self._wlock = threading.Lock()
        self._rlock = threading.RLock()
        self._wconn: psycopg.Connection[Any] | None = None
        self._rconn: psycopg.Connection[Any] | None = None
        self._seeded = False
        self._failed: str | None = None
        self._closed = False
        timeout = max(1, round(connect_timeout))
        try:
            self._rconn = pg.connect(dsn, autocommit=True, connect_timeout=timeout)
            self._rconn.read_only = True
            self._rconn.isolation_level = pg.IsolationLevel.REPEATABLE_READ
            if readonly:
                self._require_tables()
            else:
                w = pg.connect(dsn, autocommit=True, connect_timeout=timeout)
                self._wconn = w
                w.isolation_level = pg.IsolationLevel.READ_COMMITTED
                self._create_tables(w)
        except pg.Error as exc:
            self._close_connections()
            raise BackendError(f"cannot open PostgreSQL view {name!r}: {exc}") from exc
        except BaseException:
            self._close_connections()
            raise
        log.debug("postgres view opened", view=name, kv=self._kv_name, readonly=readonly)

    def _create_tables(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            # CREATE TABLE IF NOT EXISTS races with itself across sessions (a duplicate
            # pg_type row): serialize the DDL of views with these names.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"ledgerlog:{self._kv}",))
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._kv} ("
                'key text COLLATE "C" PRIMARY KEY, value bytea, version bigint NOT NULL)'
            )
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._ckpt} ("
                "id integer PRIMARY KEY CHECK (id = 1), "
                "major bigint NOT NULL, minor bigint NOT NULL, next_seq bigint NOT NULL, "
                "digest bytea NOT NULL, validator_state bytea NOT NULL)"
            )

    def _require_tables(self) -> None:
        row = (
            self._reader()
            .execute("SELECT to_regclass(%s), to_regclass(%s)", (self._kv, self._ckpt))
            .fetchone()
        )
        if row is None or row[0] is None or row[1] is None:
            raise ConfigError(
                f"the database holds no view tables {self._kv_name!r}/{self._ckpt_name!r} "
                "(open it once without readonly=True to create them)"
            )

    # -- View ------------------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint | None:
        """The checkpoint as stored in the database (another process may have advanced it)."""
        with self._rlock:
            row = self._query_one(self._select_ckpt_sql)
        if row is None:
            return None
        major, minor, next_seq, digest, state = row
        return Checkpoint(Position(major, minor), next_seq, bytes(digest), bytes(state))

    def apply(self, applied: Applied, checkpoint: Checkpoint) -> None:
        conn = self._wconn
        if conn is None:
            if self._closed:
                raise ClosedError(f"view {self.name!r} is closed")
            raise UsageError(f"view {self.name!r} was opened readonly; it cannot apply")
        if self._failed is not None:
            # The batch that failed was rolled back, but the reader that sent it has moved
            # on: applying its next batch would skip that one. Only a reader restarted
            # from this view's checkpoint (with a new view object) may continue.
            raise UsageError(
                f"view {self.name!r}: an earlier apply failed ({self._failed}); open a new "
                "view and a new Reader, which restarts from the stored checkpoint"
            )
        # Fold the batch: the last write to each key in seq order is all that is stored.
        latest: dict[str, tuple[int, Any]] = {}
        put = OP_PUT
        deleted = _DELETED
        for seq, txn in applied:
            for op, key, value in txn.writes:
                latest[key] = (seq, value if op == put else deleted)
        enc = encode_value
        keys: list[str] = []
        values: list[bytes] = []
        versions: list[int] = []
        dels: list[str] = []
        for k, (s, v) in latest.items():
            if v is deleted:
                dels.append(k)
            else:
                keys.append(k)
                values.append(enc(v))
                versions.append(s)
        pg = self._pg
        with self._wlock:
            if conn is not self._wconn:
                raise ClosedError(f"view {self.name!r} is closed")
            try:
                with conn.transaction(), conn.cursor() as cur:
                    if not self._seeded:
                        cur.execute(self._seed_ckpt_sql)
                    # Locked until COMMIT, and read after any concurrent apply committed:
                    # a second reader applying the same seqs is refused, not merged.
                    cur.execute(self._lock_ckpt_sql)
                    row = cur.fetchone()
                    stored = 1 if row is None else int(row[0])
                    check_batch(self.name, applied, stored, checkpoint)
                    if dels:
                        cur.execute(self._del_sql, (dels,))
                    if keys:
                        cur.execute(self._put_sql, (keys, values, versions))
                    state = checkpoint.validator_state
                    cur.execute(
                        self._store_ckpt_sql,
                        (
                            checkpoint.position.major,
                            checkpoint.position.minor,
                            checkpoint.next_seq,
                            checkpoint.digest,
                            state,
                            state,
                        ),
                    )
                self._seeded = True
            except pg.Error as exc:
                self._failed = f"{type(exc).__name__}: {exc}"
                nul = any("\x00" in k for k in latest)
                hint = " (PostgreSQL text cannot hold NUL characters)" if nul else ""
                raise BackendError(f"view {self.name!r}: apply failed{hint}: {exc}") from exc

    # -- reads -----------------------------------------------------------------------------

    def _reader(self) -> psycopg.Connection[Any]:
        conn = self._rconn
        if conn is None:
            raise ClosedError(f"view {self.name!r} is closed")
        return conn

    def _query(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._rlock:
                rows: list[tuple[Any, ...]] = self._reader().execute(sql, args).fetchall()
                return rows
        except self._pg.Error as exc:
            raise BackendError(f"view {self.name!r}: read failed: {exc}") from exc

    @property
    def applied_seq(self) -> int:
        """The seq the tables are consistent at (0 before anything is applied)."""
        ckpt = self.checkpoint()
        return 0 if ckpt is None else ckpt.next_seq - 1

    def snapshot_read(self, fn: Callable[[PostgresView], T]) -> T:
        """Run ``fn(self)`` inside one REPEATABLE READ transaction; return what it returns.

        Every read inside `fn` (and :attr:`applied_seq`) sees the same commit, while
        applies carry on. Other threads' reads through this object wait for it.
        """
        with self._rlock:
            conn = self._reader()
            if conn.info.transaction_status != self._pg.pq.TransactionStatus.IDLE:
                return fn(self)  # nested: the outer call already holds a snapshot
            try:
                with conn.transaction():
                    return fn(self)
            except self._pg.Error as exc:
                raise BackendError(f"view {self.name!r}: read failed: {exc}") from exc

    def _storable(self, key: str) -> bool:
        return "\x00" not in key  # PostgreSQL text cannot hold NUL
