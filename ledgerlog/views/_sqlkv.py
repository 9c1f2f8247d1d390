"""What the SQL views share: the read API over one ``kv(key, value, version)`` table, and
closing their two connections (one for applies, one for reads). Subclasses give the
table name, their driver's parameter placeholder and :meth:`_query`; the SQL and the
decoding live here once."""

from __future__ import annotations

import abc
import threading
from typing import Any

from ledgerlog.codec import decode_value
from ledgerlog.errors import UsageError


class SqlKvReads(abc.ABC):
    _kv: str
    """The kv table's (prefixed) name."""
    _ph: str = "?"
    """The driver's parameter placeholder ("?" for sqlite3, "%s" for psycopg)."""
    _wlock: threading.Lock | threading.RLock
    _rlock: threading.Lock | threading.RLock
    _wconn: Any
    _rconn: Any
    _closed: bool

    def close(self) -> None:
        with self._wlock, self._rlock:
            self._closed = True
            self._close_connections()

    def _close_connections(self) -> None:
        for conn in (self._rconn, self._wconn):
            if conn is not None:
                conn.close()
        self._wconn = None
        self._rconn = None

    @abc.abstractmethod
    def _query(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read and return all rows."""

    def _storable(self, key: str) -> bool:
        """Whether the store can hold `key` at all (a key it cannot hold is absent)."""
        return True

    def _query_one(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        rows = self._query(sql, args)
        return rows[0] if rows else None

    def get(self, key: str) -> Any | None:
        """The key's value, or None if it is absent."""
        entry = self.get_versioned(key)
        return None if entry is None else entry[0]

    def get_versioned(self, key: str) -> tuple[Any, int] | None:
        """``(value, version)``, or None if the key is absent."""
        if not self._storable(key):
            return None
        row = self._query_one(
            f"SELECT value, version FROM {self._kv} WHERE key = {self._ph}", (key,)
        )
        return None if row is None else (decode_value(row[0]), int(row[1]))

    def version(self, key: str) -> int:
        """Seq of the key's last put; 0 if it is absent (these views keep no tombstones)."""
        if not self._storable(key):
            return 0
        row = self._query_one(f"SELECT version FROM {self._kv} WHERE key = {self._ph}", (key,))
        return 0 if row is None else int(row[0])

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return self.version(key) != 0

    def _where(self, start: str, end: str | None) -> tuple[str, list[Any]]:
        # Both stores compare keys as UTF-8 bytes (SQLite's TEXT, PostgreSQL's "C"
        # collation), which is code point order: Python's str order, so ranges agree with
        # MemoryView's.
        sql = f" WHERE key >= {self._ph}"
        args: list[Any] = [start]
        if end is not None:
            sql += f" AND key < {self._ph}"
            args.append(end)
        return sql, args

    def _select(
        self, columns: str, start: str, end: str | None, limit: int | None
    ) -> list[tuple[Any, ...]]:
        if limit is not None and limit < 0:
            raise UsageError(f"limit must be >= 0, not {limit}")
        if end is not None and end <= start:
            return []
        where, args = self._where(start, end)
        sql = f"SELECT {columns} FROM {self._kv}{where} ORDER BY key"
        if limit is not None:
            sql += f" LIMIT {self._ph}"
            args.append(limit)
        return self._query(sql, args)

    def range(
        self, start: str, end: str | None = None, limit: int | None = None
    ) -> list[tuple[str, Any]]:
        """``(key, value)`` for keys in [start, end) in key order, at most `limit` of them."""
        return [(k, decode_value(v)) for k, v in self._select("key, value", start, end, limit)]

    def range_versioned(
        self, start: str, end: str | None = None, limit: int | None = None
    ) -> list[tuple[str, Any, int]]:
        """``(key, value, version)`` for keys in [start, end), like :meth:`range`."""
        return [
            (k, decode_value(v), int(s))
            for k, v, s in self._select("key, value, version", start, end, limit)
        ]

    def max_version_in_range(self, start: str, end: str | None = None) -> int:
        """Highest version of a key present in [start, end); 0 if none. Deletes leave no
        trace in these views, so this is a weaker hint than MemoryView's."""
        if end is not None and end <= start:
            return 0
        where, args = self._where(start, end)
        row = self._query_one(f"SELECT max(version) FROM {self._kv}{where}", tuple(args))
        return 0 if row is None or row[0] is None else int(row[0])

    def items(self) -> list[tuple[str, Any]]:
        """Every ``(key, value)`` in key order."""
        return self.range("")

    def __len__(self) -> int:
        row = self._query_one(f"SELECT count(*) FROM {self._kv}")
        return 0 if row is None else int(row[0])
