"""Pulsar end-to-end: committed transactions/s and commit latency on a local broker.

One run, one broker (:class:`ledgerlog.devservers.pulsar.LocalPulsar`, a real Pulsar
standalone JVM, journal fsync on), warmed up first by an unmeasured run of each workload
(the JVM compiles hot code for minutes after it starts):

1. baseline: raw ``pulsar-client``: one process produces messages of the size of one
   ledgerlog transaction (``send_async``, batching on) while another reads them; the rate
   is messages read per second, from the start signal to the last message read;
2. ledgerlog peak: client processes that pipeline transfers (read two balances, write
   two) with ``Client.submit_many``; a transfer counts once its commit decision is seen
   on the client's own replica (a reader that validated it like every other). The
   clients run the library's default ``writer="auto"``: each stands by as writer and
   one is elected, whose own transactions skip the intake (``Writer.submit_local``)
   while the other's go through it;
3. ledgerlog paced at about half the peak: each client submits on a fixed schedule (the
   transactions due every few milliseconds as one ``submit_many``), and a transaction's
   commit latency runs from its scheduled submit time to its decision being seen.

Targets: ledgerlog committed transactions/s at least the raw per-message rate, and
commit p99 under 50 ms at half load.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import time
import uuid
from array import array
from typing import Any

from bench.common import (
    FsyncProbe,
    JvmBursts,
    MachineLoad,
    account_keys,
    jit_cpu_seconds,
    p99_by_window,
    run_processes,
    two_accounts,
)
from bench.common import get_result as _get
from bench.common import pct as _pct
from bench.common import pulsar_logger as _pulsar_logger
from bench.common import quiet as _quiet

ACCOUNTS = 100_000
P99_TARGET_MS = 50.0
PACE_TICK = 0.005
#: Batches each peak client keeps in flight. The peak run is a closed loop, so it
#: measures capacity only while enough is in flight to cover a round trip: with 2 it
#: measured 22k-47k txn/s on the same build (the round trip, not the machine, set the
#: rate whenever a run's latency was high).
PEAK_BATCHES_IN_FLIGHT = 4
#: Warm-up rounds of the paced workload go on until the broker's JIT compilers use less
#: than this share of one core during a round (or MAX_WARMUP seconds have passed).
JIT_SETTLED = 0.05
WARMUP_ROUND = 5.0
MAX_WARMUP = 150.0
#: Seconds of unbatched raw messages (thousands a second) before the paced warm-up
#: rounds, to get the broker's per-message code compiled (see main).
MESSAGE_WARMUP = 15.0
KEYS = account_keys(ACCOUNTS)


def _transfer(db: Any, rnd: random.Random) -> Any:
    tx = db.transaction()
    a, b = two_accounts(rnd, ACCOUNTS)
    ka, kb = KEYS[a], KEYS[b]
    x = tx.get(ka, 0)
    y = tx.get(kb, 0)
    amount = rnd.randint(1, 10)
    tx.put(ka, x - amount)
    tx.put(kb, y + amount)
    return tx


# -- raw pulsar-client ------------------------------------------------------------------------


def _raw_producer(
    url: str, topic: str, size: int, seconds: float, go: Any, q: Any, batching: bool = True
) -> None:
    import pulsar

    client = pulsar.Client(url, operation_timeout_seconds=30, logger=_pulsar_logger())
    producer = client.create_producer(
        topic,
        batching_enabled=batching,
        batching_max_publish_delay_ms=1,
        batching_max_messages=1000,
        max_pending_messages=20_000,
        block_if_queue_full=True,
    )
    payload = random.Random(0).randbytes(size)
    acked = [0]

    def on_ack(result: Any, _msg_id: Any) -> None:
        if result == pulsar.Result.Ok:
            acked[0] += 1

    q.put(("ready", 0))
    go.wait()
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(100):
            producer.send_async(payload, on_ack)
        sent += 100
    producer.flush()
    q.put(("sent", sent))
    producer.close()
    client.close()


def _raw_reader(url: str, topic: str, seconds: float, go: Any, q: Any, total: Any) -> None:
    import pulsar

    client = pulsar.Client(url, operation_timeout_seconds=30, logger=_pulsar_logger())
    reader = client.create_reader(topic, pulsar.MessageId.earliest, receiver_queue_size=5000)
    q.put(("ready", 0))
    go.wait()
    started = time.perf_counter()
    got = 0
    last = started
    hard_stop = time.monotonic() + seconds + 60
    while time.monotonic() < hard_stop:
        want = total.value
        if want and got >= want:
            break
        try:
            reader.read_next(200)
        except pulsar.Timeout:
            continue
        got += 1
        last = time.perf_counter()
    q.put(("read", (got, last - started)))
    reader.close()
    client.close()


def send_latency(url: str, size: int, count: int = 300) -> tuple[float, float]:
    """p50/p99 ms of one synchronous send at a time (no batching): the broker's
    persist-and-acknowledge round trip, what one ledgerlog commit needs once (the
    writer's append) or twice (a client's intake publish first, unless that client hosts
    the writer) plus the replica's read."""
    import pulsar

    client = pulsar.Client(url, operation_timeout_seconds=30, logger=_pulsar_logger())
    try:
        producer = client.create_producer(
            f"persistent://public/default/lat-{uuid.uuid4().hex[:10]}", batching_enabled=False
        )
        payload = bytes(size)
        for _ in range(20):
            producer.send(payload)
        times = []
        for _ in range(count):
            t = time.perf_counter()
            producer.send(payload)
            times.append(time.perf_counter() - t)
        producer.close()
    finally:
        client.close()
    times.sort()
    return 1000 * _pct(times, 0.5), 1000 * _pct(times, 0.99)


