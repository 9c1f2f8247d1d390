"""The value classes of the vocabulary in DESIGN.md: transactions, records, decisions.

They are frozen attrs classes: safe to share between threads, hashable, comparable.
The validator works on the wire structs of :mod:`ledgerlog.codec` for speed; these are
what the public API hands out and takes in.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

import attrs

Key = str
"""Keys are strings; they order by code point, the same in every process."""


def _check_key(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{attr.name} must be a str key, not {type(value).__name__}")


def _check_keys(_inst: object, attr: attrs.Attribute[Any], value: tuple[object, ...]) -> None:
    for k in value:
        if not isinstance(k, str):
            raise TypeError(f"{attr.name} must hold str keys, not {type(k).__name__}")


def _key_tuple(v: Iterable[str]) -> tuple[str, ...]:
    return tuple(v)


def _range_tuple(v: Iterable[KeyRange]) -> tuple[KeyRange, ...]:
    out = tuple(v)
    for r in out:
        if not isinstance(r, KeyRange):
            raise TypeError(f"ranges must hold KeyRange objects, not {type(r).__name__}")
    return out


def _write_tuple(v: Iterable[Put | Delete]) -> tuple[Put | Delete, ...]:
    return tuple(v)


def _event_tuple(v: Iterable[Event]) -> tuple[Event, ...]:
    return tuple(v)


@attrs.frozen(order=True)
class TxnId:
    """Identifies a submission across retries: the validator commits each at most once."""

    client_id: str
    client_seq: int

    def __str__(self) -> str:
        return f"{self.client_id}/{self.client_seq}"


@attrs.frozen
class Put:
    key: Key = attrs.field(validator=_check_key)
    value: Any


@attrs.frozen
class Delete:
    key: Key = attrs.field(validator=_check_key)


@attrs.frozen
class Event:
    """An application event; committing it bumps the version of its conflict keys, so
    transactions that read any of them concurrently abort, but no key's value changes."""

    name: str
    payload: Any = None
    conflict_keys: tuple[Key, ...] = attrs.field(
        default=(), converter=_key_tuple, validator=_check_keys
    )


Write = Put | Delete


@attrs.frozen(order=True)
class KeyRange:
    """Half-open key interval [start, end); ``end=None`` means unbounded above."""

    start: Key = attrs.field(validator=_check_key)
    end: Key | None = None

    def __attrs_post_init__(self) -> None:
        if self.end is not None and self.end < self.start:
            raise ValueError(f"empty key range: end {self.end!r} < start {self.start!r}")

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.start <= key and (self.end is None or key < self.end)

    @classmethod
    def prefix(cls, prefix: str) -> KeyRange:
        """All keys starting with `prefix`."""
        # The end is the prefix with its last character incremented; characters already
        # at the top code point cannot be, so drop them (no end at all if all are).
        stem = prefix.rstrip(chr(0x10FFFF))
        if not stem:
            return cls(prefix, None)
        return cls(prefix, stem[:-1] + chr(ord(stem[-1]) + 1))


@attrs.frozen
class Transaction:
    """What a client submits: its snapshot seq, what it read, and what it writes."""

    txn_id: TxnId
    read_version: int
    reads: tuple[Key, ...] = attrs.field(default=(), converter=_key_tuple, validator=_check_keys)
    ranges: tuple[KeyRange, ...] = attrs.field(default=(), converter=_range_tuple)
    writes: tuple[Write, ...] = attrs.field(default=(), converter=_write_tuple)
    events: tuple[Event, ...] = attrs.field(default=(), converter=_event_tuple)
    valid_time: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.read_version < 0:
            raise ValueError("read_version must be >= 0")
        if self.txn_id.client_seq < 0:
            raise ValueError("client_seq must be >= 0")

    @property
    def is_blind(self) -> bool:
        """A transaction that read nothing cannot conflict: it always commits (once)."""
        return not self.reads and not self.ranges


