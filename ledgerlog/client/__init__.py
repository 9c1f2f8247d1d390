"""What a service calls: a Client over one ledger, transactions, and a retry helper.

A :class:`Client` keeps a local replica (a :class:`Reader` feeding an in-memory view) and
an intake producer. A transaction reads from the replica at a known seq (its
read_version), buffers its writes (reads see them: read-your-writes), and on commit is
submitted through the intake; the decision comes back from the local replica, which
validated it like every other reader did.

Reads are checked as they happen: a key whose version is already above the transaction's
read_version will certainly make it abort, so :class:`ConflictError` is raised at once
instead of after a round trip.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import importlib
import itertools
import os
import random
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Concatenate, Final, ParamSpec, TypeVar, cast, overload

import msgspec
import structlog

from ledgerlog import metrics
from ledgerlog.backends.base import Backend, IntakeProducer
from ledgerlog.codec import (
    OP_DELETE,
    OP_PUT,
    WireTxn,
    encode_intake,
    encode_transaction,
    encode_wire_txn,
)
from ledgerlog.errors import (
    ClosedError,
    CommitUnknownError,
    ConfigError,
    ConflictError,
    RetryLimitError,
    TransactionAborted,
    UsageError,
)
from ledgerlog.model import (
    AbortReason,
    Decision,
    Delete,
    Event,
    KeyRange,
    Outcome,
    Put,
    Transaction,
    TxnId,
)
from ledgerlog.reader import Reader
from ledgerlog.validator import DEFAULT_WINDOW
from ledgerlog.views.base import View
from ledgerlog.views.memory import MemoryView
from ledgerlog.writer import Writer

__all__ = ["AsyncClient", "Client", "Tx", "atransactional", "open_backend", "transactional"]

log = structlog.get_logger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_MISSING = object()


def check_client_options(
    *, client_id: str | None, writer: str | None, window: int, timeout: float
) -> None:
    """Refuse bad options before anything is opened or created."""
    if writer not in ("auto", None):
        raise ConfigError(f"writer must be 'auto' or None, not {writer!r}")
    if client_id is not None:
        from ledgerlog.backends.file import check_client_id

        check_client_id(client_id)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"window must be a positive int of seqs, not {window!r}")
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")


def default_client_id() -> str:
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:24]
    return f"{host or 'host'}-{os.getpid()}-{secrets.token_hex(3)}"


def open_backend(target: str | os.PathLike[str] | Backend, **options: Any) -> Backend:
    """A backend from a URL or path: ``file:///path``, a plain path (embedded), or
    ``pulsar://host:port/ledger`` / ``bookkeeper://zk:port/ledger`` once installed."""
    if isinstance(target, Backend):
        return target
    text = os.fspath(target)
    if "://" not in text or text.startswith("file://"):
        from ledgerlog.backends.file import FileBackend

        path = text[len("file://") :] if text.startswith("file://") else text
        return FileBackend(path, **options)
    scheme = text.split("://", 1)[0]
    backends = {
        "pulsar": ("pulsar", "PulsarBackend", "Pulsar"),
        "pulsar+ssl": ("pulsar", "PulsarBackend", "Pulsar"),
        "bookkeeper": ("bookkeeper", "BookKeeperBackend", "BookKeeper"),
    }
    if scheme in backends:
        module_name, class_name, label = backends[scheme]
        # Imported on demand: each needs its own optional dependency (pip extras).
        try:
            module = importlib.import_module(f"ledgerlog.backends.{module_name}")
        except ImportError as exc:
            raise ConfigError(f"the {label} backend is not available here: {exc}") from exc
        return cast(Backend, getattr(module, class_name).from_url(text, **options))
    raise ConfigError(f"unknown ledger URL scheme {scheme!r} in {text!r}")


_gc_frozen = threading.Event()

#: The interpreter's default first-generation threshold, and the one a client sets in its
#: place (see :func:`freeze_gc_once`).
_DEFAULT_GEN0_THRESHOLD: Final = 700
GEN0_THRESHOLD: Final = 20_000


