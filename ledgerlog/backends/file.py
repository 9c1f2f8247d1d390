"""The embedded backend: a ledger is a directory on the local disk.

Layout of a ledger directory::

    LEDGER                      marker with the format version, written last on creation
    .create.lock                flock'ed by a process creating the ledger
    segments/<n>.seg            framed entries; segment 1 heads the chain
    writer.lock                 flock'ed by the elected writer; its mtime is the lease
    election.lock               flock'ed by the one standby allowed to campaign
    intake/<client>.<n>.q       one append-only submission file per client instance,
                                flock'ed by it while it lives

**The segment chain.** Readers start at segment 1 and read frames until the first seal
frame, which names the next segment. "First seal wins" is the whole safety argument:
a writer that takes over seals the current tail segment towards a fresh segment of its
own, and anything a deposed writer appends to its old segment after that seal is
invisible to every reader, whatever the timing. A writer that rolls to a new segment
because the old one is full uses the same move, and learns it was deposed if its seal
was not the first. Every segment starts with a header frame holding the sequencer state
at that point, so a new writer scans only the tail segment, not the whole ledger.

**Election.** Standbys queue on ``election.lock``; the one holding it takes
``writer.lock``. A writer refreshes the lock file's mtime as a lease; if the lease is
older than ``lease_timeout`` (the writer is hung or SIGSTOPped), the candidate replaces
the lock file with a new one that it locks, so the old writer's lock no longer guards
anything: it notices before its next append (inode changed), and whatever it appends
in the race lands after the seal and never counts.

**Intake.** Each client instance appends framed submission batches to its own file and
fdatasyncs them (group commit) before a submission is acknowledged. The writer tails all
intake files; the offsets it has consumed travel inside each ledger record (its
``meta``), so they become durable and visible exactly when the transactions do: a new
writer resumes from the offsets of the last *visible* record, and nothing acknowledged
is lost or appended twice by the intake itself (the validator's txn_id dedup covers the
rest).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs
import msgspec
import structlog

from ledgerlog.backends import _frames as fr
from ledgerlog.backends.base import (
    Backend,
    Backoff,
    Entry,
    GroupCommit,
    IntakeConsumer,
    IntakeItem,
    IntakeProducer,
    LogReader,
    LogWriter,
)
from ledgerlog.errors import (
    BackendError,
    ClosedError,
    ConfigError,
    FencedError,
    LedgerNotFoundError,
    NotElectedError,
)
from ledgerlog.model import START, Position
from ledgerlog.validator import SequencerState

log = structlog.get_logger(__name__)

LEDGER_FORMAT: Final = "ledgerlog-file 1"
DEFAULT_SEGMENT_BYTES: Final = 64 * 1024 * 1024
DEFAULT_LEASE_TIMEOUT: Final = 10.0
_CLIENT_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_POLL_MIN: Final = 0.0005
_POLL_MAX: Final = 0.005


def _seg_name(n: int) -> str:
    return f"{n:012d}.seg"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_CREATE_LOCK: Final = ".create.lock"


def _is_unborn_ledger(path: Path) -> bool:
    """Whether ``path`` holds nothing but a ledger being created (or whose creator died).

    Any other content means the directory is someone else's, and it is left alone.
    """
    for entry in path.iterdir():
        if entry.name in ("segments", "intake"):
            if not entry.is_dir() or any(entry.iterdir()):
                return False
        elif entry.name != _CREATE_LOCK and not entry.name.startswith(".LEDGER."):
            return False
    return True


def _ledger_made(path: Path) -> bool:
    """True if a ledger is at the existing `path`, False if it holds nothing but one
    being created; anything else is refused with :class:`ConfigError`."""
    if path.is_dir() and _is_unborn_ledger(path):
        return False
    # Another process may have finished the ledger (and started using it) since the
    # look above: nothing is put in a ledger before its marker.
    if (path / "LEDGER").exists():
        return True
    raise ConfigError(f"{path} exists and is not a ledgerlog ledger")


def _create_ledger(path: Path, *, fsync: bool) -> None:
    """Create the ledger at ``path`` unless another process has (or does so meanwhile).

    Processes opening a new ledger at the same moment (a writer and its standby, say)
    serialize on a lock file inside it; without that, one saw the other's half-made
    directory and refused it as "not a ledgerlog ledger". The marker is written last,
    so a directory holding only the other parts is a creation that has not finished:
    the next creator completes it.
    """
    # Refused before the lock file is made: someone else's directory is left as it was.
    if path.exists() and _ledger_made(path):
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / _CREATE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _ledger_made(path):
            return
        for sub in ("segments", "intake"):
            (path / sub).mkdir(exist_ok=True)
        tmp = path / f".LEDGER.{os.getpid()}.{secrets.token_hex(4)}"
        with tmp.open("w") as f:
            f.write(LEDGER_FORMAT + "\n")
            if fsync:  # else a crash could leave an empty marker under its final name
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path / "LEDGER")
        for stale in path.glob(".LEDGER.*"):  # left by a creator that died
            stale.unlink(missing_ok=True)
        if fsync:
            _fsync_dir(path)
    finally:
        os.close(fd)


def check_client_id(client_id: str) -> str:
    if not isinstance(client_id, str) or not _CLIENT_RE.match(client_id):
        raise ConfigError(
            f"client id {client_id!r} must be 1-64 characters of letters, digits, '.', '_', '-'"
        )
    return client_id


class FileBackend(Backend):
    """A ledger in a local directory. Any number of processes may open it at once."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        fsync: bool = True,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
    ) -> None:
        if segment_bytes < 4096:
            raise ConfigError("segment_bytes must be at least 4096")
        if lease_timeout <= 0:
            raise ConfigError("lease_timeout must be positive")
        self.path = Path(path).absolute()
        self.ledger = self.path.name
        self.url = f"file://{self.path}"
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.lease_timeout = lease_timeout
        marker = self.path / "LEDGER"
        if not marker.exists():
            if create:
                _create_ledger(self.path, fsync=fsync)
            elif not self.path.is_dir() or _is_unborn_ledger(self.path):
                raise LedgerNotFoundError(f"no ledger at {self.path}")
            elif not marker.exists():  # not made by a creator since the first look
                raise ConfigError(f"{self.path} is not a ledgerlog ledger")
        if marker.read_text().strip() != LEDGER_FORMAT:
            raise ConfigError(f"{self.path}: unsupported ledger format {marker.read_text()!r}")
        self._end_cursor: _ChainCursor | None = None
        self._closed = False

    def seg_path(self, n: int) -> Path:
        return self.path / "segments" / _seg_name(n)

    def reader(self, start: Position = START) -> FileLogReader:
        self._check_open()
        return FileLogReader(self, start)

    def end(self) -> Position:
        self._check_open()
        if self._end_cursor is None:
            self._end_cursor = _ChainCursor(self, START)
        cur = self._end_cursor
        while cur.read(max_entries=1 << 30):
            pass
        return Position(cur.segment, max(cur.offset, cur.size_seen))

    def campaign(self, writer_id: str, timeout: float | None = None) -> FileLogWriter:
        self._check_open()
        return _campaign(self, writer_id, timeout)

    def intake_producer(self, client_id: str) -> FileIntakeProducer:
        self._check_open()
        return FileIntakeProducer(self, check_client_id(client_id))

    def close(self) -> None:
        if self._end_cursor is not None:
            self._end_cursor.close()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"backend {self.url} is closed")


