"""The only place that decides.

:func:`validate` is a pure function of (state, transaction bytes, seq): no clock, no
randomness, no I/O, and no iteration whose order could differ between processes (dicts
are only looked up, never iterated, on the decision path; histories are ordered by seq).
Every reader of a ledger runs it over the same bytes in the same order, so every reader
reaches the same decisions and the same digest. The state is mutated in place for speed;
``state.snapshot()`` / ``ValidatorState.restore()`` give it as bytes for checkpoints.

Rules, in the order they are applied to a transaction at seq S with read_version R:

1. bytes that do not decode, or break the format's rules, or R >= S: **malformed**;
2. its txn_id committed earlier inside the window: **duplicate**;
3. it read something and R < S - 1 - window: **too old** (the writes in (R, S) are no
   longer all known);
4. a key it read, or a key inside a range it read, was written by a transaction
   committed in (R, S): **conflict** (the first such read in the transaction's own order,
   and for a range the smallest such key);
5. otherwise **committed**. Blind writes (no reads) skip 3 and 4.

Entries: an epoch start is accepted iff its epoch is above every epoch seen; a record is
accepted iff its epoch equals the current one and its first_seq is not below the next seq
(a gap can only come from an entry lost to corruption). A rejected record's transactions
get a non-final ``stale_epoch`` decision without a seq; undecodable entries get one
``malformed`` decision without a seq and consume none.

Two implementations keep the state and run :func:`validate_batch`: the pure-Python one
below (the reference, always available) and the optional C extension
``ledgerlog.validator._cstate``, which keeps the hot state in compact hash tables and
rings, is used when it imports, and must decide identically: same outcomes, digests and
snapshot bytes, and a snapshot taken under one continues identically under the other
(tests/test_cstate.py). :data:`IMPLEMENTATION` says which one new states use; set
``LEDGERLOG_PURE_PYTHON=1`` to force the Python one. Transactions are decoded by msgspec
in both.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import deque
from typing import Any, Final

import attrs
import msgspec
from sortedcontainers import SortedList

from ledgerlog.codec import (
    DECODE_ERRORS,
    OP_PUT,
    WireEpoch,
    WireIntake,
    WireRecord,
    WireTxn,
    check_wire_txn,
    decode_entry,
    decode_wire_txn,
)
from ledgerlog.errors import ConfigError, FormatError
from ledgerlog.model import AbortReason, Decision, Outcome, TxnId

__all__ = [
    "DEFAULT_WINDOW",
    "IMPLEMENTATION",
    "IMPLEMENTATIONS",
    "EntryResult",
    "SequencerState",
    "ValidatorState",
    "classify",
    "process_entry",
    "to_decision",
    "validate",
    "validate_batch",
]

DEFAULT_WINDOW: Final = 100_000
"""Seqs of write history kept: read_versions older than this abort as too old."""

GENESIS_DIGEST: Final = bytes(16)

_blake2b = hashlib.blake2b
_seq_pack = struct.Struct(">QB").pack
_U64_MAX: Final = 2**64 - 1

_TXN_DECODE_ERRORS: Final = DECODE_ERRORS
"""What decoding a transaction may raise that makes it "malformed" (anything else
propagates). Both implementations catch exactly these."""


def _load_c_extension() -> Any:
    """The C state module, configured, or None (not built, or LEDGERLOG_PURE_PYTHON=1)."""
    if os.environ.get("LEDGERLOG_PURE_PYTHON", "").strip() not in ("", "0"):
        return None
    try:
        from ledgerlog.validator import _cstate
    except ImportError:
        return None
    try:
        _cstate.configure(
            decode_wire_txn,
            _TXN_DECODE_ERRORS,
            SortedList,
            WireTxn,
            WireTxn.__struct_fields__[:7],
        )
    except Exception:  # an incompatible build: the reference implementation still works
        return None
    return _cstate


_cstate: Any = _load_c_extension()

IMPLEMENTATIONS: Final[tuple[str, ...]] = ("python", "c") if _cstate is not None else ("python",)
"""Implementations available in this process."""

IMPLEMENTATION: Final = "c" if _cstate is not None else "python"
"""The implementation new ValidatorStates use: "c" (the extension) or "python"."""

_SnapshotV1 = tuple[
    int, int, int, str, int, bytes, list[tuple[int, list[str]]], list[tuple[int, str, int]]
]


class ValidatorState:
    """Everything the decision function remembers; bounded by ``window`` seqs of history.

    `implementation` ("c" or "python", default :data:`IMPLEMENTATION`) chooses who keeps
    the hot state. With "python" it is ``last_write`` (key -> seq of its last committed
    write), ``history`` ((seq, keys written) per commit, for pruning), ``committed``
    ((client_id, client_seq) -> seq) and ``committed_hist``; with "c" those four are None
    and an ``_cstate.State`` holds the same contents. Everything else, and every result,
    is the same.
    """

    __slots__ = (
        "_c",
        "_index",
        "committed",
        "committed_hist",
        "digest",
        "epoch",
        "history",
        "last_write",
        "next_seq",
        "window",
        "writer_id",
    )

    last_write: dict[str, int] | None
    history: deque[tuple[int, tuple[str, ...]]] | None
    committed: dict[tuple[str, int], int] | None
    committed_hist: deque[tuple[int, tuple[str, int]]] | None

    def __init__(self, window: int = DEFAULT_WINDOW, *, implementation: str | None = None) -> None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ConfigError(f"window must be a positive int of seqs, not {window!r}")
        impl = IMPLEMENTATION if implementation is None else implementation
        if impl not in ("c", "python"):
            raise ConfigError(f'implementation must be "c" or "python", not {impl!r}')
        if impl == "c" and _cstate is None:
            raise ConfigError(
                "the C validator extension is not available (not compiled, or "
                "LEDGERLOG_PURE_PYTHON is set)"
            )
        self.window = window
        self.epoch = 0
        self.writer_id = ""
        self.next_seq = 1
        self.digest = GENESIS_DIGEST
        # Sorted keys of last_write, built on the first range read; output never
        # depends on whether it exists, only speed does. (The C state keeps its own.)
        self._index: SortedList | None = None
        if impl == "c":
            self._c: Any = _cstate.State(window)
            self.last_write = self.history = self.committed = self.committed_hist = None
        else:
            self._c = None
            # key -> seq of the last committed write; pruned as seqs leave the window
            self.last_write = {}
            self.history = deque()
            self.committed = {}
            self.committed_hist = deque()

    @property
    def implementation(self) -> str:
        """Who keeps the hot state: "c" or "python"."""
        return "python" if self._c is None else "c"

    @property
    def last_seq(self) -> int:
        return self.next_seq - 1

    def size(self) -> int:
        """Entries held: the figure that stays bounded by the window."""
        if self._c is not None:
            return int(self._c.size())
        assert self.last_write is not None and self.committed is not None
        assert self.history is not None
        return len(self.last_write) + len(self.committed) + len(self.history)

    def _prune(self, cutoff: int) -> None:
        """Forget writes at seqs <= cutoff: no acceptable read_version can conflict with them."""
        if self._c is not None:
            self._c.prune(min(cutoff, _U64_MAX))
            return
        history = self.history
        last_write = self.last_write
        assert history is not None and last_write is not None
        index = self._index
        while history and history[0][0] <= cutoff:
            seq, keys = history.popleft()
            for key in keys:
                if last_write.get(key) == seq:
                    del last_write[key]
                    if index is not None:
                        index.remove(key)
        hist = self.committed_hist
        committed = self.committed
        assert hist is not None and committed is not None
        while hist and hist[0][0] <= cutoff:
            seq, tid = hist.popleft()
            if committed.get(tid) == seq:
                del committed[tid]

    def _range_index(self) -> SortedList:
        if self._index is None:
            self._index = SortedList(self.last_write)
        return self._index

    def _histories(self) -> tuple[list[Any], list[Any]]:
        if self._c is not None:
            hist, chist = self._c.export()
            return hist, chist
        assert self.history is not None and self.committed_hist is not None
        return (
            [[s, list(k)] for s, k in self.history],
            [[s, t[0], t[1]] for s, t in self.committed_hist],
        )

    def snapshot(self) -> bytes:
        """The state as bytes, identical for identical states in any process, whichever
        implementation holds it."""
        hist, chist = self._histories()
        return msgspec.msgpack.encode(
            [
                1,
                self.window,
                self.epoch,
                self.writer_id,
                self.next_seq,
                self.digest,
                hist,
                chist,
            ]
        )

    @classmethod
    def restore(cls, data: bytes, *, implementation: str | None = None) -> ValidatorState:
        """A state from :meth:`snapshot` bytes, kept by `implementation` (default
        :data:`IMPLEMENTATION`, whichever one took the snapshot)."""
        try:
            v = msgspec.msgpack.decode(data)[0]
        except (msgspec.DecodeError, TypeError, KeyError, IndexError) as exc:
            raise FormatError(f"corrupt validator snapshot: {exc}") from exc
        if v != 1:
            raise FormatError(f"unknown validator snapshot version {v!r}")
        try:
            _, window, epoch, writer_id, next_seq, digest, hist, chist = msgspec.msgpack.decode(
                data, type=_SnapshotV1
            )
            if epoch < 0 or next_seq < 1 or next_seq > _U64_MAX + 1:
                raise ValueError(f"epoch {epoch} or next_seq {next_seq} out of range")
            if any(s < 0 for s, _ in hist) or any(s < 0 or c < 0 for s, _, c in chist):
                raise ValueError("negative seq or client_seq")
            st = cls(window, implementation=implementation)
            st.epoch, st.writer_id, st.next_seq, st.digest = epoch, writer_id, next_seq, digest
            if st._c is not None:
                st._c.load(hist, chist)
                return st
            assert st.history is not None and st.last_write is not None
            assert st.committed_hist is not None and st.committed is not None
            for s, keys in hist:
                st.history.append((s, tuple(keys)))
                for k in keys:
                    st.last_write[k] = s
            for s, cid, cseq in chist:
                st.committed_hist.append((s, (cid, cseq)))
                st.committed[(cid, cseq)] = s
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            raise FormatError(f"corrupt validator snapshot: {exc}") from exc
        return st

    def fork(self) -> ValidatorState:
        return ValidatorState.restore(self.snapshot(), implementation=self.implementation)


def _malformed(seq: int, tid: TxnId | None, detail: str) -> Decision:
    return Decision(seq, tid, Outcome.ABORTED, AbortReason.MALFORMED, detail=detail)


# Outcome codes of the compact per-seq results; also what the digest hashes.
C_COMMITTED: Final = 0
C_CONFLICT: Final = 1
C_TOO_OLD: Final = 2
C_DUPLICATE: Final = 3
C_MALFORMED: Final = 4
_REASONS: Final = (
    None,
    AbortReason.CONFLICT,
    AbortReason.TOO_OLD,
    AbortReason.DUPLICATE,
    AbortReason.MALFORMED,
)
# By code, like _REASONS: a tuple index instead of two enum lookups per decision.
_OUTCOMES: Final = (Outcome.COMMITTED,) + (Outcome.ABORTED,) * (len(_REASONS) - 1)

Outcome_ = tuple[int, tuple[str, int] | None, int, str | None, int | None, str | None]
"""Compact decision: (seq, (client_id, client_seq) or None, code, conflict key, conflict
seq or duplicate's seq, detail). The hot loop makes these; Decision objects are built
only for whoever asks (a waiting client, a tool)."""


def to_decision(o: Outcome_) -> Decision:
    seq, tid, code, key, wseq, detail = o
    return Decision(
        seq,
        TxnId(*tid) if tid is not None else None,
        _OUTCOMES[code],
        _REASONS[code],
        key,
        wseq,
        detail,
    )


def validate_batch(
    state: ValidatorState, raws: list[msgspec.Raw] | list[bytes], first_seq: int
) -> tuple[list[Outcome_], list[tuple[int, WireTxn]]]:
    """Decide consecutive transactions from `first_seq` (which must be ``state.next_seq``).

    Returns the compact outcome of each, and (seq, txn) of each that committed. This is
    the hot loop of every reader: everything is bound to locals and no Decision objects
    are made here.
    """
    if first_seq != state.next_seq:
        raise ValueError(f"batch at seq {first_seq}, state expects {state.next_seq}")
    if state._c is not None:
        return _validate_batch_c(state, state._c, raws, first_seq)
    window = state.window
    last_write = state.last_write
    committed_ids = state.committed
    history = state.history
    committed_hist = state.committed_hist
    assert last_write is not None and committed_ids is not None
    assert history is not None and committed_hist is not None
    decode = decode_wire_txn
    blake = _blake2b
    pack = _seq_pack
    digest = state.digest
    outcomes: list[Outcome_] = []
    applied: list[tuple[int, WireTxn]] = []
    lw_get = last_write.get
    # Pruning once per batch keeps a few more entries than needed; that changes no
    # decision, since checks below compare against each seq's own floor.
    if first_seq - 1 - window > 0:
        state._prune(first_seq - 1 - window)
    seq = first_seq - 1
    for raw in raws:
        seq += 1
        floor = seq - 1 - window
        tid: tuple[str, int] | None = None
        code = C_COMMITTED
        key: str | None = None
        wseq: int | None = None
        detail: str | None = None
        try:
            txn = decode(raw)
        except _TXN_DECODE_ERRORS as exc:
            code, detail = C_MALFORMED, f"undecodable: {exc}"
        else:
            tid = (txn.client_id, txn.client_seq)
            r = txn.read_version
            reads = txn.reads
            ranges = txn.ranges
            problem = check_wire_txn(txn)
            if problem is None and r >= seq:
                problem = f"read_version {r} is not before seq {seq}"
            if problem is not None:
                code, detail = C_MALFORMED, problem
            elif tid in committed_ids and committed_ids[tid] > floor:
                code, wseq = C_DUPLICATE, committed_ids[tid]
            elif reads or ranges:
                if r < floor:
                    code = C_TOO_OLD
                    detail = f"read_version {r} is older than the window ({floor})"
                else:
                    for k in reads:
                        w = lw_get(k, 0)
                        if w > r:
                            code, key, wseq = C_CONFLICT, k, w
                            break
                    if code == C_COMMITTED and ranges:
                        index = state._range_index()
                        for start, end in ranges:
                            for k in index.irange(start, end, (True, False)):
                                w = last_write[k]
                                if w > r:
                                    code, key, wseq = C_CONFLICT, k, w
                                    break
                            if code:
                                break
        if code == C_COMMITTED:
            written = [k for _op, k, _v in txn.writes]
            if txn.events:
                for _name, _payload, ckeys in txn.events:
                    written.extend(ckeys)
            if written:
                index = state._index
                for k in written:
                    if index is not None and k not in last_write:
                        index.add(k)
                    last_write[k] = seq
                history.append((seq, tuple(written)))
            committed_ids[tid] = seq  # type: ignore[index]
            committed_hist.append((seq, tid))  # type: ignore[arg-type]
            applied.append((seq, txn))
            # The digest chains every seq's outcome with the exact bytes of what
            # committed: replicas with equal digests at seq S agree on everything up to S.
            digest = blake(digest + pack(seq, 0) + raw, digest_size=16).digest()
        else:
            digest = blake(digest + pack(seq, code), digest_size=16).digest()
        outcomes.append((seq, tid, code, key, wseq, detail))
    state.digest = digest
    state.next_seq = seq + 1
    return outcomes, applied


def _validate_batch_c(
    state: ValidatorState, cs: Any, raws: list[msgspec.Raw] | list[bytes], first_seq: int
) -> tuple[list[Outcome_], list[tuple[int, WireTxn]]]:
    """validate_batch on the C state: the same loop, run by ``cs.validate_batch``."""
    n = len(raws)
    if first_seq > _U64_MAX or first_seq + n - 1 > _U64_MAX:
        # Seqs past 2**64-1 cannot be packed into the digest: the reference decides what
        # fits, then fails with struct.error at the first seq that does not (the
        # state's digest and next_seq stay as they were). Do the same.
        fits = max(0, _U64_MAX + 1 - first_seq)
        if fits:
            cs.validate_batch(raws[:fits], first_seq, state.digest)
        elif first_seq - 1 - state.window > 0:
            cs.prune(min(first_seq - 1 - state.window, _U64_MAX))
        if n > fits:
            _seq_pack(first_seq + fits, 0)  # raises struct.error
        state.next_seq = first_seq + n
        return [], []
    outcomes, applied, digest = cs.validate_batch(raws, first_seq, state.digest)
    state.digest = digest
    state.next_seq = first_seq + n
    return outcomes, applied


def validate(
    state: ValidatorState, raw: bytes | memoryview, seq: int
) -> tuple[Decision, WireTxn | None]:
    """Decide one transaction at `seq` (which must be ``state.next_seq``).

    The decision function of DESIGN.md in its plainest form; returns the decision and,
    when it committed, the decoded transaction to apply.
    """
    outcomes, applied = validate_batch(state, [bytes(raw)], seq)
    return to_decision(outcomes[0]), (applied[0][1] if applied else None)


@attrs.frozen
class EntryResult:
    """What one ledger entry did to the state."""

    kind: str
    """"record", "epoch", "rejected" (stale epoch or seq overlap) or "malformed"."""
    outcomes: tuple[Outcome_, ...] = ()
    """Compact decisions (see Outcome_); :attr:`decisions` gives them as Decision objects."""
    committed: tuple[tuple[int, WireTxn], ...] = ()
    """(seq, transaction) of each transaction that committed, in seq order."""
    epoch: int = 0
    detail: str | None = None
    hlc: int = 0
    writer_id: str = ""

    @property
    def decisions(self) -> tuple[Decision, ...]:
        if self.kind == "record":
            return tuple(to_decision(o) for o in self.outcomes)
        reason = AbortReason.STALE_EPOCH if self.kind == "rejected" else AbortReason.MALFORMED
        return tuple(
            Decision(
                None,
                TxnId(*o[1]) if o[1] is not None else None,
                Outcome.ABORTED,
                reason,
                detail=self.detail,
            )
            for o in self.outcomes
        )

    @property
    def seqs(self) -> range:
        """The seqs this entry's transactions took (empty unless it is a record)."""
        if self.kind != "record" or not self.outcomes:
            return range(0)
        return range(self.outcomes[0][0], self.outcomes[-1][0] + 1)


def _txn_ids(rec: WireRecord) -> tuple[Outcome_, ...]:
    """Outcomes without seqs for a rejected record: only the txn ids matter."""
    out: list[Outcome_] = []
    for raw in rec.txns:
        tid: tuple[str, int] | None
        try:
            t = decode_wire_txn(raw)
            tid = (t.client_id, t.client_seq)
        except (msgspec.DecodeError, ValueError):
            tid = None
        out.append((0, tid, C_MALFORMED, None, None, None))
    return tuple(out)


_MALFORMED_ENTRY: Final[tuple[Outcome_, ...]] = ((0, None, C_MALFORMED, None, None, None),)


def classify(
    epoch: int, next_seq: int, entry: WireRecord | WireEpoch | WireIntake
) -> tuple[str, str | None]:
    """The entry rules, on headers alone: ("record" | "epoch" | "rejected" | "malformed",
    detail). Shared by readers and by a writer recovering the ledger's end, so both
    always agree on which entries count."""
    if isinstance(entry, WireIntake):
        return "malformed", "an intake batch in a ledger"
    if isinstance(entry, WireEpoch):
        if entry.epoch <= epoch:
            return "rejected", f"epoch start {entry.epoch} is not above epoch {epoch}"
        return "epoch", None
    if entry.epoch != epoch:
        return "rejected", f"record of epoch {entry.epoch} while epoch {epoch} holds the ledger"
    if entry.first_seq < next_seq:
        # A resend of records already in the log (or a forgery): its seqs are taken.
        return "rejected", f"record first_seq {entry.first_seq} is below next seq {next_seq}"
    if entry.first_seq > next_seq:
        return "record", f"gap of {entry.first_seq - next_seq} seqs before this record"
    return "record", None


def process_entry(state: ValidatorState, data: bytes | memoryview) -> EntryResult:
    """Apply one ledger entry, whatever its bytes, to `state`. Never raises for content."""
    try:
        entry = decode_entry(data)
    except FormatError as exc:
        return EntryResult("malformed", _MALFORMED_ENTRY, detail=str(exc))
    kind, detail = classify(state.epoch, state.next_seq, entry)
    if kind == "malformed":
        return EntryResult(kind, _MALFORMED_ENTRY, detail=detail)
    assert not isinstance(entry, WireIntake)
    if isinstance(entry, WireEpoch):
        if kind == "epoch":
            state.epoch = entry.epoch
            state.writer_id = entry.writer_id
        return EntryResult(
            kind, epoch=entry.epoch, detail=detail, hlc=entry.hlc, writer_id=entry.writer_id
        )
    if kind == "rejected":
        return EntryResult(
            kind, _txn_ids(entry), epoch=entry.epoch, detail=detail, writer_id=entry.writer_id
        )
    state.next_seq = entry.first_seq
    outcomes, applied = validate_batch(state, entry.txns, entry.first_seq)
    return EntryResult(
        "record",
        tuple(outcomes),
        tuple(applied),
        epoch=entry.epoch,
        detail=detail,
        hlc=entry.hlc,
        writer_id=entry.writer_id,
    )


@attrs.define
class SequencerState:
    """What a writer must know of a ledger to append to it: the header-level part of
    the validator's state, plus the newest record's backend meta. Cheap to compute:
    transactions are counted, never decoded."""

    epoch: int = 0
    next_seq: int = 1
    hlc: int = 0
    meta: bytes = b""

    def advance(self, data: bytes | memoryview) -> str:
        """Apply one entry's header under the same rules as readers; returns its kind."""
        try:
            entry = decode_entry(data)
        except FormatError:
            return "malformed"
        kind, _ = classify(self.epoch, self.next_seq, entry)
        if isinstance(entry, WireIntake):
            return kind
        if kind == "epoch":
            self.epoch = entry.epoch
        elif kind == "record":
            assert isinstance(entry, WireRecord)
            self.next_seq = entry.first_seq + len(entry.txns)
            if entry.meta:
                # Only the last record of an append carries the intake offsets; keep the
                # newest ones even if that record were lost.
                self.meta = entry.meta
        if kind != "malformed":
            self.hlc = max(self.hlc, entry.hlc)
        return kind

    def to_bytes(self) -> bytes:
        return msgspec.msgpack.encode([self.epoch, self.next_seq, self.hlc, self.meta])

    @classmethod
    def from_bytes(cls, data: bytes) -> SequencerState:
        try:
            epoch, next_seq, hlc, meta = msgspec.msgpack.decode(data)
            return cls(int(epoch), int(next_seq), int(hlc), bytes(meta))
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            raise FormatError(f"corrupt sequencer state: {exc}") from exc


def _malformed_entry(detail: str) -> Decision:
    return Decision(None, None, Outcome.ABORTED, AbortReason.MALFORMED, detail=detail)


def writes_of(txn: WireTxn) -> list[tuple[str, Any]]:
    """(key, value) per write, value None for deletes (no tombstone values exist)."""
    return [(k, v if op == OP_PUT else None) for op, k, v in txn.writes]
