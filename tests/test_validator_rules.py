"""One test (or a few) per decision rule of ledgerlog.validator (see its module docstring)."""

from __future__ import annotations

import random
import struct
import zlib

import msgspec
import pytest
from helpers import Driver, epoch_start, fresh, raw, record, txn, wire_txn, wrap

from ledgerlog import codec
from ledgerlog.errors import ConfigError, FormatError
from ledgerlog.model import AbortReason, Event, Outcome, TxnId
from ledgerlog.validator import (
    SequencerState,
    ValidatorState,
    process_entry,
    to_decision,
    validate,
    validate_batch,
)

# -- commit and conflict -------------------------------------------------------------------


def test_read_write_transaction_commits() -> None:
    d = Driver()
    first = d.one(txn("c", 1, 0, reads=["a"], puts={"a": 1}))
    assert first.committed and first.outcome is Outcome.COMMITTED
    assert (first.seq, first.txn_id, first.reason) == (1, TxnId("c", 1), None)
    assert first.conflict_key is None and first.conflict_seq is None and first.final
    # Reading at the seq that wrote it sees the write: no conflict.
    second = d.one(txn("c", 2, 1, reads=["a"], ranges=[("a", "b")], puts={"a": 2}))
    assert second.committed and second.seq == 2
    assert d.next_seq == 3


def test_point_read_conflict_reports_key_and_seq() -> None:
    d = Driver()
    assert d.one(txn("w", 1, 0, puts={"a": 1})).committed  # seq 1
    assert d.one(txn("w", 2, 0, puts={"b": 1})).committed  # seq 2
    dec = d.one(txn("r", 1, 0, reads=["x", "a"], puts={"y": 1}))  # seq 3, read at 0
    assert not dec.committed
    assert dec.outcome is Outcome.ABORTED and dec.reason is AbortReason.CONFLICT
    assert (dec.seq, dec.conflict_key, dec.conflict_seq) == (3, "a", 1)
    assert dec.retryable and dec.final
    assert "'a'" in dec.describe() and "seq 1" in dec.describe()
    # The first conflicting read in the transaction's own order is the one reported.
    dec = d.one(txn("r", 2, 0, reads=["b", "a"]))
    assert (dec.reason, dec.conflict_key, dec.conflict_seq) == (AbortReason.CONFLICT, "b", 2)
    # The aborted transaction's write of "y" is not applied.
    assert d.one(txn("r", 3, 3, reads=["y"])).committed


def test_read_at_the_write_seq_or_later_does_not_conflict() -> None:
    d = Driver()
    d.one(txn("w", 1, 0, puts={"a": 1}))  # seq 1
    d.fill(3)  # seqs 2..4
    for rv in (1, 2, 4):
        dec = d.one(txn("r", rv, rv, reads=["a"]))
        assert dec.committed, (rv, dec)
    # ... but one seq earlier does.
    dec = d.one(txn("r", 99, 0, reads=["a"]))
    assert (dec.reason, dec.conflict_key, dec.conflict_seq) == (AbortReason.CONFLICT, "a", 1)


def test_latest_write_is_the_one_reported() -> None:
    d = Driver()
    d.one(txn("w", 1, 0, puts={"a": 1}))  # seq 1
    d.one(txn("w", 2, 0, puts={"a": 2}))  # seq 2
    dec = d.one(txn("r", 1, 0, reads=["a"]))
    assert (dec.conflict_key, dec.conflict_seq) == ("a", 2)
    # Written at 1 and 2, read at 1: still a conflict (the write at 2 is after R).
    dec = d.one(txn("r", 2, 1, reads=["a"]))
    assert (dec.conflict_key, dec.conflict_seq) == ("a", 2)


# -- ranges --------------------------------------------------------------------------------


@pytest.fixture
def ranged() -> Driver:
    d = Driver()
    d.one(txn("w", 1, 0, puts={"m": 1}))  # seq 1
    d.one(txn("w", 2, 0, puts={"c": 1}))  # seq 2
    d.one(txn("w", 3, 0, puts={"z": 1}, deletes=["e"]))  # seq 3
    return d


