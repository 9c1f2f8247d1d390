"""The BookKeeper backend against a real ZooKeeper + 3 bookies (3/3/2): fencing, a bookie
killed mid-stream, the elected writer's process killed, a dead gateway JVM, URLs.

Shares the session's ensemble with the conformance suite; the bookie-killing test restarts
the bookie before it returns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from typing import Any

import pytest
from prometheus_client import REGISTRY

pytest.importorskip("py4j")

from bk_helpers import (
    all_decided,
    assert_exactly_once,
    kill_writer_midstream,
    open_bk,
    submit,
    wait_for,
)

from ledgerlog.backends.bookkeeper import BookKeeperBackend, GatewayFailedError, ZooKeeperError
from ledgerlog.devservers._common import pause_process
from ledgerlog.errors import ConfigError, FencedError
from ledgerlog.model import START, Outcome
from ledgerlog.validator import SequencerState
from ledgerlog.writer import Writer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_from_url_validates(local_bookkeeper: Any) -> None:
    with pytest.raises(ConfigError):
        BookKeeperBackend.from_url("bookkeeper://127.0.0.1:1/a/b")
    with pytest.raises(ConfigError):
        BookKeeperBackend.from_url("bookkeeper://127.0.0.1:1/a?ensemble=2&write=3&ack=2")
    with pytest.raises(ConfigError):
        BookKeeperBackend.from_url("bookkeeper://127.0.0.1:1/a?bogus=1")
    for bad in ("roll_entries=0", "roll_bytes=-1", "roll_entries=x"):
        with pytest.raises(ConfigError):
            BookKeeperBackend.from_url(f"bookkeeper://127.0.0.1:1/a?{bad}")
    from ledgerlog.client import open_backend

    b = open_backend(f"bookkeeper://{local_bookkeeper.zk_connect}/url-{uuid.uuid4().hex[:8]}")
    try:
        assert isinstance(b, BookKeeperBackend)
        assert (b.ensemble, b.write_quorum, b.ack_quorum) == (3, 3, 2)
        assert (b.roll_entries, b.roll_bytes) == (10_000, 16 * 1024 * 1024)
        calls = REGISTRY.get_sample_value(
            "ledgerlog_bookkeeper_gateway_calls_total", {"method": "zkGetStat"}
        )
        assert b.end() == START
        after = REGISTRY.get_sample_value(
            "ledgerlog_bookkeeper_gateway_calls_total", {"method": "zkGetStat"}
        )
        assert after is not None and after > (calls or 0)
    finally:
        b.close()


def test_fenced_writer_cannot_add_and_its_clients_learn_it(local_bookkeeper: Any) -> None:
    name = f"fence-{uuid.uuid4().hex[:8]}"
    a, b, c = (open_bk(local_bookkeeper, name) for _ in range(3))
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
                submit(producer, "client", i)
            producer.close()
            decided = all_decided(local_bookkeeper, name, 20)
            assert all(decided[("client", i)].count(Outcome.COMMITTED) == 1 for i in range(20))
        finally:
            w1.stop()
            w2.stop()
    finally:
        for x in (a, b, c):
            x.close()


def _shared_bookie(cluster: Any, backend: BookKeeperBackend, *handles: int) -> int:
    """Index in `cluster` of a bookie that every ledger behind `handles` writes to."""
    common: set[str] | None = None
    for h in handles:
        ids = set(backend.call("ledgerBookies", h).split("/"))
        common = ids if common is None else common & ids
    assert common, "the ledgers share no bookie"
    return cluster.bookie_ids.index(sorted(common)[0])


def test_kill_9_one_bookie_mid_stream_loses_nothing(local_bookkeeper: Any) -> None:
    name = f"bookie-{uuid.uuid4().hex[:8]}"
    a, c = open_bk(local_bookkeeper, name), open_bk(local_bookkeeper, name)
    w = Writer(a, "w1").start()
    producer = c.intake_producer("client")  # created while every bookie is up
    killed: int | None = None
    try:
        assert w.elected.wait(30)
        # Kill a bookie both the writer's ledger and the intake ledger write to (ensemble
        # 3 of 4 bookies): their adds go on with the ack quorum of 2.
        victim = _shared_bookie(local_bookkeeper, a, a.active_writers[0]._handle, producer._handle)
        n = 400
        for i in range(n):
            if i == n // 2:
                local_bookkeeper.kill_bookie(victim)
                killed = victim
            submit(producer, "client", i)
        decided = all_decided(local_bookkeeper, name, n)
        assert_exactly_once(decided, "client", n)
    finally:
        producer.close()
        w.stop()
        a.close()
        c.close()
        if killed is not None:
            local_bookkeeper.restart_bookie(killed)


def test_new_ledgers_while_a_bookie_is_down(local_bookkeeper: Any) -> None:
    """Ensemble 3 on 4 bookies: with one bookie dead (and deregistered), a new intake
    producer and a new writer (an election) still get BookKeeper ledgers. On exactly 3
    bookies both would fail with BKNotEnoughBookiesException until the bookie is back."""
    name = f"outage-{uuid.uuid4().hex[:8]}"
    a, b, c = (open_bk(local_bookkeeper, name) for _ in range(3))
    w1 = Writer(a, "w1").start()
    w2: Writer | None = None
    p1 = c.intake_producer("early")
    killed: int | None = None
    late: Any = None
    try:
        assert w1.elected.wait(30)
        for i in range(30):
            submit(p1, "early", i)
        victim = _shared_bookie(local_bookkeeper, a, a.active_writers[0]._handle, p1._handle)
        dead_id = local_bookkeeper.bookie_ids[victim]
        local_bookkeeper.kill_bookie(victim)
        killed = victim
        # Until its ZooKeeper session expires the dead bookie still looks available; the
        # case that matters is after that, when only 3 bookies are registered.
        wait_for(lambda: dead_id not in local_bookkeeper.registered_bookies(), 30, "deregistration")
        for i in range(30, 60):
            submit(p1, "early", i)
        late = c.intake_producer("late")  # a new BookKeeper ledger during the outage
        assert dead_id not in c.call("ledgerBookies", late._handle).split("/")
        for i in range(30):
            submit(late, "late", i)
        w1.stop()  # the next term needs a new BookKeeper ledger too
        w2 = Writer(b, "w2").start()
        assert w2.elected.wait(30), "no election while a bookie was down"
        lw = b.active_writers[0]
        assert dead_id not in b.call("ledgerBookies", lw._handle).split("/")
        for i in range(30, 60):
            submit(late, "late", i)
        decided = all_decided(local_bookkeeper, name, 120)
        assert_exactly_once(decided, "early", 60)
        assert_exactly_once(decided, "late", 60)
    finally:
        if late is not None:
            late.close()
        p1.close()
        w1.stop()
        if w2 is not None:
            w2.stop()
        for x in (a, b, c):
            x.close()
        if killed is not None:
            local_bookkeeper.restart_bookie(killed)


def test_kill_9_of_the_writer_standby_takes_over_exactly_once(local_bookkeeper: Any) -> None:
    name = f"kill-{uuid.uuid4().hex[:8]}"
    url = f"bookkeeper://{local_bookkeeper.zk_connect}/{name}?ensemble=3&write=3&ack=2"
    committed_before = kill_writer_midstream(
        local_bookkeeper, name, url, submissions=2000, first_commits=150, first_timeout=30
    )
    print(f"\n[kill -9 writer] {committed_before} seen committed before the kill")


def test_dead_gateway_jvm_is_a_clear_error(local_bookkeeper: Any) -> None:
    from ledgerlog.devservers.bookkeeper import GatewayProcess

    gp = GatewayProcess(read_timeout=30.0)  # connect builds a BK client: slow under load
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


# A gateway of its own (its client settings differ) with a short ZooKeeper session.
_SHORT_SESSION = "ledgerlog.zkSessionTimeoutMs=4000"


def test_expired_zookeeper_session_is_renewed_and_the_writer_reelected(
    local_bookkeeper: Any,
) -> None:
    name = f"zkexp-{uuid.uuid4().hex[:8]}"
    a = open_bk(local_bookkeeper, name, client_properties=_SHORT_SESSION)
    c = open_bk(local_bookkeeper, name)
    assert a.gateway is not c.gateway
    w = Writer(a, "w1").start()
    producer = c.intake_producer("client")
    local = a.intake_producer("local")  # its liveness node lives in the expiring session
    alive = f"{a.alive_path}/{local.name}"
    try:
        assert w.elected.wait(30)
        epoch = w.epoch
        for i in range(40):
            submit(producer, "client", i)
            submit(local, "local", i)
        assert a.call("zkSessionCount") == 1
        # ZooKeeper ends the session (as on expiry): the writer's ephemeral claim and the
        # local producer's liveness node go with it. The gateway opens a new session; the
        # writer learns it lost the ledger and, being the only candidate, is elected again
        # in a new epoch; the backend gives its producer its liveness node back.
        a.call("zkExpireSession")
        wait_for(lambda: w.epoch > epoch and w.elected.is_set(), 60, "re-election")
        assert a.call("zkSessionCount") >= 2
        wait_for(lambda: c.call("zkGet", alive) is not None, 30, "the liveness node back")
        # Beyond the writer's grace for missing nodes: the producer was not judged gone.
        time.sleep(6.5)
        for i in range(40, 80):
            submit(producer, "client", i)
            submit(local, "local", i)
        decided = all_decided(local_bookkeeper, name, 160)
        assert_exactly_once(decided, "client", 80)
        assert_exactly_once(decided, "local", 80)
    finally:
        local.close()
        producer.close()
        w.stop()
        a.close()
        c.close()


def test_paused_zookeeper_is_a_typed_error_then_the_ledger_goes_on(local_bookkeeper: Any) -> None:
    name = f"zkstop-{uuid.uuid4().hex[:8]}"
    a = open_bk(local_bookkeeper, name, client_properties=_SHORT_SESSION)
    c = open_bk(local_bookkeeper, name)
    w = Writer(a, "w1").start()
    producer = c.intake_producer("client")
    zk_pid = local_bookkeeper.zk_pid
    assert zk_pid is not None
    try:
        assert w.elected.wait(30)
        for i in range(20):
            submit(producer, "client", i)
        pause_process(zk_pid)  # returns once it is stopped: no reply is left in flight
        try:
            t = time.monotonic()
            with pytest.raises(ZooKeeperError):
                a.end()  # reads the chain node: ZooKeeper does not answer
            # A bound against hanging (the session's read timeout is 2/3 of 4 s), not a
            # performance figure.
            assert time.monotonic() - t < 30
        finally:
            os.kill(zk_pid, signal.SIGCONT)
        wait_for(w.elected.is_set, 60, "a writer serving again")
        for i in range(20, 40):
            submit(producer, "client", i)
        assert_exactly_once(all_decided(local_bookkeeper, name, 40), "client", 40)
        assert a.end() > START
    finally:
        producer.close()
        w.stop()
        a.close()
        c.close()


@pytest.mark.timeout(300)
def test_end_does_not_go_back_when_every_bookie_restarts(local_bookkeeper: Any) -> None:
    # The tail ledger is still open (its writer lives on): end() is read from the
    # bookies' last-add-confirmed, which they must still report after a restart of the
    # whole ensemble - a reader that had reached end() must not find the ledger shorter.
    name = f"restart-{uuid.uuid4().hex[:8]}"
    a, b = open_bk(local_bookkeeper, name), open_bk(local_bookkeeper, name)
    stopped: list[int] = []
    lw = a.campaign("w", timeout=30)
    try:
        n = 30
        for i in range(n):
            lw.append([f"r{i}".encode()], SequencerState().to_bytes())
        before = b.end()
        assert before > START
        for i in range(len(local_bookkeeper.bookie_ids)):
            local_bookkeeper.stop_bookie(i)
            stopped.append(i)
        while stopped:
            local_bookkeeper.restart_bookie(stopped[0])
            stopped.pop(0)
        d = open_bk(local_bookkeeper, name)
        try:
            after = d.end()
            assert after >= before, f"end() went back from {before} to {after}"
            reader = d.reader(START)
            got: list[bytes] = []
            deadline = time.monotonic() + 30
            while reader.position < before and time.monotonic() < deadline:
                got.extend(e.data for e in reader.read(timeout=0.5))
            reader.close()
            assert reader.position >= before
            assert [x for x in got if x.startswith(b"r")] == [f"r{i}".encode() for i in range(n)]
        finally:
            d.close()
    finally:
        for i in stopped:
            local_bookkeeper.restart_bookie(i)
        with contextlib.suppress(Exception):
            lw.close()
        a.close()
        b.close()