def raise_gc_threshold() -> None:
    """Raise the cyclic GC's first-generation threshold from the interpreter's default
    700 to :data:`GEN0_THRESHOLD`, unless the application set its own.

    Done when a client is created, before its replica catches up: decoding a ledger
    allocates tracked objects by the million, nearly all freed by reference counting,
    and with the default threshold the interpreter ran a full collection every ~250 ms
    of a catch-up, 25-66 ms each, all finding nothing (a paced benchmark client catching
    up). Measured on an embedded ledger of 300k transactions, five alternating pairs:
    catch-up 2-27% faster (5.2 s against 3.8-4.3 on a slow minute of the build VM)."""
    gen0, gen1, gen2 = gc.get_threshold()
    if gen0 == _DEFAULT_GEN0_THRESHOLD:
        gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


def freeze_gc_once() -> None:
    """Once per process: collect, then move every object alive now into the cyclic
    GC's permanent generation (:func:`gc.freeze`), and raise the first generation's
    threshold (:func:`raise_gc_threshold`, a no-op when the client already did).

    A replica's process keeps long-lived objects (its modules, the replica, the
    application's own state) and allocates many short-lived tracked ones per
    transaction (futures, decisions), so the interpreter runs full collections often,
    and each one walks every long-lived object: pauses of tens to hundreds of
    milliseconds on a loaded machine, which became commit-latency outliers. Frozen
    objects are never walked again; objects freed by reference counting are still
    freed. The cost: frozen objects that later become unreachable cycles are never
    reclaimed (see the ``freeze_gc`` option of :class:`Client` to opt out).

    The threshold: a client's transactions in flight are a few hundred tracked objects
    per batch (the transactions, their futures and decisions), all freed by reference
    counting, so with the default threshold the collector ran a hundred times a second
    under load, found nothing to collect, and promoted the objects in flight to older
    generations whose collections then took tens of milliseconds (measured: 4-5 s of
    every 30 s of a paced benchmark client, all collecting nothing). At 20,000 it runs
    a few times a minute there; garbage cycles wait a little longer to be freed."""
    if _gc_frozen.is_set():
        return
    _gc_frozen.set()
    gc.collect()
    gc.freeze()
    raise_gc_threshold()
    log.debug(
        "objects moved out of the cyclic GC's reach",
        frozen=gc.get_freeze_count(),
        threshold=gc.get_threshold(),
    )


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"must be a str key, not {type(key).__name__} ({key!r})")