@pytest.mark.parametrize(
    ("start", "end", "rv", "expected"),
    [
        ("a", None, 0, ("c", 2)),  # unbounded end, smallest conflicting key
        ("a", "c", 0, None),  # end is exclusive
        ("c", "c\x00", 0, ("c", 2)),  # start is inclusive
        ("d", "f", 0, ("e", 3)),  # a delete is a write
        ("d", "m", 0, ("e", 3)),
        ("n", None, 0, ("z", 3)),
        ("n", "z", 0, None),
        ("", None, 2, ("e", 3)),  # c (seq 2) is not after R=2; e is
        ("", None, 3, None),
        ("c", "c", 0, None),  # an empty range reads nothing
    ],
)
def test_range_conflicts(
    ranged: Driver, start: str, end: str | None, rv: int, expected: tuple[str, int] | None
) -> None:
    dec = ranged.one(txn("r", 1, rv, ranges=[(start, end)]))
    if expected is None:
        assert dec.committed, dec
    else:
        assert dec.reason is AbortReason.CONFLICT
        assert (dec.conflict_key, dec.conflict_seq) == expected


def test_range_reports_smallest_conflicting_key_not_smallest_written_key() -> None:
    d = Driver()
    d.one(txn("w", 1, 0, puts={"b": 1}))  # seq 1
    d.one(txn("w", 2, 0, puts={"y": 1}))  # seq 2
    d.one(txn("w", 3, 0, puts={"k": 1}))  # seq 3
    dec = d.one(txn("r", 1, 1, ranges=[("a", None)]))  # b at seq 1 is not after R=1
    assert (dec.conflict_key, dec.conflict_seq) == ("k", 3)
    # First range (in the transaction's order) that conflicts wins; point reads first.
    dec = d.one(txn("r", 2, 1, ranges=[("x", None), ("a", None)]))
    assert (dec.conflict_key, dec.conflict_seq) == ("y", 2)
    dec = d.one(txn("r", 3, 1, reads=["y"], ranges=[("a", "z")]))
    assert (dec.conflict_key, dec.conflict_seq) == ("y", 2)


def test_range_index_follows_writes_and_pruning() -> None:
    """The sorted index behind range reads must see keys written after it was built and
    forget keys that left the window, exactly like the point-read dictionary."""
    d = Driver(window=3)
    assert d.one(txn("r", 0, 0, ranges=[("a", None)])).committed  # builds the index
    d.one(txn("w", 1, 0, puts={"p": 1}))  # seq 2, added to the index
    dec = d.one(txn("r", 1, 1, ranges=[("a", None)]))
    assert (dec.conflict_key, dec.conflict_seq) == ("p", 2)
    d.fill(5)
    d.one(txn("w", 2, 0, puts={"p": 2}))  # p rewritten after being pruned
    seq = d.next_seq - 1
    dec = d.one(txn("r", 2, seq - 1, ranges=[("p", "q")]))
    assert (dec.conflict_key, dec.conflict_seq) == ("p", seq)


def test_read_of_key_written_by_aborted_txn_does_not_conflict() -> None:
    d = Driver()
    d.one(txn("w", 1, 0, puts={"a": 1}))  # seq 1
    loser = d.one(
        txn("x", 1, 0, reads=["a"], puts={"b": 1}, deletes=["d"], events=[Event("e", None, ["ev"])])
    )  # seq 2
    assert loser.reason is AbortReason.CONFLICT
    for i, t in enumerate(
        [
            txn("r", 1, 1, reads=["b"]),
            txn("r", 2, 1, reads=["d", "ev"]),
            txn("r", 3, 1, ranges=[("b", None)]),
        ]
    ):
        assert d.one(t).committed, i


def test_events_conflict_keys_conflict_with_readers() -> None:
    d = Driver()
    ev = Event("transfer", {"amount": 5}, ("acct/1", "acct/2"))
    assert d.one(txn("e", 1, 0, events=[ev])).committed  # seq 1
    dec = d.one(txn("r", 1, 0, reads=["acct/2"]))
    assert (dec.reason, dec.conflict_key, dec.conflict_seq) == (AbortReason.CONFLICT, "acct/2", 1)
    dec = d.one(txn("r", 2, 0, ranges=[("acct/", "acct0")]))
    assert (dec.conflict_key, dec.conflict_seq) == ("acct/1", 1)
    assert d.one(txn("r", 3, 0, reads=["acct/3", "transfer"])).committed
    assert d.one(txn("r", 4, 1, reads=["acct/1"])).committed