class _ChainCursor:
    """Walks the segment chain frame by frame; shared by readers, end() and recovery."""

    def __init__(self, backend: FileBackend, start: Position) -> None:
        self.backend = backend
        self.segment = max(start.major, 1)
        self.offset = start.minor if start.major >= 1 else 0
        self.size_seen = 0
        self.stalled = False
        """The last read found bytes at the tail that do not (yet) form a frame."""
        self.header: SequencerState | None = None
        self._fd: int | None = None

    def _open(self) -> bool:
        if self._fd is None:
            try:
                self._fd = os.open(self.backend.seg_path(self.segment), os.O_RDONLY)
            except FileNotFoundError:
                return False
        return True

    def read(self, max_entries: int = 1024) -> list[Entry]:
        """Entries available now, following seals; [] if none."""
        out: list[Entry] = []
        while len(out) < max_entries:
            if not self._open():
                return out
            assert self._fd is not None
            # Parse no more than could be returned: one frame past what is still
            # wanted, plus room for a header or seal frame before them.
            frames, stop, size = fr.read_frames(
                self._fd, self.offset, max_frames=max_entries - len(out) + 2
            )
            self.size_seen = size
            self.stalled = stop < size
            sealed_to = 0
            for f in frames:
                if f.ftype == fr.F_SEAL:
                    try:
                        sealed_to = int(msgspec.msgpack.decode(f.payload)[0])
                    except (msgspec.DecodeError, ValueError, TypeError, IndexError):
                        # A seal that does not name a segment cannot be followed; as
                        # corruption it becomes a malformed entry like any other.
                        out.append(
                            Entry(
                                Position(self.segment, f.offset),
                                Position(self.segment, f.end),
                                f.payload,
                            )
                        )
                        self.offset = f.end
                        continue
                    break
                if f.ftype == fr.F_HEADER:
                    with contextlib.suppress(Exception):
                        _prev, state = msgspec.msgpack.decode(f.payload)
                        self.header = SequencerState.from_bytes(state)
                    self.offset = f.end
                    continue
                if f.ftype in (fr.F_ENTRY, fr.F_BAD):
                    out.append(
                        Entry(
                            Position(self.segment, f.offset),
                            Position(self.segment, f.end),
                            f.payload,
                        )
                    )
                self.offset = f.end
                if len(out) >= max_entries:
                    # Complete frames may remain before `stop` (and `stop` may be a read
                    # limit, not a torn tail): not stopped at the tail, whatever was seen.
                    self.stalled = False
                    return out
            if sealed_to:
                self._move(sealed_to)
                continue
            if not frames or stop >= size:
                return out
        return out

    def _move(self, segment: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.segment, self.offset, self.size_seen, self.stalled = segment, 0, 0, False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class FileLogReader(LogReader):
    def __init__(self, backend: FileBackend, start: Position) -> None:
        self._cursor = _ChainCursor(backend, start)
        self._closed = False

    @property
    def position(self) -> Position:
        return Position(self._cursor.segment, self._cursor.offset)

    def read(self, max_entries: int = 1024, timeout: float = 0.0) -> list[Entry]:
        if self._closed:
            raise ClosedError("reader is closed")
        deadline = time.monotonic() + timeout
        backoff = Backoff(_POLL_MIN, _POLL_MAX)
        while True:
            out = self._cursor.read(max_entries)
            if out or not backoff.sleep(deadline):
                return out

    def caught_up(self, end: Position) -> bool:
        pos = self.position
        if pos >= end:
            return True
        # Bytes that do not form a frame yet (a torn tail) are not entries: a reader
        # stopped in front of them has read everything appended before `end`.
        c = self._cursor
        return pos.major == end.major and c.stalled and c.size_seen >= end.minor

    def close(self) -> None:
        self._closed = True
        self._cursor.close()


# -- election -----------------------------------------------------------------------------


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _campaign(backend: FileBackend, writer_id: str, timeout: float | None) -> FileLogWriter:
    deadline = float("inf") if timeout is None else time.monotonic() + timeout
    path = backend.path
    election = path / "election.lock"
    efd = os.open(election, os.O_RDWR | os.O_CREAT, 0o644)
    waiting_since = time.monotonic()
    try:
        while True:
            # election.lock lets one candidate at a time try writer.lock, so two never
            # break an expired lease together. It is held only for that one try, so a
            # candidate that stands by (or is paused) does not keep others waiting.
            if _try_flock(efd):
                try:
                    got = _try_writer_lock(backend, writer_id)
                finally:
                    fcntl.flock(efd, fcntl.LOCK_UN)
                if got is not None:
                    lfd, clean = got
                    break
                waiting_since = time.monotonic()
            elif time.monotonic() - waiting_since > backend.lease_timeout:
                # Held far longer than one try takes: its holder hangs. Replace the file
                # so the next try does not wait for it.
                os.close(efd)
                tmp = path / f"election.lock.{os.getpid()}.{secrets.token_hex(4)}"
                tmp.touch()
                os.replace(tmp, election)
                efd = os.open(election, os.O_RDWR | os.O_CREAT, 0o644)
                waiting_since = time.monotonic()
                continue
            if time.monotonic() >= deadline:
                raise NotElectedError(f"{writer_id}: not elected within {timeout}s")
            time.sleep(0.02)
    finally:
        os.close(efd)
    try:
        os.ftruncate(lfd, 0)
        os.pwrite(lfd, f"{writer_id} pid={os.getpid()}\n".encode(), 0)
        return FileLogWriter(backend, writer_id, lfd, clean=clean)
    except BaseException:
        os.close(lfd)
        raise


def _try_writer_lock(backend: FileBackend, writer_id: str) -> tuple[int, bool] | None:
    """One try at writer.lock: (fd, clean) if we hold it now, None if a live writer does.
    `clean` is False when we broke an expired lease (its holder may still run)."""
    lock_path = backend.path / "writer.lock"
    while True:
        lfd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        if _try_flock(lfd):
            try:
                same = os.fstat(lfd).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return lfd, True
            os.close(lfd)  # replaced under us: try the new one
            continue
        try:
            age = time.time() - os.fstat(lfd).st_mtime
        except OSError:
            age = 0.0
        os.close(lfd)
        if age <= backend.lease_timeout:
            return None
        tmp = backend.path / f"writer.lock.{os.getpid()}.{secrets.token_hex(4)}"
        lfd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(lfd, fcntl.LOCK_EX)
        os.replace(tmp, lock_path)
        log.warning(
            "writer lease expired; lock broken",
            ledger=backend.ledger,
            writer=writer_id,
            lease_age_s=round(age, 3),
        )
        return lfd, False


class FileLogWriter(LogWriter):
    def __init__(self, backend: FileBackend, writer_id: str, lock_fd: int, clean: bool) -> None:
        self.backend = backend
        self.writer_id = writer_id
        self._lock_fd = lock_fd
        self._lock_ino = os.fstat(lock_fd).st_ino
        self._fenced = False
        self._closed = False
        self._fd: int | None = None
        self._log = log.bind(ledger=backend.ledger, writer=writer_id)
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._beat, name=f"ledgerlog-lease-{writer_id}", daemon=True
        )
        self._heartbeat.start()
        try:
            self._segment, self._start_state = self._take_over(clean)
        except BaseException:
            self.close()
            raise
        self._verified = 0  # offset up to which our segment is known to have no seal
        self._log.info("elected", segment=self._segment)

    # Lease ----------------------------------------------------------------------------

    def _beat(self) -> None:
        interval = self.backend.lease_timeout / 4
        while not self._stop.wait(interval):
            try:
                os.utime(self._lock_fd)
                if os.stat(self.backend.path / "writer.lock").st_ino != self._lock_ino:
                    self._fenced = True
            except OSError:
                self._fenced = True

    def check(self) -> None:
        if self._closed:
            raise ClosedError("writer is closed")
        if not self._fenced:
            try:
                same = os.stat(self.backend.path / "writer.lock").st_ino == self._lock_ino
            except FileNotFoundError:
                same = False
            if not same:
                self._fenced = True
        if self._fenced:
            raise FencedError(f"writer {self.writer_id} lost {self.backend.ledger}")

    # Segment chain --------------------------------------------------------------------

    def _reserve_segment(self) -> tuple[int, int]:
        """Create a new, empty segment file with a number above every existing one."""
        seg_dir = self.backend.path / "segments"
        while True:
            nums = [int(p.name[:-4]) for p in seg_dir.glob("*.seg") if p.name[:-4].isdigit()]
            n = max(nums, default=0) + 1
            try:
                fd = os.open(
                    seg_dir / _seg_name(n), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644
                )
                return n, fd
            except FileExistsError:
                continue

    def _seal(self, tail: int, nxt: int) -> int:
        """Append a seal tail -> nxt; return the segment the FIRST seal of `tail` names."""
        fd = os.open(self.backend.seg_path(tail), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, fr.frame(fr.F_SEAL, msgspec.msgpack.encode([nxt, self.writer_id])))
            if self.backend.fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        return self._first_seal(tail)[0]

    def _first_seal(self, segment: int, start: int = 0) -> tuple[int, int]:
        """(segment named by the first seal at or after `start`, or 0; offset scanned to)."""
        fd = os.open(self.backend.seg_path(segment), os.O_RDONLY)
        try:
            offset = start
            while True:
                frames, stop, _size = fr.read_frames(fd, offset)
                for f in frames:
                    if f.ftype == fr.F_SEAL:
                        return int(msgspec.msgpack.decode(f.payload)[0]), f.offset
                if not frames:
                    return 0, offset
                offset = stop
        finally:
            os.close(fd)

    def _truncate_torn_tail(self, segment: int) -> None:
        fd = os.open(self.backend.seg_path(segment), os.O_RDWR)
        try:
            offset = 0
            while True:
                frames, stop, size = fr.read_frames(fd, offset)
                if not frames:
                    break
                offset = stop
            if offset < size:
                self._log.warning(
                    "truncating torn tail", segment=segment, at=offset, bytes=size - offset
                )
                os.ftruncate(fd, offset)
                if self.backend.fsync:
                    os.fsync(fd)
        finally:
            os.close(fd)

    def _take_over(self, clean: bool) -> tuple[int, SequencerState]:
        """Seal the chain's tail towards a fresh segment of ours; return it and the
        sequencer state at its start."""
        if not self.backend.seg_path(1).exists():
            try:
                fd = os.open(
                    self.backend.seg_path(1),
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND,
                    0o644,
                )
            except FileExistsError:
                pass
            else:
                return self._start_segment(1, fd, SequencerState())
        # Walk the chain from its head, computing the sequencer state as readers do (the
        # segment headers are not needed, so a segment a crash left without one is no
        # problem), and note the state where the tail segment starts.
        state = SequencerState()
        tail_start = attrs.evolve(state)
        segment = 1
        cursor = _ChainCursor(self.backend, START)
        try:
            while True:
                entries = cursor.read(max_entries=4096)
                if not entries:
                    break
                for e in entries:
                    if e.position.major != segment:
                        segment = e.position.major
                        tail_start = attrs.evolve(state)
                    state.advance(e.data)
            tail = cursor.segment
        finally:
            cursor.close()
        if tail != segment:
            tail_start = attrs.evolve(state)  # the tail holds no entry yet
        if clean:
            # The previous writer is gone (its lock was released), so bytes at the tail
            # that do not form a frame can only be a torn write of a crash.
            self._truncate_torn_tail(tail)
        while True:
            n, fd = self._reserve_segment()
            first = self._seal(tail, n)
            if first == n:
                break
            # Someone sealed `tail` first (its writer rolled over): follow the chain.
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.backend.seg_path(n))
            tail_start = self._state_through(tail, tail_start)
            tail = first
        # Our seal is the first in `tail`: nothing appended to it later counts, so the
        # state through it is final.
        state = self._state_through(tail, tail_start)
        try:
            self.check()
        except FencedError:
            os.close(fd)
            raise
        return self._start_segment(n, fd, state)

    def _state_through(self, segment: int, start: SequencerState) -> SequencerState:
        """Sequencer state at the end of `segment` (up to its first seal), given the
        state at its start."""
        state = attrs.evolve(start)
        cursor = _ChainCursor(self.backend, Position(segment, 0))
        try:
            while cursor.segment == segment:
                entries = cursor.read(max_entries=4096)
                for e in entries:
                    if e.position.major != segment:
                        return state
                    state.advance(e.data)
                if not entries:
                    break
            return state
        finally:
            cursor.close()

    def _start_segment(self, n: int, fd: int, state: SequencerState) -> tuple[int, SequencerState]:
        os.write(fd, fr.frame(fr.F_HEADER, msgspec.msgpack.encode([0, state.to_bytes()])))
        if self.backend.fsync:
            os.fdatasync(fd)
            _fsync_dir(self.backend.path / "segments")
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        return n, state

    # LogWriter --------------------------------------------------------------------------

    def recovery_point(self) -> tuple[Position, bytes | None]:
        return Position(self._segment, 0), self._start_state.to_bytes()

    def append(self, entries: Sequence[bytes], state: bytes) -> Position:
        self.check()
        assert self._fd is not None
        buf = b"".join(fr.frame(fr.F_ENTRY, e) for e in entries)
        try:
            os.write(self._fd, buf)
            if self.backend.fsync:
                os.fdatasync(self._fd)
            size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise BackendError(f"append to {self.backend.ledger} failed: {exc}") from exc
        if size >= self.backend.segment_bytes and state:
            self._roll(SequencerState.from_bytes(state))
            return Position(self._segment, os.fstat(self._fd).st_size)
        return Position(self._segment, size)

    def _roll(self, state: SequencerState) -> None:
        n, fd = self._reserve_segment()
        if self._seal(self._segment, n) != n:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.backend.seg_path(n))
            self._fenced = True
            raise FencedError(f"writer {self.writer_id}: segment sealed by another writer")
        self._segment, _ = self._start_segment(n, fd, state)
        self._verified = 0
        self._log.info("rolled segment", segment=n)

    def visible(self) -> bool:
        """True if everything appended so far is visible to readers for good (no seal
        precedes it). Checked before deleting anything, e.g. consumed intake files."""
        if self._fd is None:
            return False
        seal, self._verified = self._first_seal(self._segment, self._verified)
        return seal == 0

    def intake(self, meta: bytes) -> FileIntakeConsumer:
        self.check()
        return FileIntakeConsumer(self, meta)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._heartbeat.is_alive() and threading.current_thread() is not self._heartbeat:
            self._heartbeat.join(timeout=1)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        os.close(self._lock_fd)  # releases the flock: a standby takes over
        self._log.info("resigned")


