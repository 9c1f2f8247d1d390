"""The single elected writer of a ledger.

A :class:`Writer` campaigns through its backend (standing by until elected), learns the
ledger's end by scanning entry headers under the same rules readers use, appends an
epoch start one above every epoch seen, and from then on turns intake submissions into
records: batches of transactions stamped with epoch, first seq and a hybrid logical
clock. It never decodes a transaction and never decides anything: readers do. Where the
backend pipelines (:attr:`LogWriter.max_pending_appends` > 1) it keeps that many appends
in flight, acknowledging each one's intake only once that append is acknowledged, and
ends its term at the first that fails. Small submissions arriving while an append is in
flight are held and sent together once it lands (group commit): the broker's and the
readers' work goes by messages, so at moderate load this costs a submission at most one
append's round trip and saves most of the messages.

When it is fenced (another writer took over) it stops appending at once, tells whoever
listens, and goes back to standing by.

A writer running inside a client (``writer="auto"``) also takes that client's own
submissions directly (:meth:`Writer.submit_local`) into the same sequence of records,
one persisted hop fewer than the intake; the client keeps them until they are decided
and resubmits them through the intake if the term ends first.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Final

import msgspec
import structlog

from ledgerlog import metrics
from ledgerlog.backends.base import (
    Backend,
    IntakeConsumer,
    IntakeItem,
    LogWriter,
    PendingAppend,
)
from ledgerlog.codec import WireIntake, decode_entry, encode_epoch, encode_record
from ledgerlog.errors import (
    BackendError,
    ClosedError,
    ConfigError,
    FencedError,
    FormatError,
    NotElectedError,
)
from ledgerlog.validator import SequencerState

__all__ = ["HLC", "Writer"]

log = structlog.get_logger(__name__)

DEFAULT_MAX_RECORD_TXNS: Final = 1000
DEFAULT_MAX_RECORD_BYTES: Final = 1024 * 1024
DEFAULT_GROUP_COMMIT_TXNS: Final = 256

#: Told the outcome of a local submission's append: None once it is acknowledged, the
#: error otherwise (see :meth:`Writer.submit_local`).
LocalDone = Callable[[BaseException | None], None]


class HLC:
    """Hybrid logical clock: milliseconds since the epoch in the high bits, a counter in
    the low 16. Strictly increasing across writers, because each new writer starts above
    the highest timestamp in the ledger."""

    def __init__(self, floor: int = 0, clock: Callable[[], int] = time.time_ns) -> None:
        self.last = floor
        self._clock = clock

    def now(self) -> int:
        physical = (self._clock() // 1_000_000) << 16
        self.last = max(self.last + 1, physical)
        return self.last

    @staticmethod
    def to_unix_ms(hlc: int) -> int:
        return hlc >> 16


class Writer:
    """Stands by, gets elected, appends; again after losing the ledger, until stopped.

    Run it in a thread with :meth:`start` (clients do that for the embedded backend) or in
    the foreground with :meth:`run` (``ledgerlog writer``).

    `group_commit_txns`: on a backend that pipelines appends (Pulsar), submissions that
    arrive while an append is in flight wait for it to land and then go together, as one
    append, unless this many transactions wait (those are appended at once, pipelined):
    fewer, fuller messages for the broker and every reader when the load is moderate,
    the full pipeline under heavy load. 0 appends everything at once.
    """

    def __init__(
        self,
        backend: Backend,
        writer_id: str,
        *,
        max_record_txns: int = DEFAULT_MAX_RECORD_TXNS,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        max_batch_items: int = 4096,
        group_commit_txns: int = DEFAULT_GROUP_COMMIT_TXNS,
        on_elected: Callable[[int], None] | None = None,
        on_fenced: Callable[[FencedError], None] | None = None,
    ) -> None:
        if max_record_txns < 1 or max_record_bytes < 1024:
            raise ConfigError("max_record_txns must be >= 1 and max_record_bytes >= 1024")
        if group_commit_txns < 0:
            raise ConfigError("group_commit_txns must be >= 0 (0: no grouping)")
        self.backend = backend
        self.writer_id = writer_id
        self.max_record_txns = max_record_txns
        self.max_record_bytes = max_record_bytes
        self.max_batch_items = max_batch_items
        self.group_commit_txns = group_commit_txns
        self.on_elected = on_elected
        self.on_fenced = on_fenced
        self.epoch = 0
        self.next_seq = 0
        self.elected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = log.bind(ledger=backend.ledger, writer=writer_id)
        self.error: BaseException | None = None
        # The term being served, for submit_local (None while standing by).
        self._term: _Term | None = None

    # Lifecycle -------------------------------------------------------------------------

    def start(self) -> Writer:
        if self._thread is not None:
            raise ClosedError("writer already started")
        self._thread = threading.Thread(
            target=self._run_safely, name=f"ledgerlog-writer-{self.writer_id}", daemon=True
        )
        self._thread.start()
        return self

    def _run_safely(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # surfaced through .error; a thread must not die silently
            self.error = exc
            self._log.exception("writer thread failed")

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Campaign and serve until :meth:`stop`."""
        while not self._stop.is_set():
            try:
                lw = self.backend.campaign(self.writer_id, timeout=0.25)
            except NotElectedError:
                continue
            except BackendError:
                # The storage is unreachable for now: keep standing by.
                self._log.warning("campaign failed; retrying", exc_info=True)
                self._stop.wait(0.5)
                continue
            try:
                self._serve(lw)
            except FencedError as exc:
                self._log.warning("fenced: another writer holds the ledger", epoch=self.epoch)
                metrics.WRITER_FENCED.labels(self.backend.ledger).inc()
                if self.on_fenced is not None:
                    self.on_fenced(exc)
            except BackendError:
                # The storage failed under us: we cannot know what the ledger's end is,
                # so give the ledger up and campaign again (the next term rescans it).
                self._log.exception("backend error; resigning")
                time.sleep(0.1)
            finally:
                self.elected.clear()
                lw.close()

    # Term -------------------------------------------------------------------------------

    def _recover(self, lw: LogWriter) -> SequencerState:
        started = time.monotonic()
        position, raw_state = lw.recovery_point()
        state = SequencerState.from_bytes(raw_state) if raw_state else SequencerState()
        scanned = 0
        with self.backend.reader(position) as reader:
            while True:
                entries = reader.read(4096, timeout=0.0)
                if not entries:
                    break
                for e in entries:
                    state.advance(e.data)
                scanned += len(entries)
            # What a takeover cost, for whoever wonders why one was slow.
            self._log.info(
                "ledger end recovered",
                scanned_from=str(position),
                entries_scanned=scanned,
                seconds=round(time.monotonic() - started, 3),
                next_seq=state.next_seq,
            )
            epoch = state.epoch + 1
            hlc = HLC(state.hlc)
            # The state after our epoch start is not known until we have read through it
            # (a deposed writer may still slip records in before it): say so with b"".
            lw.append([encode_epoch(epoch, self.writer_id, hlc.now())], b"")
            # Read through our own epoch start: entries a deposed writer slipped in before
            # it still count, and anything after it never does.
            deadline = time.monotonic() + 30.0
            while state.epoch < epoch:
                entries = reader.read(4096, timeout=0.1)
                for e in entries:
                    state.advance(e.data)
                if state.epoch > epoch:
                    raise FencedError(f"epoch {state.epoch} started while ours ({epoch}) did")
                if time.monotonic() > deadline:
                    raise BackendError("our epoch start did not come back from the ledger")
            if state.epoch != epoch:
                raise FencedError(f"epoch {state.epoch} started while ours ({epoch}) did")
        state.hlc = max(state.hlc, hlc.last)
        return state

    def _serve(self, lw: LogWriter) -> None:
        state = self._recover(lw)
        self.epoch = state.epoch
        self.next_seq = state.next_seq
        intake = lw.intake(state.meta)
        term = _Term(self, lw, state, intake)
        # From here the term is closed whatever happens (its flusher thread waits for it).
        try:
            log_ = self._log.bind(epoch=state.epoch)
            log_.info("serving", next_seq=state.next_seq)
            metrics.WRITER_EPOCH.labels(self.backend.ledger).set(state.epoch)
            self._term = term
            self.elected.set()
            if self.on_elected is not None:
                self.on_elected(state.epoch)
            depth = max(1, lw.max_pending_appends)
            last_check = time.monotonic()
            while not self._stop.is_set():
                with term.lock:
                    term.retire(wait=len(term.pending) >= depth)
                    term.flush()  # if the flusher has not yet
                # With appends in flight, look back soon to retire them; intake that
                # arrives meanwhile is taken at once either way. (A failed send already
                # stops the next append from starting: retiring late only delays the
                # intake acknowledgement, which is bookkeeping.)
                items = intake.poll(self.max_batch_items, timeout=0.01 if term.pending else 0.05)
                if not items:
                    if not term.pending and time.monotonic() - last_check > 0.5:
                        lw.check()
                        last_check = time.monotonic()
                    continue
                raws = self._unpack(items)
                if not raws:
                    continue
                with term.lock:
                    term.append(raws, items, intake.meta(items), [])
            # Stopping: let what is in flight land (or fail) before resigning.
            term.close()
            with term.lock:
                term.flush(force=True)
                term.retire(wait=True)
        finally:
            self._term = None
            term.close()
            term.abandon()
            intake.close()

    def submit_local(self, raws: list[msgspec.Raw], on_done: LocalDone) -> int:
        """Append transactions submitted in this process straight into the next record,
        without the intake's persisted hop, if this writer is serving: returns the
        term's epoch, or 0 if it is not serving (the caller then uses the intake).

        `on_done(None)` once the record carrying them is acknowledged, `on_done(error)`
        if it failed or the term ended first; they may still have landed, so the caller
        resubmits them through the intake (readers decide a transaction id once).
        Returns without waiting: concurrent callers share records (the first appends what
        the others queue meanwhile)."""
        term = self._term
        if term is None or not term.submit_local(raws, on_done):
            return 0
        return term.state.epoch

    def _unpack(self, items: list[IntakeItem]) -> list[msgspec.Raw]:
        raws: list[msgspec.Raw] = []
        for it in items:
            try:
                entry = decode_entry(it.data)
            except FormatError as exc:
                # Not a submission at all: nothing a reader could decide, so it is
                # dropped here with a record of why.
                self._log.error("dropping undecodable intake item", error=str(exc))
                continue
            if not isinstance(entry, WireIntake):
                self._log.error("dropping intake item of the wrong kind")
                continue
            raws.extend(entry.txns)
        return raws


