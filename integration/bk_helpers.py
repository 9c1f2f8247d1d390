"""Helpers shared by the BookKeeper backend's integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

from ledgerlog.backends.bookkeeper import BookKeeperBackend
from ledgerlog.codec import encode_intake, encode_transaction
from ledgerlog.model import Outcome, Put, Transaction, TxnId
from ledgerlog.reader import Reader
from ledgerlog.writer import Writer

LEASE = 2.0


def bk_url(cluster: Any, ledger: str, **params: Any) -> str:
    query = "".join(f"&{k}={v}" for k, v in params.items())
    return f"bookkeeper://{cluster.zk_connect}/{ledger}?ensemble=3&write=3&ack=2{query}"


def open_bk(
    cluster: Any, ledger: str, *, url_params: dict[str, Any] | None = None, **kw: Any
) -> BookKeeperBackend:
    return BookKeeperBackend.from_url(
        bk_url(cluster, ledger, **(url_params or {})), **{"lease_timeout": LEASE, **kw}
    )


def submit(producer: Any, client: str, i: int) -> None:
    txn = Transaction(TxnId(client, i), 0, writes=[Put(f"{client}-{i}", i)])
    producer.submit(encode_intake([encode_transaction(txn)]))


def collect(reader: Reader, into: dict[tuple[str, int], list[Outcome]], timeout: float) -> None:
    for res in reader.poll(timeout=timeout):
        for d in res.decisions:
            if d.seq is not None and d.txn_id is not None:
                key = (d.txn_id.client_id, d.txn_id.client_seq)
                into.setdefault(key, []).append(d.outcome)


def all_decided(cluster: Any, ledger: str, want: int, timeout: float = 60) -> dict[Any, Any]:
    """Decisions of a fresh reader of the whole ledger (another process's view)."""
    backend = open_bk(cluster, ledger)
    reader = Reader(backend, name="audit")
    decided: dict[tuple[str, int], list[Outcome]] = {}
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            collect(reader, decided, 0.2)
            if sum(Outcome.COMMITTED in v for v in decided.values()) >= want:
                break
        collect(reader, decided, 0.5)
    finally:
        reader.close()
        backend.close()
    return decided


def assert_exactly_once(decided: dict[Any, Any], client: str, n: int) -> None:
    missing = [i for i in range(n) if Outcome.COMMITTED not in decided.get((client, i), [])]
    assert not missing, f"{client}: {len(missing)} acknowledged submissions never committed"
    twice = [i for i in range(n) if decided[(client, i)].count(Outcome.COMMITTED) != 1]
    assert not twice, f"{client}: committed more than once: {twice[:10]}"


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


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


def spawn_victim_writer(url: str) -> subprocess.Popen[str]:
    """A writer in a process of its own (to be killed); prints ELECTED once elected."""
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER_SCRIPT, url, str(LEASE)], stdout=subprocess.PIPE, text=True
    )


def kill_writer_midstream(
    cluster: Any,
    ledger: str,
    url: str,
    *,
    submissions: int,
    first_commits: int,
    first_timeout: float,
    before_kill: Callable[[BookKeeperBackend], None] | None = None,
) -> int:
    """kill -9 of the elected writer (a process of its own, on `url`) while a client submits
    up to `submissions`; a standby here takes over. Asserts that every submission commits
    exactly once, those seen committed before the kill included; returns how many those were.
    `before_kill` sees the standby's backend once `first_commits` have committed."""
    proc = spawn_victim_writer(url)
    b, c = open_bk(cluster, ledger), open_bk(cluster, ledger)
    standby: Writer | None = None
    producer = c.intake_producer("client")
    reader = Reader(c, name="watcher")
    seen: dict[tuple[str, int], list[Outcome]] = {}
    stop = threading.Event()
    submitted: list[int] = []

    def submit_forever() -> None:
        i = 0
        while not stop.is_set() and i < submissions:
            submit(producer, "client", i)
            submitted.append(i)
            i += 1
            time.sleep(0.002)

    t = threading.Thread(target=submit_forever)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ELECTED"
        standby = Writer(b, "standby").start()
        t.start()
        deadline = time.monotonic() + first_timeout
        while sum(Outcome.COMMITTED in v for v in seen.values()) < first_commits:
            assert time.monotonic() < deadline, "the first writer committed too little"
            collect(reader, seen, 0.1)
        if before_kill is not None:
            before_kill(b)
        os.kill(proc.pid, signal.SIGKILL)  # its gateway JVM dies with it (PDEATHSIG)
        proc.wait(10)
        committed_before = {k for k, v in seen.items() if Outcome.COMMITTED in v}
        assert standby.elected.wait(30), "the standby did not take over"
        time.sleep(0.5)
        stop.set()
        t.join(30)
        n = len(submitted)
        decided = all_decided(cluster, ledger, n)
        for k in committed_before:
            assert decided[k].count(Outcome.COMMITTED) == 1, k
        assert_exactly_once(decided, "client", n)
        return len(committed_before)
    finally:
        stop.set()
        if t.is_alive():
            t.join(30)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.close()
        producer.close()
        if standby is not None:
            standby.stop()
        b.close()
        c.close()