# -- blind writes, duplicates, too old -----------------------------------------------------


def test_blind_writes_always_commit_even_with_ancient_read_version() -> None:
    d = Driver(window=2)
    d.one(txn("w", 1, 0, puts={"a": 1}))
    d.fill(10)
    for i, t in enumerate(
        [
            txn("b", 1, 0, puts={"a": 2}),
            txn("b", 2, 0, deletes=["a"]),
            txn("b", 3, 0, events=[Event("e", 1, ["a"])]),
            txn("b", 4, 0),  # no writes at all
        ]
    ):
        dec = d.one(t)
        assert dec.committed, (i, dec)


def test_duplicate_inside_window_carries_original_seq() -> None:
    d = Driver(window=10)
    d.fill(1)
    orig = d.one(txn("c", 7, 0, reads=["a"], puts={"a": 1}))  # seq 2
    assert orig.committed and orig.seq == 2
    d.fill(3)
    # A retry with the same id (even with other content) is a duplicate.
    dup = d.one(txn("c", 7, 5, reads=["q"], puts={"dup": 1}))
    assert (dup.reason, dup.conflict_seq, dup.seq, dup.txn_id) == (
        AbortReason.DUPLICATE,
        2,
        6,
        TxnId("c", 7),
    )
    assert dup.final and not dup.retryable and dup.conflict_key is None
    # Its writes were not applied.
    assert d.one(txn("r", 1, 6, reads=["dup"])).committed
    # Blind duplicates too, and duplicates inside one record.
    decs = d.append(txn("d", 1, 0, puts={"x": 1}), txn("d", 1, 0, puts={"x": 2}), txn("c", 7, 0))
    assert decs[0].committed
    assert (decs[1].reason, decs[1].conflict_seq) == (AbortReason.DUPLICATE, decs[0].seq)
    assert (decs[2].reason, decs[2].conflict_seq) == (AbortReason.DUPLICATE, 2)
    # Same client, other client_seq; other client, same client_seq: not duplicates.
    assert d.one(txn("c", 8, 0)).committed
    assert d.one(txn("other", 7, 0)).committed


def test_aborted_txn_id_can_commit_on_retry() -> None:
    d = Driver()
    d.one(txn("w", 1, 0, puts={"a": 1}))
    assert d.one(txn("c", 1, 0, reads=["a"])).reason is AbortReason.CONFLICT
    assert d.one(txn("c", 1, 2, reads=["a"])).committed
    assert d.one(txn("c", 1, 3, reads=["a"])).reason is AbortReason.DUPLICATE


def test_retried_duplicate_after_window_is_too_old_if_it_read() -> None:
    window = 3
    d = Driver(window=window)
    orig = d.one(txn("c", 7, 0, reads=["a"], puts={"a": 1}))  # seq 1
    assert orig.committed
    d.fill(window + 2)
    retry = d.one(txn("c", 7, 0, reads=["a"], puts={"a": 1}))
    assert retry.reason is AbortReason.TOO_OLD, retry
    assert retry.retryable and "window" in (retry.detail or "")
    # Blind, it is not a duplicate any more (the window bounds at-most-once).
    assert d.one(txn("c", 7, 0, puts={"a": 1})).committed


@pytest.mark.parametrize("window", [1, 2, 5, 17])
def test_too_old_boundary(window: int) -> None:
    d = Driver(window=window)
    d.fill(window + 4)
    S = d.next_seq
    ok = d.state.fork()
    dec, _ = validate(ok, raw("r", 1, S - 1 - window, reads=["nobody"]), S)
    assert dec.committed, dec
    old = d.state.fork()
    dec, _ = validate(old, raw("r", 1, S - 2 - window, reads=["nobody"]), S)
    assert dec.reason is AbortReason.TOO_OLD
    assert (dec.conflict_key, dec.conflict_seq) == (None, None)
    # Range reads count as reads.
    dec, _ = validate(d.state.fork(), raw("r", 1, S - 2 - window, ranges=[("x", "y")]), S)
    assert dec.reason is AbortReason.TOO_OLD


