"""The BookKeeper backend against a real ZooKeeper + 3 bookies (3/3/2): fencing, a bookie
killed mid-stream, the elected writer's process killed, a dead gateway JVM, URLs.

Shares the session's ensemble with the conformance suite; the bookie-killing test restarts
the bookie before it returns.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from typing import Any

import pytest

pytest.importorskip("py4j")

from ledgerlog.backends.bookkeeper import BookKeeperBackend, GatewayFailedError
from ledgerlog.codec import encode_intake, encode_transaction
from ledgerlog.errors import ConfigError, FencedError
from ledgerlog.model import START, Outcome, Put, Transaction, TxnId
from ledgerlog.reader import Reader
from ledgerlog.validator import SequencerState
from ledgerlog.writer import Writer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LEASE = 2.0


def _open(cluster: Any, ledger: str, **kw: Any) -> BookKeeperBackend:
    return BookKeeperBackend.from_url(
        f"bookkeeper://{cluster.zk_connect}/{ledger}?ensemble=3&write=3&ack=2",
        lease_timeout=LEASE,
        **kw,
    )


def _submit(producer: Any, client: str, i: int) -> None:
    txn = Transaction(TxnId(client, i), 0, writes=[Put(f"{client}-{i}", i)])
    producer.submit(encode_intake([encode_transaction(txn)]))


def _collect(reader: Reader, into: dict[tuple[str, int], list[Outcome]], timeout: float) -> None:
    for res in reader.poll(timeout=timeout):
        for d in res.decisions:
            if d.seq is not None and d.txn_id is not None:
                key = (d.txn_id.client_id, d.txn_id.client_seq)
                into.setdefault(key, []).append(d.outcome)


def _all_decided(cluster: Any, ledger: str, want: int, timeout: float = 60) -> dict[Any, Any]:
    """Decisions of a fresh reader of the whole ledger (another process's view)."""
    backend = _open(cluster, ledger)
    reader = Reader(backend, name="audit")
    decided: dict[tuple[str, int], list[Outcome]] = {}
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _collect(reader, decided, 0.2)
            if sum(Outcome.COMMITTED in v for v in decided.values()) >= want:
                break
        _collect(reader, decided, 0.5)
    finally:
        reader.close()
        backend.close()
    return decided


def test_from_url_validates(local_bookkeeper: Any) -> None:
    with pytest.raises(ConfigError):
        BookKeeperBackend.from_url("bookkeeper://127.0.0.1:1/a/b")
    with pytest.raises(ConfigError):
        BookKeeperBackend.from_url("bookkeeper://127.0.0.1:1/a?ensemble=2&write=3&ack=2")
    with pytest.raises(ConfigError):
        BookKeeperBackend.from_url("bookkeeper://127.0.0.1:1/a?bogus=1")
    from ledgerlog.client import open_backend

    b = open_backend(f"bookkeeper://{local_bookkeeper.zk_connect}/url-{uuid.uuid4().hex[:8]}")
    try:
        assert isinstance(b, BookKeeperBackend)
        assert (b.ensemble, b.write_quorum, b.ack_quorum) == (3, 3, 2)
        assert b.end() == START
    finally:
        b.close()


def test_fenced_writer_cannot_add_and_its_clients_learn_it(local_bookkeeper: Any) -> None:
    name = f"fence-{uuid.uuid4().hex[:8]}"
    a, b, c = (_open(local_bookkeeper, name) for _ in range(3))
    try:
        # The raw handle: a hung writer (its process and gateway JVM live on) is deposed,
        # and its BookKeeper ledger is fenced: its add fails with BookKeeper's own error.
        old = a.campaign("old", timeout=30)
        old.append([b"before"], SequencerState().to_bytes())
        old.stop_heartbeat()
        new = b.campaign("new", timeout=30)
        with pytest.raises(FencedError) as err:
            old.append([b"stale"], SequencerState().to_bytes())
        assert "BKLedgerFencedException" in str(err.value)
        new.close()
        old.close()

        # The Writer: a deposed one learns it (check() or its next append), tells its
        # listeners and stands by; the new one commits everything once.
        fenced: list[FencedError] = []
        w1 = Writer(a, "w1", on_fenced=fenced.append).start()
        assert w1.elected.wait(30)
        for lw in a.active_writers:
            lw.stop_heartbeat()
        w2 = Writer(b, "w2").start()
        try:
            assert w2.elected.wait(30)
            deadline = time.monotonic() + 10
            while not fenced and time.monotonic() < deadline:
                time.sleep(0.05)
            assert fenced, "the deposed writer was never told"
            producer = c.intake_producer("client")
            for i in range(20):
                _submit(producer, "client", i)
            producer.close()
            decided = _all_decided(local_bookkeeper, name, 20)
            assert all(decided[("client", i)].count(Outcome.COMMITTED) == 1 for i in range(20))
        finally:
            w1.stop()
            w2.stop()
    finally:
        for x in (a, b, c):
            x.close()


def test_kill_9_one_bookie_mid_stream_loses_nothing(local_bookkeeper: Any) -> None:
    name = f"bookie-{uuid.uuid4().hex[:8]}"
    a, c = _open(local_bookkeeper, name), _open(local_bookkeeper, name)
    w = Writer(a, "w1").start()
    producer = c.intake_producer("client")  # created while all 3 bookies are up
    killed = False
    try:
        assert w.elected.wait(30)
        n = 400
        for i in range(n):
            if i == n // 2:
                local_bookkeeper.kill_bookie(2)
                killed = True
            _submit(producer, "client", i)
        decided = _all_decided(local_bookkeeper, name, n)
        missing = [i for i in range(n) if Outcome.COMMITTED not in decided.get(("client", i), [])]
        assert not missing, f"{len(missing)} acknowledged submissions never committed"
        assert all(v.count(Outcome.COMMITTED) == 1 for v in decided.values())
    finally:
        producer.close()
        w.stop()
        a.close()
        c.close()
        if killed:
            local_bookkeeper.restart_bookie(2)


_WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from ledgerlog.backends.bookkeeper import BookKeeperBackend
    from ledgerlog.writer import Writer
    backend = BookKeeperBackend.from_url(sys.argv[1], lease_timeout=float(sys.argv[2]))
    w = Writer(backend, "victim").start()
    w.elected.wait(60)
    print("ELECTED", flush=True)
    while True:
        time.sleep(1)
    """
)


def test_kill_9_of_the_writer_standby_takes_over_exactly_once(local_bookkeeper: Any) -> None:
    name = f"kill-{uuid.uuid4().hex[:8]}"
    url = f"bookkeeper://{local_bookkeeper.zk_connect}/{name}?ensemble=3&write=3&ack=2"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER_SCRIPT, url, str(LEASE)],
        stdout=subprocess.PIPE,
        text=True,
    )
    b, c = _open(local_bookkeeper, name), _open(local_bookkeeper, name)
    standby: Writer | None = None
    producer = c.intake_producer("client")
    reader = Reader(c, name="watcher")
    seen: dict[tuple[str, int], list[Outcome]] = {}
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ELECTED"
        standby = Writer(b, "standby").start()
        stop = threading.Event()
        submitted: list[int] = []

        def submit_forever() -> None:
            i = 0
            while not stop.is_set() and i < 2000:
                _submit(producer, "client", i)
                submitted.append(i)
                i += 1
                time.sleep(0.002)

        t = threading.Thread(target=submit_forever)
        t.start()
        deadline = time.monotonic() + 30
        while sum(Outcome.COMMITTED in v for v in seen.values()) < 150:
            assert time.monotonic() < deadline, "the first writer committed too little"
            _collect(reader, seen, 0.1)
        os.kill(proc.pid, signal.SIGKILL)  # its gateway JVM dies with it (PDEATHSIG)
        proc.wait(10)
        committed_before = {k for k, v in seen.items() if Outcome.COMMITTED in v}
        assert standby.elected.wait(30), "the standby did not take over"
        time.sleep(0.5)
        stop.set()
        t.join(30)
        n = len(submitted)
        decided = _all_decided(local_bookkeeper, name, n)
        for k in committed_before:
            assert decided[k].count(Outcome.COMMITTED) == 1, k
        for i in range(n):
            assert decided.get(("client", i), []).count(Outcome.COMMITTED) == 1, i
        print(
            f"\n[kill -9 writer] {len(committed_before)} seen committed before the kill, {n} in all"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.close()
        producer.close()
        if standby is not None:
            standby.stop()
        b.close()
        c.close()


def test_dead_gateway_jvm_is_a_clear_error(local_bookkeeper: Any) -> None:
    from ledgerlog.devservers.bookkeeper import GatewayProcess

    gp = GatewayProcess(read_timeout=5.0)
    gp.start()
    try:
        gp.entry_point.connect(local_bookkeeper.zk_connect, "explicitLacInterval=10\n")
        backend = BookKeeperBackend(local_bookkeeper.zk_connect, "deadjvm", gateway=gp)
        assert backend.end() == START
        assert gp.pid is not None
        os.kill(gp.pid, signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(GatewayFailedError, match="exited with code -9"):
            backend.end()
        assert time.monotonic() - t < 10
        backend.close()
    finally:
        gp.close()