# -- intake -------------------------------------------------------------------------------


_NEW_SUFFIX: Final = ".new"


def _create_intake_file(intake: Path, client_id: str) -> tuple[int, str]:
    """Open a new intake file, flock'ed, under a ``.q`` name no other file has had.

    The lock, held while the client lives, tells the writer the file may still grow: the
    writer deletes a ``.q`` file it can lock once it has consumed all of it. So the file
    is created under a name the writer does not tail (``.<client>.<token>.new``), locked,
    and only then linked under its ``.q`` name: created straight under that name it was
    unlocked for an instant, empty and so "consumed", and a writer collecting intake files
    then could delete it; the client's submissions went to the unlinked file, acknowledged
    and never seen. A writer may still delete the ``.new`` file before it is locked (it
    collects those a crash left behind); then the link fails and this starts over."""
    while True:
        tmp = intake / f".{client_id}.{secrets.token_hex(8)}{_NEW_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            while True:
                name = f"{client_id}.{secrets.token_hex(4)}.q"
                try:
                    os.link(tmp, intake / name)  # unlike rename, never replaces a file
                except FileExistsError:
                    continue
                break
        except FileNotFoundError:
            os.close(fd)  # a writer collected it before our lock: start over
            continue
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        return fd, name


class FileIntakeProducer(IntakeProducer):
    """A client's submission file; concurrent submits share one fdatasync."""

    def __init__(self, backend: FileBackend, client_id: str) -> None:
        self.backend = backend
        self._fd, self.name = _create_intake_file(backend.path / "intake", client_id)
        if backend.fsync:
            _fsync_dir(backend.path / "intake")
        self._commit = GroupCommit(self._write)

    def _write(self, frames: list[bytes]) -> None:
        try:
            os.write(self._fd, b"".join(frames))
            if self.backend.fsync:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise BackendError(f"intake write to {self.name} failed: {exc}") from exc

    def submit(self, data: bytes, timeout: float | None = None) -> None:
        self._commit.submit(fr.frame(fr.F_ENTRY, data), timeout)

    def close(self) -> None:
        if not self._commit.close():
            return
        with contextlib.suppress(OSError):
            os.write(self._fd, fr.frame(fr.F_CLOSED, b""))
            if self.backend.fsync:
                os.fdatasync(self._fd)
        os.close(self._fd)


