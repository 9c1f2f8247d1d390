"""What a view is: state materialized from committed transactions, exactly once.

Exactly once comes from one rule: a view stores the reader's :class:`Checkpoint` in the
same atomic step as the data it applies. After a crash the reader restarts from the
oldest checkpoint of its views and skips, per view, what that view already holds.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import attrs

from ledgerlog.codec import WireTxn
from ledgerlog.errors import UsageError
from ledgerlog.model import Position


@attrs.frozen
class Checkpoint:
    """Where a reader stands: enough to restart without reading from seq 1."""

    position: Position
    """Where the next ledger entry to read starts."""
    next_seq: int
    """The seq the next transaction will take (last applied + 1)."""
    digest: bytes
    """The state digest after seq ``next_seq - 1``."""
    validator_state: bytes
    """The reader's validator snapshot and the position it was taken at, opaque to views.
    Empty means "unchanged": a snapshot costs O(window), so readers take one only now
    and then, and a view keeps the last non-empty one (see :func:`carry_snapshot`)."""


Applied = Sequence[tuple[int, WireTxn]]
"""Committed transactions with their seqs, in seq order."""


def carry_snapshot(old: Checkpoint | None, new: Checkpoint) -> Checkpoint:
    """`new`, keeping `old`'s validator snapshot when `new` carries none."""
    # Once per applied batch: a plain constructor call (attrs.evolve introspects the
    # class each time), and none while neither carries a snapshot.
    if new.validator_state or old is None or not old.validator_state:
        return new
    return Checkpoint(new.position, new.next_seq, new.digest, old.validator_state)


def check_batch(name: str, applied: Applied, next_seq: int, checkpoint: Checkpoint) -> None:
    """Raise UsageError unless `applied` and `checkpoint` can follow a view at `next_seq`.

    Runs before anything is mutated, so a refused batch leaves the view untouched. Shared
    by every view: the rules are the interface's, not any one storage's.
    """
    if checkpoint.next_seq < next_seq:
        raise UsageError(
            f"view {name!r}: checkpoint next_seq {checkpoint.next_seq} is behind the "
            f"view's next_seq {next_seq} (a checkpoint must never move backwards)"
        )
    prev = next_seq - 1
    for seq, _txn in applied:
        if seq <= prev:
            if prev == next_seq - 1:
                raise UsageError(
                    f"view {name!r}: seq {seq} was already applied (view's next_seq is {next_seq})"
                )
            raise UsageError(f"view {name!r}: seqs not increasing ({seq} after {prev})")
        prev = seq
    if prev >= checkpoint.next_seq:
        raise UsageError(
            f"view {name!r}: seq {prev} is not below the checkpoint's next_seq "
            f"{checkpoint.next_seq}"
        )


class View(abc.ABC):
    """A consumer of committed transactions."""

    name: str = "view"

    wants_snapshots: bool = True
    """Whether checkpoints should carry the validator snapshot. A view whose data dies
    with its process (a client's in-memory replica) never restarts a reader from it, so it
    says False and spares its reader the O(window) snapshot, a pause of a few hundred
    milliseconds at the default window. A reader over such views alone restarts from
    the ledger's start, re-validating up to what they hold (nothing is applied twice)."""

    @abc.abstractmethod
    def checkpoint(self) -> Checkpoint | None:
        """The checkpoint stored with the view's data; None if it has applied nothing."""

    @abc.abstractmethod
    def apply(self, applied: Applied, checkpoint: Checkpoint) -> None:
        """Apply `applied` and store `checkpoint`, all or nothing.

        `applied` holds only transactions at seqs >= the view's own checkpoint's
        next_seq. It may be empty (the checkpoint still advances past aborts).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""
