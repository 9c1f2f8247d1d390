"""The BookKeeper backend's ledger rollover within a writer term and the garbage collection
of gone producers' intake ledgers, against the session's real ZooKeeper + 4 bookies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from typing import Any

import msgspec
import pytest

pytest.importorskip("py4j")

from bk_helpers import (
    all_decided,
    assert_exactly_once,
    bk_url,
    collect,
    kill_writer_midstream,
    open_bk,
    submit,
    wait_for,
)

from ledgerlog.backends.bookkeeper import BookKeeperBackend
from ledgerlog.errors import BackendError, FencedError
from ledgerlog.model import START, Outcome, Position
from ledgerlog.reader import Reader
from ledgerlog.validator import SequencerState
from ledgerlog.writer import Writer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _chain(backend: BookKeeperBackend) -> list[int]:
    return backend.read_chain()[0]


def _entries_in(backend: BookKeeperBackend, ledger_id: int) -> int:
    """Entries after the header of one BookKeeper ledger of the chain."""
    h = backend.call("openLedgerNoRecovery", ledger_id, b"ledgerlog")
    try:
        return max(int(backend.call("lastAddConfirmed", h)), 0)
    finally:
        backend.call("closeLedger", h)


def test_rollovers_readers_follow_and_a_takeover_scans_only_the_tail(
    local_bookkeeper: Any,
) -> None:
    name = f"roll-{uuid.uuid4().hex[:8]}"
    a = open_bk(local_bookkeeper, name, url_params={"roll_entries": 4})
    b, c = open_bk(local_bookkeeper, name), open_bk(local_bookkeeper, name)
    assert a.roll_entries == 4
    w1 = Writer(a, "w1").start()
    w2: Writer | None = None
    producer = c.intake_producer("client")
    live = Reader(c, name="live")  # tails the chain while it rolls
    seen: dict[tuple[str, int], list[Outcome]] = {}
    try:
        assert w1.elected.wait(30)
        lw1 = a.active_writers[0]
        n = 150
        for i in range(n):
            submit(producer, "client", i)
            if i % 10 == 0:
                collect(live, seen, 0.0)
        wait_for(lambda: (collect(live, seen, 0.1), len(seen) >= n)[1], 60, "the live reader")
        assert lw1.rollovers >= 10, lw1.rollovers
        chain = _chain(b)
        assert len(chain) == lw1.rollovers + 1
        assert_exactly_once(seen, "client", n)
        # A reader from the start (another process's view) follows every rollover.
        assert_exactly_once(all_decided(local_bookkeeper, name, n), "client", n)
        total = sum(_entries_in(b, lid) for lid in chain)

        # An election after the rollovers: the new writer recovers (fences) and scans the
        # chain's tail ledger only, and starts from its header's sequencer state.
        w1.stop()
        w2 = Writer(b, "w2").start()
        assert w2.elected.wait(30)
        lw2 = b.active_writers[0]
        assert lw2.scanned is not None
        scanned_ledger, scanned_entries = lw2.scanned
        assert scanned_ledger == chain[-1]
        assert scanned_entries <= 4 < total
        assert lw2.recovery_point()[0] == Position(len(chain), 1)
        assert b.bridge_stats().by_method.get("openLedgerRecover") == 1
        for i in range(n, n + 20):
            submit(producer, "client", i)
        decided = all_decided(local_bookkeeper, name, n + 20)
        assert_exactly_once(decided, "client", n + 20)
        assert b.end() > Position(len(chain), 0)
    finally:
        live.close()
        producer.close()
        w1.stop()
        if w2 is not None:
            w2.stop()
        for x in (a, b, c):
            x.close()


def test_a_deposed_writer_can_neither_add_nor_roll_the_chain(local_bookkeeper: Any) -> None:
    name = f"rollfence-{uuid.uuid4().hex[:8]}"
    a = open_bk(local_bookkeeper, name, url_params={"roll_entries": 1})
    b = open_bk(local_bookkeeper, name)
    try:
        old = a.campaign("old", timeout=30)
        state = SequencerState().to_bytes()
        old.append([b"one"], state)
        old.append([b"two"], state)  # rolled first: a ledger holds one entry
        assert old.rollovers == 1
        old.stop_heartbeat()
        new = b.campaign("new", timeout=30)
        chain = _chain(b)
        assert chain[-1] == new.ledger_id and chain[-2] == old.ledger_id
        # Its next append must roll (its ledger is full): the recovery-open closed its
        # ledger and the chain moved on, so neither the seal nor the CAS can succeed.
        with pytest.raises(FencedError):
            old.append([b"stale"], state)
        assert _chain(b) == chain
        old.close()
        # Nor can it add to the ledger the new writer recovered, rolling or not.
        b2 = open_bk(local_bookkeeper, name, url_params={"roll_entries": 1000})
        try:
            new.stop_heartbeat()
            newer = b2.campaign("newer", timeout=30)
            with pytest.raises(FencedError):
                new.append([b"stale"], state)
            newer.close()
            new.close()
        finally:
            b2.close()
        # The chain's entries are exactly the acknowledged ones.
        with a.reader(START) as r:
            datas = []
            while entries := r.read(100, timeout=1.0):  # one BookKeeper ledger per read
                datas += [e.data for e in entries]
        assert b"stale" not in datas and datas[:2] == [b"one", b"two"]
    finally:
        a.close()
        b.close()


def test_kill_9_of_a_writer_rolling_every_append(local_bookkeeper: Any) -> None:
    """roll_entries=1: every append of the victim first rolls to a new BookKeeper ledger
    (create, header, seal, compare-and-set), so the kill lands in or right around one."""
    name = f"rollkill-{uuid.uuid4().hex[:8]}"
    rolled_before: list[int] = []
    kill_writer_midstream(
        local_bookkeeper,
        name,
        bk_url(local_bookkeeper, name, roll_entries=1),
        submissions=1500,
        first_commits=100,
        first_timeout=60,
        before_kill=lambda backend: rolled_before.append(len(_chain(backend))),
    )
    assert rolled_before[0] > 5, "the victim did not roll"


# -- intake garbage collection ---------------------------------------------------------------

_PRODUCER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from ledgerlog.backends.bookkeeper import BookKeeperBackend
    from ledgerlog.codec import encode_intake, encode_transaction
    from ledgerlog.model import Put, Transaction, TxnId
    backend = BookKeeperBackend.from_url(
        sys.argv[1], client_properties="ledgerlog.zkSessionTimeoutMs=3000"
    )
    p = backend.intake_producer("crashed")
    print("NAME", p.name, p.ledger_id, flush=True)
    for i in range(int(sys.argv[2])):
        txn = Transaction(TxnId("crashed", i), 0, writes=[Put(f"crashed-{i}", i)])
        p.submit(encode_intake([encode_transaction(txn)]))
    print("DONE", flush=True)
    while True:
        time.sleep(1)
    """
)


