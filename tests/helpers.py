"""Builders for ledger entries and transactions, shared by the validator and codec tests.

Everything here goes through the public codec, so a test that builds a record with these
helpers sees exactly the bytes a writer would append.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from ledgerlog import codec
from ledgerlog.model import Decision, Delete, Event, KeyRange, Put, Transaction, TxnId
from ledgerlog.validator import EntryResult, ValidatorState, process_entry

WRITER = "w1"


def txn(
    client: str = "c",
    cseq: int = 1,
    rv: int = 0,
    *,
    reads: Iterable[str] = (),
    ranges: Iterable[tuple[str, str | None] | KeyRange] = (),
    puts: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
    deletes: Iterable[str] = (),
    events: Iterable[Event] = (),
    valid_time: int | None = None,
) -> Transaction:
    """A Transaction; `ranges` may be (start, end) pairs, `puts` a mapping or pairs."""
    items = puts.items() if isinstance(puts, Mapping) else puts
    writes: list[Put | Delete] = [Put(k, v) for k, v in items]
    writes += [Delete(k) for k in deletes]
    return Transaction(
        txn_id=TxnId(client, cseq),
        read_version=rv,
        reads=tuple(reads),
        ranges=tuple(r if isinstance(r, KeyRange) else KeyRange(*r) for r in ranges),
        writes=tuple(writes),
        events=tuple(events),
        valid_time=valid_time,
    )


def raw(*args: Any, **kwargs: Any) -> bytes:
    """Encoded transaction bytes; same arguments as :func:`txn`."""
    return codec.encode_transaction(txn(*args, **kwargs))


def enc(t: Transaction | bytes) -> bytes:
    return t if isinstance(t, bytes) else codec.encode_transaction(t)


def wire_txn(
    client: str = "c",
    cseq: int = 1,
    rv: int = 0,
    reads: Sequence[str] = (),
    ranges: Sequence[tuple[str, str | None]] = (),
    writes: Sequence[tuple[int, str, Any]] = (),
    events: Sequence[tuple[str, Any, list[str]]] = (),
    valid_time: int | None = None,
) -> bytes:
    """Transaction bytes built straight from the wire struct, bypassing the model's
    checks: for transactions that break the format's rules (negative versions, empty
    ranges, unknown write ops)."""
    return msgspec.msgpack.encode(
        codec.WireTxn(
            client, cseq, rv, list(reads), list(ranges), list(writes), list(events), valid_time
        )
    )


def record(
    txns: Iterable[Transaction | bytes],
    first_seq: int,
    epoch: int = 1,
    *,
    hlc: int = 0,
    writer: str = WRITER,
    meta: bytes = b"",
) -> bytes:
    return codec.encode_record(epoch, first_seq, hlc, writer, [enc(t) for t in txns], meta)


def epoch_start(epoch: int, writer: str = WRITER, hlc: int = 0) -> bytes:
    return codec.encode_epoch(epoch, writer, hlc)


def wrap(
    kind: int,
    body: bytes,
    *,
    version: int = codec.FORMAT_VERSION,
    reserved: int = 0,
    magic: bytes = codec.MAGIC,
    crc: int | None = None,
) -> bytes:
    """An envelope around arbitrary body bytes (a correct CRC unless `crc` is given)."""
    if crc is None:
        crc = zlib.crc32(body)
    return struct.pack(">4sBBHI", magic, version, kind, reserved, crc) + body


def fresh(window: int = 100, epoch: int = 1) -> ValidatorState:
    """A validator state that has seen the epoch start of `epoch` (and nothing else)."""
    st = ValidatorState(window)
    if epoch:
        res = process_entry(st, epoch_start(epoch))
        assert res.kind == "epoch", res
    return st


class Driver:
    """Appends records the way a well-behaved writer would: current epoch, next seq."""

    def __init__(self, window: int = 100, epoch: int = 1) -> None:
        self.state = fresh(window, epoch)
        self.epoch = epoch
        self.results: list[EntryResult] = []

    @property
    def next_seq(self) -> int:
        return self.state.next_seq

    def feed(self, data: bytes) -> EntryResult:
        res = process_entry(self.state, data)
        self.results.append(res)
        return res

    def append(self, *txns: Transaction | bytes) -> list[Decision]:
        """One record holding `txns` at the next seq; returns their decisions."""
        res = self.feed(record(txns, self.state.next_seq, self.epoch))
        assert res.kind == "record", res
        return list(res.decisions)

    def one(self, t: Transaction | bytes) -> Decision:
        (d,) = self.append(t)
        return d

    def fill(self, n: int, client: str = "filler") -> None:
        """`n` blind transactions writing keys nobody reads (advances seqs)."""
        start = self.state.next_seq
        for i in range(n):
            d = self.one(txn(client, start + i, 0, puts={f"~fill/{start + i}": i}))
            assert d.committed, d


def rebatch(
    entries: Sequence[bytes], results: Sequence[EntryResult], sizes: Iterable[int]
) -> list[bytes]:
    """The same log with every accepted record split into records of the given sizes
    (cycled); other entries are kept as they are. Every transaction keeps its seq."""
    sizes = list(sizes) or [1]
    out: list[bytes] = []
    k = 0
    for data, res in zip(entries, results, strict=True):
        if res.kind != "record" or not res.outcomes:
            out.append(data)
            continue
        entry = codec.decode_entry(data)
        assert isinstance(entry, codec.WireRecord)
        raws = [bytes(r) for r in entry.txns]
        i = 0
        while i < len(raws):
            n = max(1, sizes[k % len(sizes)])
            k += 1
            out.append(
                codec.encode_record(
                    entry.epoch,
                    entry.first_seq + i,
                    entry.hlc,
                    entry.writer_id,
                    raws[i : i + n],
                    entry.meta,
                )
            )
            i += n
    return out