class Outcome(enum.Enum):
    COMMITTED = "committed"
    ABORTED = "aborted"


class AbortReason(enum.Enum):
    CONFLICT = "conflict"
    """A key it read (or a key inside a range it read) was written in (read_version, seq)."""
    TOO_OLD = "too_old"
    """Its read_version fell out of the validator's window."""
    DUPLICATE = "duplicate"
    """Its txn_id already committed inside the window (a retried submission)."""
    STALE_EPOCH = "stale_epoch"
    """It came in a record of a writer that had already been replaced. Not final for the
    client: the intake still holds the submission and the new writer appends it again."""
    MALFORMED = "malformed"
    """Its bytes could not be decoded or break the format's rules."""


@attrs.frozen
class Decision:
    """The verdict every reader reaches for one transaction (or one undecodable entry)."""

    seq: int | None
    """Seq given to the transaction; None when the entry carrying it was rejected whole."""
    txn_id: TxnId | None
    outcome: Outcome
    reason: AbortReason | None = None
    conflict_key: Key | None = None
    conflict_seq: int | None = None
    detail: str | None = None

    @property
    def committed(self) -> bool:
        return self.outcome is Outcome.COMMITTED

    @property
    def final(self) -> bool:
        """False only for stale-epoch rejections, which the next writer supersedes."""
        return self.reason is not AbortReason.STALE_EPOCH

    @property
    def retryable(self) -> bool:
        return self.reason in (AbortReason.CONFLICT, AbortReason.TOO_OLD)

    def describe(self) -> str:
        who = f"txn {self.txn_id}" if self.txn_id else "entry"
        at = f" at seq {self.seq}" if self.seq is not None else ""
        if self.committed:
            return f"{who} committed{at}"
        text = f"{who} aborted{at}: {self.reason.value if self.reason else '?'}"
        if self.conflict_key is not None:
            text += f" on key {self.conflict_key!r} written at seq {self.conflict_seq}"
        if self.detail:
            text += f" ({self.detail})"
        return text


@attrs.frozen
class Record:
    """A batch of transactions as the writer appended it (decoded for inspection)."""

    epoch: int
    first_seq: int
    hlc: int
    writer_id: str
    transactions: tuple[Transaction | bytes, ...]
    """Each decoded transaction, or its raw bytes where it does not decode."""


@attrs.frozen
class EpochStart:
    """The marker a newly elected writer appends before its first record."""

    epoch: int
    writer_id: str
    hlc: int


@attrs.frozen
class Position:
    """Where an entry sits in a backend's log. Two integers cover every backend
    (file: segment and offset; Pulsar: ledger and entry id; BookKeeper: ledger index and
    entry id) and order the same way the log does."""

    major: int
    minor: int

    # Ordered by hand, not with attrs' order=True: readers compare positions a few
    # times per entry read, and attrs' generic comparison (a tuple of the fields built
    # through getattr, per operand) took ~4 us a time here, ten times these.
    def __lt__(self, other: Position) -> bool:
        if other.__class__ is not Position:
            return NotImplemented
        return (self.major, self.minor) < (other.major, other.minor)

    def __le__(self, other: Position) -> bool:
        if other.__class__ is not Position:
            return NotImplemented
        return (self.major, self.minor) <= (other.major, other.minor)

    def __gt__(self, other: Position) -> bool:
        if other.__class__ is not Position:
            return NotImplemented
        return (self.major, self.minor) > (other.major, other.minor)

    def __ge__(self, other: Position) -> bool:
        if other.__class__ is not Position:
            return NotImplemented
        return (self.major, self.minor) >= (other.major, other.minor)

    def __str__(self) -> str:
        return f"{self.major}:{self.minor}"

    @classmethod
    def parse(cls, text: str) -> Position:
        try:
            a, b = text.split(":")
            return cls(int(a), int(b))
        except ValueError:
            raise ValueError(f"not a position (want MAJOR:MINOR): {text!r}") from None


START = Position(0, 0)
"""The position before the first entry of any log."""