@pytest.mark.parametrize("window", [1, 2, 5])
def test_oldest_allowed_read_version_still_sees_every_later_write(window: int) -> None:
    """At R = S-1-window the write at seq R+1 must still be known (not pruned)."""
    d = Driver(window=window)
    d.fill(window + 2)
    d.one(txn("w", 1, 0, puts={"k": 1}))  # seq R+1
    d.fill(window - 1)
    S = d.next_seq
    R = S - 1 - window
    dec, _ = validate(d.state.fork(), raw("r", 1, R, reads=["k"]), S)
    assert (dec.reason, dec.conflict_key, dec.conflict_seq) == (AbortReason.CONFLICT, "k", R + 1)
    dec, _ = validate(d.state.fork(), raw("r", 1, R, ranges=[("a", None)]), S)
    assert (dec.reason, dec.conflict_key, dec.conflict_seq) == (AbortReason.CONFLICT, "k", R + 1)


# -- malformed transactions ---------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 1, 5])
def test_read_version_at_or_after_seq_is_malformed(offset: int) -> None:
    d = Driver()
    d.fill(2)
    S = d.next_seq
    dec = d.one(txn("c", 1, S + offset, puts={"a": 1}))  # blind, still malformed
    assert (dec.seq, dec.txn_id, dec.reason) == (S, TxnId("c", 1), AbortReason.MALFORMED)
    assert not dec.retryable and dec.final
    assert d.next_seq == S + 1  # it consumed its seq
    assert d.one(txn("r", 1, 0, reads=["a"])).committed  # its write was not applied


def test_undecodable_txn_inside_record_is_malformed_at_its_seq() -> None:
    d = Driver()
    d.fill(1)
    good = [txn("g", i, 0, puts={f"g{i}": i}) for i in range(5)]
    bad = [
        msgspec.msgpack.encode("not a transaction"),
        msgspec.msgpack.encode([1, 2, 3]),
        wire_txn("b", 1, 0, ranges=[("z", "a")]),  # empty range
        wire_txn("b", 2, -1),  # negative read_version
        wire_txn("b", 3, 0, writes=[(9, "k", None)]),  # unknown write op
        wire_txn("b", 4, 0, reads=["k"], valid_time=None) + b"",
    ]
    bad[-1] = msgspec.msgpack.encode([*msgspec.msgpack.decode(bad[-1]), "extra", "fields"])
    items = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], bad[4], good[3]]
    decs = d.append(*items)
    assert [x.seq for x in decs] == list(range(2, 2 + len(items)))
    malformed = {i for i, x in enumerate(decs) if x.reason is AbortReason.MALFORMED}
    assert malformed == {1, 3, 4, 6, 7}
    assert all(decs[i].committed for i in (0, 2, 5, 8))
    assert decs[1].txn_id is None and decs[3].txn_id is None
    assert decs[4].txn_id == TxnId("b", 1) and "range" in (decs[4].detail or "")
    assert decs[7].txn_id == TxnId("b", 3) and "op" in (decs[7].detail or "")
    assert d.next_seq == 2 + len(items)


