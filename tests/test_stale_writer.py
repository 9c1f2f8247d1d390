"""A paused (SIGSTOP) or deposed writer must never get an append accepted after the new
epoch starts (DESIGN.md invariant 3), and acknowledged transactions still commit exactly
once (invariant 4). Real processes first, then the same race made deterministic with the
backend API."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from procs import (
    Decisions,
    Proc,
    Submitter,
    assert_exactly_once,
    kill_all,
    new_ledger,
    replay,
    start_writer,
    symptom,
)

from ledgerlog.backends import _frames as fr
from ledgerlog.backends.file import FileBackend
from ledgerlog.codec import encode_epoch, encode_record, encode_transaction
from ledgerlog.errors import FencedError
from ledgerlog.model import START, Put, Transaction, TxnId
from ledgerlog.validator import SequencerState, ValidatorState, process_entry

pytestmark = pytest.mark.slow


def _segment_frames(path: Path, n: int) -> list[fr.Frame]:
    fd = os.open(path / "segments" / f"{n:012d}.seg", os.O_RDONLY)
    try:
        frames, _stop, _size = fr.read_frames(fd, 0, 1 << 30)
        return frames
    finally:
        os.close(fd)


def _walk(path: Path) -> list[tuple[Any, ...]]:
    """(kind, epoch, writer_id, data) per entry, in ledger order, as a reader decides."""
    backend = FileBackend(path, create=False, fsync=False)
    out = []
    try:
        state = ValidatorState()
        with backend.reader(START) as r:
            while entries := r.read(4096, timeout=0.0):
                for e in entries:
                    res = process_entry(state, e.data)
                    out.append((res.kind, res.epoch, res.writer_id, e.data, state.epoch))
    finally:
        backend.close()
    return out


def _assert_no_stale_record_accepted(walk: list[tuple[Any, ...]], old_writer: str) -> None:
    max_epoch = 0
    new_epoch_seen = False
    for kind, epoch, writer, _data, _cur in walk:
        if kind == "epoch":
            assert epoch > max_epoch
            max_epoch = epoch
            if writer != old_writer:
                new_epoch_seen = True
        elif kind == "record":
            assert epoch == max_epoch, f"a record of epoch {epoch} accepted in epoch {max_epoch}"
        if new_epoch_seen:
            assert not (writer == old_writer and kind == "record"), (
                "a record of the deposed writer was accepted after the new epoch start"
            )
    assert new_epoch_seen


# -- real processes: SIGSTOP the elected writer ----------------------------------------------


@pytest.mark.timeout(120)
def test_sigstopped_writer_is_fenced_after_takeover(tmp_path: Path) -> None:
    path = new_ledger(tmp_path)
    procs: list[Proc] = []
    sub: Submitter | None = None
    dec: Decisions | None = None
    try:
        a = start_writer(path, tmp_path, "wA", lease=1.0)
        procs.append(a)
        assert a.wait_for("ELECTED epoch=1", 30), a.log()
        b = start_writer(path, tmp_path, "wB", lease=1.0)
        procs.append(b)
        sub = Submitter(path, pause=0.002).start()
        assert sub.wait_acked(100, 30), sub.error

        a.signal(signal.SIGSTOP)  # hung mid-stream, holding writer.lock
        stopped_at = time.monotonic()
        assert b.wait_for("ELECTED epoch=2", 30), b.log()
        assert time.monotonic() - stopped_at > 0.5, "took over before the lease could expire"
        assert sub.wait_acked(len(sub.acked) + 60, 30), sub.error
        a.signal(signal.SIGCONT)  # the old writer wakes up with its batch in hand
        assert a.wait_for("FENCED", 20), a.log()
        assert sub.wait_acked(len(sub.acked) + 100, 30), sub.error
        sub.stop()
        assert sub.error is None, sub.error

        # The old writer noticed and went back to standing by (it did not exit).
        assert a.alive(), a.log()
        assert "fenced" in a.log().lower()
        assert "Traceback" not in a.log() + b.log(), a.log() + b.log()

        acked = [("client", c, k) for c, k in sub.acked]
        dec = Decisions(path)
        missing = dec.wait_decided([(c, s) for c, s, _ in acked], 60)
        assert not missing, f"{len(missing)} acknowledged txns undecided: {sorted(missing)[:10]}"
        dec.drain()
        assert_exactly_once(dec, acked, [("client", c) for c in sub.retried])
        assert dec.epochs[:2] == [(1, "wA"), (2, "wB")]
        kill_all(procs)

        walk = _walk(path)
        _assert_no_stale_record_accepted(walk, "wA")
        # Whatever the old writer appended after the seal of its segment is in the file
        # but in no reader's view.
        seen = {w[3] for w in walk}
        frames = _segment_frames(path, 1)
        seals = [i for i, f in enumerate(frames) if f.ftype == fr.F_SEAL]
        assert seals
        for f in frames[seals[0] + 1 :]:
            if f.ftype == fr.F_ENTRY:
                assert f.payload not in seen
    finally:
        if sub is not None:
            sub.stop()
        kill_all(procs)
        if dec is not None:
            dec.close()


@pytest.mark.timeout(90)
def test_sigstopped_standby_does_not_block_election(tmp_path: Path) -> None:
    path = new_ledger(tmp_path)
    procs: list[Proc] = []
    sub: Submitter | None = None
    dec: Decisions | None = None
    try:
        a = start_writer(path, tmp_path, "wA", lease=1.0)
        procs.append(a)
        assert a.wait_for("ELECTED epoch=1", 30), a.log()
        b = start_writer(path, tmp_path, "wB", lease=1.0)
        procs.append(b)
        c = start_writer(path, tmp_path, "wC", lease=1.0)
        procs.append(c)
        sub = Submitter(path, pause=0.002).start()
        assert sub.wait_acked(50, 30), sub.error
        b.signal(signal.SIGSTOP)  # a hung standby
        a.kill()  # and the writer dies
        symptom(
            c.wait_for("ELECTED", 10 * 1.0),
            "no writer elected within 10 lease timeouts while a standby is paused",
        )
        assert sub.wait_acked(len(sub.acked) + 50, 30), sub.error
        sub.stop()
        acked = [("client", cs, k) for cs, k in sub.acked]
        dec = Decisions(path)
        assert not dec.wait_decided([(x, s) for x, s, _ in acked], 30)
        assert_exactly_once(dec, acked)
    finally:
        if sub is not None:
            sub.stop()
        kill_all(procs)
        if dec is not None:
            dec.close()


# -- deterministic, with the backend API -------------------------------------------------------


def _raw(i: int, pad: int = 0) -> bytes:
    value: Any = "x" * pad if pad else i
    return encode_transaction(Transaction(TxnId("det", i), 0, writes=[Put(f"k{i}", value)]))


def _state(epoch: int, next_seq: int) -> bytes:
    return SequencerState(epoch, next_seq, 0, b"").to_bytes()


def _take_over(path: Path, lease: float = 30.0) -> tuple[FileBackend, Any]:
    """Age the current writer's lease and elect a new one (its heartbeat is 7.5 s away)."""
    os.utime(path / "writer.lock", (0, 0))
    b = FileBackend(path, lease_timeout=lease, fsync=False)
    return b, b.campaign("new", timeout=10)


