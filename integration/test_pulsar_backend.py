"""The Pulsar backend end to end, against a real broker (one per session).

What is checked, beyond the conformance suite:

- positions: a reader started where no entry exists yet, or across a BookKeeper ledger
  rollover (forced with the admin API's topic unload), resumes exactly;
- bank transfers through ``ledgerlog.open("pulsar://...")`` clients (``writer="auto"``):
  money is conserved and every replica reaches the same digest (on every variant of
  ``pulsar_target``; the fault tests below need the local broker's process);
- kill -9 of the process holding the elected writer mid-stream: a standby takes over and
  every transaction a client saw committed is in the ledger exactly once;
- a restart of the Pulsar process mid-stream: clients and readers resume, nothing lost or
  duplicated;
- a writer process SIGSTOPped, replaced, then SIGCONTed: no record it sends afterwards is
  accepted by any reader.

Fault tests run the clients as child processes: this file is also their script
(``python integration/test_pulsar_backend.py bank ...``), and each writes what it saw
committed to a file as it goes, so a SIGKILL loses nothing the test relies on.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ledgerlog
from ledgerlog.check.procs import Proc, spawn
from ledgerlog.errors import (
    BackendError,
    ConfigError,
    ConflictError,
    LedgerlogError,
    TransactionAborted,
)
from ledgerlog.model import START, Outcome, Position
from ledgerlog.reader import Reader
from ledgerlog.testing.threads import run_in_threads
from ledgerlog.validator import EntryResult, SequencerState, ValidatorState, process_entry
from ledgerlog.views.memory import MemoryView

pytest.importorskip("pulsar")
from ledgerlog.backends.pulsar import PulsarBackend

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
LEASE = 2.0
ACCOUNTS = 40


# -- load: bank transfers -------------------------------------------------------------------


class Bank:
    """Threads doing transfers between ``acct/NN`` keys through one client. Balances may
    go negative, so the total stays 0 exactly when every committed transfer was applied
    whole and serializably. `committed` holds the client seqs seen committed."""

    def __init__(
        self,
        client: ledgerlog.Client,
        threads: int = 4,
        seed: int = 0,
        record: Any = None,
    ) -> None:
        self.client = client
        self.committed: list[int] = []
        self.aborted = 0
        self.unknown = 0
        self._record = record
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(seed * 100 + i,), daemon=True)
            for i in range(threads)
        ]

    def start(self) -> Bank:
        for t in self._threads:
            t.start()
        return self

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            src, dst = rng.sample(range(ACCOUNTS), 2)
            amount = rng.randint(1, 9)
            try:
                tx = self.client.transaction()
                a = tx.get(f"acct/{src:02d}", 0)
                b = tx.get(f"acct/{dst:02d}", 0)
                tx.put(f"acct/{src:02d}", a - amount)
                tx.put(f"acct/{dst:02d}", b + amount)
                tx.commit()
            except (ConflictError, TransactionAborted):
                with self._lock:
                    self.aborted += 1
                continue
            except LedgerlogError:
                # Commit unknown / broker away: the next transaction is a new one.
                with self._lock:
                    self.unknown += 1
                time.sleep(0.05)
                continue
            with self._lock:
                self.committed.append(tx.txn_id.client_seq)
                if self._record is not None:
                    self._record(tx.txn_id.client_seq)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


# -- checking a ledger ------------------------------------------------------------------------


class LedgerWalk:
    """Every entry of a ledger, validated one by one with ``process_entry``."""

    def __init__(self, url: str) -> None:
        self.entries: list[tuple[Position, EntryResult]] = []
        self.state = ValidatorState()
        backend = PulsarBackend.from_url(url)
        try:
            end = backend.end()
            with backend.reader(START) as r:
                deadline = time.monotonic() + 60
                while not r.caught_up(end):
                    assert time.monotonic() < deadline, "ledger walk did not reach the end"
                    for e in r.read(4096, timeout=0.2):
                        self.entries.append((e.position, process_entry(self.state, e.data)))
        finally:
            backend.close()

    def committed_counts(self) -> dict[tuple[str, int], int]:
        counts: dict[tuple[str, int], int] = {}
        for _pos, res in self.entries:
            for d in res.decisions:
                if d.txn_id is not None and d.outcome is Outcome.COMMITTED:
                    key = (d.txn_id.client_id, d.txn_id.client_seq)
                    counts[key] = counts.get(key, 0) + 1
        return counts


def replica(url: str) -> tuple[Reader, MemoryView, PulsarBackend]:
    """A fresh reader with a view, caught up to the ledger's end."""
    backend = PulsarBackend.from_url(url)
    view = MemoryView()
    reader = Reader(backend, [view], name="checker", keep_digests=1 << 20)
    reader.sync(timeout=60)
    return reader, view, backend


def total(view: MemoryView) -> tuple[int, int]:
    rows = view.range("acct/", "acct0")
    return sum(v for _k, v in rows), len(rows)


def assert_exactly_once(walk: LedgerWalk, seen: dict[str, list[int]]) -> int:
    counts = walk.committed_counts()
    assert all(n == 1 for n in counts.values()), "a transaction committed twice"
    missing = [(c, s) for c, seqs in seen.items() for s in seqs if counts.get((c, s)) != 1]
    assert not missing, f"seen committed but not in the ledger exactly once: {missing[:5]}"
    return sum(len(v) for v in seen.values())


