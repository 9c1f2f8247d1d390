"""BookKeeper backend beside the Pulsar backend, on the same machine in one run.

Workload (the same for both backends, all in this process): one elected ``Writer`` thread,
one ``Reader`` that validates the ledger and records when each transaction's decision is
seen, and ``clients`` submitter threads, each submitting intake batches of ``batch``
single-key writes in a closed loop. Figures: committed transactions/s (decisions seen by
the reader), and commit latency p50/p99 from a batch's submit call to its decision, in a
second, paced phase at about half the closed-loop rate. For BookKeeper, the py4j bridge's
own cost is shown separately: calls/s, bytes/s each way and the share of wall time spent
inside gateway calls (summed over threads).

Run: ``python -m bench.bookkeeper_bench [--seconds 8] [--no-pulsar]``. It starts and stops a
ZooKeeper + 3 bookies (3/3/2) and, unless ``--no-pulsar``, a Pulsar standalone.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from ledgerlog.backends.base import Backend
from ledgerlog.codec import encode_intake, encode_transaction
from ledgerlog.model import Outcome, Put, Transaction, TxnId
from ledgerlog.reader import Reader
from ledgerlog.writer import Writer


def _workload(
    open_backend: Callable[[], Backend], seconds: float, clients: int, batch: int, rate: float
) -> dict[str, float]:
    """Closed loop when rate == 0, else about `rate` txn/s in all (paced)."""
    wb, rb = open_backend(), open_backend()
    writer = Writer(wb, "bench-writer").start()
    assert writer.elected.wait(60), "writer not elected"
    reader = Reader(rb, name="bench")
    seen: dict[tuple[str, int], float] = {}
    sent: dict[tuple[str, int], float] = {}
    stop = threading.Event()
    lock = threading.Lock()

    def read_loop() -> None:
        while not stop.is_set():
            for res in reader.poll(timeout=0.05):
                now = time.perf_counter()
                for d in res.decisions:
                    if d.outcome is Outcome.COMMITTED and d.txn_id is not None:
                        seen[(d.txn_id.client_id, d.txn_id.client_seq)] = now

    def submit_loop(idx: int) -> None:
        cid = f"c{idx}-{uuid.uuid4().hex[:6]}"
        producer = rb.intake_producer(cid)
        seq = 0
        interval = clients * batch / rate if rate else 0.0
        next_at = time.perf_counter()
        try:
            while not stop.is_set():
                if interval:
                    delay = next_at - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    next_at += interval
                txns = [
                    encode_transaction(
                        Transaction(TxnId(cid, seq + i), 0, writes=[Put(f"{cid}-{seq + i}", i)])
                    )
                    for i in range(batch)
                ]
                t = time.perf_counter()
                producer.submit(encode_intake(txns))
                with lock:
                    for i in range(batch):
                        sent[(cid, seq + i)] = t
                seq += batch
        finally:
            producer.close()

    threads = [threading.Thread(target=read_loop)]
    threads += [threading.Thread(target=submit_loop, args=(i,)) for i in range(clients)]
    stats0 = _bridge(wb, rb)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    elapsed = time.perf_counter() - t0
    stats1 = _bridge(wb, rb)
    committed = sum(1 for k in seen if k in sent)
    lat = sorted((seen[k] - sent[k]) * 1000 for k in sent if k in seen)
    writer.stop()
    reader.close()
    wb.close()
    rb.close()
    out = {
        "txn_per_s": committed / elapsed,
        "p50_ms": statistics.median(lat) if lat else float("nan"),
        "p99_ms": lat[int(len(lat) * 0.99) - 1] if len(lat) > 1 else float("nan"),
    }
    if stats0 is not None and stats1 is not None:
        out["gw_calls_per_s"] = (stats1[0] - stats0[0]) / elapsed
        out["gw_mb_to_java_per_s"] = (stats1[1] - stats0[1]) / elapsed / 1e6
        out["gw_mb_from_java_per_s"] = (stats1[2] - stats0[2]) / elapsed / 1e6
        out["gw_call_seconds_per_s"] = (stats1[3] - stats0[3]) / elapsed
    return out


def _bridge(*backends: Backend) -> tuple[int, int, int, float] | None:
    from ledgerlog.backends.bookkeeper import BookKeeperBackend

    bks = [b for b in backends if isinstance(b, BookKeeperBackend)]
    if not bks:
        return None
    s = bks[0].bridge_stats()  # both share the process's gateway
    return s.calls, s.bytes_to_java, s.bytes_from_java, s.seconds


def _run(name: str, open_backend: Callable[[], Backend], seconds: float) -> dict[str, Any]:
    _workload(open_backend, 1.5, 2, 50, 0.0)  # warm-up (JIT, connections)
    closed = _workload(open_backend, seconds, 2, 50, 0.0)
    paced = _workload(open_backend, seconds, 2, 10, max(closed["txn_per_s"] / 2, 20.0))
    print(
        f"{name:<10} closed loop: {closed['txn_per_s']:8,.0f} committed txn/s "
        f"(p50 {closed['p50_ms']:.1f} ms) | paced at {paced['txn_per_s']:,.0f} txn/s: "
        f"p50 {paced['p50_ms']:.1f} ms, p99 {paced['p99_ms']:.1f} ms",
        flush=True,
    )
    for label, r in (("closed", closed), ("paced", paced)):
        if "gw_calls_per_s" in r:
            print(
                f"{'':<10} py4j bridge ({label}): {r['gw_calls_per_s']:,.0f} calls/s, "
                f"{r['gw_mb_to_java_per_s']:.2f} MB/s to Java, "
                f"{r['gw_mb_from_java_per_s']:.2f} MB/s from Java, "
                f"{r['gw_call_seconds_per_s']:.2f} s in calls per s (summed over threads)",
                flush=True,
            )
    return {"closed": closed, "paced": paced}


def main(seconds: float = 8.0, pulsar: bool = True) -> dict[str, Any]:
    from ledgerlog.backends.bookkeeper import BookKeeperBackend
    from ledgerlog.devservers.bookkeeper import LocalBookKeeper

    results: dict[str, Any] = {}
    print("BookKeeper (ZooKeeper + 3 bookies, 3/3/2, journal fsync) vs Pulsar standalone")
    with LocalBookKeeper(3) as cluster:
        pin = BookKeeperBackend(cluster.zk_connect, "bench-pin")  # one gateway for the run
        try:
            ledger = f"bench-{uuid.uuid4().hex[:8]}"
            results["bookkeeper"] = _run(
                "bookkeeper",
                lambda: BookKeeperBackend(cluster.zk_connect, ledger),
                seconds,
            )
        finally:
            pin.close()
    if pulsar:
        from ledgerlog.backends.pulsar import PulsarBackend
        from ledgerlog.devservers.pulsar import LocalPulsar

        with LocalPulsar() as broker:
            ledger = f"bench-{uuid.uuid4().hex[:8]}"
            results["pulsar"] = _run(
                "pulsar", lambda: PulsarBackend(broker.service_url, ledger), seconds
            )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bookkeeper_bench")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--no-pulsar", action="store_true")
    args = parser.parse_args()
    main(args.seconds, pulsar=not args.no_pulsar)