class Tx:
    """One transaction: reads at ``read_version`` from the local replica, buffered writes.

    Use as a context manager (commits on a clean exit) or call :meth:`commit`.
    """

    def __init__(self, client: Client, client_seq: int) -> None:
        self._client = client
        self._view = client.view
        self.txn_id = TxnId(client.client_id, client_seq)
        self.read_version = self._view.applied_seq
        self._reads: dict[str, None] = {}  # insertion-ordered set: the order is the txn's
        self._ranges: list[KeyRange] = []
        # key -> (op, key, value), already in wire form: commit only encodes it
        self._writes: dict[str, tuple[int, str, Any]] = {}
        self._events: list[Event] = []
        self.decision: Decision | None = None
        self._done = False

    # Reads --------------------------------------------------------------------------------

    def _conflict(self, key: str, version: int) -> ConflictError:
        d = Decision(
            None,
            self.txn_id,
            Outcome.ABORTED,
            AbortReason.CONFLICT,
            key,
            version,
            detail="seen on the local replica before submitting",
        )
        self._done = True
        self.decision = d
        return ConflictError(d)

    def get(self, key: str, default: Any = None) -> Any:
        """The key's value as of read_version (or as this transaction wrote it)."""
        self._check()
        _check_key(key)
        w = self._writes.get(key)
        if w is not None:
            return w[2] if w[0] == OP_PUT else default
        present, value, version = self._view.lookup(key)
        if version > self.read_version:
            raise self._conflict(key, version)
        self._reads[key] = None
        return value if present else default

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def range(
        self, start: str, end: str | None = None, limit: int | None = None
    ) -> list[tuple[str, Any]]:
        """Keys in [start, end) with their values, in key order, as of read_version.

        The whole interval counts as read (even past `limit`): a key inserted into it
        by a concurrent transaction aborts this one, which prevents phantoms.
        """
        self._check()
        _check_key(start)
        if end is not None:
            _check_key(end)
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise UsageError(f"limit must be >= 0 (an int), not {limit!r}")
        kr = KeyRange(start, end)
        view = self._view

        def read(v: MemoryView) -> tuple[list[tuple[str, Any, int]], int]:
            # One lock for both: no batch may land between the check and the read.
            return v.range_versioned(start, end), v.max_version_in_range(start, end)

        rows_v, newest = view.snapshot_read(read)
        if newest > self.read_version:
            changed = [k for k, _v, ver in rows_v if ver > self.read_version]
            raise self._conflict(changed[0] if changed else start, newest)
        rows = {k: v for k, v, _ver in rows_v}
        for k, w in self._writes.items():
            if k in kr:
                if w[0] == OP_PUT:
                    rows[k] = w[2]
                else:
                    rows.pop(k, None)
        self._ranges.append(kr)
        out = sorted(rows.items())
        return out[:limit] if limit is not None else out

    def prefix(self, prefix: str, limit: int | None = None) -> list[tuple[str, Any]]:
        kr = KeyRange.prefix(prefix)
        return self.range(kr.start, kr.end, limit)

    # Writes -------------------------------------------------------------------------------

    def put(self, key: str, value: Any) -> None:
        self._check()
        _check_key(key)
        self._writes[key] = (OP_PUT, key, value)

    def __setitem__(self, key: str, value: Any) -> None:
        self.put(key, value)

    def delete(self, key: str) -> None:
        self._check()
        _check_key(key)
        self._writes[key] = (OP_DELETE, key, None)

    def __delitem__(self, key: str) -> None:
        self.delete(key)

    def emit(self, name: str, payload: Any = None, conflict_keys: Sequence[str] = ()) -> None:
        """Append an application event; committing it bumps its conflict keys' versions."""
        self._check()
        self._events.append(Event(name, payload, tuple(conflict_keys)))

    def add_read(self, key: str) -> None:
        """Declare a read without reading (makes a write conditional on the key)."""
        self._check()
        _check_key(key)
        self._reads[key] = None

    # Commit -------------------------------------------------------------------------------

    def _check(self) -> None:
        if self._done:
            raise UsageError(f"transaction {self.txn_id} is already finished")

    def to_transaction(self) -> Transaction:
        return Transaction(
            self.txn_id,
            self.read_version,
            reads=tuple(self._reads),
            ranges=tuple(self._ranges),
            writes=tuple(
                Put(k, v) if op == OP_PUT else Delete(k) for op, k, v in self._writes.values()
            ),
            events=tuple(self._events),
        )

    def encode(self) -> bytes:
        """The wire bytes of :meth:`to_transaction`, built without the value objects
        (the client's hot path)."""
        writes = list(self._writes.values())
        return encode_wire_txn(
            WireTxn(
                self.txn_id.client_id,
                self.txn_id.client_seq,
                self.read_version,
                list(self._reads),
                [(r.start, r.end) for r in self._ranges],
                writes,
                [(e.name, e.payload, list(e.conflict_keys)) for e in self._events],
                None,
            )
        )

    @property
    def read_only(self) -> bool:
        return not self._writes and not self._events

    def submit(self) -> Future[Decision]:
        """Submit without waiting: a future of the decision."""
        self._check()
        self._done = True
        if self.read_only:
            # A snapshot read checked key by key needs no validation round.
            fut: Future[Decision] = Future()
            self.decision = Decision(None, self.txn_id, Outcome.COMMITTED, detail="read-only")
            fut.set_result(self.decision)
            return fut
        return self._client._submit_encoded(self.txn_id, self.encode())

    def commit(self, timeout: float | None = None) -> Decision:
        """Submit and wait for the decision. Raises ConflictError or TransactionAborted
        if it aborted, CommitUnknownError if no decision came in time."""
        fut = self.submit()
        d = self._client._wait(fut, self.txn_id, timeout)
        self.decision = d
        if not d.committed:
            raise ConflictError(d) if d.reason is AbortReason.CONFLICT else TransactionAborted(d)
        return d

    def abandon(self) -> None:
        """Finish without submitting anything."""
        self._done = True

    def __enter__(self) -> Tx:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None and not self._done:
            self.commit()
        else:
            self._done = True


class _LocalBatch:
    """Transactions handed to this process's writer, kept until decided."""

    __slots__ = ("epoch", "fail", "futs", "payload", "resent")

    def __init__(
        self,
        payload: list[bytes],
        futs: Sequence[Future[Decision]],
        fail: Callable[[BaseException | None], None],
    ) -> None:
        self.payload = payload
        self.futs = futs
        self.fail = fail
        self.epoch = 0
        self.resent = False

    def settled(self) -> bool:
        # Decisions come in submission order, mostly: the last one first is the cheap no.
        return not self.futs or (self.futs[-1].done() and all(f.done() for f in self.futs))