# -- child processes ----------------------------------------------------------------------------


class Child(Proc):
    """A bank client in its own process (``writer="auto"``), logging to a file."""

    def __init__(self, url: str, client_id: str, workdir: Path, threads: int = 3) -> None:
        self.client_id = client_id
        self.seen_path = workdir / f"{client_id}.seen"
        self.stop_path = workdir / f"{client_id}.stop"
        self.exit_path = workdir / f"{client_id}.exit"
        argv = [str(a) for a in (SCRIPT, "bank", url, client_id, workdir)]
        argv += ["--threads", str(threads), "--lease", str(LEASE)]
        proc = spawn(argv, log_dir=workdir, name=client_id, cwd=ROOT)
        super().__init__(proc.popen, proc.log_path, client_id)

    def lines(self, prefix: str) -> list[str]:
        return [ln for ln in self.log().splitlines() if ln.startswith(prefix)]

    def wait_for(self, prefix: str, timeout: float, count: int = 1) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.lines(prefix)) >= count:
                return True
            if not self.alive():
                break
            time.sleep(0.05)
        return len(self.lines(prefix)) >= count

    def seen(self) -> list[int]:
        """Client seqs it saw committed (an unfinished last line, cut by a kill, dropped)."""
        try:
            text = self.seen_path.read_text()
        except FileNotFoundError:
            return []
        return [int(x.split()[0]) for x in text.split("\n")[:-1] if x]

    def commits(self) -> int:
        return len(self.seen())

    def final(self) -> tuple[int, str]:
        _, seq, digest = self.lines("FINAL")[-1].split()
        return int(seq), digest