def _whole_entry_damage() -> dict[str, bytes]:
    good = record([txn("c", 1, 0, puts={"a": 1})], 1)
    rng = random.Random(7)
    return {
        "empty": b"",
        "random": bytes(rng.randrange(256) for _ in range(64)),
        "bad magic": b"XXXX" + good[4:],
        "bad crc": good[:8] + struct.pack(">I", zlib.crc32(good[12:]) ^ 1) + good[12:],
        "flipped body bit": good[:-1] + bytes([good[-1] ^ 0x40]),
        "unknown version": good[:4] + b"\x02" + good[5:],
        "unknown kind": good[:5] + b"\x07" + good[6:],
        "reserved bits": good[:6] + b"\x00\x01" + good[8:],
        "truncated": good[:-3],
        "header only": good[:12],
        "short": good[:5],
        "garbage body, good crc": wrap(codec.KIND_RECORD, b"\xc1\xc1"),
        "wrong shape, good crc": wrap(codec.KIND_RECORD, msgspec.msgpack.encode({"a": 1})),
        "epoch 0 record": wrap(codec.KIND_RECORD, msgspec.msgpack.encode([0, 1, 0, "w", []])),
        "seq 0 record": wrap(codec.KIND_RECORD, msgspec.msgpack.encode([1, 0, 0, "w", []])),
        "intake batch": codec.encode_intake([raw("c", 1, 0)]),
        "epoch start 0": wrap(codec.KIND_EPOCH, msgspec.msgpack.encode([0, "w", 0])),
    }


@pytest.mark.parametrize("name", sorted(_whole_entry_damage()))
def test_undecodable_entry_is_one_malformed_decision_and_changes_nothing(name: str) -> None:
    data = _whole_entry_damage()[name]
    d = Driver()
    d.one(txn("c", 1, 0, reads=["a"], puts={"a": 1}))
    before = d.state.snapshot()
    res = process_entry(d.state, data)
    assert res.kind == "malformed"
    assert res.committed == () and res.seqs == range(0)
    (dec,) = res.decisions
    assert (dec.seq, dec.txn_id, dec.outcome, dec.reason) == (
        None,
        None,
        Outcome.ABORTED,
        AbortReason.MALFORMED,
    )
    assert dec.detail
    assert d.state.snapshot() == before
    seqs = SequencerState(epoch=1, next_seq=2)
    assert seqs.advance(data) == "malformed" and (seqs.epoch, seqs.next_seq) == (1, 2)
    # The reader goes on as if the entry were not there.
    assert d.one(txn("c", 2, 1, reads=["a"])).seq == 2


# -- epochs and seqs ---------------------------------------------------------------------


def test_epoch_start_must_be_above_current() -> None:
    st = ValidatorState(10)
    assert st.epoch == 0
    assert process_entry(st, epoch_start(2, "w2")).kind == "epoch"
    assert (st.epoch, st.writer_id) == (2, "w2")
    before = st.snapshot()
    for e in (1, 2):
        res = process_entry(st, epoch_start(e, "old"))
        assert res.kind == "rejected" and res.decisions == ()
        assert "not above" in (res.detail or "")
        assert st.snapshot() == before
    assert process_entry(st, epoch_start(5, "w5")).kind == "epoch"  # jumps are fine
    assert (st.epoch, st.writer_id) == (5, "w5")


def test_record_of_older_epoch_is_rejected_stale_epoch() -> None:
    d = Driver(epoch=1)
    d.one(txn("c", 1, 0, puts={"a": 1}))
    d.feed(epoch_start(2, "w2"))
    before = d.state.snapshot()
    stale = record(
        [txn("s", 1, 0, puts={"a": 9}), b"\x93\x01\x02\x03", txn("s", 2, 1)], d.next_seq, epoch=1
    )
    res = process_entry(d.state, stale)
    assert res.kind == "rejected" and res.committed == () and res.seqs == range(0)
    assert [x.txn_id for x in res.decisions] == [TxnId("s", 1), None, TxnId("s", 2)]
    for x in res.decisions:
        assert (x.seq, x.outcome, x.reason) == (None, Outcome.ABORTED, AbortReason.STALE_EPOCH)
        assert not x.final and not x.committed
    assert d.state.snapshot() == before
    # The new writer appends at the same seq.
    d.epoch = 2
    assert d.one(txn("s", 1, 1, reads=["a"])).seq == 2


def test_record_of_newer_epoch_without_epoch_start_is_rejected() -> None:
    d = Driver(epoch=1)
    before = d.state.snapshot()
    res = process_entry(d.state, record([txn("c", 1, 0)], 1, epoch=2))
    assert res.kind == "rejected"
    assert [x.reason for x in res.decisions] == [AbortReason.STALE_EPOCH]
    assert d.state.snapshot() == before
    # Nor before any epoch start at all.
    st = ValidatorState(10)
    assert process_entry(st, record([txn("c", 1, 0)], 1, epoch=1)).kind == "rejected"
    assert st.next_seq == 1


