"""BookKeeper backend end to end, multi-process, beside the Pulsar backend in one run.

For each backend: a ``ledgerlog writer URL`` process and ``clients`` client processes
that pipeline transfers (read two balances, write two) with ``Client.submit_many``; a
transfer counts once its commit decision is seen on the client's own replica (the same
client code as ``pulsar_bench``). Phases: closed loop (peak committed txn/s), then the
same clients paced at about half of it for commit latency p50/p99 (from a transaction's
scheduled submit time to its decision).

BookKeeper runs on ZooKeeper + 4 bookies (3/3/2, journal fsync on); Pulsar on a local
standalone. The py4j bridge's own cost is shown separately, per process kind: calls/s,
MB/s each way and the seconds spent inside gateway calls per second (summed over
threads) — the writer's from its ``--metrics-port`` (``ledgerlog_bookkeeper_gateway_*``),
the clients' from ``BookKeeperBackend.bridge_stats()`` — beside what the bridge alone
carries in the same run (empty round trips/s, MB/s of 64 KB arrays each way).

Run: ``python -m bench.bookkeeper_bench [--seconds 8] [--clients 2] [--no-pulsar]``.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench.common import pct as _pct
from bench.common import quiet as _quiet
from bench.common import run_processes, window_p99, writer_process
from bench.pulsar_bench import _paced, _peak

Bridge = tuple[float, float, float, float]  # calls, bytes to Java, bytes from Java, seconds


def _bridge_of(db: Any) -> Bridge:
    stats = getattr(db.backend, "bridge_stats", None)
    if stats is None:
        return (0.0, 0.0, 0.0, 0.0)
    s = stats()
    return (s.calls, s.bytes_to_java, s.bytes_from_java, s.seconds)


def _client(url: str, idx: int, mode: str, arg: float, seconds: float, go: Any, q: Any) -> None:
    _quiet()
    import ledgerlog

    db = ledgerlog.open(url, writer=None, client_id=f"bench-{mode}-{idx}", timeout=60)
    db.sync(120)
    rnd = random.Random(idx * 7919 + (mode == "paced"))
    q.put(("ready", 0))
    go.wait()
    before = _bridge_of(db)
    result = (_peak if mode == "peak" else _paced)(db, rnd, arg, seconds)
    after = _bridge_of(db)
    result["bridge"] = tuple(b - a for a, b in zip(before, after, strict=True))
    q.put(("result", result))
    db.close()


def _run_clients(
    url: str, clients: int, mode: str, arg: float, seconds: float
) -> list[dict[str, Any]]:
    argses = [(url, i, mode, arg, seconds) for i in range(clients)]
    results: list[dict[str, Any]] = run_processes(_client, argses, result_timeout=seconds + 180)[0]
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int | None) -> Bridge:
    """The writer process's gateway counters from its metrics endpoint."""
    if port is None:
        return (0.0, 0.0, 0.0, 0.0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    calls = to_java = from_java = seconds = 0.0
    for line in text.splitlines():
        if line.startswith("ledgerlog_bookkeeper_gateway_calls_total{"):
            calls += float(line.rsplit(" ", 1)[1])
        elif line.startswith('ledgerlog_bookkeeper_gateway_bytes_total{direction="to_java"}'):
            to_java = float(line.rsplit(" ", 1)[1])
        elif line.startswith('ledgerlog_bookkeeper_gateway_bytes_total{direction="from_java"}'):
            from_java = float(line.rsplit(" ", 1)[1])
        elif line.startswith("ledgerlog_bookkeeper_gateway_call_seconds_total "):
            seconds = float(line.rsplit(" ", 1)[1])
    return (calls, to_java, from_java, seconds)


@contextmanager
def _writer(url: str, metrics_port: int | None) -> Iterator[None]:
    import ledgerlog

    options = ["--metrics-port", str(metrics_port)] if metrics_port is not None else []
    with writer_process(url, options=options):
        db = ledgerlog.open(url, writer=None, client_id="bench-init", timeout=60)
        try:
            db.wait_writer(120)
        finally:
            db.close()
        yield


def _bridge_line(label: str, b: Bridge, seconds: float, procs: int) -> str:
    calls, to_java, from_java, inside = (x / seconds for x in b)
    return (
        f"  py4j bridge, {label} ({procs} process{'es' if procs > 1 else ''}): "
        f"{calls:,.0f} calls/s, {to_java / 1e6:.2f} MB/s to Java, "
        f"{from_java / 1e6:.2f} MB/s from Java, {inside:.2f} s inside calls per s"
        + (f", {to_java / calls:,.0f} B to Java per call" if calls else "")
    )


def bridge_capacity(zk_connect: str, rounds: int = 2000, size: int = 64 * 1024) -> dict[str, float]:
    """What the py4j bridge alone can carry, in this run: empty round trips per second and
    MB/s of ``size``-byte arrays each way, through the backend's own call path."""
    from ledgerlog.backends.bookkeeper import BookKeeperBackend

    backend = BookKeeperBackend(zk_connect, "bench-bridge")
    try:
        call = backend.call
        for _ in range(200):
            call("ping")
        t = time.perf_counter()
        for _ in range(rounds):
            call("ping")
        calls = rounds / (time.perf_counter() - t)
        blob = bytes(size)
        n = max(20, rounds // 20)
        t = time.perf_counter()
        for _ in range(n):
            call("sinkBytes", blob)
        to_java = n * size / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n):
            call("echoBytes", size)
        from_java = n * size / (time.perf_counter() - t)
    finally:
        backend.close()
    print(
        f"py4j bridge alone: {calls:,.0f} empty calls/s ({1e6 / calls:.0f} us each); "
        f"{size // 1024} KB arrays: {to_java / 1e6:.1f} MB/s to Java, "
        f"{from_java / 1e6:.1f} MB/s from Java",
        flush=True,
    )
    return {
        "calls_per_s": calls,
        "mb_to_java_per_s": to_java / 1e6,
        "mb_from_java_per_s": from_java / 1e6,
    }


def measure(
    name: str, url: str, clients: int, seconds: float, batch: int, metrics_port: int | None
) -> dict[str, Any]:
    with _writer(url, metrics_port):
        _run_clients(url, clients, "peak", batch, min(2.0, seconds))  # warm-up (JIT, caches)
        w0 = _scrape(metrics_port)
        peak = _run_clients(url, clients, "peak", batch, seconds)
        w1 = _scrape(metrics_port)
        rate = sum(r["committed"] for r in peak) / seconds
        paced = _run_clients(url, clients, "paced", max(rate / 2, 20.0) / clients, seconds)
        w2 = _scrape(metrics_port)
    lat = sorted(x for r in paced for x in r["latencies"])
    out: dict[str, Any] = {
        "committed_per_s": rate,
        "aborted": sum(r["aborted"] for r in peak),
        "paced_per_s": sum(r["committed"] for r in paced) / seconds,
        "p50_ms": 1000 * _pct(lat, 0.50),
        "p99_ms": 1000 * _pct(lat, 0.99),
        "window_p99_ms": window_p99(paced),
    }
    print(
        f"{name:<10} closed loop, {clients} client processes + 1 writer process: "
        f"{rate:>8,.0f} committed txn/s ({out['aborted']:,} aborted; submit_many of {batch}) "
        f"| paced at {out['paced_per_s']:,.0f} txn/s: p50 {out['p50_ms']:.1f} ms, "
        f"p99 {out['p99_ms']:.1f} ms ({len(lat):,} measured); p99 of each second: "
        + " ".join(f"{w:.0f}" for w in out["window_p99_ms"])
        + " ms",
        flush=True,
    )
    if metrics_port is not None:
        for phase, rs, wa, wb in (("closed", peak, w0, w1), ("paced", paced, w1, w2)):
            c = [sum(r["bridge"][i] for r in rs) for i in range(4)]
            clients_b: Bridge = (c[0], c[1], c[2], c[3])
            writer_b: Bridge = (wb[0] - wa[0], wb[1] - wa[1], wb[2] - wa[2], wb[3] - wa[3])
            out[f"bridge_{phase}_writer"] = writer_b
            out[f"bridge_{phase}_clients"] = clients_b
            print(_bridge_line(f"{phase}, writer", writer_b, seconds, 1), flush=True)
            print(_bridge_line(f"{phase}, clients", clients_b, seconds, clients), flush=True)
    return out


def main(
    seconds: float = 8.0, clients: int = 2, batch: int = 256, pulsar: bool = True
) -> dict[str, Any]:
    _quiet()
    from ledgerlog.devservers.bookkeeper import LocalBookKeeper

    print(
        f"BookKeeper (ZooKeeper + 4 bookies, 3/3/2, journal fsync) vs Pulsar standalone; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        flush=True,
    )
    results: dict[str, Any] = {}
    with LocalBookKeeper(4) as cluster:
        url = (
            f"bookkeeper://{cluster.zk_connect}/bench-{uuid.uuid4().hex[:8]}"
            "?ensemble=3&write=3&ack=2"
        )
        results["bridge"] = bridge_capacity(cluster.zk_connect)
        results["bookkeeper"] = measure(
            "bookkeeper", url, clients, seconds, batch, metrics_port=_free_port()
        )
    if pulsar:
        from ledgerlog.devservers.pulsar import LocalPulsar

        with LocalPulsar() as broker:
            url = f"{broker.service_url}/public/default/bench-{uuid.uuid4().hex[:10]}"
            results["pulsar"] = measure("pulsar", url, clients, seconds, batch, None)
        ratio = results["bookkeeper"]["committed_per_s"] / max(
            results["pulsar"]["committed_per_s"], 1e-9
        )
        print(f"ratio bookkeeper/pulsar committed txn/s: {ratio:.2f}", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}", flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bookkeeper_bench")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--no-pulsar", action="store_true")
    args = parser.parse_args()
    main(args.seconds, args.clients, pulsar=not args.no_pulsar)