def wait_until(predicate: Any, timeout: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def finish(children: list[Child], timeout: float = 90.0) -> None:
    """Stop every live child's load, wait for its FINAL line, then let it exit."""
    live = [c for c in children if c.alive()]
    for c in live:
        c.stop_path.touch()
    for c in live:
        assert c.wait_for("FINAL", timeout), f"{c.client_id} did not finish:\n{c.log()[-3000:]}"
    for c in live:
        c.exit_path.touch()
    for c in live:
        try:
            c.popen.wait(30)
        except subprocess.TimeoutExpired:
            c.kill()


def child_bank(argv: list[str]) -> int:
    """Child side: a ``writer="auto"`` client doing transfers until told to stop."""
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("client_id")
    ap.add_argument("workdir")
    ap.add_argument("--threads", type=int, default=3)
    ap.add_argument("--lease", type=float, default=LEASE)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
    workdir = Path(a.workdir)
    stop_path = workdir / f"{a.client_id}.stop"
    exit_path = workdir / f"{a.client_id}.exit"
    seen_fd = os.open(workdir / f"{a.client_id}.seen", os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def say(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    client = ledgerlog.open(
        a.url, client_id=a.client_id, writer="auto", timeout=15.0, lease_timeout=a.lease
    )
    writer = client.writer
    assert writer is not None
    say(f"STARTED pid={os.getpid()}")

    def monitor() -> None:
        elected = False
        while True:
            now = writer.elected.is_set()
            if now != elected:
                state = f"ELECTED epoch={writer.epoch}" if now else f"STANDBY after={writer.epoch}"
                say(f"{state} t={time.time():.3f}")
                elected = now
            time.sleep(0.02)

    threading.Thread(target=monitor, daemon=True).start()
    client.wait_writer(60)
    bank = Bank(
        client,
        threads=a.threads,
        seed=hash(a.client_id) & 0xFFFF,
        record=lambda seq: os.write(seen_fd, f"{seq} {time.time():.3f}\n".encode()),
    ).start()
    say("LOADING")
    while not stop_path.exists():
        time.sleep(0.05)
    bank.stop()
    for _ in range(10):
        try:
            client.sync(timeout=30)
            break
        except (LedgerlogError, TimeoutError) as exc:
            say(f"SYNC RETRY {exc!r}")
            time.sleep(1)
    say(f"FINAL {client.last_seq} {client.digest.hex()}")
    while not exit_path.exists():
        time.sleep(0.05)
    client.close()  # closes the backend ledgerlog.open made for it
    say("EXIT")
    return 0


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def url(local_pulsar: Any) -> str:
    return f"{local_pulsar.service_url}/public/default/bank-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def any_url(pulsar_target: Any) -> str:
    """A fresh ledger on each variant of ``pulsar_target`` (local JVM, testcontainers,
    external); the URL carries the variant's token and TLS options."""
    return pulsar_target.url(f"bank-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def children(tmp_path: Path) -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for c in made:
        c.kill()


# -- positions ------------------------------------------------------------------------------


def test_from_url_parses_and_validates() -> None:
    b = PulsarBackend.from_url(
        "pulsar://127.0.0.1:6650/acme/ledgers/orders?token=t0k&lease_timeout=3"
        "&tls_validate_hostname=false&max_pending_appends=3&intake_in_flight=4",
        append_timeout=5,
    )
    try:
        assert b.topic == "persistent://acme/ledgers/orders"
        assert b.intake_topic == "persistent://acme/ledgers/orders-intake"
        assert b.lease_topic == "non-persistent://acme/ledgers/orders-lease"
        assert b.lease_timeout == 3.0 and b.append_timeout == 5.0
        assert b.max_pending_appends == 3 and b.intake_in_flight == 4
        assert "t0k" not in b.url
    finally:
        b.close()
    for bad in (
        "pulsar://h:6650/",
        "pulsar://h:6650/a/b",
        "pulsar://h:6650/x?nope=1",
        "pulsar://h:6650/x-intake",
        "pulsar://user:pw@h:6650/x",
        "pulsar://h:6650/x?lease_timeout=-1",
        "pulsar://h:6650/x?max_pending_appends=0",
        "pulsar://h:6650/x?intake_in_flight=0",
    ):
        with pytest.raises(ConfigError):
            PulsarBackend.from_url(bad)


def _unload(admin_url: str, ledger: str) -> None:
    req = urllib.request.Request(
        f"{admin_url}/admin/v2/persistent/public/default/{ledger}/unload", method="PUT"
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status in (200, 204)


def test_positions_survive_missing_entries_and_ledger_rollover(local_pulsar: Any) -> None:
    ledger = f"pos-{uuid.uuid4().hex[:10]}"
    backend = PulsarBackend(local_pulsar.service_url, ledger, lease_timeout=LEASE)
    try:
        assert backend.end() == START
        lw = backend.campaign("w", timeout=30)
        first = [f"a{i}".encode() for i in range(5)]
        end1 = lw.append(first, b"")
        assert backend.end() == end1
        with backend.reader(START) as r:
            got1 = []
            while len(got1) < 5:
                got1.extend(r.read(16, timeout=1))
        assert got1[-1].next == end1
        # A reader whose start entry does not exist yet waits for it.
        tail = backend.reader(end1)
        assert tail.read(16, timeout=0.3) == [] and tail.read(16, timeout=0.0) == []
        # Force a new BookKeeper ledger under the topic; the writer's producer reconnects.
        _unload(local_pulsar.admin_url, ledger)
        # A reader created after the rollover, at the old ledger's end, before any new entry.
        tail2 = backend.reader(end1)
        second = [f"b{i}".encode() for i in range(5)]
        end2 = lw.append(second, b"")
        assert end2.major > end1.major, "the unload did not roll the topic's ledger over"
        assert backend.end() == end2
        for r in (tail, tail2):
            got = []
            deadline = time.monotonic() + 30
            while len(got) < 5 and time.monotonic() < deadline:
                got.extend(r.read(16, timeout=0.5))
            assert [e.data for e in got] == second
            assert got[0].position == Position(end2.major, 0)
            assert r.caught_up(backend.end())
            r.close()
        with backend.reader(START) as r:
            everything = []
            while len(everything) < 10:
                everything.extend(r.read(64, timeout=1))
        assert [e.data for e in everything] == first + second
        for i, e in enumerate(everything):
            with backend.reader(e.next) as r:
                rest = []
                deadline = time.monotonic() + 10
                while len(rest) < 9 - i and time.monotonic() < deadline:
                    rest.extend(r.read(64, timeout=0.3 if not rest else 0.0))
                assert [x.data for x in rest] == (first + second)[i + 1 :]
        # The start of the new ledger, as a Position with entry 0.
        with backend.reader(Position(end2.major, 0)) as r:
            assert [e.data for e in r.read(64, timeout=2)][:1] == [b"b0"]
        lw.close()
    finally:
        backend.close()


class _CountingReader:
    """A pulsar Reader that counts the reads that found nothing (each one a Timeout
    raised through the binding)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.empty = 0

    def read_next(self, timeout_ms: int) -> Any:
        import pulsar

        try:
            return self.inner.read_next(timeout_ms)
        except pulsar.Timeout:
            self.empty += 1
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_tailing_read_returns_what_it_waited_for_without_asking_for_more(
    local_pulsar: Any,
) -> None:
    backend = PulsarBackend(local_pulsar.service_url, f"tail-{uuid.uuid4().hex[:10]}")
    try:
        lw = backend.campaign("w", timeout=30)
        r = backend.reader(START)
        counting = _CountingReader(r._reader)  # type: ignore[attr-defined]
        r._reader = counting  # type: ignore[attr-defined]
        # Each entry appended while the reader waits arrives alone: the read returns it
        # without a read_next(0) that would find the queue empty (and raise).
        got = []
        for i in range(5):
            later = threading.Timer(0.2, lw.append, ([f"t{i}".encode()], b""))
            later.start()
            got.extend(r.read(16, timeout=10))
            later.join()
        assert [e.data for e in got] == [f"t{i}".encode() for i in range(5)]
        assert counting.empty == 0
        # Entries already queued are all taken by one read, which stops at the first
        # read_next(0) that finds nothing.
        lw.append([f"q{i}".encode() for i in range(5)], b"")
        time.sleep(2)
        assert [e.data for e in r.read(16, timeout=10)] == [f"q{i}".encode() for i in range(5)]
        assert counting.empty == 1
        r.close()
        lw.close()
    finally:
        backend.close()


def _scan(backend: PulsarBackend, start: Position, state: SequencerState) -> tuple[bytes, int]:
    """The sequencer state at the ledger's end, scanning from `start` with `state` (what
    an election does), and how many entries that read."""
    end = backend.end()
    seen = 0
    with backend.reader(start) as r:
        while not r.caught_up(end):
            for e in r.read(4096, timeout=1):
                state.advance(e.data)
                seen += 1
    return state.to_bytes(), seen


def _commit_in_appends(db: ledgerlog.Client, appends: int, tag: str) -> None:
    """`appends` submissions of 5 transactions, one after the other (an append each)."""
    for a in range(appends):
        txs = []
        for i in range(5):
            tx = db.transaction()
            tx.put(f"{tag}/{a}/{i}", a * 5 + i)
            txs.append(tx)
        assert all(f.result(60).committed for f in db.submit_many(txs))


def _restart_checked(url: str) -> tuple[Position, int]:
    """The restart point a new writer gets; asserts that scanning on from it reaches the
    state a scan of the whole ledger does. Returns it and the entries scanned from it."""
    backend = PulsarBackend.from_url(url)
    try:
        whole, _ = _scan(backend, START, SequencerState())
        with backend.campaign("next", timeout=30) as lw:
            position, raw = lw.recovery_point()
        assert raw is not None, "the newest message carries no restart point"
        from_point, scanned = _scan(backend, position, SequencerState.from_bytes(raw))
        assert from_point == whole
        return position, scanned
    finally:
        backend.close()


def test_a_new_writer_scans_on_from_the_newest_messages_restart_point(url: str) -> None:
    url = f"{url}?lease_timeout={LEASE}"
    with ledgerlog.open(url, client_id="first", timeout=60) as db:
        db.wait_writer(60)
        _commit_in_appends(db, 40, "a")
    position, scanned = _restart_checked(url)
    assert scanned <= 3, f"scanned {scanned} entries from {position}"
    # The next writer takes over from there: its records follow on, nothing rejected.
    with ledgerlog.open(url, client_id="second", timeout=60) as db:
        db.wait_writer(60)
        _commit_in_appends(db, 2, "b")
    reader, view, backend = replica(url)
    try:
        assert reader.last_seq == 42 * 5
        assert view.get("b/1/4") == 9
    finally:
        reader.close()
        backend.close()


def test_the_restart_point_follows_the_topic_into_a_new_bookkeeper_ledger(
    local_pulsar: Any,
) -> None:
    ledger = f"roll-{uuid.uuid4().hex[:10]}"
    url = f"{local_pulsar.service_url}/public/default/{ledger}?lease_timeout={LEASE}"
    with ledgerlog.open(url, client_id="first", timeout=60) as db:
        db.wait_writer(60)
        _commit_in_appends(db, 10, "a")
        before = PulsarBackend.from_url(url)
        try:
            old_ledger = before.end().major
        finally:
            before.close()
        _unload(local_pulsar.admin_url, ledger)
        _commit_in_appends(db, 10, "b")
        # The lease thread checks what follows the old ledger's last proven entry.
        time.sleep(LEASE)
        _commit_in_appends(db, 3, "c")
    position, scanned = _restart_checked(url)
    assert position.major > old_ledger, f"restart point {position} is still in {old_ledger}"
    assert scanned <= 3, f"scanned {scanned} entries from {position}"


def test_pipelined_appends_of_a_fenced_writer_all_fail(local_pulsar: Any) -> None:
    ledger = f"pipe-{uuid.uuid4().hex[:10]}"
    a = PulsarBackend(local_pulsar.service_url, ledger, lease_timeout=LEASE)
    b = PulsarBackend(local_pulsar.service_url, ledger, lease_timeout=LEASE)
    try:
        old = a.campaign("old", timeout=30)
        assert old.max_pending_appends > 1
        landed = [old.append_async([f"old-{i}".encode()], b"") for i in range(4)]
        assert [p.result(30) for p in landed] == sorted(p.result(30) for p in landed)
        old.stop_heartbeat()  # hangs, as far as the lease tells: b fences it
        new = b.campaign("new", timeout=30)
        new.append([b"new-0"], b"")
        # Appends the deposed writer starts now fail, all of them, and none lands.
        failed = 0
        for i in range(4):
            try:
                pending = old.append_async([f"late-{i}".encode()], b"")
                pending.result(30)
            except ledgerlog.FencedError:
                failed += 1
        assert failed == 4
        new.append([b"new-1"], b"")
        with b.reader(START) as r:
            got: list[bytes] = []
            deadline = time.monotonic() + 30
            while len(got) < 6 and time.monotonic() < deadline:
                got.extend(e.data for e in r.read(64, timeout=0.5))
            got.extend(e.data for e in r.read(64, timeout=0.5))
        assert got == [b"old-0", b"old-1", b"old-2", b"old-3", b"new-0", b"new-1"]
        new.close()
        old.close()
    finally:
        a.close()
        b.close()


def _intake_messages(backend: PulsarBackend) -> list[bytes]:
    """Every message on the ledger's intake topic, in order."""
    import pulsar

    reader = backend.client.create_reader(backend.intake_topic, pulsar.MessageId.earliest)
    messages: list[bytes] = []
    while True:
        try:
            messages.append(reader.read_next(2000).data())
        except pulsar.Timeout:
            break
    reader.close()
    return messages


def test_intake_holds_back_and_merges_submissions_while_messages_are_in_flight(
    local_pulsar: Any,
) -> None:
    from msgspec import msgpack

    from ledgerlog.codec import WireIntake, decode_entry, encode_intake

    ledger = f"merge-{uuid.uuid4().hex[:10]}"
    backend = PulsarBackend(local_pulsar.service_url, ledger, intake_in_flight=1)
    try:
        producer = backend.intake_producer("merger")
        results: list[BaseException | None] = []
        done = threading.Event()
        n = 60

        def finished(error: BaseException | None) -> None:
            results.append(error)
            if len(results) == n + 1:
                done.set()

        for i in range(n):
            producer.submit_async(encode_intake([msgpack.encode(f"t{i}")]), finished)
        producer.submit_async(b"foreign bytes", finished)  # not an intake batch
        assert done.wait(30), f"{len(results)} of {n + 1} submissions acknowledged"
        assert results == [None] * (n + 1)
        messages = _intake_messages(backend)
        # One in flight: the rest was held and went out merged, in submission order,
        # except the foreign bytes, which travel as they are.
        assert len(messages) < n // 2
        assert messages[-1] == b"foreign bytes"
        txns: list[bytes] = []
        for data in messages[:-1]:
            entry = decode_entry(data)
            assert isinstance(entry, WireIntake)
            txns.extend(bytes(t) for t in entry.txns)
        assert txns == [msgpack.encode(f"t{i}") for i in range(n)]
        producer.close()
        with pytest.raises(ledgerlog.ClosedError):
            producer.submit_async(encode_intake([msgpack.encode("late")]), finished)
    finally:
        backend.close()


def test_submissions_made_before_close_reach_the_ledger(local_pulsar: Any) -> None:
    # submit_many returns before the intake message is acknowledged (and may hold it
    # back to merge it): closing the client right after must still deliver it.
    url = f"{local_pulsar.service_url}/public/default/close-{uuid.uuid4().hex[:10]}"
    with ledgerlog.open(url, client_id="keeper", timeout=60) as keeper:
        keeper.wait_writer(60)
        db = ledgerlog.open(url, writer=None, client_id="leaver", timeout=60)
        db.sync(60)
        for b in range(20):
            txs = []
            for i in range(10):
                tx = db.transaction()
                tx.put(f"left-{b}-{i}", b * 10 + i)
                txs.append(tx)
            db.submit_many(txs)
        db.close()
        deadline = time.monotonic() + 60
        while keeper.get("left-19-9") != 199:
            assert time.monotonic() < deadline, "submissions made before close were lost"
            time.sleep(0.05)
        keeper.sync(60)
        assert [keeper.get(f"left-{b}-{i}") for b in range(20) for i in range(10)] == list(
            range(200)
        )


def test_close_sends_held_submissions_in_messages_of_at_most_1_mib(local_pulsar: Any) -> None:
    from msgspec import msgpack

    from ledgerlog.codec import WireIntake, decode_entry, encode_intake

    backend = PulsarBackend(
        local_pulsar.service_url, f"heldclose-{uuid.uuid4().hex[:10]}", intake_in_flight=1
    )
    try:
        producer = backend.intake_producer("closer")
        results: list[BaseException | None] = []
        big = [msgpack.encode(f"{i}" * 400_000) for i in range(5)]  # 400 KB transactions
        for t in big:
            producer.submit_async(encode_intake([t]), results.append)
        producer.close()  # the first is in flight, four are held: sent and flushed here
        assert results == [None] * 5
        messages = _intake_messages(backend)
        assert 1 < len(messages) < 5 and max(len(m) for m in messages) <= (1 << 20) + 1024
        txns: list[bytes] = []
        for data in messages:
            entry = decode_entry(data)
            assert isinstance(entry, WireIntake)
            txns.extend(bytes(t) for t in entry.txns)
        assert txns == big
    finally:
        backend.close()


@pytest.mark.parametrize("route", ["intake", "local"])
def test_many_threads_share_messages_and_all_commit(local_pulsar: Any, route: str) -> None:
    """8 threads of one client submit at once: through the intake (the writer is in
    another client) or straight to the client's own elected writer ("local")."""
    url = f"{local_pulsar.service_url}/public/default/threads-{uuid.uuid4().hex[:10]}"
    with contextlib.ExitStack() as stack:
        if route == "intake":
            host = stack.enter_context(ledgerlog.open(url, client_id="host", timeout=60))
            host.wait_writer(60)
        db = stack.enter_context(
            ledgerlog.open(
                url,
                client_id="threads",
                writer="auto" if route == "local" else None,
                timeout=60,
            )
        )
        db.wait_writer(60)
        assert db.writer is None if route == "intake" else db.writer.elected.wait(60)

        def work(t: int) -> None:
            for b in range(10):
                txs = []
                for i in range(5):
                    tx = db.transaction()
                    tx.put(f"k-{t}-{b}-{i}", i)
                    txs.append(tx)
                assert all(f.result(60).committed for f in db.submit_many(txs))

        run_in_threads(work, 8, timeout=120)
        db.sync(60)
        assert db.get("k-7-9-4") == 4
        assert (
            sum(
                1
                for t in range(8)
                for b in range(10)
                for i in range(5)
                if db.get(f"k-{t}-{b}-{i}") == i
            )
            == 400
        )
        if route == "local":
            assert isinstance(db.backend, PulsarBackend)
            assert _intake_messages(db.backend) == []


def test_a_deposed_writers_local_submissions_go_through_the_intake_once(
    local_pulsar: Any,
) -> None:
    """The elected writer's own client submits without the intake; its writer is then
    fenced mid-stream (its lease stops, as a hung writer's would, and the standby in the
    other client takes over). Submissions in its failed appends go through the intake
    after all: every one is decided committed exactly once, and replicas agree."""
    ledger = f"local-{uuid.uuid4().hex[:10]}"
    backends = [
        PulsarBackend(local_pulsar.service_url, ledger, lease_timeout=LEASE) for _ in range(3)
    ]
    host = ledgerlog.Client(backends[0], client_id="host", timeout=60)
    standby = None
    try:
        assert host.writer is not None and host.writer.elected.wait(60)
        standby = ledgerlog.Client(backends[1], client_id="standby", timeout=60)
        standby.sync(60)
        futures: list[Any] = []
        stop = threading.Event()

        def submit() -> None:
            i = 0
            while not stop.is_set():
                txs = []
                for _ in range(20):
                    tx = host.transaction()
                    tx.put(f"k{i}", i)
                    txs.append(tx)
                    i += 1
                futures.extend(host.submit_many(txs))
                time.sleep(0.01)

        submitter = threading.Thread(target=submit)
        submitter.start()
        try:
            time.sleep(1.0)
            assert _intake_messages(backends[0]) == []  # all local so far
            for w in backends[0].active_writers:
                w.stop_heartbeat()
            deadline = time.monotonic() + 30
            while not (standby.writer is not None and standby.writer.elected.is_set()):
                assert time.monotonic() < deadline, "the standby never took over"
                time.sleep(0.05)
            time.sleep(1.0)
        finally:
            stop.set()
            submitter.join(30)
        decisions = [f.result(60) for f in futures]
        assert len(decisions) > 100
        assert all(d.committed for d in decisions)
        assert _intake_messages(backends[0]), "nothing went through the intake"
        n = len(decisions)
        seq = standby.sync(60)
        host.sync(60)
        assert host.digest == standby.digest
        assert [standby.get(f"k{i}") for i in range(n)] == list(range(n))
        results: list[EntryResult] = []
        check = Reader(backends[2], name="check")
        check.subscribe(results.extend)
        check.catch_up(60)
        assert check.last_seq == seq
        committed = Counter(
            str(d.txn_id)
            for res in results
            if res.kind == "record"
            for d in res.decisions
            if d.committed
        )
        assert len(committed) == n and set(committed.values()) == {1}
        check.close()
    finally:
        if standby is not None:
            standby.close()
        host.close()
        for b in backends:
            b.close()


def test_end_is_one_cheap_round_trip(local_pulsar: Any) -> None:
    backend = PulsarBackend(local_pulsar.service_url, f"end-{uuid.uuid4().hex[:10]}")
    try:
        with backend.campaign("w", timeout=30) as lw:
            lw.append([b"x"] * 20, b"")
        backend.end()
        started = time.perf_counter()
        for _ in range(20):
            backend.end()
        assert (time.perf_counter() - started) / 20 < 0.05
    finally:
        backend.close()


class _StaleEndConsumer:
    """Answers get_last_message_id with a fixed id, as the client library did around a
    broker restart (an "empty topic" answer for a ledger with entries)."""

    def __init__(self, msg_id: Any) -> None:
        self.msg_id = msg_id
        self.calls = 0

    def get_last_message_id(self) -> Any:
        self.calls += 1
        return self.msg_id

    def close(self) -> None:
        pass


def test_end_never_goes_back_before_what_was_read(local_pulsar: Any) -> None:
    import pulsar

    ledger = f"end-{uuid.uuid4().hex[:10]}"
    backend = PulsarBackend(local_pulsar.service_url, ledger, operation_timeout=1.0)
    try:
        with backend.campaign("w", timeout=30) as lw:
            first = lw.append([b"a"] * 3, b"")
            end = lw.append([b"b"] * 3, b"")
        assert first < end
        with backend.reader(START) as r:
            got: list[Any] = []
            while len(got) < 6:
                got.extend(r.read(16, timeout=1))
        real = backend._end_consumer
        # "Empty" for a ledger this process has read six entries of: asked again until
        # the operation timeout, then refused, never answered with START.
        backend._end_consumer = stale = _StaleEndConsumer(pulsar.MessageId.earliest)
        started = time.monotonic()
        with pytest.raises(BackendError, match="before"):
            backend.end()
        assert stale.calls > 1 and time.monotonic() - started < 5
        # An answer before one already seen is not taken either.
        backend._end_consumer = _StaleEndConsumer(
            pulsar.MessageId(ledger_id=first.major, entry_id=first.minor - 2)
        )
        with pytest.raises(BackendError):
            backend.end()
        # The broker's real answer is taken again.
        backend._end_consumer = real
        assert backend.end() == end
    finally:
        backend.close()


_LOGGER_SCRIPT = """
import logging, os, sys, time, uuid
from ledgerlog.backends.pulsar import PulsarBackend

calls = [0]
original = logging.Logger.log

def counting(self, level, msg, *args, **kwargs):
    calls[0] += 1
    return original(self, level, msg, *args, **kwargs)

logging.Logger.log = counting  # every stdlib logger, whatever its level
option = {"default": None, "stdlib": True}[sys.argv[2]]
backend = PulsarBackend(sys.argv[1], "log-" + uuid.uuid4().hex[:10], client_logger=option)
try:
    with backend.campaign("w", timeout=30) as lw:
        for _ in range(50):
            lw.append([b"x"], b"")
    with backend.reader() as r:
        seen, deadline = 0, time.monotonic() + 30
        while seen < 50 and time.monotonic() < deadline:
            seen += len(r.read(1024, timeout=0.5))
    kind = type(backend._client_options["logger"]).__name__
finally:
    backend.close()
print(seen, calls[0], kind, flush=True)
# pulsar-client's threads can still be calling the stdlib logger while the interpreter
# shuts down, which aborts the process ("terminate called without an active exception").
os._exit(0)
"""


@pytest.mark.parametrize("mode", ["default", "stdlib"])
def test_the_c_client_logs_natively_unless_asked_for_a_stdlib_logger(
    local_pulsar: Any, mode: str
) -> None:
    # pulsar-client hands a stdlib logger every line the C++ client could log, DEBUG
    # included, each call taking the GIL from a client thread: by default the C++ client
    # logs on its own (errors to stderr); client_logger=True (or a Logger) is the
    # application's choice. In a process of its own: the C++ client's logger is
    # process-wide, set by the first client a process creates.
    out = subprocess.run(
        [sys.executable, "-c", _LOGGER_SCRIPT, local_pulsar.service_url, mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    seen, calls, kind = out.stdout.split()
    assert int(seen) == 50
    if mode == "default":
        assert kind == "FileLogger"
        assert int(calls) == 0  # nothing the C++ client said reached Python
    else:
        assert kind == "Logger"
        assert int(calls) > 50  # more than a call per message, nearly all below WARNING


# -- end to end -----------------------------------------------------------------------------


def test_transfers_conserve_money_and_replicas_agree(any_url: str) -> None:
    url = any_url
    clients = [
        ledgerlog.open(url, client_id=f"bank{i}", writer="auto", timeout=20, lease_timeout=LEASE)
        for i in range(3)
    ]
    banks: list[Bank] = []
    try:
        clients[0].wait_writer(60)
        banks = [Bank(c, threads=4, seed=i).start() for i, c in enumerate(clients)]
        started = time.monotonic()
        time.sleep(8)
        for b in banks:
            b.stop()
        elapsed = time.monotonic() - started
        committed = sum(len(b.committed) for b in banks)
        print(
            f"\n[pulsar e2e] {committed} transfers committed in {elapsed:.1f}s "
            f"= {committed / elapsed:.0f} txn/s ({sum(b.aborted for b in banks)} aborted, "
            f"{sum(b.unknown for b in banks)} unknown)"
        )
        assert committed > 50
        seqs = {c.sync(timeout=60) for c in clients}
        assert len(seqs) == 1
        assert len({c.digest for c in clients}) == 1
        assert sum(1 for c in clients if c.writer and c.writer.elected.is_set()) == 1
        reader, view, backend = replica(url)
        try:
            assert reader.last_seq == seqs.pop()
            assert reader.digest == clients[0].digest
            assert total(view) == (0, ACCOUNTS)
        finally:
            reader.close()
            backend.close()
        walk = LedgerWalk(url)
        seen = {c.client_id: b.committed for c, b in zip(clients, banks, strict=True)}
        assert assert_exactly_once(walk, seen) == committed
    finally:
        for b in banks:
            b.stop()
        for c in clients:
            c.close()


def test_kill_9_of_the_elected_writer_loses_nothing(
    url: str, tmp_path: Path, children: list[Child]
) -> None:
    first = Child(url, "kill-a", tmp_path)
    children.append(first)
    assert first.wait_for("ELECTED", 60), first.log()
    children += [Child(url, "kill-b", tmp_path), Child(url, "kill-c", tmp_path)]
    for c in children:
        assert c.wait_for("LOADING", 60), c.log()
    wait_until(lambda: all(c.commits() >= 20 for c in children), 60, "load on every client")
    before = first.commits()
    first.kill()  # SIGKILL mid-stream, with transactions in flight
    survivors = children[1:]
    wait_until(
        lambda: sum(len(c.lines("ELECTED")) for c in survivors) >= 1, 60, "a standby's election"
    )
    counts = [c.commits() for c in survivors]
    wait_until(
        lambda: all(c.commits() >= n + 30 for c, n in zip(survivors, counts, strict=True)),
        60,
        "commits under the new writer",
    )
    finish(survivors)
    seen = {c.client_id: c.seen() for c in children}
    assert len(seen["kill-a"]) >= before
    walk = LedgerWalk(url)
    assert assert_exactly_once(walk, seen) > 0
    epochs = [res.epoch for _p, res in walk.entries if res.kind == "epoch"]
    assert len(epochs) >= 2 and epochs == sorted(epochs)
    reader, view, backend = replica(url)
    try:
        assert total(view) == (0, ACCOUNTS)
        for c in survivors:
            seq, digest = c.final()
            assert reader.digest_at(seq) is not None and reader.digest_at(seq).hex() == digest
    finally:
        reader.close()
        backend.close()


def test_broker_restart_mid_stream_loses_and_duplicates_nothing(
    url: str, local_pulsar: Any
) -> None:
    clients = [
        ledgerlog.open(url, client_id=f"rs{i}", writer="auto", timeout=10, lease_timeout=LEASE)
        for i in range(2)
    ]
    observer = None
    banks: list[Bank] = []
    try:
        clients[0].wait_writer(60)
        # A replica without a writer that tails through the restart as well.
        obs_backend = PulsarBackend.from_url(url)
        obs_view = MemoryView()
        observer = Reader(obs_backend, [obs_view], name="observer", keep_digests=1 << 20).start()
        banks = [Bank(c, threads=3, seed=10 + i).start() for i, c in enumerate(clients)]
        wait_until(lambda: all(len(b.committed) >= 30 for b in banks), 60, "load")
        local_pulsar.restart()
        after = [len(b.committed) for b in banks]
        wait_until(
            lambda: all(len(b.committed) >= n + 30 for b, n in zip(banks, after, strict=True)),
            120,
            "commits after the restart",
        )
        for b in banks:
            b.stop()
        seqs = {c.sync(timeout=60) for c in clients}
        assert len(seqs) == 1, seqs
        assert len({c.digest for c in clients}) == 1
        assert observer.sync(timeout=60) == seqs.pop()
        assert observer.digest == clients[0].digest
        assert total(obs_view) == (0, ACCOUNTS)
        walk = LedgerWalk(url)
        seen = {c.client_id: b.committed for c, b in zip(clients, banks, strict=True)}
        assert assert_exactly_once(walk, seen) > 0
        # Nothing the reader accepted is out of seq order or duplicated.
        seqs_seen = [d.seq for _p, res in walk.entries for d in res.decisions if d.seq]
        assert seqs_seen == sorted(set(seqs_seen))
    finally:
        for b in banks:
            b.stop()
        if observer is not None:
            observer.close()
            observer.backend.close()
        for c in clients:
            c.close()


def test_sigstopped_writer_is_replaced_and_never_accepted_after(
    url: str, tmp_path: Path, children: list[Child]
) -> None:
    hung = Child(url, "stop-a", tmp_path)
    children.append(hung)
    assert hung.wait_for("ELECTED", 60), hung.log()
    other = Child(url, "stop-b", tmp_path)
    children.append(other)
    for c in children:
        assert c.wait_for("LOADING", 60), c.log()
    wait_until(lambda: all(c.commits() >= 20 for c in children), 60, "load on both clients")
    hung.signal(signal.SIGSTOP)
    try:
        assert other.wait_for("ELECTED", LEASE + 30), other.log()
        n = other.commits()
        wait_until(lambda: other.commits() >= n + 30, 60, "commits under the new writer")
    finally:
        hung.signal(signal.SIGCONT)
    # The resumed process runs on: its writer learns it was deposed and stands by.
    assert hung.wait_for("STANDBY", 30), hung.log()
    n = hung.commits()
    wait_until(lambda: hung.commits() >= n + 10, 60, "the resumed client's commits")
    # Its own pause did not count as the new writer's silence: no takeover back.
    assert len(hung.lines("ELECTED")) == 1 and len(other.lines("ELECTED")) == 1
    finish(children)
    walk = LedgerWalk(url)
    epochs = [(res.epoch, res.writer_id, i) for i, (_p, res) in enumerate(walk.entries)]
    takeover = next(
        i
        for i, (_p, res) in enumerate(walk.entries)
        if res.kind == "epoch" and res.writer_id == "stop-b"
    )
    old_epoch = max(e for e, w, i in epochs if w == "stop-a" and i < takeover)
    late = [res for _p, res in walk.entries[takeover:] if res.writer_id == "stop-a"]
    accepted = [r for r in late if r.kind == "record" and r.epoch <= old_epoch]
    assert not accepted, f"{len(accepted)} records of the deposed writer were accepted"
    seen = {c.client_id: c.seen() for c in children}
    assert assert_exactly_once(walk, seen) > 0
    reader, view, backend = replica(url)
    try:
        assert total(view) == (0, ACCOUNTS)
        for c in children:
            seq, digest = c.final()
            assert reader.digest_at(seq) is not None and reader.digest_at(seq).hex() == digest
    finally:
        reader.close()
        backend.close()


if __name__ == "__main__":
    roles = {"bank": child_bank}
    sys.exit(roles[sys.argv[1]](sys.argv[2:]))