@pytest.fixture
def deposed(tmp_path: Path) -> Any:
    """A ledger whose old writer ("old", epoch 1, seqs 1-2) was deposed by "new"
    (epoch 2, seq 3); yields (path, old LogWriter, new LogWriter)."""
    path = tmp_path / "ledger"
    a = FileBackend(path, lease_timeout=30.0, fsync=False, segment_bytes=4096)
    old = a.campaign("old", timeout=10)
    old.append([encode_epoch(1, "old", 1), encode_record(1, 1, 2, "old", [_raw(1), _raw(2)])],
               _state(1, 3))  # fmt: skip
    b, new = _take_over(path)
    new.append([encode_epoch(2, "new", 3), encode_record(2, 3, 4, "new", [_raw(3)])],
               _state(2, 4))  # fmt: skip
    try:
        yield path, old, new
    finally:
        for x in (old, new, a, b):
            x.close()


def _decided(path: Path) -> dict[str, Any]:
    return replay(path)


def _committed_ids(result: dict[str, Any]) -> list[int]:
    return [o[1][1] for e in result["entries"] if e[4] == "record" for o in e[6] if o[2] == 0]


@pytest.mark.timeout(60)
def test_deposed_writer_append_raises_fenced(deposed: Any) -> None:
    path, old, new = deposed
    with pytest.raises(FencedError):
        old.append([encode_record(1, 3, 5, "old", [_raw(4)])], _state(1, 4))
    with pytest.raises(FencedError):
        old.check()
    new.append([encode_record(2, 4, 6, "new", [_raw(5)])], _state(2, 5))
    res = _decided(path)
    assert [e[4] for e in res["entries"]] == ["epoch", "record", "epoch", "record", "record"]
    assert _committed_ids(res) == [1, 2, 3, 5]


