"""Typed errors. Every error ledgerlog raises on purpose derives from LedgerlogError,
so callers can catch the family, and the CLI can print one clear line for any of them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ledgerlog.model import Decision


class LedgerlogError(Exception):
    """Base class of every error ledgerlog raises deliberately."""


class ConfigError(LedgerlogError, ValueError):
    """A setting, URL or argument that cannot work (raised before any I/O is attempted)."""


class UsageError(LedgerlogError, RuntimeError):
    """The API was used in a way it does not support (e.g. a finished transaction reused)."""


class ClosedError(UsageError):
    """The object (client, reader, writer, backend) was already closed."""


class LedgerNotFoundError(LedgerlogError):
    """The ledger does not exist and the caller asked not to create it."""


class FormatError(LedgerlogError, ValueError):
    """Bytes that are not a well-formed ledgerlog record or transaction.

    Readers never raise this for ledger contents: they turn it into a deterministic
    "malformed" decision. It reaches callers only from explicit decode calls.
    """


class FencedError(LedgerlogError):
    """This writer lost its election: another writer holds the ledger, so appends are refused."""


class NotElectedError(LedgerlogError, TimeoutError):
    """Waiting to become the ledger's writer timed out."""


class BackendError(LedgerlogError):
    """The storage under the ledger failed (I/O error, broker unreachable, ...)."""


class TransactionError(LedgerlogError):
    """Base of the errors a transaction's outcome can raise."""


class TransactionAborted(TransactionError):
    """The transaction was validated and aborted; `.decision` says why."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.describe())
        self.decision = decision

    @property
    def retryable(self) -> bool:
        return self.decision.retryable


class ConflictError(TransactionAborted):
    """Aborted because a key it read was written after its read_version (retryable)."""


class CommitUnknownError(TransactionError, TimeoutError):
    """No decision was seen in time: the transaction may or may not commit.

    Retrying with the same transaction id is safe: the validator drops duplicates.
    """


class RetryLimitError(TransactionError):
    """`transactional` gave up after its retry limit; `.last` is the final abort."""

    def __init__(self, attempts: int, last: TransactionAborted) -> None:
        super().__init__(f"gave up after {attempts} attempts: {last}")
        self.attempts = attempts
        self.last = last


class HandlerError(LedgerlogError):
    """A HandlerView's function raised: the batch was not checkpointed, so the reader
    delivers it again. `.seq` is the transaction it raised on; the handler's own
    exception is ``__cause__``."""

    def __init__(self, view: str, seq: int, cause: BaseException) -> None:
        super().__init__(f"handler of view {view!r} failed at seq {seq}: {cause!r}")
        self.view = view
        self.seq = seq