class _Term:
    """One term's appending: records numbered from the recovered state, appends in flight
    oldest first, shared by the serving thread (intake) and local submitters. `lock`
    orders appends (their seqs) and guards `pending`; only the serving thread retires."""

    def __init__(
        self, writer: Writer, lw: LogWriter, state: SequencerState, intake: IntakeConsumer
    ) -> None:
        self.writer = writer
        self.lw = lw
        self.state = state
        self.hlc = HLC(state.hlc)
        self.intake = intake
        self.lock = threading.Lock()
        # (append, the intake items it carries, its local submitters, the next seq
        # after it). The backend lands appends in order and none after a failed one;
        # intake items are acknowledged only once their own append is.
        self.pending: deque[tuple[PendingAppend, list[IntakeItem], list[LocalDone], int]] = deque()
        self.failed: BaseException | None = None
        ledger = writer.backend.ledger
        self._m_records = metrics.WRITER_RECORDS.labels(ledger)
        self._m_txns = metrics.WRITER_TXNS.labels(ledger)
        self._m_seq = metrics.WRITER_NEXT_SEQ.labels(ledger)
        # Local submissions waiting for the submitter that is appending (under qlock).
        self._qlock = threading.Lock()
        self._queue: list[tuple[list[msgspec.Raw], LocalDone]] = []
        self._appending = False
        self._closed = False
        # Group commit (see Writer): submissions held while an append is in flight, in
        # arrival order, with how many transactions they hold; the flusher appends them
        # once it lands.
        self._group = writer.group_commit_txns if lw.max_pending_appends > 1 else 0
        self._held: list[tuple[list[msgspec.Raw], list[IntakeItem], bytes, list[LocalDone]]] = []
        self._held_txns = 0
        self._landed = threading.Event()
        if self._group:
            threading.Thread(
                target=self._flush_loop, name=f"ledgerlog-group-{writer.writer_id}", daemon=True
            ).start()

    def _in_flight(self) -> bool:
        # Appends land in order: the newest tells.
        return bool(self.pending) and not self.pending[-1][0].done()

    def _on_landed(self) -> None:
        # On the backend's I/O thread: only wake the flusher, and only if it has work
        # (a submission held after this check sees the append landed and goes itself).
        if self._held:
            self._landed.set()

    def _flush_loop(self) -> None:
        # No timeout: every landing with something held sets the event, close() does,
        # and the serving thread flushes after each retire anyway.
        while True:
            self._landed.wait()
            self._landed.clear()
            with self.lock:
                if self._closed or self.failed is not None:
                    return
                with contextlib.suppress(BaseException):  # kept in .failed: the term ends
                    self.flush()

    def flush(self, force: bool = False) -> None:
        """Append what is held if no append is in flight, or anyway if `force` (call with
        `lock` held); raises what ends the term."""
        if self._held and (force or not self._in_flight()):
            self._start([], [], b"", [])

    def _records(self, raws: list[msgspec.Raw], meta: bytes) -> list[bytes]:
        """`raws` as records of at most the writer's max_record_txns / max_record_bytes,
        numbered from ``state.next_seq`` on (which moves past them); `meta` goes with the
        last."""
        writer, state = self.writer, self.state
        records: list[bytes] = []
        i = 0
        while i < len(raws):
            j = i
            size = 0
            while j < len(raws) and j - i < writer.max_record_txns:
                size += len(raws[j])
                if size > writer.max_record_bytes and j > i:
                    break
                j += 1
            last = j == len(raws)
            records.append(
                encode_record(
                    state.epoch,
                    state.next_seq,
                    self.hlc.now(),
                    writer.writer_id,
                    raws[i:j],
                    meta if last else b"",
                )
            )
            state.next_seq += j - i
            i = j
        return records

    def append(
        self, raws: list[msgspec.Raw], items: list[IntakeItem], meta: bytes, done: list[LocalDone]
    ) -> None:
        """Append `raws` now, or hold them for the next append if one is in flight and
        what is held is still small (call with `lock` held); raises what ends the term."""
        if self.failed is not None:
            raise self.failed
        if self._group and self._held_txns + len(raws) < self._group and self._in_flight():
            self._held.append((raws, items, meta, done))
            self._held_txns += len(raws)
            if self._in_flight():
                return
            # It landed meanwhile, maybe before _on_landed could see this: go now.
            self._held.pop()
            self._held_txns -= len(raws)
        self._start(raws, items, meta, done)

    def _start(
        self, raws: list[msgspec.Raw], items: list[IntakeItem], meta: bytes, done: list[LocalDone]
    ) -> None:
        held = self._held
        if held:
            # Oldest first; the newest intake position goes with the records.
            held = [*held, (raws, items, meta, done)]
            raws = [r for h in held for r in h[0]]
            items = [i for h in held for i in h[1]]
            meta = next((h[2] for h in reversed(held) if h[2]), b"")
            done = [d for h in held for d in h[3]]
            self._held, self._held_txns = [], 0
        state = self.state
        records = self._records(raws, meta)
        if meta:
            state.meta = meta
        state.hlc = self.hlc.last
        try:
            append = self.lw.append_async(records, state.to_bytes())
        except BaseException as exc:
            self.failed = exc
            # The caller tells its own submitters; abandon() tells those held before.
            self._held = held[:-1]
            raise
        self.pending.append((append, items, done, state.next_seq))
        if self._group:
            append.add_done_callback(self._on_landed)
        self._m_records.inc(len(records))
        self._m_txns.inc(len(raws))

    def retire(self, wait: bool) -> None:
        """Settle the appends that are done (the oldest at least, if `wait`); call with
        `lock` held. Raises the first failure, which ends the term."""
        pending = self.pending
        if self.failed is not None:
            raise self.failed
        while pending and (wait or pending[0][0].done()):
            append, items, done, next_seq = pending[0]
            try:
                append.result()
            except BaseException as exc:
                self.failed = exc
                raise
            pending.popleft()
            self.intake.ack(items)
            self.writer.next_seq = next_seq
            self._m_seq.set(next_seq)
            _tell(done, None)
            wait = False

    def submit_local(self, raws: list[msgspec.Raw], on_done: LocalDone) -> bool:
        with self._qlock:
            if self._closed:
                return False
            self._queue.append((raws, on_done))
            if self._appending:
                return True  # the submitter appending now takes it on its next round
            self._appending = True
        while True:
            with self._qlock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._appending = False
                    return True
            done = [d for _raws, d in batch]
            error: BaseException | None = None
            with self.lock:
                if self._closed or self.failed is not None:
                    error = self.failed or ClosedError("the writer's term ended")
                else:
                    try:
                        self.append([r for rs, _d in batch for r in rs], [], b"", done)
                    except BaseException as exc:
                        error = exc
            if error is not None:
                _tell(done, error)

    def close(self) -> None:
        """No more local submissions; those queued fail (their submitters resubmit)."""
        with self._qlock:
            self._closed = True
        self._landed.set()  # the flusher stops

    def abandon(self) -> None:
        """The term is over: whatever is still pending may or may not land; its local
        submitters are told so (intake items are reread by the next term)."""
        with self.lock:
            error = self.failed or ClosedError("the writer's term ended")
            done = [d for _a, _i, ds, _n in self.pending for d in ds]
            done += [d for h in self._held for d in h[3]]
            self._held, self._held_txns = [], 0
            self.pending.clear()
        _tell(done, error)


def _tell(done: list[LocalDone], error: BaseException | None) -> None:
    for fn in done:
        try:
            fn(error)
        except Exception:  # one submitter's callback must not end the term
            log.exception("local submission callback failed")
