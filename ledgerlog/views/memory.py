"""An in-memory key-value view: the fastest replica, and the model the others are tested
against.

Each key has a value and a version, the version being the seq of the last committed
write to it. A delete removes the key but leaves a tombstone (key -> seq of the delete)
for ``window`` seqs, so a client can still tell "deleted at seq S" from "never written"
while its read_version is young enough for the validator to accept it. Events change no
value and no version here: the validator alone tracks their conflict keys.

Thread-safety: :meth:`apply` and every read take one re-entrant lock, so a read never
sees half a batch. A single read is consistent on its own; to read several keys at the
same seq, run them inside :meth:`snapshot_read`, which holds the lock for the whole
callback (the lock is re-entrant, so the callback calls the ordinary read methods).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any, TypeVar

import structlog
from sortedcontainers import SortedDict, SortedList

from ledgerlog.codec import OP_PUT
from ledgerlog.errors import ConfigError, UsageError
from ledgerlog.validator import DEFAULT_WINDOW
from ledgerlog.views.base import Applied, Checkpoint, View, carry_snapshot, check_batch

__all__ = ["MemoryView"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

_ABSENT: Any = object()


class MemoryView(View):
    """Keys and values in memory, kept in key order for range reads."""

    def __init__(
        self, *, window: int = DEFAULT_WINDOW, name: str = "memory", snapshots: bool = True
    ) -> None:
        """`snapshots=False`: no reader will ever be restarted over this view (see
        :attr:`View.wants_snapshots`)."""
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ConfigError(f"window must be a positive int of seqs, not {window!r}")
        self.name = name
        self.window = window
        self.wants_snapshots = bool(snapshots)
        self._lock = threading.RLock()
        # Plain dicts plus a SortedList of their keys, rather than one SortedDict: the
        # SortedDict's __setitem__ is a Python-level call per write, while this way a
        # put to an existing key is a C-level membership test and store (measured about
        # 1.45x faster applies once keys exist). Deletes are rarer, so tombstones keep
        # the simpler SortedDict.
        # Values and versions in two dicts, not one dict of (value, version) tuples:
        # every put made a new tuple, which the cyclic GC tracks until a collection
        # looks at it, so a busy replica's first generation filled with them (and their
        # dict) and each collection walked ~100k of them (tens of ms with the GIL held).
        # With plain values (numbers, strings) neither dict is ever tracked.
        self._values: dict[str, Any] = {}
        self._versions: dict[str, int] = {}  # the same keys
        # The keys present in order, except the newest: keys that appear are only
        # appended to _new_keys, and merged into _keys by the first read that needs the
        # order (one sort of many keys is far cheaper than a SortedList.add each, and a
        # view that is never range-read never pays). See _sorted_keys.
        self._keys = SortedList()
        self._new_keys: list[str] = []
        self._tombs: SortedDict = SortedDict()  # key -> seq of its latest delete
        # (seq, key) per delete in seq order, so pruning never scans the map. A put
        # after a delete leaves the tombstone in place: versions come from _versions first,
        # and the newer put outranks it in max_version_in_range, so it is only dead
        # weight until the window prunes it, which is cheaper than a lookup per put.
        self._tomb_log: deque[tuple[int, str]] = deque()
        self._checkpoint: Checkpoint | None = None
        self._next_seq = 1

    # -- View ------------------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint | None:
        return self._checkpoint

    def apply(self, applied: Applied, checkpoint: Checkpoint) -> None:
        with self._lock:
            check_batch(self.name, applied, self._next_seq, checkpoint)
            # The hot path: locals only, one dict store per put (a key is new iff the
            # store grew the dict); SortedList is only called when a key disappears.
            values = self._values
            versions = self._versions
            new_keys = self._new_keys
            new_key = new_keys.append
            tombs = self._tombs
            tomb_append = self._tomb_log.append
            put = OP_PUT
            n = len(versions)
            for seq, txn in applied:
                for op, key, value in txn.writes:
                    if op == put:
                        # The version before the value: a lock-free lookup (see lookup)
                        # reads the value first, so a new value comes with its version.
                        versions[key] = seq
                        values[key] = value
                        if len(versions) != n:
                            n += 1
                            new_key(key)
                    else:
                        # The tombstone first: a lock-free lookup (see lookup) must never
                        # see the key gone without the delete's seq.
                        tombs[key] = seq
                        tomb_append((seq, key))
                        if key in versions:
                            del values[key]
                            del versions[key]
                            n -= 1
                            if new_keys:
                                self._sorted_keys()
                            self._keys.remove(key)
            self._checkpoint = carry_snapshot(self._checkpoint, checkpoint)
            self._next_seq = checkpoint.next_seq
            self._prune(checkpoint.next_seq - 1 - self.window)

    def _sorted_keys(self) -> SortedList:
        """The keys present, in order (call with the lock held)."""
        if self._new_keys:
            self._keys.update(self._new_keys)
            self._new_keys.clear()
        return self._keys

    def _prune(self, cutoff: int) -> None:
        tomb_log = self._tomb_log
        tombs = self._tombs
        while tomb_log and tomb_log[0][0] <= cutoff:
            seq, key = tomb_log.popleft()
            if tombs.get(key) == seq:
                del tombs[key]

    # -- reads -----------------------------------------------------------------------------

    @property
    def applied_seq(self) -> int:
        """The seq the view's contents are consistent at (0 before anything is applied)."""
        return self._next_seq - 1

    def snapshot_read(self, fn: Callable[[MemoryView], T]) -> T:
        """Run ``fn(self)`` with no batch applied meanwhile; return what it returns.

        Inside `fn`, every read (and :attr:`applied_seq`) sees the same seq. Keep `fn`
        short: the reader's apply waits for it.
        """
        with self._lock:
            return fn(self)

    def get(self, key: str) -> Any | None:
        """The key's value, or None if it is absent."""
        with self._lock:
            return self._values.get(key)

    def get_versioned(self, key: str) -> tuple[Any, int] | None:
        """``(value, version)``, or None if the key is absent."""
        with self._lock:
            version = self._versions.get(key)
            return None if version is None else (self._values[key], version)

    def lookup(self, key: str) -> tuple[bool, Any, int]:
        """``(present, value, version)``: a present key's value and version, or for an
        absent one ``(False, None, seq of its delete or 0)``; without taking the lock, for
        the client's read path.

        Safe without the lock because versions only grow and :meth:`apply` stores a put's
        version before its value and a delete's tombstone before removing the key, while
        this reads the value first: a value comes with its own version or a newer one,
        and a key changing between the two reads shows that change's seq. A reader that
        checks the version against its read_version therefore either sees the value as
        of that read_version or a version above it (and aborts). See
        :class:`ledgerlog.client.Tx`.
        """
        value = self._values.get(key, _ABSENT)
        version = self._versions.get(key)
        if value is not _ABSENT and version is not None:
            return True, value, version
        return False, None, max(version or 0, self._tombs.get(key, 0))

    def version(self, key: str) -> int:
        """Seq of the key's last put or delete; 0 if never written, or if it was deleted
        longer than ``window`` seqs ago (its tombstone is gone)."""
        with self._lock:
            version = self._versions.get(key)
            if version is not None:
                return version
            return int(self._tombs.get(key, 0))

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._versions

    def range(
        self, start: str, end: str | None = None, limit: int | None = None
    ) -> list[tuple[str, Any]]:
        """``(key, value)`` for keys in [start, end) in key order, at most `limit` of them."""
        with self._lock:
            values = self._values
            return [(k, values[k]) for k in self._keys_in(start, end, limit)]

    def range_versioned(
        self, start: str, end: str | None = None, limit: int | None = None
    ) -> list[tuple[str, Any, int]]:
        """``(key, value, version)`` for keys in [start, end), like :meth:`range`."""
        with self._lock:
            values = self._values
            versions = self._versions
            return [(k, values[k], versions[k]) for k in self._keys_in(start, end, limit)]

    def max_version_in_range(self, start: str, end: str | None = None) -> int:
        """Highest seq of any put or delete of a key in [start, end); 0 if none is known.

        Lets a client see early that a range it read has changed since its read_version.
        A hint, not a verdict: deletes older than ``window`` are forgotten (such a
        read_version aborts as too old anyway) and events are not counted; the validator
        decides. Costs a scan of the range.
        """
        if end is not None and end <= start:
            return 0
        with self._lock:
            versions = self._versions
            best = 0
            for k in self._sorted_keys().irange(start, end, inclusive=(True, False)):
                version = versions[k]
                if version > best:
                    best = version
            for k in self._tombs.irange(start, end, inclusive=(True, False)):
                seq = self._tombs[k]
                if seq > best:
                    best = seq
            return best

    def items(self) -> list[tuple[str, Any]]:
        """Every ``(key, value)`` in key order."""
        with self._lock:
            values = self._values
            return [(k, values[k]) for k in self._sorted_keys()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._versions)

    def tombstones(self) -> dict[str, int]:
        """Deleted keys still remembered, with the seq of their delete (for tests, tools)."""
        with self._lock:
            versions = self._versions
            return {k: s for k, s in self._tombs.items() if k not in versions}

    # -- helpers ---------------------------------------------------------------------------

    def _keys_in(self, start: str, end: str | None, limit: int | None) -> Iterable[str]:
        if limit is not None and limit < 0:
            raise UsageError(f"limit must be >= 0, not {limit}")
        if end is not None and end <= start:
            return []
        keys: Iterable[str] = self._sorted_keys().irange(start, end, inclusive=(True, False))
        return keys if limit is None else islice(keys, limit)