class Client:
    """A service's handle on one ledger (sync API; see :class:`AsyncClient`).

    ``writer="auto"`` (the default for the embedded backend) runs a standby writer in
    this process: the first client to start becomes the writer, and when it goes another
    takes over. ``writer=None`` leaves writing to a separate ``ledgerlog writer``.

    ``freeze_gc=True`` (the default) raises the GC's first-generation threshold
    (:func:`raise_gc_threshold`) and calls :func:`freeze_gc_once` when the replica
    first catches up, which keeps the interpreter's full GC passes short and rare; pass
    False if the application relies on the cyclic GC reclaiming objects it created
    before then, or manages the GC itself.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        client_id: str | None = None,
        writer: str | None = "auto",
        views: Sequence[View] = (),
        window: int = DEFAULT_WINDOW,
        timeout: float = 30.0,
        start: bool = True,
        owns_backend: bool = False,
        freeze_gc: bool = True,
    ) -> None:
        check_client_options(client_id=client_id, writer=writer, window=window, timeout=timeout)
        self.backend = backend
        self.owns_backend = owns_backend
        self.client_id = default_client_id() if client_id is None else client_id
        self.timeout = timeout
        # Rebuilt by every new Client, so never a restart point: no validator snapshots.
        self.view = MemoryView(window=window, snapshots=False)
        self.reader = Reader(backend, [self.view, *views], window=window, name=self.client_id)
        if freeze_gc:
            raise_gc_threshold()
            self.reader.when_caught_up(freeze_gc_once)
        try:
            self._intake: IntakeProducer = backend.intake_producer(self.client_id)
        except BaseException:
            self.reader.close()
            raise
        # Seqs that survive restarts under a fixed client_id: a restarted client must not
        # reuse the ids of transactions the validator still remembers.
        self._client_seq = itertools.count(time.time_ns() // 1000)
        self._seq_lock = threading.Lock()
        self._latency = metrics.COMMIT_LATENCY.labels(backend.ledger)
        self.writer: Writer | None = None
        # Local submissions not yet decided, oldest first (see _submit_local).
        self._local: deque[_LocalBatch] = deque()
        self._local_lock = threading.Lock()
        self._seen_epoch = 0
        if writer == "auto":
            self.writer = Writer(backend, self.client_id)
            self.reader.subscribe(self._on_entries)
        self._closed = False
        self._log = log.bind(ledger=backend.ledger, client=self.client_id)
        if start:
            self.start()

    def start(self) -> Client:
        if self.writer is not None:
            self.writer.start()
        self.reader.start()
        return self

    # Transactions -----------------------------------------------------------------------

    def transaction(self) -> Tx:
        self._check()
        with self._seq_lock:
            seq = next(self._client_seq)
        return Tx(self, seq)

    def _submit(self, txn: Transaction) -> Future[Decision]:
        return self._submit_encoded(txn.txn_id, encode_transaction(txn))

    def _submit_encoded(self, txn_id: TxnId, data: bytes) -> Future[Decision]:
        self._check()
        key = (txn_id.client_id, txn_id.client_seq)
        (fut,) = self.reader.watch_many([key], self._latency.observe_many)
        if self._submit_local([data], [fut], self._failer([key], [fut])):
            return fut
        try:
            self._intake.submit(encode_intake([data]), timeout=self.timeout)
        except BaseException:
            self.reader.unwatch(txn_id.client_id, txn_id.client_seq, fut)
            raise
        return fut

    def _failer(
        self, keys: list[tuple[str, int]], futs: Sequence[Future[Decision]]
    ) -> Callable[[BaseException | None], None]:
        """What fails these watched transactions' futures if their submission fails."""

        def fail(error: BaseException | None) -> None:
            if error is None:
                return
            for (client_id, client_seq), fut in zip(keys, futs, strict=True):
                self.reader.unwatch(client_id, client_seq, fut)
                if not fut.done():
                    fut.set_exception(error)

        return fail

    def _submit_local(
        self,
        payload: list[bytes],
        futs: Sequence[Future[Decision]],
        fail: Callable[[BaseException | None], None],
    ) -> bool:
        """Hand `payload` (encoded transactions) straight to this process's writer when it
        serves the ledger: its next record carries them, one persisted hop (the intake's)
        fewer. False when it does not serve; the caller then uses the intake.

        They go through the intake after all if that record fails or the term ends first,
        and if this replica sees a newer epoch start before deciding them (a deposed
        writer's records cannot count after it, whatever its appends were told).
        Resubmitting is safe even if they landed: a copy of a committed transaction is
        decided a duplicate, and one of an aborted transaction aborts again (its
        conflicts only grow with its seq)."""
        writer = self.writer
        if writer is None:
            return False
        batch = _LocalBatch(payload, futs, fail)

        def done(error: BaseException | None) -> None:
            if error is not None:
                self._resubmit(batch, repr(error))

        batch.epoch = writer.submit_local([msgspec.Raw(t) for t in payload], done)
        if not batch.epoch:
            return False
        with self._local_lock:
            local = self._local
            local.append(batch)
            while local and local[0].settled():
                local.popleft()
            # A deposed writer that has not noticed yet still takes submissions, after
            # this replica has seen the newer epoch start (and looked for stale ones).
            stale = batch.epoch < self._seen_epoch
        if stale:
            self._resubmit(batch, f"epoch {self._seen_epoch} had started")
        return True

    def _resubmit(self, batch: _LocalBatch, why: str) -> None:
        with self._local_lock:
            if batch.resent:
                return
            batch.resent = True
        self._log.warning(
            "local submission not written; resubmitting through the intake",
            why=why,
            txns=len(batch.payload),
        )
        try:
            self._intake.submit_async(encode_intake(batch.payload), batch.fail)
        except BaseException as exc:
            batch.fail(exc)

    def _on_entries(self, _results: Sequence[Any]) -> None:
        """On the reading thread, after each batch of entries is decided: once a newer
        epoch has started, local submissions of older terms still undecided never will
        be (records of an older epoch after its start are rejected)."""
        epoch = self.reader.state.epoch
        if epoch == self._seen_epoch:
            return
        with self._local_lock:
            self._seen_epoch = epoch
            stale = [b for b in self._local if b.epoch < epoch and not b.settled()]
        for b in stale:
            self._resubmit(b, f"epoch {epoch} started before they were decided")

    def submit_many(self, txs: Sequence[Tx]) -> list[Future[Decision]]:
        """Submit several finished-building transactions as ONE intake batch (one
        fdatasync): the way to pipeline many transactions from one thread. Returns a
        future per transaction, in order; it does not raise for aborts.

        On backends that write the intake asynchronously (Pulsar) it returns once the
        batch is on its way, so the caller can build the next one meanwhile; if the
        intake write then fails, the batch's futures fail with that error
        (:class:`BackendError`; the transactions may still commit, and resubmitting them
        is safe)."""
        self._check()
        futs: list[Future[Decision] | None] = []
        payload: list[bytes] = []
        keys: list[tuple[str, int]] = []
        slots: list[int] = []
        for tx in txs:
            tx._check()
            tx._done = True
            if tx.read_only:
                fut: Future[Decision] = Future()
                tx.decision = Decision(None, tx.txn_id, Outcome.COMMITTED, detail="read-only")
                fut.set_result(tx.decision)
                futs.append(fut)
            else:
                keys.append((tx.txn_id.client_id, tx.txn_id.client_seq))
                payload.append(tx.encode())
                slots.append(len(futs))
                futs.append(None)
        if payload:
            # One registration (one lock round) for the batch, and the latency observed
            # by the reader as it decides: this is the client's per-transaction hot path.
            watched = self.reader.watch_many(keys, self._latency.observe_many)
            for slot, fut in zip(slots, watched, strict=True):
                futs[slot] = fut
            fail = self._failer(keys, watched)
            if not self._submit_local(payload, watched, fail):
                try:
                    self._intake.submit_async(encode_intake(payload), fail)
                except BaseException as exc:
                    fail(exc)
                    raise
        return cast(list[Future[Decision]], futs)

    def _wait(self, fut: Future[Decision], txn_id: TxnId, timeout: float | None) -> Decision:
        try:
            return fut.result(self.timeout if timeout is None else timeout)
        except FutureTimeout:
            self.reader.unwatch(txn_id.client_id, txn_id.client_seq, fut)
            raise CommitUnknownError(
                f"no decision for {txn_id} within {timeout or self.timeout}s; it may still "
                "commit (resubmitting the same transaction is safe)"
            ) from None

    def submit(self, txn: Transaction, timeout: float | None = None) -> Decision:
        """Submit a ready-made Transaction (its txn_id is the caller's business) and wait.
        Resubmitting after CommitUnknownError commits it at most once."""
        return self._wait(self._submit(txn), txn.txn_id, timeout)

    # Reads outside transactions ---------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The replica's current value (not a serializable read: see :meth:`sync`)."""
        self._check()
        _check_key(key)
        got = self.view.get_versioned(key)
        return default if got is None else got[0]

    def range(self, start: str, end: str | None = None) -> list[tuple[str, Any]]:
        """The replica's current keys in [start, end) (not serializable: see :meth:`sync`)."""
        self._check()
        return self.view.range(start, end)

    def sync(self, timeout: float | None = None) -> int:
        """Wait until the replica holds everything appended before this call; a
        transaction started after it is strictly serializable. Returns the seq reached."""
        self._check()
        return self.reader.sync(self.timeout if timeout is None else timeout)

    @property
    def last_seq(self) -> int:
        return self.view.applied_seq

    @property
    def digest(self) -> bytes:
        return self.reader.digest

    def wait_writer(self, timeout: float = 30.0) -> None:
        """Wait until some writer serves the ledger (this process's or another's)."""
        if self.writer is not None and self.writer.elected.wait(0):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.reader.state.epoch > 0 or (self.writer and self.writer.elected.is_set()):
                return
            time.sleep(0.01)
        raise TimeoutError(f"no writer serves {self.backend.ledger} after {timeout}s")

    # Lifecycle --------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise ClosedError(f"client {self.client_id} is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.writer is not None:
            self.writer.stop()
        self._intake.close()
        self.reader.close()
        if self.owns_backend:
            self.backend.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _backoff(attempt: int, base: float, cap: float) -> float:
    # Jitter is client-side only (never in the validator): it spreads retries apart.
    return random.uniform(0, min(cap, base * (2**attempt)))