def test_resent_record_below_next_seq_is_rejected() -> None:
    d = Driver()
    rec1 = record([txn("c", 1, 0, puts={"a": 1}), txn("c", 2, 0, puts={"b": 1})], 1)
    assert d.feed(rec1).kind == "record"
    before = d.state.snapshot()
    for data in (rec1, record([txn("c", 3, 0)], 2), record([txn("c", 3, 0)], 1)):
        res = process_entry(d.state, data)
        assert res.kind == "rejected" and "below next seq" in (res.detail or "")
        assert all(x.reason is AbortReason.STALE_EPOCH for x in res.decisions)
        assert d.state.snapshot() == before
    assert d.one(txn("c", 3, 2, reads=["a"])).seq == 3


def test_gap_is_accepted() -> None:
    d = Driver()
    d.one(txn("c", 1, 0, puts={"a": 1}))  # seq 1
    res = d.feed(record([txn("c", 2, 1, reads=["a"], puts={"a": 2}), txn("c", 3, 0)], 5))
    assert res.kind == "record" and "gap of 3" in (res.detail or "")
    assert res.seqs == range(5, 7)
    assert [x.seq for x in res.decisions] == [5, 6]
    assert all(x.committed for x in res.decisions)
    assert d.next_seq == 7
    # Read versions inside the gap are fine.
    dec = d.one(txn("r", 1, 3, reads=["a"]))
    assert (dec.conflict_key, dec.conflict_seq) == ("a", 5)


# -- equivalences ------------------------------------------------------------------------


def _mixed_raws(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    keys = [f"k{i}" for i in range(6)]
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.08:
            out.append(msgspec.msgpack.encode(["junk", i]))
            continue
        rv = max(0, i - rng.randrange(0, 8)) if r > 0.12 else i + 1 + rng.randrange(3)
        client = f"c{rng.randrange(3)}"
        cseq = rng.randrange(8)
        out.append(
            raw(
                client,
                cseq,
                rv,
                reads=rng.sample(keys, rng.randrange(3)),
                ranges=[("k3", None)] if rng.random() < 0.2 else [],
                puts={k: i for k in rng.sample(keys, rng.randrange(3))},
                events=[Event("e", None, [rng.choice(keys)])] if rng.random() < 0.1 else [],
            )
        )
    return out


@pytest.mark.parametrize("seed", range(4))
def test_validate_validate_batch_and_process_entry_agree(seed: int) -> None:
    raws = _mixed_raws(120, seed)
    window = 5

    # 1. one record through process_entry
    a = fresh(window)
    res = process_entry(a, record(raws, 1))
    by_entry = list(res.decisions)

    # 2. validate() one at a time, digest after each seq
    b = fresh(window)
    one_by_one = []
    digests = {}
    for i, r in enumerate(raws, start=1):
        dec, applied = validate(b, r, i)
        assert (applied is not None) == dec.committed
        one_by_one.append(dec)
        digests[i] = b.digest

    # 3. validate_batch in random chunks
    c = fresh(window)
    rng = random.Random(seed)
    batched = []
    i = 0
    while i < len(raws):
        n = rng.randint(1, 9)
        outcomes, applied = validate_batch(c, raws[i : i + n], i + 1)
        assert [s for s, _ in applied] == [o[0] for o in outcomes if o[2] == 0]
        batched.extend(to_decision(o) for o in outcomes)
        i += n
        assert c.digest == digests[i if i <= len(raws) else len(raws)]

    assert by_entry == one_by_one == batched
    assert a.digest == b.digest == c.digest == digests[len(raws)]
    assert a.next_seq == b.next_seq == c.next_seq == len(raws) + 1
    assert {x.reason for x in by_entry} >= {
        None,
        AbortReason.CONFLICT,
        AbortReason.MALFORMED,
        AbortReason.DUPLICATE,
        AbortReason.TOO_OLD,
    }


def test_validate_batch_requires_next_seq() -> None:
    st = fresh()
    with pytest.raises(ValueError, match="expects 1"):
        validate_batch(st, [raw()], 2)
    with pytest.raises(ValueError):
        validate(st, raw(), 0)


@pytest.mark.parametrize("seed", range(3))
def test_snapshot_restore_round_trip_gives_identical_future(seed: int) -> None:
    raws = _mixed_raws(200, seed + 10)
    window = 7
    a = fresh(window)
    cut = 90
    for i in range(0, cut, 6):
        process_entry(a, record(raws[i : i + 6], i + 1))
    snap = a.snapshot()
    b = ValidatorState.restore(snap)
    assert b.snapshot() == snap
    assert (b.window, b.epoch, b.writer_id, b.next_seq, b.digest) == (
        a.window,
        a.epoch,
        a.writer_id,
        a.next_seq,
        a.digest,
    )
    assert b.size() == a.size()
    c = a.fork()
    for i in range(cut, len(raws), 4):
        data = record(raws[i : i + 4], i + 1)
        ra, rb, rc = (process_entry(s, data) for s in (a, b, c))
        assert ra == rb == rc
        assert a.digest == b.digest == c.digest
    assert a.snapshot() == b.snapshot() == c.snapshot()
    # A snapshot taken before any range read restores without the index; the same
    # range reads still decide the same.
    d = ValidatorState.restore(snap)
    e = ValidatorState.restore(snap)
    process_entry(e, record([txn("x", 1, cut - 2, ranges=[("", None)])], cut + 1))
    process_entry(d, record([txn("x", 1, cut - 2, ranges=[("", None)])], cut + 1))
    assert d.snapshot() == e.snapshot()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        msgspec.msgpack.encode([2, 1]),
        msgspec.msgpack.encode([1, 10, 1, "w", 1, b"", [], "x"]),
    ],
)
def test_restore_rejects_garbage(data: bytes) -> None:
    with pytest.raises(FormatError):
        ValidatorState.restore(data)