def _intake_nodes(backend: BookKeeperBackend) -> set[str]:
    return {n for n in (backend.call("zkChildren", backend.intake_path) or "").split("/") if n}


def _ledger_exists(backend: BookKeeperBackend, ledger_id: int) -> bool:
    try:
        backend.call("closeLedger", backend.call("openLedgerNoRecovery", ledger_id, b"ledgerlog"))
    except BackendError as exc:
        if "NoSuchLedger" in str(exc):
            return False
        raise
    return True


def _newest_offsets(backend: BookKeeperBackend) -> dict[str, int]:
    """The intake offsets the newest record carries (what a new writer resumes from)."""
    state = SequencerState()
    with backend.reader(START) as r:
        while entries := r.read(1000, timeout=0.5):
            for e in entries:
                state.advance(e.data)
    return dict(msgspec.msgpack.decode(state.meta)) if state.meta else {}


def test_gone_producers_intake_ledgers_are_collected(local_bookkeeper: Any) -> None:
    name = f"gc-{uuid.uuid4().hex[:8]}"
    a, b, c = (open_bk(local_bookkeeper, name) for _ in range(3))
    w1 = Writer(a, "w1").start()
    w2: Writer | None = None
    crashed = subprocess.Popen(
        [sys.executable, "-c", _PRODUCER_SCRIPT, bk_url(local_bookkeeper, name), "25"],
        stdout=subprocess.PIPE,
        text=True,
    )
    closed = c.intake_producer("closed")
    live = c.intake_producer("live")
    try:
        assert w1.elected.wait(30)
        assert crashed.stdout is not None
        _, crashed_name, crashed_ledger = crashed.stdout.readline().split()
        for i in range(30):
            submit(closed, "closed", i)
            submit(live, "live", i)
        assert crashed.stdout.readline().strip() == "DONE"
        os.kill(crashed.pid, signal.SIGKILL)  # its gateway JVM and ZooKeeper session go too
        crashed.wait(10)
        closed.close()
        gone = {closed.name: closed.ledger_id, crashed_name: int(crashed_ledger)}
        assert set(gone) <= _intake_nodes(c)
        # Collected once the writer's durable records cover every entry: the crashed
        # producer's after its session expires and the writer fences its ledger.
        wait_for(lambda: not (set(gone) & _intake_nodes(c)), 60, "intake collection")
        for ledger_id in gone.values():
            assert not _ledger_exists(c, ledger_id)
        assert live.name in _intake_nodes(c)
        for i in range(30, 40):
            submit(live, "live", i)
        decided = all_decided(local_bookkeeper, name, 95)
        assert_exactly_once(decided, "closed", 30)
        assert_exactly_once(decided, "crashed", 25)
        assert_exactly_once(decided, "live", 40)
        # The records stop carrying the collected producers' offsets.
        wait_for(lambda: not (set(gone) & set(_newest_offsets(c))), 30, "offsets dropped")
        assert live.name in _newest_offsets(c)

        # A new writer resumes after the collection: nothing is read twice or missed.
        w1.stop()
        w2 = Writer(b, "w2").start()
        assert w2.elected.wait(30)
        for i in range(40, 50):
            submit(live, "live", i)
        decided = all_decided(local_bookkeeper, name, 105)
        assert_exactly_once(decided, "closed", 30)
        assert_exactly_once(decided, "crashed", 25)
        assert_exactly_once(decided, "live", 50)
    finally:
        if crashed.poll() is None:
            crashed.kill()
            crashed.wait(10)
        live.close()
        closed.close()
        w1.stop()
        if w2 is not None:
            w2.stop()
        for x in (a, b, c):
            x.close()
