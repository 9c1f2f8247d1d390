"""A view that hands each committed transaction to a function of yours, in seq order
(Waltz's ``applyTransaction``).

``fn(seq, txn)`` is called once per committed transaction, `txn` being a
:class:`ledgerlog.model.Transaction`. How often it is called again after a crash depends
on where the checkpoint lives:

``HandlerView(fn, store=conn)`` — **exactly once** for handlers that keep their state in
the SQLite database behind `conn`. Each batch runs in one transaction on `conn`:
``BEGIN IMMEDIATE``, your ``fn`` calls (whose writes on `conn` join it), the checkpoint
row, ``COMMIT``. A crash or an exception rolls all of it back together, and the batch is
delivered again to a state that never saw it. Rules: do not commit, roll back or open
transactions on `conn` inside `fn` (a commit is detected and refused with UsageError,
but only after the fact); `conn` must have no transaction open when the reader applies;
use `conn` only from the reader's thread while it runs (create it with
``check_same_thread=False`` if the view was built on another thread). Effects outside
that database (an HTTP call, another store) are at-least-once as below.

``HandlerView(fn, checkpoint_path=path)`` — **at least once**, with the duplicates
identifiable. The checkpoint is stored in a small SQLite file after every batch whose
calls all returned. After a crash (or an exception) the transactions of the last
unfinished batch are delivered again **with the same seqs**, so a handler that records
the highest seq it has durably acted on, and ignores seqs <= that, acts exactly once.

``HandlerView(fn)`` — the checkpoint lives in memory: after a restart the reader
delivers everything again from its oldest view's checkpoint (or seq 1).

If `fn` raises, the batch is not checkpointed and :class:`~ledgerlog.errors.HandlerError`
propagates (your exception as its ``__cause__``, the failing seq as ``.seq``).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable

import structlog

from ledgerlog.codec import wire_to_transaction
from ledgerlog.errors import BackendError, ClosedError, ConfigError, HandlerError, UsageError
from ledgerlog.model import Transaction
from ledgerlog.views.base import Applied, Checkpoint, View, carry_snapshot, check_batch
from ledgerlog.views.sqlite import (
    check_prefix,
    checkpoint_table_sql,
    load_checkpoint,
    store_checkpoint,
)

__all__ = ["HandlerFn", "HandlerView"]

log = structlog.get_logger(__name__)

HandlerFn = Callable[[int, Transaction], None]

_SAVEPOINT = "ledgerlog_handler_batch"


class HandlerView(View):
    """Calls ``fn(seq, txn)`` for each committed transaction, in seq order."""

    def __init__(
        self,
        fn: HandlerFn,
        *,
        checkpoint_path: str | os.PathLike[str] | None = None,
        store: sqlite3.Connection | None = None,
        table_prefix: str = "handler_",
        name: str = "handler",
    ) -> None:
        if not callable(fn):
            raise ConfigError(f"fn must be callable, not {fn!r}")
        if checkpoint_path is not None and store is not None:
            raise ConfigError("give checkpoint_path or store, not both")
        if store is not None and not isinstance(store, sqlite3.Connection):
            raise ConfigError(f"store must be a sqlite3.Connection, not {type(store).__name__}")
        self.fn = fn
        self.name = name
        # Defaults to "handler_" so a handler's checkpoint never lands on the row of a
        # SQLiteView sharing the file: two views on one row would skip each other's seqs.
        self._table = f"{check_prefix(table_prefix)}ledgerlog_checkpoint"
        self._lock = threading.Lock()
        self._store = store
        self._own: sqlite3.Connection | None = None
        self._closed = False
        self._checkpoint: Checkpoint | None = None
        try:
            if checkpoint_path is not None:
                text = os.fspath(checkpoint_path)
                if text in ("", ":memory:"):
                    raise ConfigError(f"checkpoint_path must be a file, not {text!r}")
                own = sqlite3.connect(text, isolation_level=None, check_same_thread=False)
                self._own = own
                own.execute("PRAGMA journal_mode=WAL")
                own.execute(checkpoint_table_sql(self._table))
                self._checkpoint = load_checkpoint(own, self._table)
            elif store is not None:
                # A CREATE does not begin a transaction implicitly, so this commits on
                # its own unless the caller has one open (then it joins theirs).
                store.execute(checkpoint_table_sql(self._table))
                self._checkpoint = load_checkpoint(store, self._table)
        except sqlite3.Error as exc:
            if self._own is not None:
                self._own.close()
            raise BackendError(f"handler view {name!r}: cannot open its checkpoint: {exc}") from exc
        log.debug(
            "handler view opened",
            view=name,
            mode="store" if store is not None else "file" if self._own else "memory",
            applied_seq=self.applied_seq,
        )

    @property
    def applied_seq(self) -> int:
        """The highest seq whose batch was checkpointed (0 before any)."""
        ckpt = self._checkpoint
        return 0 if ckpt is None else ckpt.next_seq - 1

    def checkpoint(self) -> Checkpoint | None:
        return self._checkpoint

    def apply(self, applied: Applied, checkpoint: Checkpoint) -> None:
        with self._lock:
            if self._closed:
                raise ClosedError(f"view {self.name!r} is closed")
            if self._store is not None:
                self._apply_in_store(self._store, applied, checkpoint)
                return
            ckpt = self._checkpoint
            check_batch(self.name, applied, ckpt.next_seq if ckpt else 1, checkpoint)
            self._call_all(applied)
            own = self._own
            if own is not None:
                try:
                    own.execute("BEGIN IMMEDIATE")
                    try:
                        store_checkpoint(own, self._table, checkpoint)
                        own.execute("COMMIT")
                    except BaseException:
                        if own.in_transaction:
                            own.execute("ROLLBACK")
                        raise
                except sqlite3.Error as exc:
                    raise BackendError(
                        f"view {self.name!r}: cannot store its checkpoint: {exc}"
                    ) from exc
            self._checkpoint = carry_snapshot(self._checkpoint, checkpoint)

    def _call_all(self, applied: Applied) -> None:
        fn = self.fn
        for seq, wtxn in applied:
            txn = wire_to_transaction(wtxn)
            try:
                fn(seq, txn)
            except Exception as exc:
                log.warning("handler failed", view=self.name, seq=seq, error=repr(exc))
                raise HandlerError(self.name, seq, exc) from exc

    def _apply_in_store(self, conn: sqlite3.Connection, applied: Applied, ckpt: Checkpoint) -> None:
        if conn.in_transaction:
            raise UsageError(
                f"view {self.name!r}: the store connection has a transaction open; its "
                "writes would commit with this batch's checkpoint"
            )
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise BackendError(f"view {self.name!r}: cannot begin a batch: {exc}") from exc
        try:
            stored = load_checkpoint(conn, self._table)
            check_batch(self.name, applied, stored.next_seq if stored else 1, ckpt)
            # The savepoint is a tripwire: if fn commits or rolls back, it vanishes and
            # RELEASE fails, instead of the checkpoint silently committing alone.
            conn.execute(f"SAVEPOINT {_SAVEPOINT}")
            self._call_all(applied)
            try:
                conn.execute(f"RELEASE {_SAVEPOINT}")
            except sqlite3.OperationalError:
                raise UsageError(
                    f"view {self.name!r}: the handler committed or rolled back the store "
                    "connection; its writes are no longer atomic with the checkpoint"
                ) from None
            store_checkpoint(conn, self._table, ckpt)
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise BackendError(f"view {self.name!r}: apply failed: {exc}") from exc
            raise
        self._checkpoint = carry_snapshot(self._checkpoint, ckpt)

    def close(self) -> None:
        """Close the checkpoint file (a `store` connection stays open: it is yours)."""
        with self._lock:
            self._closed = True
            if self._own is not None:
                self._own.close()
                self._own = None