@pytest.mark.parametrize("window", [0, -1, 1.5, "10", None])
def test_window_must_be_positive(window: object) -> None:
    with pytest.raises(ConfigError, match="window"):
        ValidatorState(window)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ValidatorState(window)  # type: ignore[arg-type]


# -- bounded memory ------------------------------------------------------------------------


def test_state_stays_bounded_by_the_window() -> None:
    window = 1_000
    d = Driver(window=window)
    n, per_record = 50_000, 50
    peak = 0
    for start in range(1, n + 1, per_record):
        txns = []
        for s in range(start, start + per_record):
            reads = [f"key/{s - 3}"] if s > 3 else []
            rngs = [(f"key/{s - 9}", f"key/{s - 8}")] if s % 97 == 0 else []
            txns.append(
                raw(
                    f"client/{s % 13}",
                    s,
                    s - 1,
                    reads=reads,
                    ranges=rngs,
                    puts={f"key/{s}": s, f"other/{s}": None},
                    events=[Event("e", None, [f"ev/{s}"])] if s % 7 == 0 else [],
                )
            )
        res = d.feed(record(txns, start))
        assert res.kind == "record"
        peak = max(peak, d.state.size())
    assert d.next_seq == n + 1
    assert peak < 10 * window, peak
    assert d.state.size() < 10 * window
    assert len(d.state.snapshot()) < 200 * window


# -- the sequencer agrees with readers ---------------------------------------------------


def _random_log(rng: random.Random, n: int) -> list[bytes]:
    out: list[bytes] = []
    epoch, next_seq = 0, 1
    for _ in range(n):
        r = rng.random()
        if r < 0.1 or (epoch == 0 and r < 0.5):
            e = epoch + rng.choice([1, 1, 2]) if rng.random() < 0.8 else max(1, epoch - 1)
            out.append(epoch_start(e))
            epoch = max(epoch, e)
            continue
        if r < 0.15:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(40))))
            continue
        if r < 0.18:
            out.append(codec.encode_intake([raw()]))
            continue
        e = epoch
        first = next_seq
        if r < 0.24:
            e = epoch + rng.choice([-1, 1])
        elif r < 0.30:
            first = max(1, next_seq - rng.randint(1, 3))
        elif r < 0.34:
            first = next_seq + rng.randint(1, 3)
        k = rng.randint(0, 4)
        data = record([raw("c", rng.randrange(100), 0) for _ in range(k)], first, max(e, 1))
        if rng.random() < 0.05:
            data = data[: rng.randrange(len(data))]
        out.append(data)
        if e == epoch and first >= next_seq and len(data) > 12 and epoch > 0:
            next_seq = first + k
    return out