def run_raw(url: str, size: int, seconds: float, batching: bool = True) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    q, go, total = ctx.Queue(), ctx.Event(), ctx.Value("q", 0)
    topic = f"persistent://public/default/raw-{uuid.uuid4().hex[:10]}"
    procs = [
        ctx.Process(target=_raw_reader, args=(url, topic, seconds, go, q, total), daemon=True),
        ctx.Process(
            target=_raw_producer, args=(url, topic, size, seconds, go, q, batching), daemon=True
        ),
    ]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            assert _get(q, procs, 120)[0] == "ready"
        go.set()
        out: dict[str, Any] = {}
        for _ in procs:
            kind, value = _get(q, procs, seconds + 120)
            out[kind] = value
            if kind == "sent":
                total.value = value
        got, elapsed = out["read"]
        for p in procs:
            p.join(30)
        return {
            "per_s": got / elapsed if elapsed > 0 else 0.0,
            "sent": out["sent"],
            "read": got,
            "size": size,
        }
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


# -- ledgerlog --------------------------------------------------------------------------------


def _ledger_client(
    url: str, idx: int, mode: str, arg: float, seconds: float, serving: Any, go: Any, q: Any
) -> None:
    _quiet()
    import ledgerlog

    db = ledgerlog.open(url, client_id=f"bench-{mode}-{idx}", timeout=60)
    db.sync(120)
    # Each round starts new clients, so one of them is elected anew (after scanning the
    # ledger): ready only once a writer serves, so that no measured transaction waits
    # for the election.
    deadline = time.monotonic() + 120
    while not serving.is_set():
        if db.writer is not None and db.writer.elected.is_set():
            serving.set()
        elif time.monotonic() > deadline:
            raise TimeoutError("no writer elected among the benchmark's clients")
        else:
            time.sleep(0.01)
    rnd = random.Random(idx * 7919 + (mode == "paced"))
    q.put(("ready", 0))
    go.wait()
    run = _peak if mode == "peak" else _paced
    result = run(db, rnd, arg, seconds)
    result["hosts_writer"] = db.writer is not None and db.writer.elected.is_set()
    q.put(("result", result))
    db.close()