@overload
def transactional(
    fn: Callable[Concatenate[Tx, P], R],
) -> Callable[Concatenate[Client | Tx, P], R]: ...
@overload
def transactional(
    fn: None = None, *, retries: int = 10, backoff: float = 0.001, max_backoff: float = 0.2
) -> Callable[[Callable[Concatenate[Tx, P], R]], Callable[Concatenate[Client | Tx, P], R]]: ...


def transactional(
    fn: Callable[Concatenate[Tx, P], R] | None = None,
    *,
    retries: int = 10,
    backoff: float = 0.001,
    max_backoff: float = 0.2,
) -> Any:
    """FoundationDB-style: ``@transactional def f(tx, ...)``, called as ``f(client, ...)``,
    runs `f` in a fresh transaction and commits, retrying on conflict or too-old with
    jittered exponential backoff, up to `retries` times (then RetryLimitError). Called with
    a Tx instead, it joins that transaction and does not commit."""

    def deco(f: Callable[Concatenate[Tx, P], R]) -> Callable[Concatenate[Client | Tx, P], R]:
        @functools.wraps(f)
        def wrapper(db: Client | Tx, *args: P.args, **kwargs: P.kwargs) -> R:
            if isinstance(db, Tx):
                return f(db, *args, **kwargs)
            if not isinstance(db, Client):
                raise UsageError(f"{f.__name__} needs a Client or a Tx, not {type(db).__name__}")
            last: TransactionAborted | None = None
            for attempt in range(retries + 1):
                tx = db.transaction()
                try:
                    result = f(tx, *args, **kwargs)
                    if not tx._done:
                        tx.commit()
                    return result
                except TransactionAborted as exc:
                    if not exc.retryable:
                        raise
                    last = exc
                    tx.abandon()
                    # Retrying before the replica holds the conflicting write would read
                    # the same stale value and abort again.
                    if exc.decision.conflict_seq:
                        db.reader.wait_for_seq(exc.decision.conflict_seq, timeout=db.timeout)
                    time.sleep(_backoff(attempt, backoff, max_backoff))
            assert last is not None
            raise RetryLimitError(retries + 1, last)

        return wrapper  # type: ignore[return-value]  # functools.wraps loses the new first arg

    return deco(fn) if fn is not None else deco


