"""ledgerlog: a serializable transaction log for services.

Every reader of a ledger validates every transaction with the same pure function, so all
replicas agree on every commit and abort without a lock service. This module is the whole
public API; everything else is importable but private unless re-exported here.

    import ledgerlog

    db = ledgerlog.open("./data/bank")          # embedded ledger in a directory

    @ledgerlog.transactional
    def transfer(tx, src, dst, amount):
        a, b = tx.get(src, 0), tx.get(dst, 0)
        tx.put(src, a - amount)
        tx.put(dst, b + amount)

    transfer(db, "acct:1", "acct:2", 10)
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import structlog

from ledgerlog.backends.base import Backend
from ledgerlog.client import (
    AsyncClient,
    AsyncTx,
    Client,
    Tx,
    atransactional,
    check_client_options,
    open_backend,
)
from ledgerlog.client import transactional as transactional
from ledgerlog.errors import (
    BackendError,
    ClosedError,
    CommitUnknownError,
    ConfigError,
    ConflictError,
    FencedError,
    FormatError,
    LedgerlogError,
    LedgerNotFoundError,
    NotElectedError,
    RetryLimitError,
    TransactionAborted,
    TransactionError,
    UsageError,
)
from ledgerlog.metrics import serve as serve_metrics
from ledgerlog.model import (
    AbortReason,
    Decision,
    Delete,
    EpochStart,
    Event,
    KeyRange,
    Outcome,
    Position,
    Put,
    Record,
    Transaction,
    TxnId,
)
from ledgerlog.reader import ApplyError, DivergenceError, Reader
from ledgerlog.validator import DEFAULT_WINDOW, ValidatorState, validate
from ledgerlog.views import HandlerView, MemoryView, PostgresView, SQLiteView, View
from ledgerlog.writer import Writer

__version__ = "0.1.0"


# A library should not print its info logs unless the application asks: if nobody has
# configured structlog yet, keep ledgerlog's events at WARNING and above, on stderr.
class _CurrentStderr:
    """sys.stderr as it is at each write (test runners and apps swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


if not structlog.is_configured():
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(_CurrentStderr()),  # type: ignore[arg-type]
    )

_CLIENT_OPTIONS = frozenset(
    {"client_id", "writer", "views", "window", "timeout", "start", "freeze_gc"}
)


def open(
    target: str | os.PathLike[str] | Backend,
    *,
    client_id: str | None = None,
    writer: str | None = "auto",
    views: Sequence[View] = (),
    window: int = DEFAULT_WINDOW,
    timeout: float = 30.0,
    freeze_gc: bool = True,
    **backend_options: Any,
) -> Client:
    """Open a ledger and return a started :class:`Client`.

    `target` is a directory path or ``file://`` URL (the embedded backend, created if
    missing), a ``pulsar://`` or ``bookkeeper://`` URL, or a Backend object. Other keyword
    arguments go to the backend (e.g. ``fsync=False`` for the file backend);
    ``freeze_gc``: see :class:`Client`.
    """
    check_client_options(client_id=client_id, writer=writer, window=window, timeout=timeout)
    backend = open_backend(target, **backend_options)
    try:
        return Client(
            backend,
            client_id=client_id,
            writer=writer,
            views=views,
            window=window,
            timeout=timeout,
            owns_backend=not isinstance(target, Backend),
            freeze_gc=freeze_gc,
        )
    except BaseException:
        if not isinstance(target, Backend):
            backend.close()
        raise


async def aopen(target: str | os.PathLike[str] | Backend, **options: Any) -> AsyncClient:
    """The asyncio twin of :func:`open`."""
    client_opts = {k: v for k, v in options.items() if k in _CLIENT_OPTIONS}
    backend_opts = {k: v for k, v in options.items() if k not in _CLIENT_OPTIONS}
    check_client_options(
        client_id=client_opts.get("client_id"),
        writer=client_opts.get("writer", "auto"),
        window=client_opts.get("window", DEFAULT_WINDOW),
        timeout=client_opts.get("timeout", 30.0),
    )
    backend = open_backend(target, **backend_opts)
    try:
        return AsyncClient(backend, owns_backend=not isinstance(target, Backend), **client_opts)
    except BaseException:
        if not isinstance(target, Backend):
            backend.close()
        raise


__all__ = [
    "DEFAULT_WINDOW",
    "AbortReason",
    "ApplyError",
    "AsyncClient",
    "AsyncTx",
    "Backend",
    "BackendError",
    "Client",
    "ClosedError",
    "CommitUnknownError",
    "ConfigError",
    "ConflictError",
    "Decision",
    "Delete",
    "DivergenceError",
    "EpochStart",
    "Event",
    "FencedError",
    "FormatError",
    "HandlerView",
    "KeyRange",
    "LedgerNotFoundError",
    "LedgerlogError",
    "MemoryView",
    "NotElectedError",
    "Outcome",
    "Position",
    "PostgresView",
    "Put",
    "Reader",
    "Record",
    "RetryLimitError",
    "SQLiteView",
    "Transaction",
    "TransactionAborted",
    "TransactionError",
    "Tx",
    "TxnId",
    "UsageError",
    "ValidatorState",
    "View",
    "Writer",
    "aopen",
    "atransactional",
    "open",
    "serve_metrics",
    "transactional",
    "validate",
]