def _peak(db: Any, rnd: random.Random, batch: float, seconds: float) -> dict[str, Any]:
    import ledgerlog

    committed = aborted = 0
    sizes: list[int] = []
    pending: list[list[Any]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or pending:
        if time.monotonic() < deadline and len(pending) < PEAK_BATCHES_IN_FLIGHT:
            txs = []
            for _ in range(int(batch)):
                try:
                    txs.append(_transfer(db, rnd))
                except ledgerlog.ConflictError:
                    aborted += 1
            if not sizes:
                sizes = [len(tx.encode()) for tx in txs[:64]]
            pending.append(db.submit_many(txs))
            continue
        for f in pending.pop(0):
            if f.result(60).committed:
                committed += 1
            else:
                aborted += 1
    return {"committed": committed, "aborted": aborted, "tx_size": statistics.mean(sizes)}


def _due_times(t0: float, rate: float, submitted: int, now: float) -> list[float]:
    """When each transaction not yet submitted fell due by `now`: the n-th (from 1) at
    ``t0 + n / rate``. (Stamping it ``(n - 1) / rate`` added one whole interval to every
    measured latency: 40 ms at 25 txn/s, 0.2 ms at the paced benchmark's rate.)"""
    return [t0 + n / rate for n in range(submitted + 1, int((now - t0) * rate) + 1)]


def _paced(db: Any, rnd: random.Random, rate: float, seconds: float) -> dict[str, Any]:
    import ledgerlog

    # Outcomes are recorded by the futures' callbacks, and no future is kept: a list of
    # every future of the run (tens of thousands, a dozen GC-tracked objects each) made
    # this process's own cyclic-GC passes grow to hundreds of milliseconds, which then
    # showed up as ledgerlog's commit latency. The callbacks run on the replica's reading
    # thread, so they do the least they can: no lock (list.append is atomic), no
    # condition to notify (the end waits by polling). With a lock, a tally and a
    # notify_all each they were half of that thread's time spent on decisions. Arrays,
    # not lists: the cyclic GC walks a list's items, and these grow to 10^5.
    latencies = array("d")
    # Each measured latency's scheduled submit time, relative to the run's start, for
    # the per-second windows (a spike shows as one bad second, not a shifted p99).
    scheduled_at = array("d")
    outcomes = array("b")
    errors: list[BaseException] = []
    warmup = 1.0
    t0 = time.perf_counter()
    measure_from = t0 + warmup
    submitted = 0
    expected = 0
    conflicts = 0
    clock = time.perf_counter

    def decided(f: Any, at: float) -> None:
        took = clock() - at
        try:
            committed = f.result(0).committed
        except BaseException as exc:  # recorded, raised at the end
            errors.append(exc)
            committed = False
        if at >= measure_from:
            # Appended together on the one thread that runs callbacks: indexes match.
            latencies.append(took)
            scheduled_at.append(at - t0)
        outcomes.append(committed)

    while True:
        now = clock()
        if now - t0 >= seconds:
            break
        due = _due_times(t0, rate, submitted, now)
        if due:
            txs, scheduled = [], []
            for at in due:
                try:
                    txs.append(_transfer(db, rnd))
                    scheduled.append(at)
                except ledgerlog.ConflictError:
                    conflicts += 1
            submitted += len(due)
            expected += len(txs)
            for f, at in zip(db.submit_many(txs), scheduled, strict=True):
                f.add_done_callback(lambda f, at=at: decided(f, at))
        time.sleep(max(0.0, PACE_TICK - (clock() - now)))
    deadline = clock() + 60
    while len(outcomes) < expected:
        if clock() > deadline:
            raise TimeoutError(
                f"{expected - len(outcomes)} transactions without a decision after 60s"
            )
        time.sleep(0.01)
    if errors:
        raise errors[0]
    committed = sum(outcomes)
    return {
        "committed": committed,
        "aborted": len(outcomes) - committed + conflicts,
        "latencies": latencies.tolist(),
        "scheduled_at": scheduled_at.tolist(),
    }


def _run_clients(
    url: str,
    clients: int,
    mode: str,
    arg: float,
    seconds: float,
    load: MachineLoad | None = None,
    disk: FsyncProbe | None = None,
    jvm: JvmBursts | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Run the clients; `load`, `disk` and `jvm`, if given, measure the machine, the disk
    and the broker's JIT and GC over the go-to-results window (not the clients' start-up
    and catch-up)."""
    meters = [m for m in (load, disk, jvm) if m is not None]

    def start() -> None:
        for m in meters:
            m.start()

    def stop() -> None:
        for m in meters:
            m.stop()

    serving = mp.get_context("spawn").Event()
    argses = [(url, i, mode, arg, seconds, serving) for i in range(clients)]
    return run_processes(
        _ledger_client, argses, result_timeout=seconds + 180, on_go=start, on_done=stop
    )


def _cpu_per_txn(load: MachineLoad, committed: int) -> dict[str, float]:
    """Microseconds of CPU per committed transaction: in all, of each part (broker,
    writer) and of the rest (the clients)."""
    n = max(1, committed)
    cost = {name: 1e6 * sec / n for name, sec in load.part_seconds.items()}
    cost["clients"] = 1e6 * load.rest_seconds / n
    cost["total"] = 1e6 * load.cpu_seconds / n
    return cost


def _describe_cost(cost: dict[str, float]) -> str:
    parts = ", ".join(f"{name} {us:.0f}" for name, us in cost.items() if name != "total")
    return f"{cost['total']:.0f} us ({parts})"


def _settle_jit(
    url: str, broker_pid: int, clients: int, rate: float, max_seconds: float
) -> tuple[float, float | None]:
    """Run the paced workload in unmeasured rounds until the broker's JIT compilers go
    (nearly) quiet; returns the seconds spent and the JIT's share of a core in the last
    round (None where it cannot be read: one round is run then)."""
    started = time.monotonic()
    share: float | None = None
    while True:
        before = jit_cpu_seconds(broker_pid)
        t = time.monotonic()
        _run_clients(url, clients, "paced", rate / clients, WARMUP_ROUND)
        after = jit_cpu_seconds(broker_pid)
        if before is None or after is None:
            return time.monotonic() - started, None
        share = (after - before) / (time.monotonic() - t)
        if share < JIT_SETTLED or time.monotonic() - started >= max_seconds:
            return time.monotonic() - started, share


def _jit_settled(share: float | None) -> str:
    if share is None:
        return "(not measurable here: one round)"
    verdict = "yes" if share < JIT_SETTLED else "no"
    return f"{100 * share:.0f}% of a core (settled below {100 * JIT_SETTLED:.0f}%: {verdict})"


def main(
    clients: int = 2,
    seconds: float = 10.0,
    batch: int = 256,
    warmup: float | None = None,
    max_warmup: float = MAX_WARMUP,
) -> dict[str, Any]:
    """`warmup` seconds (default: half of `seconds`) of each workload run unmeasured
    first, and then the paced workload again until the broker's JIT compilers settle
    (at most `max_warmup` seconds; 0 skips that)."""
    _quiet()
    from ledgerlog.devservers.pulsar import LocalPulsar

    started = time.monotonic()
    warm_s = seconds / 2 if warmup is None else warmup
    # Extra JVM flags for the broker, to compare JIT settings (e.g. -XX:TieredStopAtLevel=1).
    jvm_args = os.environ.get("LEDGERLOG_BENCH_JVM_ARGS", "").split()
    with LocalPulsar(extra_jvm_args=jvm_args) as broker:
        url = f"{broker.service_url}/public/default/bench-{uuid.uuid4().hex[:10]}"
        # A freshly started broker JVM compiles hot code for minutes; on 2 cores its C2
        # compiler thread alone took 10-20% of the machine during the first minute.
        # Both workloads run once unmeasured, so that neither measured phase pays for
        # the other's warm-up (the raw baseline used to be measured on a broker warmed
        # by ledgerlog's own phase).
        warm, _ = _run_clients(url, clients, "peak", batch, warm_s)
        size = round(statistics.mean(r["tx_size"] for r in warm))
        warm_rate = sum(r["committed"] for r in warm) / warm_s
        _run_clients(url, clients, "paced", warm_rate / 2 / clients, warm_s)
        # The broker's per-message code (publish, deduplication, journal, dispatch) runs
        # a few hundred times a second under the paced workload, so it reached the C2
        # compiler's thresholds (~15k calls) only minutes after start - in the measured
        # phase, after the JIT had looked settled (-XX:+PrintCompilation: handleSend,
        # notifyCursors, addEntry, syncJournal... compiled 95-108 s after start, the
        # compiler threads at 0.2-0.3 of a core in those seconds). Unbatched messages,
        # thousands a second, get there first.
        message_warm = (
            run_raw(broker.service_url, size, MESSAGE_WARMUP, batching=False)
            if max_warmup > 0
            else {"per_s": 0.0}
        )
        # The paced workload's latency is what C2 compiling under load hurts most (a
        # broker thread taking a quarter of the machine for a minute after start):
        # measure a warm broker, and say how long it took to get there.
        jit_s, jit_share = (
            _settle_jit(url, broker.pid, clients, warm_rate / 2, max_warmup)
            if max_warmup > 0
            else (0.0, None)
        )
        run_raw(broker.service_url, size, warm_s)
        raw = run_raw(broker.service_url, size, seconds)
        # The whole tree (the clients and the broker are all children), with the
        # broker's share on its own.
        parts = {"broker": [broker.pid]}
        peak_load = MachineLoad([os.getpid()], parts)
        peak, peak_elapsed = _run_clients(url, clients, "peak", batch, seconds, peak_load)
        send_p50, send_p99 = send_latency(broker.service_url, size)
        committed = sum(r["committed"] for r in peak)
        ll_rate = committed / seconds
        target_rate = ll_rate / 2
        # The raw and peak phases ran other code in the broker since the JIT settled
        # (batched messages, big entries, another topic): its compilers woke again, and
        # their bursts (0.10-0.17 of a core) sat in the paced phase's worst seconds.
        # Settle them again on the paced workload itself, at the rate to be measured.
        jit2_s, jit2_share = (
            _settle_jit(url, broker.pid, clients, target_rate, max_warmup)
            if max_warmup > 0
            else (0.0, None)
        )
        load = MachineLoad([os.getpid()], parts)
        # Beside the bookie's journal (same directory tree, same filesystem).
        disk = FsyncProbe(broker.data_dir)
        jvm = JvmBursts(broker.pid)
        paced, _ = _run_clients(
            url, clients, "paced", target_rate / clients, seconds, load, disk, jvm
        )
    lat = sorted(x for r in paced for x in r["latencies"])
    paced_rate = sum(r["committed"] for r in paced) / seconds
    p50, p99 = 1000 * _pct(lat, 0.50), 1000 * _pct(lat, 0.99)
    p99s = p99_by_window(paced)
    windows = list(p99s.values())
    ratio = ll_rate / raw["per_s"] if raw["per_s"] else 0.0
    aborted = sum(r["aborted"] for r in peak)
    print(
        f"baseline raw pulsar-client, 1 producer (async, batching on) + 1 reader process, "
        f"{size} B messages: {raw['per_s']:>9,.0f} msg/s produced and read "
        f"({raw['read']:,} read)"
    )
    print(
        f"reference raw pulsar-client, one synchronous send at a time: "
        f"p50 {send_p50:.1f} ms, p99 {send_p99:.1f} ms per persisted message"
    )
    print(
        f"pulsar end-to-end, local standalone, {clients} client processes (one hosts the "
        f"elected writer): "
        f"{ll_rate:>9,.0f} committed txn/s ({committed:,} committed, {aborted:,} aborted; "
        f"{size} B per transaction, submit_many of {batch}; "
        f"{committed / peak_elapsed:,.0f}/s over the wall time)"
    )
    print(
        f"pulsar commit latency at {paced_rate:,.0f} txn/s (~half of peak, paced): "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(lat):,} transactions measured); "
        f"p99 of each second: {' '.join(f'{w:.0f}' for w in windows)} ms"
    )
    by_host = {r["hosts_writer"]: sorted(r["latencies"]) for r in paced if r["latencies"]}
    if len(by_host) == 2:
        own, other = by_host[True], by_host[False]
        print(
            f"  the writer's own client (no intake hop): p50 {1000 * _pct(own, 0.5):.1f}, "
            f"p99 {1000 * _pct(own, 0.99):.1f} ms; the other (through the intake): "
            f"p50 {1000 * _pct(other, 0.5):.1f}, p99 {1000 * _pct(other, 0.99):.1f} ms"
        )
    disk_worst = disk.window_max(p99s)
    syncs = sorted(took for _at, took in disk.samples)
    if syncs:
        print(
            f"disk during the paced phase: a 4 KB write + fdatasync every "
            f"{1000 * disk.interval:.0f} ms beside the broker's journal took p50 "
            f"{1000 * _pct(syncs, 0.5):.1f} ms, max {1000 * syncs[-1]:.0f} ms; slowest of each "
            f"second: {' '.join(f'{w:.0f}' for w in disk_worst)} ms"
        )
    jit, gc = jvm.window("jit", p99s), jvm.window("gc", p99s)
    if jvm.samples:
        print(
            "broker's JIT compilers and garbage collector in each second (cores): "
            f"JIT {' '.join(f'{w:.2f}' for w in jit)}; GC {' '.join(f'{w:.2f}' for w in gc)}"
        )
    paced_cost = _cpu_per_txn(load, sum(r["committed"] for r in paced))
    peak_cost = _cpu_per_txn(peak_load, committed)
    cpu_us = paced_cost["total"]
    print(
        f"machine during the paced phase: {100 * load.busy:.0f}% of {os.cpu_count()} CPUs "
        f"busy; CPU per committed transaction {_describe_cost(paced_cost)}, at peak "
        f"{_describe_cost(peak_cost)} (the paced phase's small batches make more messages "
        "for the same transactions)"
    )
    met = ratio >= 1.0 and p99 < P99_TARGET_MS
    if max_warmup > 0:
        print(
            f"broker JIT warm-up: {MESSAGE_WARMUP:g}s of unbatched raw messages "
            f"({message_warm['per_s']:,.0f} msg/s), then "
            f"paced rounds of {WARMUP_ROUND:g}s for {jit_s:.0f}s until its "
            f"compilers used {_jit_settled(jit_share)}; again after the raw and peak phases, "
            f"{jit2_s:.0f}s at the paced rate: {_jit_settled(jit2_share)}"
        )
    print(
        f"ratio ledgerlog/raw: {ratio:.2f}; target ledgerlog >= raw per-message rate and "
        f"p99 < {P99_TARGET_MS:.0f} ms: {'met' if met else 'NOT met'} "
        f"(after {warm_s:g}s of unmeasured warm-up of each workload; "
        f"run took {time.monotonic() - started:.0f}s, "
        f"broker start {broker.last_start_seconds or 0:.0f}s)"
    )
    return {
        "raw": raw,
        "send_ms": {"p50": send_p50, "p99": send_p99},
        "ledgerlog": {"committed_per_s": ll_rate, "committed": committed, "aborted": aborted},
        "paced": {
            "committed_per_s": paced_rate,
            "p50_ms": p50,
            "p99_ms": p99,
            "window_p99_ms": windows,
            "disk_sync_worst_ms_by_second": disk_worst,
            "broker_jit_cores_by_second": jit,
            "broker_gc_cores_by_second": gc,
            "machine_busy": load.busy,
            "cpu_us_per_txn": cpu_us,
            "cpu_us_per_txn_by_part": paced_cost,
        },
        "peak_cpu_us_per_txn_by_part": peak_cost,
        "jit_warmup_s": [jit_s, jit2_s],
        "message_warmup_per_s": message_warm["per_s"],
        "ratio": ratio,
        "met": met,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.pulsar_bench", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="each measured phase")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--batch", type=int, default=256, help="submit_many size at peak")
    parser.add_argument(
        "--max-warmup", type=float, default=MAX_WARMUP, help="cap on the JIT warm-up rounds"
    )
    args = parser.parse_args()
    main(args.clients, args.seconds, args.batch, max_warmup=args.max_warmup)
