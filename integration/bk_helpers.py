"""Helpers shared by the BookKeeper backend's integration tests."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from typing import Any

from ledgerlog.backends.bookkeeper import BookKeeperBackend
from ledgerlog.codec import encode_intake, encode_transaction
from ledgerlog.model import Outcome, Put, Transaction, TxnId
from ledgerlog.reader import Reader

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
