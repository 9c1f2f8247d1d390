"""Prometheus metrics, and an optional HTTP endpoint for them.

All series carry the ledger's name; reader series also carry the reader's name, since a
process may run several replicas of one ledger (the demo does).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

__all__ = ["serve"]

COMMITS = Counter(
    "ledgerlog_commits", "Transactions committed, as decided by a reader", ["ledger", "reader"]
)
ABORTS = Counter(
    "ledgerlog_aborts", "Transactions aborted, by reason", ["ledger", "reader", "reason"]
)
REJECTED_ENTRIES = Counter(
    "ledgerlog_rejected_entries",
    "Entries of a deposed writer or resends, rejected by a reader",
    ["ledger", "reader"],
)
MALFORMED_ENTRIES = Counter(
    "ledgerlog_malformed_entries", "Undecodable entries seen by a reader", ["ledger", "reader"]
)
APPLIED_SEQ = Gauge(
    "ledgerlog_reader_applied_seq", "Last seq a reader validated and applied", ["ledger", "reader"]
)
LAG = Gauge(
    "ledgerlog_reader_lag_seqs",
    "Seqs in the ledger the reader has not validated yet (computed at scrape time)",
    ["ledger", "reader"],
)
COMMIT_LATENCY = Histogram(
    "ledgerlog_commit_latency_seconds",
    "Client-side time from submit to the decision seen on the local replica",
    ["ledger"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
)
WRITER_RECORDS = Counter("ledgerlog_writer_records", "Records appended", ["ledger"])
WRITER_TXNS = Counter("ledgerlog_writer_transactions", "Transactions appended", ["ledger"])
WRITER_NEXT_SEQ = Gauge("ledgerlog_writer_next_seq", "Seq the next appended txn takes", ["ledger"])
WRITER_EPOCH = Gauge("ledgerlog_writer_epoch", "Epoch of this process's elected writer", ["ledger"])
WRITER_FENCED = Counter(
    "ledgerlog_writer_fenced", "Times this process's writer lost its election", ["ledger"]
)

BK_GATEWAY_CALLS = Counter(
    "ledgerlog_bookkeeper_gateway_calls",
    "Calls from this process through the BookKeeper py4j gateway, by Java method",
    ["method"],
)
BK_GATEWAY_BYTES = Counter(
    "ledgerlog_bookkeeper_gateway_bytes",
    "Payload bytes through the BookKeeper py4j gateway (to_java, from_java)",
    ["direction"],
)
BK_GATEWAY_SECONDS = Counter(
    "ledgerlog_bookkeeper_gateway_call_seconds",
    "Time spent inside BookKeeper gateway calls, summed over threads",
)


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Expose every metric at http://addr:port/metrics (loopback unless told otherwise)."""
    start_http_server(port, addr=addr, registry=REGISTRY)