@pytest.mark.parametrize("seed", range(25))
def test_sequencer_advance_agrees_with_process_entry(seed: int) -> None:
    rng = random.Random(seed)
    st = ValidatorState(5)
    sq = SequencerState()
    kinds = set()
    for data in _random_log(rng, 80):
        kind = sq.advance(data)
        res = process_entry(st, data)
        kinds.add(res.kind)
        assert kind == res.kind
        assert (sq.epoch, sq.next_seq) == (st.epoch, st.next_seq)
        assert SequencerState.from_bytes(sq.to_bytes()) == sq
    assert kinds >= {"record", "epoch", "rejected", "malformed"}


# -- hostile entries (known bugs) --------------------------------------------------------

DEEP = b"\x91" * 100_000 + b"\xc0"
"""A msgpack value nested 100,000 arrays deep: 100 KB, a valid msgpack object."""


def test_deeply_nested_txn_in_record_does_not_crash_reader() -> None:
    st = fresh()
    res = process_entry(st, record([raw("c", 1, 0, puts={"a": 1}), DEEP], 1))
    # Either answer is deterministic; crashing the reader is not.
    assert res.kind in ("record", "malformed")


def test_deeply_nested_value_in_txn_is_malformed_not_a_crash() -> None:
    body = msgspec.msgpack.encode(codec.WireTxn("c", 1, 0, [], [], [(1, "k", None)], []))
    deep_txn = body[:-3] + DEEP + body[-2:]  # replace the put's nil value (then [] and nil)
    assert body[-3:] == b"\xc0\x90\xc0"
    dec, _ = validate(fresh(), deep_txn, 1)
    assert dec.reason is AbortReason.MALFORMED


def test_record_with_seq_beyond_u64_does_not_crash_reader() -> None:
    st = fresh()
    data = record([raw("c", 1, 0), raw("c", 2, 0)], 2**64 - 1)
    res = process_entry(st, data)
    assert res.kind in ("record", "rejected", "malformed")


def _bad_utf8_entries() -> dict[str, bytes]:
    rec = msgspec.msgpack.encode([1, 1, 0, "w", [raw("c", 1, 0)]])
    ep = msgspec.msgpack.encode([2, "w", 0])
    return {
        "record writer_id": wrap(codec.KIND_RECORD, rec.replace(b"\xa1w", b"\xa1\xff")),
        "epoch writer_id": wrap(codec.KIND_EPOCH, ep.replace(b"\xa1w", b"\xa1\x80")),
    }


@pytest.mark.parametrize("name", sorted(_bad_utf8_entries()))
def test_invalid_utf8_in_entry_header_is_malformed_not_a_crash(name: str) -> None:
    d = Driver()
    before = d.state.snapshot()
    res = process_entry(d.state, _bad_utf8_entries()[name])
    assert res.kind == "malformed"
    assert d.state.snapshot() == before


@pytest.mark.parametrize("name", sorted(_bad_utf8_entries()))
def test_sequencer_survives_invalid_utf8(name: str) -> None:
    assert SequencerState(1, 1).advance(_bad_utf8_entries()[name]) == "malformed"


def test_invalid_utf8_inside_a_txn_is_malformed_at_its_seq() -> None:
    bad = raw("c\x7f", 1, 0).replace(b"c\x7f", b"c\xff")
    d = Driver()
    decs = d.append(raw("a", 1, 0), bad, raw("a", 2, 0))
    assert [x.reason for x in decs] == [None, AbortReason.MALFORMED, None]
    assert decs[1].seq == 2 and decs[1].txn_id is None
