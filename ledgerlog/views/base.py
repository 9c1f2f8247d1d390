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
    """``ValidatorState.snapshot()`` at this point."""


Applied = Sequence[tuple[int, WireTxn]]
"""Committed transactions with their seqs, in seq order."""


class View(abc.ABC):
    """A consumer of committed transactions."""

    name: str = "view"

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