# -- asyncio ------------------------------------------------------------------------------


class AsyncTx:
    """:class:`Tx` for asyncio: reads are local and synchronous, commit is awaited."""

    def __init__(self, client: AsyncClient, tx: Tx) -> None:
        self._client = client
        self._tx = tx
        self.get = tx.get
        self.range = tx.range
        self.prefix = tx.prefix
        self.put = tx.put
        self.delete = tx.delete
        self.emit = tx.emit
        self.add_read = tx.add_read

    @property
    def txn_id(self) -> TxnId:
        return self._tx.txn_id

    @property
    def read_version(self) -> int:
        return self._tx.read_version

    @property
    def decision(self) -> Decision | None:
        return self._tx.decision

    async def commit(self, timeout: float | None = None) -> Decision:
        loop = asyncio.get_running_loop()
        # The intake's fdatasync blocks: keep it off the event loop.
        fut = await loop.run_in_executor(None, self._tx.submit)
        try:
            d = await asyncio.wait_for(
                asyncio.wrap_future(fut),
                self._client.sync_client.timeout if timeout is None else timeout,
            )
        except TimeoutError:
            tid = self.txn_id
            self._client.sync_client.reader.unwatch(tid.client_id, tid.client_seq, fut)
            raise CommitUnknownError(
                f"no decision for {tid} in time; it may still commit "
                "(resubmitting the same transaction is safe)"
            ) from None
        self._tx.decision = d
        if not d.committed:
            raise ConflictError(d) if d.reason is AbortReason.CONFLICT else TransactionAborted(d)
        return d

    async def __aenter__(self) -> AsyncTx:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None and not self._tx._done:
            await self.commit()
        else:
            self._tx.abandon()


