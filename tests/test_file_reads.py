"""The embedded backend's reads parse only what they return: a reader asking for a few
entries of a segment of thousands of small frames once checked every frame of a 4 MB
chunk on every call (a catch-up of single-transaction records cost ~15x its decoding)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ledgerlog.backends import _frames as fr
from ledgerlog.backends.file import FileBackend
from ledgerlog.model import START
from ledgerlog.validator import SequencerState

ENTRIES = 2000


def _ledger(tmp_path: Path, segment_bytes: int) -> FileBackend:
    backend = FileBackend(tmp_path / "ledger", fsync=False, segment_bytes=segment_bytes)
    lw = backend.campaign("w", timeout=10)
    try:
        for i in range(0, ENTRIES, 50):
            # A state lets the writer roll to a new segment (sealing the last) when full.
            lw.append([b"entry-%06d" % n for n in range(i, i + 50)], SequencerState().to_bytes())
    finally:
        lw.close()
    return backend


def test_parse_stops_after_max_frames_and_resumes_where_it_stopped() -> None:
    frames = [fr.frame(fr.F_ENTRY, b"x" * n) for n in range(1, 8)]
    buf = b"".join(frames)
    first, stop = fr.parse(buf, 100, max_frames=3)
    assert [f.payload for f in first] == [b"x", b"xx", b"xxx"]
    assert stop == 100 + sum(len(f) for f in frames[:3])
    rest, end = fr.parse(buf[stop - 100 :], stop)
    assert [f.payload for f in rest] == [b"x" * n for n in range(4, 8)]
    assert end == 100 + len(buf)
    assert fr.parse(buf, 100)[0] == first + rest


@pytest.mark.timeout(60)
def test_a_small_read_checks_a_bounded_number_of_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = _ledger(tmp_path, 1 << 24)  # one segment holds every entry
    checked = 0
    real = fr._valid_at

    def counting(buf: bytes | memoryview, pos: int) -> int:
        nonlocal checked
        checked += 1
        return real(buf, pos)

    monkeypatch.setattr(fr, "_valid_at", counting)
    with backend.reader(START) as reader:
        got = reader.read(max_entries=3)
        assert len(got) == 3
        # The three entries, perhaps a header frame, one frame to spare: not 2000.
        assert checked <= 6, checked
    backend.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("segment_bytes", [4096, 1 << 24])
def test_reading_a_few_at_a_time_returns_every_entry_once_in_order(
    tmp_path: Path, segment_bytes: int
) -> None:
    backend = _ledger(tmp_path, segment_bytes)
    if segment_bytes == 4096:
        assert len(os.listdir(backend.path / "segments")) > 3  # seals are followed
    with backend.reader(START) as r:
        whole = [(e.position, e.data) for e in r.read(max_entries=100_000)]
    assert [d for _p, d in whole] == [b"entry-%06d" % n for n in range(ENTRIES)]
    for step in (1, 3, 1024):
        with backend.reader(START) as r:
            got = []
            while batch := r.read(max_entries=step):
                assert len(batch) <= step
                got += [(e.position, e.data) for e in batch]
        assert got == whole, step
    backend.close()