class FileIntakeConsumer(IntakeConsumer):
    """Tails every client's intake file from the offsets the ledger says are consumed."""

    _RESCAN_S: Final = 0.05

    def __init__(self, writer: FileLogWriter, meta: bytes) -> None:
        self.writer = writer
        self.dir = writer.backend.path / "intake"
        self._offsets: dict[str, int] = {}
        if meta:
            try:
                self._offsets = {str(k): int(v) for k, v in msgspec.msgpack.decode(meta).items()}
            except (msgspec.DecodeError, AttributeError, ValueError, TypeError):
                log.error("unreadable intake offsets in the ledger; rereading all intake files")
        self._handed = dict(self._offsets)  # offsets handed out, ahead of what is durable
        self._closed_files: set[str] = set()
        self._fds: dict[str, int] = {}
        self._last_scan = 0.0
        self._last_gc = time.monotonic()
        self._gc()

    def _scan(self) -> None:
        self._last_scan = time.monotonic()
        try:
            names = sorted(p for p in os.listdir(self.dir) if p.endswith(".q"))
        except FileNotFoundError:
            return
        for name in names:
            if name not in self._fds:
                try:
                    self._fds[name] = os.open(self.dir / name, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                self._handed.setdefault(name, 0)

    def poll(self, max_items: int = 1024, timeout: float = 0.0) -> list[IntakeItem]:
        deadline = time.monotonic() + timeout
        backoff = Backoff(_POLL_MIN, _POLL_MAX)
        while True:
            if time.monotonic() - self._last_scan > self._RESCAN_S:
                self._scan()
            items: list[IntakeItem] = []
            # Sorted names: a fixed, fair order; each file's own order is kept.
            for name in sorted(self._fds):
                if len(items) >= max_items:
                    break
                fd = self._fds[name]
                frames, _stop, _size = fr.read_frames(fd, self._handed[name], 1 << 20)
                for f in frames:
                    if len(items) >= max_items:
                        break
                    self._handed[name] = f.end
                    if f.ftype == fr.F_ENTRY:
                        items.append(IntakeItem(f.payload, (name, f.end)))
                    elif f.ftype == fr.F_CLOSED:
                        self._closed_files.add(name)
                    elif f.ftype == fr.F_BAD:
                        log.error(
                            "skipping corrupt bytes in intake file",
                            file=name,
                            offset=f.offset,
                            bytes=f.end - f.offset,
                        )
            if items:
                return items
            if time.monotonic() - self._last_gc > 5.0:
                self._gc()
            if not backoff.sleep(deadline):
                return []

    def meta(self, items: Sequence[IntakeItem]) -> bytes:
        for it in items:
            name, end = it.token
            if end > self._offsets.get(name, 0):
                self._offsets[name] = end
        return msgspec.msgpack.encode(dict(sorted(self._offsets.items())))

    def _gc(self) -> None:
        """Delete intake files that are fully in the ledger and whose client is gone."""
        self._last_gc = time.monotonic()
        if not self.writer.visible():
            return
        try:
            listed = os.listdir(self.dir)
        except FileNotFoundError:
            return
        for name in listed:
            if name.startswith(".") and name.endswith(_NEW_SUFFIX):
                self._collect_unborn(name)
        names = [p for p in listed if p.endswith(".q")]
        for name in names:
            path = self.dir / name
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if not _try_flock(fd):
                    continue  # its client still runs
                size = os.fstat(fd).st_size
                done = self._offsets.get(name, 0)
                tail_frames, stop, _ = fr.read_frames(fd, done, 1 << 16)
                only_close = all(f.ftype == fr.F_CLOSED for f in tail_frames) and stop >= size
                if done >= size or only_close:
                    os.unlink(path)
                    self._offsets.pop(name, None)
                    self._handed.pop(name, None)
                    if name in self._fds:
                        os.close(self._fds.pop(name))
            finally:
                os.close(fd)

    def _collect_unborn(self, name: str) -> None:
        """Delete an intake file a client left before it got its ``.q`` name (it died in
        between), unless a client holds it (it is being born now)."""
        try:
            fd = os.open(self.dir / name, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            if _try_flock(fd):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.dir / name)
        finally:
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
