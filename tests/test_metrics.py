"""Metrics move with the work, and the optional HTTP endpoint serves them."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import ledgerlog
from ledgerlog.metrics import serve


def _value(name: str, **labels: str) -> float:
    v = REGISTRY.get_sample_value(name, labels)
    return 0.0 if v is None else v


@pytest.mark.timeout(60)
def test_commits_aborts_latency_and_writer_counters(tmp_path: Path) -> None:
    with ledgerlog.open(tmp_path / "m", client_id="metrics-client") as db:
        db.wait_writer()
        ledger = db.backend.ledger
        base_commits = _value("ledgerlog_commits_total", ledger=ledger, reader="metrics-client")
        base_lat = _value("ledgerlog_commit_latency_seconds_count", ledger=ledger)
        with db.transaction() as tx:
            tx.put("k", 1)
        t1 = db.transaction()
        t1.get("k")
        with db.transaction() as t2:
            t2.put("k", 2)
        t1.put("k", 3)
        with pytest.raises(ledgerlog.ConflictError):
            t1.commit()
        db.sync()
        commits = _value("ledgerlog_commits_total", ledger=ledger, reader="metrics-client")
        conflicts = _value(
            "ledgerlog_aborts_total", ledger=ledger, reader="metrics-client", reason="conflict"
        )
        assert commits - base_commits == 2
        assert conflicts >= 1
        assert _value("ledgerlog_commit_latency_seconds_count", ledger=ledger) - base_lat == 3
        # The writer counts after its append returns, which may be after readers saw it.
        deadline = time.monotonic() + 10
        while _value("ledgerlog_writer_transactions_total", ledger=ledger) < 3:
            assert time.monotonic() < deadline, "writer never counted 3 transactions"
            time.sleep(0.01)
        assert _value("ledgerlog_reader_applied_seq", ledger=ledger, reader="metrics-client") == 3
        assert _value("ledgerlog_writer_epoch", ledger=ledger) == 1


def test_http_endpoint_serves_metrics() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve(port)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    assert b"ledgerlog_commit_latency_seconds" in body
    assert b"ledgerlog_reader_applied_seq" in body


@pytest.mark.timeout(60)
def test_reader_lag_counts_seqs_not_yet_validated(tmp_path: Path) -> None:
    from ledgerlog.backends.file import FileBackend

    with ledgerlog.open(tmp_path / "lag", client_id="lag-writer") as db:
        db.wait_writer()
        for i in range(25):
            with db.transaction() as tx:
                tx.put(f"k{i}", i)
        db.sync()
        backend = FileBackend(tmp_path / "lag")
        reader = ledgerlog.Reader(backend, name="lagging")
        try:
            assert reader.lag() == 25
            reader.poll(max_entries=6)  # the epoch start and 5 records of one txn each
            assert reader.lag() == 20
            gauge = _value("ledgerlog_reader_lag_seqs", ledger="lag", reader="lagging")
            assert gauge == 20
            reader.catch_up(timeout=10)
            assert reader.lag() == 0
        finally:
            reader.close()
            backend.close()


def test_bulk_histogram_exposes_what_a_prometheus_histogram_would() -> None:
    # The commit-latency histogram takes observations in bulk; its exposition must be the
    # one prometheus_client.Histogram gives for the same values (le is inclusive).
    from prometheus_client import CollectorRegistry, Histogram

    from ledgerlog.metrics import COMMIT_LATENCY

    values = [0.0001, 0.0005, 0.0005001, 0.003, 0.05, 0.05, 7.0, 11.0]
    child = COMMIT_LATENCY.labels("bulk-histogram-test")
    child.observe_many(values[:5])
    child.observe(values[5])
    child.observe_many(values[6:])
    reference = CollectorRegistry()
    h = Histogram(
        "ref_seconds",
        "reference",
        ["ledger"],
        registry=reference,
        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
    ).labels("bulk-histogram-test")
    for v in values:
        h.observe(v)
    for le in ("0.0005", "0.001", "0.005", "0.05", "5.0", "10.0", "+Inf"):
        ours = _value(
            "ledgerlog_commit_latency_seconds_bucket", ledger="bulk-histogram-test", le=le
        )
        theirs = reference.get_sample_value(
            "ref_seconds_bucket", {"ledger": "bulk-histogram-test", "le": le}
        )
        assert ours == theirs, le
    assert _value("ledgerlog_commit_latency_seconds_count", ledger="bulk-histogram-test") == 8
    assert _value("ledgerlog_commit_latency_seconds_sum", ledger="bulk-histogram-test") == (
        pytest.approx(sum(values))
    )
