"""The binary formats (ledgerlog.codec) and the model's own validation (ledgerlog.model)."""

from __future__ import annotations

import contextlib
import struct
import zlib

import msgspec
import pytest
from helpers import epoch_start, raw, record, txn, wire_txn, wrap
from hypothesis import given, settings
from hypothesis import strategies as st

from ledgerlog import codec
from ledgerlog.errors import FormatError, LedgerlogError
from ledgerlog.model import (
    Delete,
    EpochStart,
    Event,
    KeyRange,
    Position,
    Put,
    Record,
    Transaction,
    TxnId,
)

# -- transaction round trips -------------------------------------------------------------

NESTED = {
    "list": [1, -2, 3.5, None, True, False, "x", b"\x00\xff"],
    "dict": {"a": {"b": {"c": [[], {}, [[[]]]]}}},
    "big": 2**64 - 1,
    "small": -(2**63),
    "unicode": "grüße 🌍 \u0000 \U0010ffff",
}

ROUND_TRIPS = {
    "minimal": txn("c", 0, 0),
    "reads and puts": txn("svc", 5, 3, reads=["a", "b", "a"], puts={"a": 1, "b": "two"}),
    "ranges": txn("c", 1, 9, ranges=[("a", "b"), ("m", None), ("", None), ("k", "k")]),
    "prefix range": txn("c", 2, 1, ranges=[KeyRange.prefix("user/")]),
    "deletes": txn("c", 3, 0, deletes=["x", "y"]),
    "put then delete": Transaction(
        TxnId("c", 4), 0, writes=(Put("k", 1), Delete("k"), Put("k", None))
    ),
    "events": txn(
        "c",
        5,
        0,
        events=[
            Event("paid", {"amount": 12, "cur": "EUR"}, ["acct/1"]),
            Event("noop"),
            Event("e", [1, [2]], ("a", "b", "a")),
        ],
    ),
    "valid_time": txn("c", 6, 0, puts={"a": 1}, valid_time=1_700_000_000_000),
    "negative valid_time": txn("c", 7, 0, valid_time=-5),
    "unicode keys": txn(
        "клиент",
        8,
        0,
        reads=["ключ", "🔑", "\u00e9", "e\u0301", "\x00"],
        ranges=[("\u03b1", "\u03c9")],
        puts={"日本語": "値", "": ""},
    ),
    "nested values": txn("c", 9, 0, puts={"n": NESTED, "empty": [], "none": None}),
    "huge ints": txn("c", 2**64 - 1, 2**64 - 1, valid_time=2**63 - 1),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_transaction_round_trip(name: str) -> None:
    t = ROUND_TRIPS[name]
    data = codec.encode_transaction(t)
    assert isinstance(data, bytes)
    back = codec.decode_transaction(data)
    assert back == t
    assert codec.decode_transaction(memoryview(data)) == t
    assert codec.encode_transaction(back) == data  # canonical: same bytes again
    assert codec.wire_to_transaction(codec.transaction_to_wire(t)) == t
    assert codec.check_wire_txn(codec.decode_wire_txn(data)) is None


def test_tuples_come_back_as_lists() -> None:
    """msgpack has one array type: a tuple value decodes as a list (documented here)."""
    back = codec.decode_transaction(raw("c", 1, 0, puts={"k": (1, (2, 3))}))
    assert back.writes == (Put("k", [1, [2, 3]]),)


def test_record_round_trip_keeps_bad_txns_as_bytes() -> None:
    ts = [ROUND_TRIPS["reads and puts"], ROUND_TRIPS["events"]]
    junk = msgspec.msgpack.encode(["junk"])
    data = record([ts[0], junk, ts[1]], 17, epoch=3, hlc=99, writer="writer-\u03b1", meta=b"m")
    rec = codec.decode_record(data)
    assert rec == Record(3, 17, 99, "writer-\u03b1", (ts[0], junk, ts[1]))
    entry = codec.decode_entry(data)
    assert isinstance(entry, codec.WireRecord)
    assert (entry.epoch, entry.first_seq, entry.hlc, entry.writer_id, entry.meta) == (
        3,
        17,
        99,
        "writer-\u03b1",
        b"m",
    )
    assert [bytes(r) for r in entry.txns] == [
        codec.encode_transaction(ts[0]),
        junk,
        codec.encode_transaction(ts[1]),
    ]


def test_epoch_and_intake_round_trip() -> None:
    assert codec.decode_record(epoch_start(4, "w", 123)) == EpochStart(4, "w", 123)
    ep = codec.decode_entry(codec.encode_epoch(2, "x", 5))
    assert isinstance(ep, codec.WireEpoch) and (ep.epoch, ep.writer_id, ep.hlc) == (2, "x", 5)
    t = raw("c", 1, 0, puts={"a": 1})
    intake = codec.decode_entry(codec.encode_intake([t, t]))
    assert isinstance(intake, codec.WireIntake)
    assert [bytes(r) for r in intake.txns] == [t, t]
    with pytest.raises(FormatError, match="intake"):
        codec.decode_record(codec.encode_intake([t]))


def test_envelope_layout() -> None:
    data = record([raw()], 1)
    assert data[:4] == codec.MAGIC == b"\x89LGL"
    assert data[4] == codec.FORMAT_VERSION and data[5] == codec.KIND_RECORD
    assert data[6:8] == b"\x00\x00"
    assert struct.unpack(">I", data[8:12])[0] == zlib.crc32(data[12:])
    assert codec.HEADER_SIZE == 12
    kind, body = codec.unwrap(data)
    assert kind == codec.KIND_RECORD and bytes(body) == data[12:]


def test_value_codec() -> None:
    for v in (None, 1, "x", [1, {"a": b"b"}], NESTED):
        assert codec.decode_value(codec.encode_value(v)) == v
    assert codec.encode_value({"b": 1, "a": 2}) == codec.encode_value({"b": 1, "a": 2})


# -- envelope damage -----------------------------------------------------------------------

GOOD = record([raw("c", 1, 0, puts={"a": 1})], 1)


def _crc(body: bytes) -> bytes:
    return struct.pack(">I", zlib.crc32(body))


DAMAGE = {
    "empty": (b"", "shorter than the envelope"),
    "short": (GOOD[:11], "11 bytes is shorter"),
    "bad magic": (b"\x89LGX" + GOOD[4:], "bad magic"),
    "foreign bytes": (b"PK\x03\x04" + bytes(20), "bad magic"),
    "version 0": (GOOD[:4] + b"\x00" + GOOD[5:], "unsupported format version 0"),
    "version 2": (GOOD[:4] + b"\x02" + GOOD[5:], "unsupported format version 2"),
    "kind 0": (GOOD[:5] + b"\x00" + GOOD[6:], "unknown entry kind 0"),
    "kind 9": (GOOD[:5] + b"\x09" + GOOD[6:], "unknown entry kind 9"),
    "crc": (GOOD[:8] + bytes(4) + GOOD[12:], "checksum mismatch"),
    "flipped body": (GOOD[:-1] + bytes([GOOD[-1] ^ 1]), "checksum mismatch"),
    "truncated": (GOOD[:-2], "checksum mismatch"),
    "extended": (GOOD + b"\x00", "checksum mismatch"),
    "header only": (GOOD[:12], "checksum mismatch"),
    "garbage body": (wrap(codec.KIND_RECORD, b"\xc1"), "malformed entry body"),
    "empty body": (wrap(codec.KIND_RECORD, b""), "malformed entry body"),
    "wrong shape": (
        wrap(codec.KIND_RECORD, msgspec.msgpack.encode([1, 2])),
        "malformed entry body",
    ),
    "trailing bytes": (wrap(codec.KIND_RECORD, GOOD[12:] + b"\x00"), "malformed entry body"),
    "epoch 0": (
        wrap(codec.KIND_RECORD, msgspec.msgpack.encode([0, 1, 0, "w", []])),
        "epoch or first_seq below 1",
    ),
    "first_seq 0": (
        wrap(codec.KIND_RECORD, msgspec.msgpack.encode([1, 0, 0, "w", []])),
        "epoch or first_seq below 1",
    ),
    "negative first_seq": (
        wrap(codec.KIND_RECORD, msgspec.msgpack.encode([1, -3, 0, "w", []])),
        "epoch or first_seq below 1",
    ),
    "epoch start 0": (
        wrap(codec.KIND_EPOCH, msgspec.msgpack.encode([0, "w", 0])),
        "epoch start below 1",
    ),
    "epoch start shape": (
        wrap(codec.KIND_EPOCH, msgspec.msgpack.encode(["1", "w", 0])),
        "malformed entry body",
    ),
    "intake shape": (wrap(codec.KIND_INTAKE, msgspec.msgpack.encode([1])), "malformed entry body"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_entries_raise_format_error(name: str) -> None:
    data, message = DAMAGE[name]
    with pytest.raises(FormatError, match=message) as info:
        codec.decode_entry(data)
    assert isinstance(info.value, LedgerlogError) and isinstance(info.value, ValueError)
    with pytest.raises(FormatError):
        codec.decode_record(data)


def test_reserved_bits_have_their_own_message() -> None:
    data = GOOD[:6] + b"\x00\x01" + GOOD[8:]
    with pytest.raises(FormatError, match="reserved"):
        codec.decode_entry(data)


TXN_DAMAGE = {
    "garbage": (b"\xc1", "malformed transaction"),
    "empty": (b"", "malformed transaction"),
    "not an array": (msgspec.msgpack.encode({"client_id": "c"}), "malformed transaction"),
    "too short": (msgspec.msgpack.encode(["c", 1, 0]), "malformed transaction"),
    "wrong type": (msgspec.msgpack.encode(["c", "1", 0, [], [], [], []]), "malformed transaction"),
    "int key": (msgspec.msgpack.encode(["c", 1, 0, [1], [], [], []]), "malformed transaction"),
    "float version": (
        msgspec.msgpack.encode(["c", 1, 0.5, [], [], [], []]),
        "malformed transaction",
    ),
    "trailing": (raw() + b"\x00", "malformed transaction"),
    "truncated": (raw(reads=["abc"])[:-2], "malformed transaction"),
    "bad utf-8": (raw("c\x7f").replace(b"c\x7f", b"c\xff"), "malformed transaction"),
    "negative read_version": (wire_txn("c", 1, -1), "negative"),
    "negative client_seq": (wire_txn("c", -1, 0), "negative"),
    "empty range": (wire_txn("c", 1, 0, ranges=[("b", "a")]), "empty range"),
    "unknown op": (wire_txn("c", 1, 0, writes=[(3, "k", None)]), "unknown write op 3"),
    "bad range shape": (
        msgspec.msgpack.encode(["c", 1, 0, [], [["a"]], [], []]),
        "malformed transaction",
    ),
}


@pytest.mark.parametrize("name", sorted(TXN_DAMAGE))
def test_damaged_transactions_raise_format_error(name: str) -> None:
    data, message = TXN_DAMAGE[name]
    with pytest.raises(FormatError, match=message):
        codec.decode_transaction(data)


def test_extra_trailing_fields_are_ignored() -> None:
    """msgspec array-like structs skip extra trailing fields: a later format may append
    fields and this reader decodes the prefix it knows (deterministically)."""
    data = msgspec.msgpack.encode(["c", 1, 0, ["a"], [], [], [], None, "future", [1]])
    assert codec.decode_transaction(data) == txn("c", 1, 0, reads=["a"])


def test_encode_transaction_rejects_unencodable_values() -> None:
    with pytest.raises(FormatError, match="cannot encode transaction c/1"):
        codec.encode_transaction(txn("c", 1, 0, puts={"k": object()}))
    with pytest.raises(FormatError):
        codec.encode_transaction(txn("c", 1, 0, events=[Event("e", {1j})]))
    with pytest.raises(FormatError, match="not a write"):
        codec.encode_transaction(Transaction(TxnId("c", 1), 0, writes=("k",)))  # type: ignore


@pytest.mark.parametrize(
    "kwargs", [{"cseq": 2**64}, {"rv": 2**64}, {"valid_time": -(2**63) - 1}, {"puts": {"k": 2**70}}]
)
def test_encode_out_of_range_int_is_format_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(FormatError):
        codec.encode_transaction(txn(**kwargs))  # type: ignore[arg-type]


def test_encode_surrogate_key_is_a_typed_error() -> None:
    with pytest.raises((FormatError, TypeError)):
        codec.encode_transaction(txn("c", 1, 0, reads=["\ud800"]))


def test_ranges_must_be_key_ranges() -> None:
    with pytest.raises((TypeError, FormatError)):
        codec.encode_transaction(Transaction(TxnId("c", 1), 0, ranges=[("a", "b")]))  # type: ignore


DEEP = b"\x91" * 100_000 + b"\xc0"


def test_decode_transaction_deep_nesting_is_format_error() -> None:
    body = msgspec.msgpack.encode(codec.WireTxn("c", 1, 0, [], [], [(1, "k", None)], []))
    with pytest.raises(FormatError):
        codec.decode_transaction(body[:-3] + DEEP + body[-2:])


def test_decode_entry_deep_nesting_is_format_error() -> None:
    # msgspec cannot even skip over such a txn, so the whole record is malformed (the
    # writer never appends one: the same happens to it in the intake).
    with pytest.raises(FormatError, match="RecursionError"):
        codec.decode_entry(record([DEEP], 1))


def test_decode_entry_bad_utf8_is_format_error() -> None:
    body = msgspec.msgpack.encode([1, 1, 0, "w", []]).replace(b"\xa1w", b"\xa1\xff")
    with pytest.raises(FormatError):
        codec.decode_entry(wrap(codec.KIND_RECORD, body))


# -- fuzz: FormatError or success, nothing else -------------------------------------------


def _decode_or_format_error(fn, data: bytes) -> None:  # type: ignore[no-untyped-def]
    with contextlib.suppress(FormatError):
        fn(data)


@settings(deadline=None, max_examples=1000)
@given(st.binary(max_size=200))
def test_fuzz_decoders_only_raise_format_error(data: bytes) -> None:
    for fn in (codec.decode_entry, codec.decode_record, codec.decode_transaction):
        _decode_or_format_error(fn, data)
        for kind in (codec.KIND_RECORD, codec.KIND_EPOCH, codec.KIND_INTAKE):
            _decode_or_format_error(fn, wrap(kind, data))


@settings(deadline=None, max_examples=500)
@given(st.sampled_from(sorted(ROUND_TRIPS)), st.data())
def test_fuzz_mutated_transactions(name: str, data: st.DataObject) -> None:
    good = codec.encode_transaction(ROUND_TRIPS[name])
    i = data.draw(st.integers(0, len(good)))
    j = data.draw(st.integers(i, min(len(good), i + 8)))
    mutated = good[:i] + data.draw(st.binary(max_size=8)) + good[j:]
    _decode_or_format_error(codec.decode_transaction, mutated)
    rec = record([mutated, good], 1)
    _decode_or_format_error(codec.decode_record, rec)
    _decode_or_format_error(codec.decode_record, wrap(codec.KIND_RECORD, rec[12:][: i + 3]))


# -- hypothesis round trip -----------------------------------------------------------------

keys = st.text(max_size=8)
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
ranges = st.tuples(keys, st.none() | keys).map(
    lambda p: KeyRange(p[0], None) if p[1] is None else KeyRange(min(p), max(p))
)
writes = st.one_of(st.builds(Put, keys, values), st.builds(Delete, keys))
transactions = st.builds(
    Transaction,
    txn_id=st.builds(TxnId, st.text(max_size=8), st.integers(0, 2**64 - 1)),
    read_version=st.integers(0, 2**64 - 1),
    reads=st.lists(keys, max_size=4),
    ranges=st.lists(ranges, max_size=3),
    writes=st.lists(writes, max_size=4),
    events=st.lists(
        st.builds(Event, st.text(max_size=6), values, st.lists(keys, max_size=3)), max_size=2
    ),
    valid_time=st.none() | st.integers(-(2**63), 2**63 - 1),
)


@settings(deadline=None, max_examples=300)
@given(transactions)
def test_hypothesis_round_trip(t: Transaction) -> None:
    data = codec.encode_transaction(t)
    assert codec.decode_transaction(data) == t
    rec = codec.decode_record(record([data], 5, epoch=2))
    assert isinstance(rec, Record) and rec.transactions == (t,)


# -- model validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: Put(1, "v"),
        lambda: Put(b"k", "v"),
        lambda: Delete(None),
        lambda: Event("e", None, ["ok", 2]),
        lambda: KeyRange(1, "b"),
        lambda: KeyRange("a", 5),
        lambda: Transaction(TxnId("c", 1), 0, reads=["a", 1]),
        lambda: Transaction(TxnId("c", 1), 0, reads=[b"a"]),
    ],
)
def test_non_str_keys_raise_type_error(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError):
        make()


def test_type_error_names_the_field() -> None:
    with pytest.raises(TypeError, match="reads must hold str keys, not int"):
        Transaction(TxnId("c", 1), 0, reads=[1])
    with pytest.raises(TypeError, match="key must be a str key, not bytes"):
        Put(b"k", 1)


def test_negative_versions_raise_value_error() -> None:
    with pytest.raises(ValueError, match="read_version"):
        Transaction(TxnId("c", 1), -1)
    with pytest.raises(ValueError, match="client_seq"):
        Transaction(TxnId("c", -1), 0)
    assert Transaction(TxnId("c", 0), 0).is_blind


def test_empty_key_range_raises_value_error() -> None:
    with pytest.raises(ValueError, match="empty key range"):
        KeyRange("b", "a")
    r = KeyRange("b", "d")
    assert "b" in r and "c" in r and "czz" in r
    assert "d" not in r and "a" not in r and 1 not in r
    unbounded = KeyRange("m")
    assert "m" in unbounded and "\U0010ffff" in unbounded and "l" not in unbounded
    assert "" not in KeyRange("a", "a")


def test_key_range_prefix() -> None:
    assert KeyRange.prefix("ab") == KeyRange("ab", "ac")
    assert KeyRange.prefix("user/") == KeyRange("user/", "user0")
    assert KeyRange.prefix("") == KeyRange("", None)
    r = KeyRange.prefix("user/")
    assert "user/" in r and "user/\U0010ffff" in r and "user/zzz" in r
    assert "user0" not in r and "user" not in r and "usep" not in r


@settings(deadline=None, max_examples=300)
@given(st.text(st.characters(max_codepoint=0x10FFFE), max_size=4), st.text(max_size=6))
def test_key_range_prefix_matches_startswith(prefix: str, key: str) -> None:
    r = KeyRange.prefix(prefix)
    assert (key in r) == key.startswith(prefix)
    assert ((prefix + key) in r) is True


def test_key_range_prefix_of_max_code_point() -> None:
    r = KeyRange.prefix("a\U0010ffff")
    assert "a\U0010ffff" in r and "a\U0010ffffz" in r and "b" not in r


def test_merge_intake_keeps_transactions_in_order_and_names_foreign_bytes() -> None:
    a = codec.encode_intake([msgspec.msgpack.encode("t0"), msgspec.msgpack.encode("t1")])
    b = codec.encode_intake([msgspec.msgpack.encode("t2")])
    record = codec.encode_epoch(1, "w", 0)  # a ledger entry, not an intake batch
    merged, foreign = codec.merge_intake([a, b"junk", record, b])
    assert foreign == [1, 2]
    assert merged is not None
    entry = codec.decode_entry(merged)
    assert isinstance(entry, codec.WireIntake)
    assert [bytes(t) for t in entry.txns] == [msgspec.msgpack.encode(f"t{i}") for i in range(3)]
    assert codec.merge_intake([b"junk", record]) == (None, [0, 1])


# -- positions ----------------------------------------------------------------------------

_POS = st.tuples(st.integers(-1, 2**63), st.integers(-1, 2**63))


@given(_POS, _POS)
def test_positions_order_as_their_two_integers(a: tuple[int, int], b: tuple[int, int]) -> None:
    # Position orders by hand (attrs' generic ordering was the slow part of a read).
    pa, pb = Position(*a), Position(*b)
    assert (pa < pb, pa <= pb, pa > pb, pa >= pb, pa == pb) == (
        a < b,
        a <= b,
        a > b,
        a >= b,
        a == b,
    )
    assert sorted([pb, pa]) == [Position(*x) for x in sorted([b, a])]


def test_positions_do_not_compare_with_other_types() -> None:
    with pytest.raises(TypeError):
        assert Position(1, 2) < (1, 3)  # type: ignore[operator]
    assert Position(1, 2) != (1, 2)
