"""Smoke tests against a real ZooKeeper + 3 bookies on loopback, driven through the gateway.

Needs a JDK 17+, Maven (the first run resolves jars from Maven Central) and py4j. Tests run
in file order and share one cluster; the bookie-killing test comes last.
Run with ``-s`` to see the latency and throughput figures they print.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("py4j")
from py4j.protocol import Py4JJavaError

from ledgerlog.devservers._common import pause_process
from ledgerlog.devservers.bookkeeper import (
    GatewayError,
    GatewayProcess,
    LocalBookKeeper,
    ensure_build,
    pack_entries,
    unpack_entries,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        shutil.which("java") is None or shutil.which("mvn") is None,
        reason="needs java and mvn",
    ),
]

PASSWORD = b"ledgerlog-smoke"
# Recommended client settings for the backend: keep writing with ack quorum satisfied while a
# bookie is down (no replacement needed), and tell readers the LAC within 100 ms of a batch.
CLIENT_PROPS = "delayEnsembleChange=true\nexplicitLacInterval=100\n"


def payloads(prefix: str, n: int, size: int = 100) -> list[bytes]:
    return [f"{prefix}-{i:06d}-".encode().ljust(size, b"x") for i in range(n)]


@pytest.fixture(scope="module")
def classpath() -> str:
    return ensure_build()


@pytest.fixture(scope="module")
def cluster(classpath: str) -> Iterator[LocalBookKeeper]:
    with LocalBookKeeper(3, classpath=classpath) as bk:
        print(f"\n[bookkeeper] ZooKeeper + 3 bookies up in {bk.startup_seconds:.1f} s")
        yield bk


@pytest.fixture(scope="module")
def gateway(classpath: str, cluster: LocalBookKeeper) -> Iterator[GatewayProcess]:
    with GatewayProcess(classpath) as gp:
        gp.entry_point.connect(cluster.zk_connect, CLIENT_PROPS)
        yield gp


def add_in_batches(ep: Any, handle: int, entries: list[bytes], batch: int) -> int:
    last = -1
    for i in range(0, len(entries), batch):
        last = ep.addEntries(handle, pack_entries(entries[i : i + batch]))
    return int(last)


def read_all(ep: Any, handle: int, first: int = 0) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    nxt = first
    while True:
        got = unpack_entries(ep.readEntries(handle, nxt, 300, 64 * 1024))
        if not got:
            return out
        out.extend(got)
        nxt = got[-1][0] + 1


def wait_lac(ep: Any, handle: int, target: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    lac = int(ep.lastAddConfirmed(handle))
    while lac < target and time.monotonic() < deadline:
        time.sleep(0.05)
        lac = int(ep.lastAddConfirmed(handle))
    return lac


def test_cluster_is_up(cluster: LocalBookKeeper) -> None:
    assert len(cluster.registered_bookies()) == 3
    assert all(pid is not None for pid in cluster.bookie_pids)
    assert cluster.zk_connect.startswith("127.0.0.1:")


def test_write_1000_then_read_back_without_recovery(gateway: GatewayProcess) -> None:
    ep = gateway.entry_point
    writer = ep.createLedger(3, 3, 2, PASSWORD)
    ledger_id = ep.ledgerId(writer)
    entries = payloads("w", 1000)
    assert add_in_batches(ep, writer, entries, batch=100) == 999

    reader = ep.openLedgerNoRecovery(ledger_id, PASSWORD)
    # A reader never sees past the last-add-confirmed. Right after a burst, the LAC the
    # bookies know trails the writer's (the piggybacked LAC of the last entry is the one at
    # send time); the writer's explicit LAC (explicitLacInterval) catches it up.
    early = read_all(ep, reader)
    assert [e for _, e in early] == entries[: len(early)]
    assert wait_lac(ep, reader, 999) == 999
    got = read_all(ep, reader)
    assert [i for i, _ in got] == list(range(1000))
    assert [e for _, e in got] == entries
    # maxCount / maxBytes bound one call; at least one entry is always returned.
    assert len(unpack_entries(ep.readEntries(reader, 0, 10, 1 << 20))) == 10
    assert len(unpack_entries(ep.readEntries(reader, 0, 1000, 250))) == 2
    assert len(unpack_entries(ep.readEntries(reader, 5, 1000, 1))) == 1
    assert ep.readEntries(reader, 1000, 10, 1 << 20) == b""
    ep.closeLedger(reader)
    ep.closeLedger(writer)
    ep.deleteLedger(ledger_id)


def test_recovery_open_fences_first_writer(gateway: GatewayProcess) -> None:
    ep = gateway.entry_point
    writer = ep.createLedger(3, 3, 2, PASSWORD)
    ledger_id = ep.ledgerId(writer)
    entries = payloads("f", 50)
    assert add_in_batches(ep, writer, entries, batch=25) == 49

    recovered = ep.openLedgerRecover(ledger_id, PASSWORD)
    assert ep.isLedgerClosed(recovered)
    assert ep.lastAddConfirmed(recovered) == 49

    with pytest.raises(Py4JJavaError) as err:
        ep.addEntries(writer, pack_entries(payloads("late", 10)))
    message = str(err.value)
    print(f"\n[fencing] {message.splitlines()[1][:300]}")
    assert "BkCallException" in message
    assert "BKLedgerFencedException" in message
    assert "fenced" in message.lower()
    assert err.value.java_exception.getCode() == -101

    got = read_all(ep, recovered)
    assert [e for _, e in got] == entries
    ep.closeLedger(recovered)
    ep.closeLedger(writer)  # the ledger is already sealed by recovery: close just forgets it


def test_zookeeper_helpers(gateway: GatewayProcess) -> None:
    ep = gateway.entry_point
    ep.zkEnsurePath("/ledgerlog/smoke/logs")
    assert ep.zkGet("/ledgerlog/smoke/missing") is None
    assert ep.zkGetVersion("/ledgerlog/smoke/missing") == -1
    assert ep.zkChildren("/ledgerlog/smoke/missing") is None
    assert ep.zkCreate("/ledgerlog/smoke/logs/a", b"one", False, False) == "/ledgerlog/smoke/logs/a"
    with pytest.raises(Py4JJavaError, match="NodeExists"):
        ep.zkCreate("/ledgerlog/smoke/logs/a", b"again", False, False)
    assert ep.zkGet("/ledgerlog/smoke/logs/a") == b"one"
    assert ep.zkGetVersion("/ledgerlog/smoke/logs/a") == 0
    assert ep.zkSetIfVersion("/ledgerlog/smoke/logs/a", b"two", 0) == 1
    assert ep.zkSetIfVersion("/ledgerlog/smoke/logs/a", b"stale", 0) == -1
    assert ep.zkGet("/ledgerlog/smoke/logs/a") == b"two"
    seq = ep.zkCreate("/ledgerlog/smoke/logs/s-", b"", True, True)
    assert seq.startswith("/ledgerlog/smoke/logs/s-")
    children = ep.zkChildren("/ledgerlog/smoke/logs").split("/")
    assert children == sorted(["a", seq.rsplit("/", 1)[1]])
    assert ep.zkDelete(seq, -1) is True
    assert ep.zkDelete("/ledgerlog/smoke/logs/a", 0) is False  # version is 1
    assert ep.zkDelete("/ledgerlog/smoke/logs/a", 1) is True
    assert ep.zkChildren("/ledgerlog/smoke/logs") == ""


def _median_ms(fn: Any, n: int) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples)


def test_call_latency_and_batch_throughput(
    classpath: str, cluster: LocalBookKeeper, gateway: GatewayProcess
) -> None:
    ep = gateway.entry_point
    ping = _median_ms(ep.ping, 300)
    mid = _median_ms(lambda: ep.echoBytes(8 * 1024), 100)
    big = _median_ms(lambda: ep.echoBytes(64 * 1024), 100)
    with GatewayProcess(classpath, tcp_nodelay=False) as nagle:
        nep = nagle.entry_point
        nping = _median_ms(nep.ping, 100)
        nmid = _median_ms(lambda: nep.echoBytes(8 * 1024), 30)
        nbig = _median_ms(lambda: nep.echoBytes(64 * 1024), 30)
    print(
        f"\n[py4j] median per call: ping {ping:.3f} ms; 8 KB response {mid:.2f} ms, 64 KB "
        f"{big:.2f} ms with TCP_NODELAY; without it ping {nping:.3f} ms, 8 KB {nmid:.2f} ms, "
        f"64 KB {nbig:.2f} ms"
    )
    assert mid < 20.0

    writer = ep.createLedger(3, 3, 2, PASSWORD)
    for size in (100, 1024):
        batch = pack_entries(payloads("t", 1000, size))
        for _ in range(5):  # warm-up (JIT in four JVMs)
            ep.addEntries(writer, batch)
        calls = 20
        t = time.perf_counter()
        for _ in range(calls):
            ep.addEntries(writer, batch)
        dt = time.perf_counter() - t
        n = calls * 1000
        print(
            f"[addEntries] 1000 x {size} B per call, 3/3/2: {n / dt:,.0f} entries/s, "
            f"{n * size / dt / 1e6:.2f} MB/s, {dt / calls * 1000:.1f} ms per call"
        )
    reader = ep.openLedgerRecover(ep.ledgerId(writer), PASSWORD)
    t = time.perf_counter()
    got = read_all(ep, reader)
    dt = time.perf_counter() - t
    total = sum(len(e) for _, e in got)
    print(
        f"[readEntries] {len(got):,} entries, {len(got) / dt:,.0f} entries/s, "
        f"{total / dt / 1e6:.2f} MB/s"
    )
    ep.closeLedger(reader)
    ep.deleteLedger(ep.ledgerId(writer))


def test_dead_or_stuck_gateway_raises(classpath: str) -> None:
    with GatewayProcess(classpath, read_timeout=3.0) as gp:
        ep = gp.entry_point
        assert ep.ping() == "ok"
        assert gp.pid is not None
        pause_process(gp.pid)
        try:
            t = time.monotonic()
            with pytest.raises(GatewayError, match="did not answer"):
                ep.ping()
            assert time.monotonic() - t < 10
        finally:
            os.kill(gp.pid, signal.SIGCONT)
    with GatewayProcess(classpath) as gp:
        ep = gp.entry_point
        assert ep.ping() == "ok"
        assert gp.pid is not None
        os.kill(gp.pid, signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(GatewayError, match="exited with code -9"):
            ep.ping()
        assert time.monotonic() - t < 10


def test_kill_one_bookie_adds_still_complete(
    classpath: str, cluster: LocalBookKeeper, gateway: GatewayProcess
) -> None:
    ep = gateway.entry_point
    writer = ep.createLedger(3, 3, 2, PASSWORD)
    ledger_id = ep.ledgerId(writer)
    before = payloads("k", 200)
    assert add_in_batches(ep, writer, before, batch=100) == 199

    # The same ledger shape on a client with BookKeeper's default settings
    # (delayEnsembleChange=false), to record what it does when no replacement bookie exists.
    with GatewayProcess(classpath) as plain:
        pep = plain.entry_point
        pep.connect(cluster.zk_connect)
        pwriter = pep.createLedger(3, 3, 2, PASSWORD)
        assert add_in_batches(pep, pwriter, payloads("p", 100), batch=100) == 99

        victim = cluster.kill_bookie(0)
        print(f"\n[fault] kill -9 bookie 0 (pid {victim}); bookies now {cluster.bookie_pids}")

        after = payloads("k2", 500)
        t = time.perf_counter()
        assert add_in_batches(ep, writer, after, batch=100) == 699
        print(
            f"[fault] delayEnsembleChange=true: 500 adds with 2 of 3 bookies ok in "
            f"{time.perf_counter() - t:.2f} s"
        )
        try:
            last = add_in_batches(pep, pwriter, payloads("p2", 100), batch=100)
            print(f"[fault] default client settings: adds succeeded too (last id {last})")
        except Py4JJavaError as e:
            print(f"[fault] default client settings: {str(e).splitlines()[1][:300]}")
            assert "BKNotEnoughBookiesException" in str(e)

    # Everything acknowledged reads back, through a recovering (fencing) open.
    reader = ep.openLedgerRecover(ledger_id, PASSWORD)
    got = read_all(ep, reader)
    assert [i for i, _ in got] == list(range(700))
    assert [e for _, e in got] == before + after
    ep.closeLedger(reader)

    t = time.monotonic()
    cluster.restart_bookie(0)
    print(f"[fault] bookie 0 restarted and registered in {time.monotonic() - t:.1f} s")
    assert len(cluster.registered_bookies()) == 3
