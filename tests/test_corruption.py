"""Damaged ledgers (DESIGN.md invariants 1 and 5): flipped bytes, truncation, garbage
between frames and at the tail, bad checksums, unknown versions, absurd lengths, torn
tails. On each damaged copy two independent readers, one in another process, run to the
end: neither raises, both reach identical decisions and digests at every seq, and what
precedes the damage decides exactly as in the pristine ledger."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import replay, symptom

from ledgerlog.backends import _frames as fr
from ledgerlog.backends.file import FileBackend
from ledgerlog.codec import HEADER_SIZE, encode_intake, encode_transaction
from ledgerlog.model import Delete, KeyRange, Put, Transaction, TxnId
from ledgerlog.reader import Reader
from ledgerlog.writer import Writer

pytestmark = pytest.mark.slow

SEGMENT_BYTES = 16384
TERMS = 4
PER_TERM = 800

HYPO = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


# -- the pristine ledger ---------------------------------------------------------------------


def _txns(rng: random.Random, cseq: int, rv: int) -> list[bytes]:
    """Blind puts and deletes, read-modify-writes and range reads over 60 hot keys."""
    key = f"k{rng.randrange(60):02d}"
    tid = TxnId("c", cseq)
    x = rng.random()
    if x < 0.4:
        t = Transaction(tid, rv, writes=[Put(key, [cseq, "v" * rng.randrange(20)])])
    elif x < 0.75:
        t = Transaction(tid, rv, reads=[key], writes=[Put(key, cseq)])
    elif x < 0.85:
        t = Transaction(tid, rv, writes=[Delete(key)])
    else:
        lo = f"k{rng.randrange(50):02d}"
        hi = f"k{int(lo[1:]) + 5:02d}"
        t = Transaction(tid, rv, ranges=[KeyRange(lo, hi)], writes=[Put(f"sum/{lo}", cseq)])
    return [encode_transaction(t)]


def _build(path: Path) -> int:
    """A few thousand transactions, several segments, TERMS epochs; returns the count."""
    backend = FileBackend(path, fsync=False, segment_bytes=SEGMENT_BYTES)
    producer = backend.intake_producer("c")
    watcher = Reader(backend, name="builder")
    rng = random.Random(20240611)
    cseq = 0
    try:
        for term in range(TERMS):
            w = Writer(backend, f"w{term}", max_record_txns=8).start()
            try:
                assert w.elected.wait(30)
                target = cseq + PER_TERM
                while cseq < target:
                    watcher.poll(timeout=0.0)
                    raws = []
                    for _ in range(rng.randint(1, 4)):
                        cseq += 1
                        raws += _txns(rng, cseq, watcher.last_seq)
                    producer.submit(encode_intake(raws))
                deadline = time.monotonic() + 60
                while watcher.last_seq < cseq and time.monotonic() < deadline:
                    watcher.poll(timeout=0.1)
                assert watcher.last_seq == cseq
            finally:
                w.stop()
                assert w.error is None
    finally:
        producer.close()
        watcher.close()
        backend.close()
    return cseq


@pytest.fixture(scope="module")
def pool() -> Iterator[Any]:
    p = multiprocessing.get_context("spawn").Pool(1)
    try:
        yield p
    finally:
        p.terminate()
        p.join()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("pristine") / "ledger"
    n = _build(path)
    res = replay(path)
    segs = sorted(int(p.name[:-4]) for p in (path / "segments").glob("*.seg"))
    assert len(segs) >= 6, segs
    assert res["epoch"] == TERMS and res["last_seq"] == n
    kinds = {e[4] for e in res["entries"]}
    assert kinds == {"epoch", "record"}, kinds
    codes = {p[1] for p in res["perseq"]}
    assert {0, 1} <= codes, codes  # commits and conflicts
    frames = {s: _frames(path, s) for s in segs}
    return {"path": path, "res": res, "segs": segs, "frames": frames, "n": n}


def _record_in_a_sealed_segment(pristine: dict[str, Any]) -> Any:
    """A record entry in the middle of the first segment that holds records and is not
    the chain's last (so it is sealed: more of the ledger follows it). Which segments
    those are depends on the timing of the elections that built the ledger."""
    entries = pristine["res"]["entries"]
    with_records = sorted({e[0] for e in entries if e[4] == "record"})
    assert len(with_records) >= 2, with_records
    recs = [e for e in entries if e[4] == "record" and e[0] == with_records[0]]
    return recs[len(recs) // 2]


def _seg(path: Path, n: int) -> Path:
    return path / "segments" / f"{n:012d}.seg"


def _frames(path: Path, n: int) -> list[fr.Frame]:
    fd = os.open(_seg(path, n), os.O_RDONLY)
    try:
        return fr.read_frames(fd, 0, 1 << 30)[0]
    finally:
        os.close(fd)


_copies = iter(range(1 << 30))


def _copy(pristine: dict[str, Any], tmp: Path) -> Path:
    dst = tmp / f"copy{next(_copies)}"
    shutil.copytree(pristine["path"], dst, ignore=shutil.ignore_patterns("*.lock*"))
    return dst


# -- the checks --------------------------------------------------------------------------------


def _check(
    pristine: dict[str, Any], path: Path, damage: tuple[int, int], pool: Any
) -> dict[str, Any]:
    """Two readers agree on everything; entries wholly before `damage` (segment, offset)
    decide as in the pristine ledger. Returns the in-process result."""
    mine = replay(path, max_entries=1)
    other = pool.apply_async(replay, (str(path), 4096)).get(timeout=120)
    assert mine["entries"] == other["entries"]
    assert mine["perseq"] == other["perseq"]
    assert mine == other
    # Within each process, the library Reader and the per-transaction walk agree too.
    assert [(e[4], e[5], e[6], e[7] if e[6] else "") for e in mine["entries"]] == [
        (k, ep, o, d if o else "") for k, ep, o, d in mine["reader"]
    ]
    assert (mine["digest"], mine["last_seq"]) == (mine["walk_digest"], mine["walk_last_seq"])
    per = {s: d for s, _c, d in mine["perseq"]}
    for e in mine["entries"]:
        if e[4] == "record" and e[6]:
            assert per[e[6][-1][0]] == e[7]
    # The undamaged prefix is untouched.
    pre = [e for e in pristine["res"]["entries"] if (e[2], e[3]) <= damage]
    assert mine["entries"][: len(pre)] == pre
    seqs = [o[0] for e in pre if e[4] == "record" for o in e[6]]
    if seqs:
        upto = max(seqs)
        assert [p for p in mine["perseq"] if p[0] <= upto] == [
            p for p in pristine["res"]["perseq"] if p[0] <= upto
        ]
    return mine


def _rewrite_entry(
    pristine: dict[str, Any], tmp: Path, pick: int, change: Callable[[bytearray], None]
) -> tuple[Path, tuple[int, int], int]:
    """Change the envelope of the pick-th record entry, with a valid frame checksum (so
    only the envelope is wrong). Returns the copy, the damage position, the entry index."""
    recs = [i for i, e in enumerate(pristine["res"]["entries"]) if e[4] == "record"]
    idx = recs[pick % len(recs)]
    e = pristine["res"]["entries"][idx]
    path = _copy(pristine, tmp)
    seg = _seg(path, e[0])
    data = bytearray(seg.read_bytes())
    start, end = e[1], e[3]
    payload = bytearray(data[start + fr.FRAME_HEADER : end])
    change(payload)
    assert len(payload) == end - start - fr.FRAME_HEADER
    data[start:end] = fr.frame(fr.F_ENTRY, bytes(payload))
    seg.write_bytes(bytes(data))
    return path, (e[0], e[1]), idx


# -- random damage (hypothesis) ---------------------------------------------------------------


@pytest.mark.timeout(180)
@HYPO
@given(
    flips=st.lists(
        st.tuples(st.integers(0, 1000), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
        min_size=1,
        max_size=4,
    )
)
def test_random_byte_flips(pristine: Any, pool: Any, tmp_path_factory: Any, flips: Any) -> None:
    path = _copy(pristine, tmp_path_factory.mktemp("flip"))
    damage = (1 << 62, 0)
    for si, frac, mask in flips:
        n = pristine["segs"][si % len(pristine["segs"])]
        seg = _seg(path, n)
        data = bytearray(seg.read_bytes())
        off = int(frac * len(data))
        data[off] ^= mask
        seg.write_bytes(bytes(data))
        damage = min(damage, (n, off))
    _check(pristine, path, damage, pool)


@pytest.mark.timeout(180)
@HYPO
@given(si=st.integers(0, 1000), frac=st.floats(0, 1, exclude_max=True))
def test_truncated_segment(pristine: Any, pool: Any, tmp_path_factory: Any, si: int, frac: float):
    path = _copy(pristine, tmp_path_factory.mktemp("trunc"))
    n = pristine["segs"][si % len(pristine["segs"])]
    seg = _seg(path, n)
    off = int(frac * seg.stat().st_size)
    os.truncate(seg, off)
    _check(pristine, path, (n, off), pool)


_garbage = st.one_of(
    st.binary(min_size=1, max_size=80),
    st.binary(max_size=40).map(lambda b: fr.FRAME_MAGIC + b),  # looks like a frame start
    st.binary(max_size=40).map(lambda b: fr.frame(fr.F_ENTRY, b)[: max(1, len(b))]),
)


@pytest.mark.timeout(180)
@HYPO
@given(si=st.integers(0, 1000), fi=st.integers(0, 1000), garbage=_garbage)
def test_garbage_between_frames(
    pristine: Any, pool: Any, tmp_path_factory: Any, si: int, fi: int, garbage: bytes
) -> None:
    path = _copy(pristine, tmp_path_factory.mktemp("insert"))
    n = pristine["segs"][si % len(pristine["segs"])]
    frames = pristine["frames"][n]
    at = frames[fi % len(frames)].end  # after a frame, before the next (or at the end)
    seg = _seg(path, n)
    data = seg.read_bytes()
    seg.write_bytes(data[:at] + garbage + data[at:])
    mine = _check(pristine, path, (n, at), pool)
    # Nothing is lost: once the parser resynchronises, every later frame is read again,
    # so every pristine transaction is still decided (the garbage costs no seq).
    if garbage.find(fr.FRAME_MAGIC) < 0 and at < len(data):
        assert mine["last_seq"] == pristine["n"]


@pytest.mark.timeout(180)
@HYPO
@given(sealed=st.booleans(), si=st.integers(0, 1000), garbage=_garbage)
def test_garbage_at_segment_tail(
    pristine: Any, pool: Any, tmp_path_factory: Any, sealed: bool, si: int, garbage: bytes
) -> None:
    path = _copy(pristine, tmp_path_factory.mktemp("tail"))
    segs = pristine["segs"]
    n = segs[si % (len(segs) - 1)] if sealed else segs[-1]
    seg = _seg(path, n)
    size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(garbage)
    mine = _check(pristine, path, (n, size), pool)
    # After a seal, or at the very end: every pristine entry decides exactly as before.
    assert mine["entries"][: len(pristine["res"]["entries"])] == pristine["res"]["entries"]
    assert mine["perseq"] == pristine["res"]["perseq"]


# -- targeted damage ---------------------------------------------------------------------------


def _bad_crc(p: bytearray) -> None:
    crc = struct.unpack_from(">I", p, 8)[0]
    struct.pack_into(">I", p, 8, crc ^ 0x5A5A5A5A)


def _bad_version(p: bytearray) -> None:
    p[4] = 7  # FORMAT_VERSION is 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change", [_bad_crc, _bad_version], ids=["bad-checksum", "bad-version"])
@pytest.mark.parametrize("pick", [0, 5, 97, -1])
def test_bad_envelope_is_malformed_at_every_reader(
    pristine: Any, pool: Any, tmp_path: Path, change: Any, pick: int
) -> None:
    path, damage, idx = _rewrite_entry(pristine, tmp_path, pick, change)
    assert HEADER_SIZE == 12
    mine = _check(pristine, path, damage, pool)
    entries, before = mine["entries"], pristine["res"]["entries"]
    assert len(entries) == len(before)
    assert entries[idx][4] == "malformed"
    assert entries[idx][6] == ((0, None, 4),)  # one malformed decision, no seq
    # Every other entry is still read (the lost record's seqs stay a gap), so every
    # later record keeps its seqs.
    assert [e[4] for i, e in enumerate(entries) if i != idx] == [
        e[4] for i, e in enumerate(before) if i != idx
    ]
    lost = {o[0] for o in before[idx][6]}
    assert {p[0] for p in mine["perseq"]} == {p[0] for p in pristine["res"]["perseq"]} - lost
    assert mine["last_seq"] == pristine["n"] or before[idx][6][-1][0] == pristine["n"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("length", [0xFFFFFFFF, fr.MAX_FRAME + 1])
@pytest.mark.parametrize("pick", [3, 200])
def test_huge_frame_length_is_skipped(
    pristine: Any, pool: Any, tmp_path: Path, length: int, pick: int
) -> None:
    recs = [e for e in pristine["res"]["entries"] if e[4] == "record"]
    e = recs[pick]
    path = _copy(pristine, tmp_path)
    seg = _seg(path, e[0])
    data = bytearray(seg.read_bytes())
    struct.pack_into(">I", data, e[1] + 5, length)
    seg.write_bytes(bytes(data))
    mine = _check(pristine, path, (e[0], e[1]), pool)
    assert mine["last_seq"] == pristine["n"]
    assert sum(1 for x in mine["entries"] if x[4] == "malformed") == 1


@pytest.mark.timeout(60)
def test_plausible_but_wrong_frame_length_in_sealed_segment(
    pristine: Any, pool: Any, tmp_path: Path
) -> None:
    """One corrupted length field (e.g. a flipped high bit: 16 MiB, within MAX_FRAME) in
    the middle of a sealed segment: readers must resynchronise, not wait forever."""
    e = _record_in_a_sealed_segment(pristine)
    path = _copy(pristine, tmp_path)
    seg = _seg(path, e[0])
    data = bytearray(seg.read_bytes())
    struct.pack_into(">I", data, e[1] + 5, 1 << 24)
    seg.write_bytes(bytes(data))
    mine = _check(pristine, path, (e[0], e[1]), pool)
    symptom(mine["last_seq"] == pristine["n"], "readers stalled at the corrupt length")


@pytest.mark.timeout(60)
def test_election_never_truncates_frames_behind_corruption(tmp_path: Path, pristine: Any) -> None:
    e = _record_in_a_sealed_segment(pristine)
    path = _copy(pristine, tmp_path)
    seg = _seg(path, e[0])
    data = bytearray(seg.read_bytes())
    struct.pack_into(">I", data, e[1] + 5, 1 << 24)
    seg.write_bytes(bytes(data))
    size = seg.stat().st_size
    backend = FileBackend(path, fsync=False, segment_bytes=SEGMENT_BYTES)
    try:
        lw = backend.campaign("after-damage", timeout=10)
        lw.close()
    finally:
        backend.close()
    symptom(seg.stat().st_size >= size, "the election truncated committed frames")
    symptom(seg.read_bytes()[:size] == bytes(data), "the election changed committed frames")


# -- torn tail --------------------------------------------------------------------------------


@pytest.mark.timeout(180)
@settings(HYPO, max_examples=5)
@given(cut=st.integers(1, 10_000), header_only=st.booleans())
def test_torn_tail_truncated_on_clean_election(
    pristine: Any, pool: Any, tmp_path_factory: Any, cut: int, header_only: bool
) -> None:
    """A crash mid-write leaves a partial frame at the end of the active segment. Readers
    stop in front of it; the next writer (clean lock acquisition) cuts it off, and the
    ledger goes on with no malformed entry."""
    path = _copy(pristine, tmp_path_factory.mktemp("torn"))
    last = pristine["segs"][-1]
    seg = _seg(path, last)
    size = seg.stat().st_size
    whole = fr.frame(
        fr.F_ENTRY,
        encode_intake([encode_transaction(Transaction(TxnId("x", 1), 0, writes=[Put("a", 1)]))])
        * 3,
    )
    limit = fr.FRAME_HEADER if header_only else len(whole)
    torn = whole[: 1 + cut % (limit - 1)]
    with open(seg, "ab") as f:
        f.write(torn)
    mine = _check(pristine, path, (last, size), pool)
    assert mine["entries"] == pristine["res"]["entries"]

    backend = FileBackend(path, fsync=False, segment_bytes=SEGMENT_BYTES)
    producer = backend.intake_producer("after")
    w = Writer(backend, "next", max_record_txns=8).start()
    try:
        assert w.elected.wait(30)
        assert w.epoch == TERMS + 1
        # Cut off, then sealed: the old tail is its pristine frames plus one seal.
        frames = _frames(path, last)
        assert [f.end for f in frames[:-1]] == [f.end for f in pristine["frames"][last]]
        assert frames[-1].ftype == fr.F_SEAL and frames[-1].offset == size
        for i in range(20):
            t = Transaction(TxnId("after", i), 0, writes=[Put(f"after/{i}", i)])
            producer.submit(encode_intake([encode_transaction(t)]))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if replay(path)["last_seq"] >= pristine["n"] + 20:
                break
            time.sleep(0.05)
    finally:
        w.stop()
        producer.close()
        backend.close()
    assert w.error is None
    res = _check(pristine, path, (1 << 62, 0), pool)
    assert res["entries"][: len(pristine["res"]["entries"])] == pristine["res"]["entries"]
    assert not [e for e in res["entries"] if e[4] != "record" and e[4] != "epoch"]
    assert res["last_seq"] == pristine["n"] + 20
    tail = [p for p in res["perseq"] if p[0] > pristine["n"]]
    assert [c for _s, c, _d in tail] == [0] * 20


def test_frame_crc_sanity() -> None:
    """The frame layout the tests above edit by hand."""
    f = fr.frame(fr.F_ENTRY, b"abc")
    assert f[:4] == fr.FRAME_MAGIC and f[4] == fr.F_ENTRY
    assert struct.unpack(">I", f[5:9])[0] == 3
    assert struct.unpack(">I", f[9:13])[0] == zlib.crc32(b"abc")
