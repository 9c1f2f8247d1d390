"""Framing for the file backend's segment and intake files.

A frame is ``magic(4) type(1) length(4) crc32(4) header_crc32(4) payload``. Frames make
a torn tail recognisable (a frame whose bytes are not all there yet) and corruption
recognisable (a header or payload whose checksum fails); after corruption, parsing
resynchronises at the next complete frame whose checksums hold, so every reader skips
exactly the same bytes. The header's own checksum matters for the length field: a
corrupt length could otherwise pass for a frame still being written, and stall readers
for good.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Final

import attrs

FRAME_MAGIC: Final = b"\xa7LLF"
_FRAME = struct.Struct(">4sBIII")
_HEAD = struct.Struct(">4sBII")
FRAME_HEADER: Final = _FRAME.size
MAX_FRAME: Final = 256 * 1024 * 1024
"""Lengths above this are corruption, not data (keeps a bad length from stalling a reader)."""

F_ENTRY: Final = 1
F_HEADER: Final = 2
F_SEAL: Final = 3
F_CLOSED: Final = 4
F_BAD: Final = 0
"""Not on disk: what the parser reports for a corrupt region it skipped."""
_TYPES: Final = frozenset({F_ENTRY, F_HEADER, F_SEAL, F_CLOSED})


def frame(ftype: int, payload: bytes) -> bytes:
    head = _HEAD.pack(FRAME_MAGIC, ftype, len(payload), zlib.crc32(payload))
    return head + zlib.crc32(head).to_bytes(4, "big") + payload


@attrs.frozen
class Frame:
    ftype: int
    offset: int
    end: int
    payload: bytes


def _valid_at(buf: bytes | memoryview, pos: int) -> int:
    """End of the valid frame at `pos`, 0 if none, -1 if one may still be being written."""
    n = len(buf)
    if n - pos < FRAME_HEADER:
        return -1 if bytes(buf[pos : pos + 4]) == FRAME_MAGIC[: n - pos] else 0
    magic, ftype, length, crc, hcrc = _FRAME.unpack_from(buf, pos)
    if magic != FRAME_MAGIC or ftype not in _TYPES or length > MAX_FRAME:
        return 0
    if zlib.crc32(buf[pos : pos + _HEAD.size]) != hcrc:
        return 0
    end = pos + FRAME_HEADER + length
    if end > n:
        return -1
    if zlib.crc32(buf[pos + FRAME_HEADER : end]) != crc:
        return 0
    return int(end)


def _next_valid(buf: bytes, mv: memoryview, start: int) -> int:
    """Offset of the first complete, valid frame at or after `start`; -1 if there is none
    or if a frame that may still be arriving comes first."""
    nxt = start
    while True:
        nxt = buf.find(FRAME_MAGIC, nxt)
        if nxt < 0:
            return -1
        e = _valid_at(mv, nxt)
        if e > 0:
            return nxt
        if e < 0:
            return -1
        nxt += 1


def parse(buf: bytes, base: int, max_frames: int | None = None) -> tuple[list[Frame], int]:
    """Parse frames from ``buf`` (file bytes starting at file offset ``base``).

    Returns the frames and the offset where parsing stopped: everything before it is
    decided for good; what follows is an unfinished frame (or nothing), or, once
    `max_frames` frames are parsed, frames left for the next call. A corrupt region is
    returned as one F_BAD frame, but only once a valid frame follows it, because until
    then it may be a frame still being written (or a torn tail a recovering writer will
    truncate)."""
    frames: list[Frame] = []
    pos = 0
    n = len(buf)
    mv = memoryview(buf)
    limit = n if max_frames is None else max_frames
    while pos < n and len(frames) < limit:
        end = _valid_at(mv, pos)
        if end > 0:
            ftype = mv[pos + 4]
            frames.append(Frame(ftype, base + pos, base + end, bytes(mv[pos + FRAME_HEADER : end])))
            pos = end
            continue
        if end < 0:
            break  # unfinished: wait for the rest (or for recovery to truncate a torn tail)
        # Corrupt: skip to the next valid frame, once there is one.
        found = _next_valid(buf, mv, pos + 1)
        if found < 0:
            break
        frames.append(Frame(F_BAD, base + pos, base + found, bytes(mv[pos:found])))
        pos = found
    return frames, base + pos


CHUNK: Final = 4 * 1024 * 1024


def read_frames(
    fd: int, offset: int, max_bytes: int = CHUNK, max_frames: int | None = None
) -> tuple[list[Frame], int, int]:
    """Frames from file offset `offset`: (frames, stop offset, file size seen).

    `max_frames` bounds the parsing (CRCs, copies) to what the caller will use: a chunk
    of small frames holds tens of thousands, and a reader asking for a few must not pay
    for all of them on every call."""
    size = os.fstat(fd).st_size
    if size <= offset:
        return [], offset, size
    want = size - offset
    if want > max_bytes:
        # Read enough for at least one large frame; the rest waits for the next call.
        head = os.pread(fd, FRAME_HEADER, offset)
        if len(head) == FRAME_HEADER:
            magic, _t, length, _c, _h = _FRAME.unpack(head)
            if magic == FRAME_MAGIC and length <= MAX_FRAME:
                want = max(max_bytes, min(want, FRAME_HEADER + length))
            else:
                want = size - offset  # corruption: the resync may need the whole rest
        else:
            want = max_bytes
    buf = os.pread(fd, want, offset)
    frames, stop = parse(buf, offset, max_frames)
    return frames, stop, size
