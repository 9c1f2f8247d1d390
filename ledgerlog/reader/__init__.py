"""Readers: tail a ledger, validate every entry, apply what committed to views.

A :class:`Reader` is a replica. It restarts from the checkpoints its views stored with
their data (never from seq 1 when they have one): it restores the validator state from
the oldest view's last snapshot, re-validates from there (cheap) and applies to each view
only the seqs that view does not hold yet, so nothing is applied twice or skipped. When
it passes a view's checkpoint it checks that its digest equals the one the view stored:
a replica that would diverge stops with :class:`DivergenceError` instead.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Final, cast

import msgspec
import structlog

from ledgerlog import metrics
from ledgerlog.backends.base import Backend, LogReader
from ledgerlog.errors import BackendError, ClosedError, FormatError, LedgerlogError
from ledgerlog.model import START, Decision, Position
from ledgerlog.validator import (
    C_COMMITTED,
    DEFAULT_WINDOW,
    EntryResult,
    SequencerState,
    ValidatorState,
    process_entry,
    to_decision,
)
from ledgerlog.views.base import Checkpoint, View

__all__ = ["ApplyError", "DivergenceError", "Reader"]

log = structlog.get_logger(__name__)

_REASON_NAMES: Final = ("committed", "conflict", "too_old", "duplicate", "malformed")


class ApplyError(LedgerlogError):
    """A view failed to apply a batch; the reader stopped. Nothing is lost: a new Reader
    resumes from the checkpoints the views stored with their data."""


class DivergenceError(LedgerlogError):
    """A replica reached a different digest than the one stored with a view's data:
    the ledger or the view was altered, or determinism broke. Never ignored."""


def _pack_snapshot(position: Position, state: bytes) -> bytes:
    return msgspec.msgpack.encode([position.major, position.minor, state])


def _unpack_snapshot(data: bytes) -> tuple[Position, bytes]:
    try:
        major, minor, state = msgspec.msgpack.decode(data)
        return Position(int(major), int(minor)), bytes(state)
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        raise FormatError(f"corrupt reader snapshot: {exc}") from exc


#: A poll applies and announces what it validated at least every this many transactions,
#: not once at its end: a replica catching up (or behind after a stall) reads up to 1,024
#: entries of up to hundreds of transactions each, and released no decision before the
#: last was validated, while every decoded transaction stayed alive for the cyclic GC to
#: walk (catching up 307k transactions: 1.3-1.6 s in the GC before, 0.6-1.0 s after).
APPLY_EVERY_TXNS: Final = 2048

_UNSETTLED: Final = (PENDING, RUNNING)
_SETTLED: Final = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


class _DecisionFuture(Future[Decision]):
    """The future of one transaction's decision; clients make them by the ten thousand
    per second, one per transaction.

    A plain ``concurrent.futures.Future`` builds a Condition (and an RLock) of its own in
    ``__init__``; with a per-future done-callback for the latency metric that was about a
    tenth of a busy client's CPU. The futures of one :meth:`Reader.watch_many` call share
    one Condition instead, the reader sets the decisions of one batch under one hold of
    it with one wake-up (:func:`_settle_all`), and observes the commit latencies itself.
    Setting one future wakes every waiter of the shared Condition and the base class's
    ``result``/``exception`` wait only once, so here they wait in a loop until their own
    future is done."""

    def __init__(
        self,
        condition: threading.Condition,
        started: float,
        observe: Callable[[Sequence[float]], None] | None,
    ) -> None:
        # Future.__init__ is not called: it would make the Condition this class saves.
        self._condition = condition
        self._state = PENDING
        self._result = None
        self._exception = None
        self._waiters = []
        self._done_callbacks: list[Callable[[Future[Decision]], object]] = []
        self.started = started
        self.observe = observe

    def _settle(self, timeout: float | None) -> None:
        with self._condition:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._state in _UNSETTLED:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                self._condition.wait(left)

    def result(self, timeout: float | None = None) -> Decision:
        # A decided future (a done-callback's, or one waited on before) answers without
        # holding the shared Condition twice (here and in the base class): the reader
        # sets the result before the state, so FINISHED with no exception means it is
        # there.
        if self._state == FINISHED and self._exception is None:
            return cast(Decision, self._result)
        self._settle(timeout)
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._settle(timeout)
        return super().exception(0)


def _settle_all(decided: list[tuple[_DecisionFuture, Decision]], now: float) -> None:
    """``set_result`` for many futures: per Condition one hold and one ``notify_all``,
    per latency sink one call (what ``Future.set_result`` does, batched)."""
    groups: dict[threading.Condition, list[tuple[_DecisionFuture, Decision]]] = {}
    for fut, d in decided:
        groups.setdefault(fut._condition, []).append((fut, d))
    # Keyed by the sink itself: the bound methods of one histogram are equal.
    latencies: dict[Callable[[Sequence[float]], None], list[float]] = {}
    for cond, items in groups.items():
        callbacks: list[_DecisionFuture] = []
        with cond:
            for fut, d in items:
                if fut._state in _SETTLED:  # cancelled by its owner: nothing to report
                    continue
                fut._result = d
                fut._state = FINISHED
                for waiter in fut._waiters:
                    waiter.add_result(fut)
                if fut._done_callbacks:
                    callbacks.append(fut)
                if fut.observe is not None:
                    latencies.setdefault(fut.observe, []).append(now - fut.started)
            cond.notify_all()
        for fut in callbacks:
            fut._invoke_callbacks()  # type: ignore[attr-defined]
    for observe, values in latencies.items():
        observe(values)


class Reader:
    """One replica of a ledger: validates every entry and feeds views, exactly once.

    Use :meth:`poll` to advance by hand, or :meth:`start` to tail in a thread.
    """

    def __init__(
        self,
        backend: Backend,
        views: Sequence[View] = (),
        *,
        window: int = DEFAULT_WINDOW,
        name: str = "reader",
        snapshot_every: int | None = None,
        keep_digests: int = 4096,
    ) -> None:
        self.backend = backend
        self.views = list(views)
        self.name = name
        self.window = window
        self.snapshot_every = snapshot_every or min(window, 50_000)
        # A snapshot stalls this thread (and, holding the GIL, the process) for
        # O(window): only take them for views that can use one.
        self._snapshots = any(v.wants_snapshots for v in self.views)
        self._log = log.bind(ledger=backend.ledger, reader=name)
        self._lock = threading.Condition()
        self._waiters: dict[tuple[str, int], list[_DecisionFuture]] = {}
        self._subscribers: list[Callable[[Sequence[EntryResult]], None]] = []
        self._on_caught_up: list[Callable[[], None]] = []
        self._digests: deque[tuple[int, bytes]] = deque(maxlen=keep_digests)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._failed: BaseException | None = None
        self._closed = False

        self.state, start, self._skip, self._expect = self._restore(window)
        self._log_reader: LogReader = backend.reader(start)
        self._snapshot = b""
        self._snapshot_seq = self.state.next_seq
        self._position = start
        self.entries_read = 0
        self._m_commits = metrics.COMMITS.labels(backend.ledger, name)
        self._m_aborts = [metrics.ABORTS.labels(backend.ledger, name, r) for r in _REASON_NAMES]
        self._m_rejected = metrics.REJECTED_ENTRIES.labels(backend.ledger, name)
        self._m_malformed = metrics.MALFORMED_ENTRIES.labels(backend.ledger, name)
        self._m_applied = metrics.APPLIED_SEQ.labels(backend.ledger, name)
        # Computed when scraped, not on the hot path: it has to look at the ledger's end.
        metrics.LAG.labels(backend.ledger, name).set_function(self._lag_or_zero)
        self._log.info("reader started", position=str(start), next_seq=self.state.next_seq)

    def _restore(
        self, window: int
    ) -> tuple[ValidatorState, Position, list[int], list[tuple[int, bytes] | None]]:
        cks: list[Checkpoint | None] = [v.checkpoint() for v in self.views]
        skip = [ck.next_seq if ck else 1 for ck in cks]
        expect = [(ck.next_seq, ck.digest) if ck else None for ck in cks]
        snaps = [_unpack_snapshot(ck.validator_state) for ck in cks if ck and ck.validator_state]
        if self.views and len(snaps) == len(self.views):
            position, raw = min(snaps, key=lambda s: s[0])
            state = ValidatorState.restore(raw)
            if state.window != window:
                self._log.warning(
                    "window differs from the checkpoint's; keeping the checkpoint's",
                    checkpoint_window=state.window,
                    asked=window,
                )
            return state, position, skip, expect
        return ValidatorState(window), START, skip, expect

    # Properties -----------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The last seq validated (0 before the first transaction)."""
        return self.state.next_seq - 1

    @property
    def digest(self) -> bytes:
        """The state digest after :attr:`last_seq`."""
        return self.state.digest

    @property
    def position(self) -> Position:
        return self._position

    def digest_at(self, seq: int) -> bytes | None:
        """The digest after `seq`, if it is among the recent record boundaries kept."""
        for s, d in reversed(self._digests):
            if s == seq:
                return d
            if s < seq:
                return None
        return None

    # Reading --------------------------------------------------------------------------

    def poll(self, timeout: float = 0.0, max_entries: int = 1024) -> list[EntryResult]:
        """Read, validate and apply what is available (waiting up to `timeout`)."""
        results: list[EntryResult] = []
        self._poll(timeout, max_entries, keep=results)
        return results

    def _poll(
        self, timeout: float, max_entries: int = 1024, *, keep: list[EntryResult] | None = None
    ) -> int:
        """:meth:`poll`, adding the results to `keep` if given (the reader's own thread
        keeps none: a long poll's results would hold every transaction it decoded);
        returns the number of entries read."""
        if self._closed:
            raise ClosedError(f"reader {self.name} is closed")
        if self._failed is not None:
            raise ApplyError(f"reader {self.name} stopped after a view failed") from self._failed
        entries = self._log_reader.read(max_entries, timeout)
        if not entries:
            # The cursor may still have moved (past a seal, say): nothing to apply there.
            self._position = self._log_reader.position
            return 0
        state = self.state
        chunk: list[EntryResult] = []
        applied: list[tuple[int, object]] = []
        commits = txns = 0
        last = len(entries) - 1
        for i, e in enumerate(entries):
            res = process_entry(state, e.data)
            if keep is not None:
                keep.append(res)
            chunk.append(res)
            if res.kind == "record":
                applied.extend(res.committed)
                commits += len(res.committed)
                txns += len(res.outcomes)
                self._digests.append((state.next_seq - 1, state.digest))
                self._check_expected()
            elif res.kind == "rejected":
                self._m_rejected.inc()
                self._log.warning("entry rejected", detail=res.detail, epoch=res.epoch)
            elif res.kind == "malformed":
                self._m_malformed.inc()
                self._log.warning("malformed entry", detail=res.detail, at=str(e.position))
            elif res.kind == "epoch":
                self._log.info("new epoch", epoch=res.epoch, writer=res.writer_id)
            if txns >= APPLY_EVERY_TXNS and i < last:
                self._publish(chunk, applied, commits, e.next, snapshot=False)
                chunk, applied, commits, txns = [], [], 0, 0
        # Where the next read starts: past these entries, and past any seal after them.
        self._publish(chunk, applied, commits, self._log_reader.position, snapshot=True)
        self.entries_read += len(entries)
        return len(entries)

    def _publish(
        self,
        results: list[EntryResult],
        applied: list[tuple[int, object]],
        commits: int,
        position: Position,
        *,
        snapshot: bool,
    ) -> None:
        """Apply validated entries to the views, then move to `position` and settle the
        decisions (in that order: a decision is announced only once views hold it).
        Validator snapshots only where `snapshot` (at a poll's end): exporting the state
        takes ~0.2 s at 10^5 keys, and a catch-up's steps are seconds apart."""
        try:
            self._apply(applied, position, may_snapshot=snapshot)
        except Exception as exc:
            # The validator state has moved past this batch but (some) views have not:
            # going on would skip it in them. Stop for good; a new Reader resumes from
            # the views' checkpoints.
            self._failed = exc
            raise ApplyError(
                f"reader {self.name}: a view failed to apply seqs up to "
                f"{self.state.next_seq - 1} ({exc}); restart the reader to resume from "
                "the views' checkpoints"
            ) from exc
        self._position = position
        self._notify(results, commits)

    def _check_expected(self) -> None:
        for i, exp in enumerate(self._expect):
            if exp is not None and self.state.next_seq >= exp[0]:
                self._expect[i] = None
                if self.state.next_seq == exp[0] and self.state.digest != exp[1]:
                    raise DivergenceError(
                        f"reader {self.name}: digest at seq {exp[0] - 1} is "
                        f"{self.state.digest.hex()}, view {self.views[i].name} stored "
                        f"{exp[1].hex()}"
                    )

    def _apply(
        self, applied: list[tuple[int, object]], position: Position, *, may_snapshot: bool
    ) -> None:
        if not self.views:
            return
        state = self.state
        snapshot = b""
        if (
            may_snapshot
            and self._snapshots
            and (state.next_seq - self._snapshot_seq >= self.snapshot_every or not self._snapshot)
        ):
            snapshot = _pack_snapshot(position, state.snapshot())
            self._snapshot = snapshot
            self._snapshot_seq = state.next_seq
        ck = Checkpoint(position, state.next_seq, state.digest, snapshot)
        for i, view in enumerate(self.views):
            floor = self._skip[i]
            if floor > 1:
                if state.next_seq < floor:
                    continue  # the view already holds all of this batch
                part = [a for a in applied if a[0] >= floor]
                self._skip[i] = 1
            else:
                part = applied
            view.apply(part, ck)  # type: ignore[arg-type]

    def _notify(self, results: list[EntryResult], commits: int) -> None:
        self._m_commits.inc(commits)
        self._m_applied.set(self.state.next_seq - 1)
        aborts = [0] * len(_REASON_NAMES)
        now = time.perf_counter()
        decided: list[tuple[_DecisionFuture, Decision]] = []
        with self._lock:
            waiters = self._waiters
            for res in results:
                if res.kind != "record":
                    continue
                for o in res.outcomes:
                    code = o[2]
                    if code != C_COMMITTED:
                        aborts[code] += 1
                    if waiters and o[1] in waiters:
                        d = to_decision(o)
                        for fut in waiters.pop(o[1]):
                            decided.append((fut, d))
            if decided:
                _settle_all(decided, now)
            self._lock.notify_all()
        for code, n in enumerate(aborts):
            if n:
                self._m_aborts[code].inc(n)
        for fn in self._subscribers:
            fn(results)

    def lag(self, max_entries: int = 100_000) -> int:
        """Seqs appended to the ledger but not yet validated here (0 when caught up).

        Reads the entry headers between this reader's position and the ledger's end (at
        most `max_entries` of them, so the figure is a lower bound when far behind).
        """
        end = self.backend.end()
        position = self._position
        probe = SequencerState(self.state.epoch, self.state.next_seq)
        with self.backend.reader(position) as r:
            seen = 0
            while seen < max_entries and not r.caught_up(end):
                entries = r.read(min(4096, max_entries - seen), timeout=0.0)
                if not entries:
                    break
                for e in entries:
                    probe.advance(e.data)
                seen += len(entries)
        return max(0, probe.next_seq - self.state.next_seq)

    def _lag_or_zero(self) -> float:
        if self._closed:
            return 0.0
        try:
            return float(self.lag())
        except Exception:  # a scrape must not fail because the ledger is unreachable
            return float("nan")

    # Waiting --------------------------------------------------------------------------

    def watch(self, client_id: str, client_seq: int) -> Future[Decision]:
        """A future for the final decision of a transaction id (register before submit)."""
        return self.watch_many([(client_id, client_seq)])[0]

    def watch_many(
        self,
        ids: Sequence[tuple[str, int]],
        observe: Callable[[Sequence[float]], None] | None = None,
    ) -> list[Future[Decision]]:
        """:meth:`watch` for several ``(client_id, client_seq)`` at once, in order.

        `observe`, if given, is called from the reading thread with the seconds from
        this call to each decision, for the decisions of a batch at once as they are
        set: a latency metric without a callback per future."""
        condition = threading.Condition()
        started = time.perf_counter()
        futs = [_DecisionFuture(condition, started, observe) for _ in ids]
        with self._lock:
            waiters = self._waiters
            for key, fut in zip(ids, futs, strict=True):
                got = waiters.get(key)
                if got is None:
                    waiters[key] = [fut]
                else:
                    got.append(fut)
        return cast(list[Future[Decision]], futs)

    def unwatch(self, client_id: str, client_seq: int, fut: Future[Decision]) -> None:
        with self._lock:
            lst = self._waiters.get((client_id, client_seq))
            if lst and fut in lst:
                lst[:] = [f for f in lst if f is not fut]
                if not lst:
                    del self._waiters[(client_id, client_seq)]

    def subscribe(self, fn: Callable[[Sequence[EntryResult]], None]) -> None:
        """Call `fn` with the results of every batch (from the reading thread)."""
        self._subscribers.append(fn)

    def when_caught_up(self, fn: Callable[[], None]) -> None:
        """Call `fn` once, the first time the replica has read what the ledger held:
        from the reading thread (:meth:`start`) when a poll finds nothing new, or from
        the caller of :meth:`sync` when it returns, whichever comes first (on a busy
        ledger every poll finds something, so a replica could wait for an idle moment
        forever)."""
        self._on_caught_up.append(fn)

    def _caught_up(self) -> None:
        with self._lock:
            hooks, self._on_caught_up = self._on_caught_up, []
        for fn in hooks:
            fn()

    def wait_for_seq(self, seq: int, timeout: float | None = None) -> bool:
        """Wait until seq `seq` has been validated and applied; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self.state.next_seq <= seq:
                self._raise_if_failed()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if self._thread is None:
                    self._lock.release()
                    try:
                        self._poll(min(remaining or 0.05, 0.05))
                    finally:
                        self._lock.acquire()
                else:
                    self._lock.wait(min(remaining or 0.1, 0.1))
            return True

    def sync(self, timeout: float | None = None) -> int:
        """Wait until everything appended before this call has been applied; returns the
        last seq then. Reads after it are strictly serializable."""
        end = self.backend.end()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                self._raise_if_failed()
                if self._log_reader.caught_up(end) and self._position >= self._log_reader.position:
                    seq = self.last_seq
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"reader {self.name} did not reach {end} in {timeout}s")
                if self._thread is not None:
                    self._lock.wait(0.05)
                    continue
            self._poll(0.01)
        if self._on_caught_up:
            self._caught_up()
        return seq

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise LedgerlogError(f"reader {self.name} stopped: {self.error}") from self.error

    def catch_up(self, timeout: float | None = None) -> int:
        """:meth:`sync` for a reader without a thread: poll until the ledger's end."""
        return self.sync(timeout)

    # Thread ---------------------------------------------------------------------------

    def start(self) -> Reader:
        if self._thread is not None:
            raise ClosedError("reader already started")
        self._thread = threading.Thread(
            target=self._run, name=f"ledgerlog-reader-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    if not self._poll(0.05) and self._on_caught_up:
                        self._caught_up()
                except BackendError:
                    # The storage is unreachable for now; the log reader resumes where it
                    # stopped. Anything else (divergence, a view failing) stops the reader.
                    self._log.warning("read failed; retrying", exc_info=True)
                    self._stop.wait(0.5)
        except BaseException as exc:
            self.error = exc
            self._log.exception("reader stopped on an error")
            with self._lock:
                for futs in self._waiters.values():
                    for fut in futs:
                        if not fut.done():
                            fut.set_exception(exc)
                self._waiters.clear()
                self._lock.notify_all()

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._closed = True
        self._log_reader.close()
        with self._lock:
            for futs in self._waiters.values():
                for fut in futs:
                    if not fut.done():
                        fut.set_exception(ClosedError(f"reader {self.name} closed"))
            self._waiters.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