@pytest.mark.timeout(60)
def test_append_racing_the_takeover_is_invisible(deposed: Any, tmp_path: Path) -> None:
    """The old writer passed check() just before the takeover and writes after it: its
    bytes land behind the seal of its segment and no reader ever sees them."""
    path, old, new = deposed
    sneaky = [
        encode_record(1, 3, 5, "old", [_raw(4)]),  # would be accepted (epoch 1, next seq)
        encode_epoch(99, "old", 6),  # would even outrank the new writer
        encode_record(99, 3, 7, "old", [_raw(6)]),
    ]
    os.write(old._fd, b"".join(fr.frame(fr.F_ENTRY, d) for d in sneaky))
    new.append([encode_record(2, 4, 8, "new", [_raw(5)])], _state(2, 5))
    # The bytes are there, behind the first seal of the old writer's segment.
    frames = _segment_frames(path, 1)
    first_seal = next(i for i, f in enumerate(frames) if f.ftype == fr.F_SEAL)
    assert [f.payload for f in frames[first_seal + 1 :] if f.ftype == fr.F_ENTRY] == sneaky
    with pytest.raises(FencedError):
        old.append([encode_record(1, 3, 9, "old", [_raw(7)])], _state(1, 4))

    # Two readers, one in another process, agree: none of it counts.
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(1)
    try:
        other = pool.apply_async(replay, (str(path), 1)).get(timeout=60)
    finally:
        pool.terminate()
        pool.join()
    mine = _decided(path)
    assert mine == other
    assert [e[4] for e in mine["entries"]] == ["epoch", "record", "epoch", "record", "record"]
    assert _committed_ids(mine) == [1, 2, 3, 5]
    assert mine["epoch"] == 2
    walk = _walk(path)
    assert not {w[3] for w in walk} & set(sneaky)
    _assert_no_stale_record_accepted(walk, "old")

    # A later writer (clean election after "new" resigns) does not resurrect them either.
    new.close()
    c = FileBackend(path, lease_timeout=30.0, fsync=False)
    try:
        third = c.campaign("third", timeout=10)
        third.append([encode_epoch(3, "third", 10), encode_record(3, 5, 11, "third", [_raw(8)])],
                     _state(3, 6))  # fmt: skip
        third.close()
    finally:
        c.close()
    res = _decided(path)
    assert _committed_ids(res) == [1, 2, 3, 5, 8]
    assert res["epoch"] == 3


@pytest.mark.timeout(60)
def test_old_writer_bypassing_check_is_fenced_by_its_roll(deposed: Any) -> None:
    """Even skipping check(), the old writer learns it was deposed when it rolls its full
    segment: its seal is not the first one."""
    path, old, new = deposed
    old.check = lambda: None  # the race: the check passed, the takeover happened after
    big = [_raw(100 + i, pad=100) for i in range(60)]  # > segment_bytes: append must roll
    assert sum(map(len, big)) > 4096
    with pytest.raises(FencedError):
        old.append([encode_record(1, 3, 5, "old", big)], _state(1, 63))
    segs = sorted(os.listdir(path / "segments"))
    assert segs == ["000000000001.seg", "000000000002.seg"], "a reserved segment was left over"
    new.append([encode_record(2, 4, 6, "new", [_raw(5)])], _state(2, 5))
    res = _decided(path)
    assert _committed_ids(res) == [1, 2, 3, 5]
    _assert_no_stale_record_accepted(_walk(path), "old")