class AsyncClient:
    """The asyncio twin of :class:`Client` (same replica, same intake)."""

    def __init__(self, backend: Backend, **options: Any) -> None:
        self.sync_client = Client(backend, **options)

    def transaction(self) -> AsyncTx:
        return AsyncTx(self, self.sync_client.transaction())

    def get(self, key: str, default: Any = None) -> Any:
        return self.sync_client.get(key, default)

    def range(self, start: str, end: str | None = None) -> list[tuple[str, Any]]:
        return self.sync_client.range(start, end)

    async def sync(self, timeout: float | None = None) -> int:
        return await asyncio.to_thread(self.sync_client.sync, timeout)

    async def submit(self, txn: Transaction, timeout: float | None = None) -> Decision:
        return await asyncio.to_thread(self.sync_client.submit, txn, timeout)

    @property
    def last_seq(self) -> int:
        return self.sync_client.last_seq

    @property
    def digest(self) -> bytes:
        return self.sync_client.digest

    @property
    def client_id(self) -> str:
        return self.sync_client.client_id

    async def wait_writer(self, timeout: float = 30.0) -> None:
        await asyncio.to_thread(self.sync_client.wait_writer, timeout)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.sync_client.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def atransactional(
    fn: Callable[..., Awaitable[R]] | None = None,
    *,
    retries: int = 10,
    backoff: float = 0.001,
    max_backoff: float = 0.2,
) -> Any:
    """The asyncio twin of :func:`transactional`: ``@atransactional async def f(tx, ...)``."""

    def deco(f: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        @functools.wraps(f)
        async def wrapper(db: AsyncClient | AsyncTx, *args: Any, **kwargs: Any) -> R:
            if isinstance(db, AsyncTx):
                return await f(db, *args, **kwargs)
            if not isinstance(db, AsyncClient):
                raise UsageError(f"{f.__name__} needs an AsyncClient or an AsyncTx")
            last: TransactionAborted | None = None
            for attempt in range(retries + 1):
                tx = db.transaction()
                try:
                    result = await f(tx, *args, **kwargs)
                    if not tx._tx._done:
                        await tx.commit()
                    return result
                except TransactionAborted as exc:
                    if not exc.retryable:
                        raise
                    last = exc
                    tx._tx.abandon()
                    if exc.decision.conflict_seq:
                        await asyncio.to_thread(
                            db.sync_client.reader.wait_for_seq,
                            exc.decision.conflict_seq,
                            db.sync_client.timeout,
                        )
                    await asyncio.sleep(_backoff(attempt, backoff, max_backoff))
            assert last is not None
            raise RetryLimitError(retries + 1, last)

        return wrapper

    return deco(fn) if fn is not None else deco
