"""The bank workload on PostgreSQL SERIALIZABLE and on ledgerlog (embedded, Pulsar), one run.

Workload (identical for every system: same accounts, same seeds, same contention, same
client count): ``accounts`` accounts start with ``balance`` each; a transfer picks two
distinct accounts and an amount of 1..10, reads both balances, and writes both new ones.
With a hot set, a share ``hot_fraction`` of account picks goes to the first ``hot``
accounts, so concurrent transfers really collide. Each client thread picks its transfers
from its own seeded generator, so every system is offered the same sequence.

A **client** is one thread; there are ``processes`` x ``threads`` of them:

- PostgreSQL (a real server from the Debian package, :class:`LocalPostgres`): each thread
  owns one connection (psycopg 3) and runs one transaction at a time at SERIALIZABLE:
  ``SELECT`` both balances, ``UPDATE`` both, ``COMMIT``; on serialization failure (SQLSTATE
  40001) or deadlock (40P01) it rolls back and retries the same transfer (the usual loop),
  with the same jittered exponential backoff ledgerlog's ``transactional`` uses. Server
  settings are in :data:`PG_SETTINGS` (durable like ledgerlog: fsync and
  synchronous_commit on).
- ledgerlog, ``@transactional`` (the same shape): each process opens one ``Client`` (one
  local replica, one intake producer) against a separate ``ledgerlog writer`` process;
  each thread runs one ``@ledgerlog.transactional`` transfer at a time and waits for its
  decision; conflicts are retried by ``transactional`` itself.
- ledgerlog, pipelined (what its design allows, labelled apart): each thread builds
  ``batch`` transfers, submits them with ``Client.submit_many`` (one intake write) and
  waits for their decisions; an aborted transfer is retried, the same transfer re-read,
  in the thread's next batch.

Figures: committed transfers/s from the start signal to the last client's end (clients
finish the transaction in progress at the deadline), aborted attempts as a share of all
attempts, and the latency of a committed transfer from its first attempt to its commit
(retries included). After each run the final balances are read back and checked: the sum
is conserved and every balance equals its initial value plus the effects of exactly the
transfers that clients saw commit. Target (issue 5): ledgerlog on Pulsar at least 5x the
committed transactions/s of PostgreSQL SERIALIZABLE, with the check passing on both.
Before the measured runs every system and form runs the uniform workload once,
unmeasured (a freshly started broker JVM is still compiling hot code). PostgreSQL runs
first and again last (other load on a shared machine drifts between systems run one
after another); ratios use its better run. CPU per commit is measured
too (client processes; servers: PostgreSQL's processes, ledgerlog's writer process and
the broker JVM), with the commits/s it would allow if every core did only this.

Run: ``python -m bench --only bank [--quick]`` or ``python -m bench.bank_bench --help``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import attrs

from bench.common import (
    load_average,
    pct,
    quiet,
    run_processes,
    tree_cpu_seconds,
    writer_process,
)
from ledgerlog.testing.threads import run_in_threads

TARGET_RATIO = 5.0
RETRIES = 100  # per transfer, on every system; a transfer that runs out counts as given up
MAX_AMOUNT = 10
#: PostgreSQL settings for a 2-core, 24 GB machine shared with other jobs. Durability as
#: ledgerlog's (fsync, synchronous_commit, full_page_writes on: LocalPostgres's defaults);
#: shared_buffers far above the data (10,000 rows) and WAL room so that no checkpoint's
#: flood of page writes lands inside a 10 s run.
PG_SETTINGS = {
    "shared_buffers": "256MB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "30min",
    "max_connections": "200",
}
SYSTEMS = ("postgres", "embedded", "pulsar")


@attrs.frozen
class Workload:
    accounts: int = 10_000
    balance: int = 1_000
    hot: int = 0  # size of the hot set; 0 = uniform picks
    hot_fraction: float = 0.0  # share of account picks that go to the hot set
    processes: int = 2
    threads: int = 8
    seconds: float = 10.0
    batch: int = 32  # pipelined form: transfers per submit_many, per thread

    @property
    def clients(self) -> int:
        return self.processes * self.threads

    def describe(self) -> str:
        skew = (
            f"{self.hot_fraction:.0%} of picks on {self.hot} hot accounts"
            if self.hot and self.hot_fraction
            else "uniform picks"
        )
        return (
            f"{self.accounts:,} accounts, {skew}, {self.processes} processes x "
            f"{self.threads} threads = {self.clients} clients, {self.seconds:g} s"
        )

    def rng(self, proc: int, thread: int) -> random.Random:
        return random.Random(proc * 10_007 + thread)

    def pick(self, rnd: random.Random) -> tuple[int, int, int]:
        """(from, to, amount) of the next transfer."""

        def one() -> int:
            if self.hot and rnd.random() < self.hot_fraction:
                return rnd.randrange(self.hot)
            return rnd.randrange(self.accounts)

        a = one()
        b = one()
        while b == a:
            b = one()
        return a, b, rnd.randint(1, MAX_AMOUNT)


SCENARIOS: dict[str, dict[str, Any]] = {
    "uniform": {},
    "hot": {"hot": 20, "hot_fraction": 0.25},
}


def _acct(i: int) -> str:
    return f"acct:{i:06d}"


def _backoff(attempt: int) -> float:
    # ledgerlog.transactional's default schedule (base 1 ms, cap 0.2 s, full jitter), used
    # for PostgreSQL's retries too so both back off alike.
    return random.uniform(0, min(0.2, 0.001 * 2**attempt))


class Tally:
    """One client thread's (then one process's, then one run's) counts."""

    def __init__(self) -> None:
        self.committed = 0
        self.attempts = 0
        self.gave_up = 0
        self.unknown = 0
        self.cpu = 0.0  # CPU seconds of the client processes over their measured window
        self.latencies: list[float] = []
        self.deltas: collections.Counter[int] = collections.Counter()

    def commit(self, a: int, b: int, amount: int, latency: float) -> None:
        self.committed += 1
        self.latencies.append(latency)
        self.deltas[a] -= amount
        self.deltas[b] += amount

    def merge(self, other: Tally) -> Tally:
        self.committed += other.committed
        self.attempts += other.attempts
        self.gave_up += other.gave_up
        self.unknown += other.unknown
        self.cpu += other.cpu
        self.latencies.extend(other.latencies)
        self.deltas.update(other.deltas)
        return self


class _ServerCpu:
    """CPU seconds each named server process tree uses between the go signal and the
    last result."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def go(self) -> None:
        self.start = {k: tree_cpu_seconds([p]) for k, p in self.pids.items()}

    def done(self) -> None:
        self.used = {k: tree_cpu_seconds([p]) - self.start[k] for k, p in self.pids.items()}


def _in_threads(n: int, work: Callable[[int], Tally]) -> Tally:
    out: list[Tally] = [Tally() for _ in range(n)]

    def run(i: int) -> None:
        out[i] = work(i)

    run_in_threads(run, n, timeout=None)
    total = Tally()
    for t in out:
        total.merge(t)
    return total


@attrs.frozen
class Result:
    label: str
    committed: int
    attempts: int
    gave_up: int
    unknown: int
    elapsed: float
    p50_ms: float
    p99_ms: float
    client_cpu: float  # CPU seconds of the client processes, go to end
    server_cpu: dict[str, float]  # CPU seconds per server (postgres; writer, broker)
    balances_ok: bool
    check: str  # what the balance check found

    @property
    def rate(self) -> float:
        return self.committed / self.elapsed if self.elapsed > 0 else 0.0

    def cpu_us(self) -> tuple[float, float]:
        """CPU microseconds per committed transfer: (clients, servers)."""
        n = max(self.committed, 1)
        return 1e6 * self.client_cpu / n, 1e6 * sum(self.server_cpu.values()) / n

    @property
    def cpu_ceiling(self) -> float:
        """Commits/s if every core of this machine did nothing else (CPU per commit as
        measured): what the system could reach here when it is CPU-bound."""
        used = self.client_cpu + sum(self.server_cpu.values())
        return (os.cpu_count() or 1) * self.committed / used if used > 0 else 0.0

    @property
    def abort_share(self) -> float:
        """Aborted attempts (then retried or given up) over all attempts."""
        aborted = self.attempts - self.committed - self.unknown
        return aborted / self.attempts if self.attempts else 0.0


def _result(
    w: Workload,
    label: str,
    tally: Tally,
    elapsed: float,
    server_cpu: dict[str, float],
    final: dict[int, int],
) -> Result:
    lat = sorted(tally.latencies)
    ok, check = check_balances(w, final, tally)
    return Result(
        label=label,
        committed=tally.committed,
        attempts=tally.attempts,
        gave_up=tally.gave_up,
        unknown=tally.unknown,
        elapsed=elapsed,
        p50_ms=1000 * pct(lat, 0.50),
        p99_ms=1000 * pct(lat, 0.99),
        client_cpu=tally.cpu,
        server_cpu=server_cpu,
        balances_ok=ok,
        check=check,
    )


def check_balances(w: Workload, final: dict[int, int], tally: Tally) -> tuple[bool, str]:
    """Sum conserved, and each balance = initial + the committed transfers' effects."""
    total = sum(final.values())
    if len(final) != w.accounts:
        return False, f"{len(final):,} accounts instead of {w.accounts:,}"
    if total != w.accounts * w.balance:
        return False, f"sum {total:,} instead of {w.accounts * w.balance:,}"
    wrong = [i for i in range(w.accounts) if final.get(i) != w.balance + tally.deltas[i]]
    if wrong:
        i = wrong[0]
        return False, (
            f"{len(wrong):,} balances differ from the committed transfers' effects "
            f"(account {i}: {final.get(i)} instead of {w.balance + tally.deltas[i]})"
        )
    if tally.unknown:
        return False, f"{tally.unknown} transfers of unknown outcome"
    return True, "ok"


# -- PostgreSQL -------------------------------------------------------------------------------

_SELECT = "SELECT balance FROM acct WHERE id = %s"
_UPDATE = "UPDATE acct SET balance = %s WHERE id = %s"
_RETRY_SQLSTATES = ("40001", "40P01")  # serialization_failure, deadlock_detected


def _pg_thread(conn: Any, w: Workload, rnd: random.Random, deadline: float) -> Tally:
    import psycopg

    t = Tally()
    while time.monotonic() < deadline:
        a, b, amount = w.pick(rnd)
        start = time.perf_counter()
        for attempt in range(RETRIES + 1):
            t.attempts += 1
            try:
                with conn.cursor() as cur:
                    x = cur.execute(_SELECT, (a,)).fetchone()[0]
                    y = cur.execute(_SELECT, (b,)).fetchone()[0]
                    cur.execute(_UPDATE, (x - amount, a))
                    cur.execute(_UPDATE, (y + amount, b))
                conn.commit()
            except psycopg.Error as exc:
                conn.rollback()
                if exc.sqlstate not in _RETRY_SQLSTATES:
                    raise
                time.sleep(_backoff(attempt))
                continue
            t.commit(a, b, amount, time.perf_counter() - start)
            break
        else:
            t.gave_up += 1
    return t


def _pg_process(dsn: str, w: Workload, proc: int, go: Any, q: Any) -> None:
    import psycopg

    conns = [psycopg.connect(dsn) for _ in range(w.threads)]
    for c in conns:
        c.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
    q.put(("ready", None))
    go.wait()
    cpu = time.process_time()
    deadline = time.monotonic() + w.seconds
    tally = _in_threads(w.threads, lambda i: _pg_thread(conns[i], w, w.rng(proc, i), deadline))
    tally.cpu = time.process_time() - cpu
    q.put(("result", tally))  # before closing: teardown is not the workload's time
    for c in conns:
        c.close()


def run_postgres(dsn: str, w: Workload, postmaster: int | None = None) -> Result:
    """The workload on the (empty) database `dsn`: creates the table, runs, checks.
    `postmaster`: its pid, to measure the server's CPU (its backends included)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS acct")
        conn.execute("CREATE TABLE acct (id integer PRIMARY KEY, balance bigint NOT NULL)")
        conn.execute(
            "INSERT INTO acct SELECT i, %s FROM generate_series(0, %s) AS i",
            (w.balance, w.accounts - 1),
        )
        # Statistics make the planner use the primary key index, so SERIALIZABLE takes
        # row-level predicate locks rather than a whole-relation lock.
        conn.execute("VACUUM ANALYZE acct")
        version = conn.execute("SHOW server_version").fetchone()
    cpu = _ServerCpu({"postgres": postmaster} if postmaster else {})
    results, elapsed = run_processes(
        _pg_process,
        [(dsn, w, p) for p in range(w.processes)],
        on_go=cpu.go,
        on_done=cpu.done,
    )
    tally = Tally()
    for r in results:
        tally.merge(r)
    with psycopg.connect(dsn, autocommit=True) as conn:
        final: dict[int, int] = dict(conn.execute("SELECT id, balance FROM acct").fetchall())
    major = (version[0] if version else "?").split()[0].split(".")[0]
    label = f"PostgreSQL {major} SERIALIZABLE, {w.clients} connections"
    return _result(w, label, tally, elapsed, cpu.used, final)


@contextlib.contextmanager
def postgres_server() -> Iterator[Any]:
    """A LocalPostgres with :data:`PG_SETTINGS`, and a fresh database in it."""
    from ledgerlog.devservers.postgres import LocalPostgres

    with LocalPostgres(settings=PG_SETTINGS) as pg:
        yield pg


# -- ledgerlog --------------------------------------------------------------------------------


def _transactional_thread(db: Any, w: Workload, rnd: random.Random, deadline: float) -> Tally:
    import ledgerlog

    t = Tally()

    @ledgerlog.transactional(retries=RETRIES)
    def transfer(tx: Any, a: int, b: int, amount: int) -> None:
        t.attempts += 1
        x = tx.get(_acct(a))
        y = tx.get(_acct(b))
        tx.put(_acct(a), x - amount)
        tx.put(_acct(b), y + amount)

    while time.monotonic() < deadline:
        a, b, amount = w.pick(rnd)
        start = time.perf_counter()
        try:
            transfer(db, a, b, amount)
        except ledgerlog.RetryLimitError:
            t.gave_up += 1
            continue
        except ledgerlog.CommitUnknownError:
            t.unknown += 1
            continue
        t.commit(a, b, amount, time.perf_counter() - start)
    return t


def _pipelined_thread(db: Any, w: Workload, rnd: random.Random, deadline: float) -> Tally:
    import ledgerlog

    t = Tally()
    retry: list[tuple[int, int, int, float, int]] = []  # (a, b, amount, first try, tries)
    while time.monotonic() < deadline:
        todo, retry = retry, []
        while len(todo) < w.batch:
            todo.append((*w.pick(rnd), time.perf_counter(), 0))
        txs, sent = [], []
        wait_seq = 0
        for item in todo:
            a, b, amount, first, tries = item
            t.attempts += 1
            tx = db.transaction()
            try:
                x = tx.get(_acct(a))
                y = tx.get(_acct(b))
            except ledgerlog.ConflictError as exc:
                tx.abandon()
                wait_seq = max(wait_seq, exc.decision.conflict_seq or 0)
                if tries < RETRIES:
                    retry.append((a, b, amount, first, tries + 1))
                else:
                    t.gave_up += 1
                continue
            tx.put(_acct(a), x - amount)
            tx.put(_acct(b), y + amount)
            txs.append(tx)
            sent.append(item)
        for (a, b, amount, first, tries), fut in zip(sent, db.submit_many(txs), strict=True):
            try:
                d = fut.result(db.timeout)
            except FutureTimeout:
                t.unknown += 1
                continue
            if d.committed:
                t.commit(a, b, amount, time.perf_counter() - first)
            elif d.retryable and tries < RETRIES:
                wait_seq = max(wait_seq, d.conflict_seq or 0)
                retry.append((a, b, amount, first, tries + 1))
            else:
                t.gave_up += 1
        if wait_seq:
            # As transactional does: re-reading before the replica holds the conflicting
            # write would read the same stale value and abort again.
            db.reader.wait_for_seq(wait_seq, timeout=db.timeout)
    return t


FORMS = {"transactional": _transactional_thread, "pipelined": _pipelined_thread}


def _ledger_process(url: str, w: Workload, form: str, proc: int, go: Any, q: Any) -> None:
    quiet()
    import ledgerlog

    db = ledgerlog.open(url, writer=None, client_id=f"bank-{form}-{proc}", timeout=60)
    db.sync(120)
    q.put(("ready", None))
    go.wait()
    cpu = time.process_time()
    deadline = time.monotonic() + w.seconds
    work = FORMS[form]
    tally = _in_threads(w.threads, lambda i: work(db, w, w.rng(proc, i), deadline))
    tally.cpu = time.process_time() - cpu
    q.put(("result", tally))  # before closing: teardown is not the workload's time
    db.close()


def _read_balances(url: str) -> dict[int, int]:
    import ledgerlog

    with ledgerlog.open(url, writer=None, client_id="bank-check", timeout=60) as db:
        db.sync(120)
        return {int(k.split(":", 1)[1]): v for k, v in db.range("acct:", "acct;")}


def run_ledgerlog(
    url: str, w: Workload, form: str, label: str, broker: int | None = None
) -> Result:
    """The workload on a fresh ledger `url`, with its own ``ledgerlog writer`` process;
    the writer's CPU is measured, and the `broker` process's if given."""
    import ledgerlog

    with writer_process(url) as writer:
        with ledgerlog.open(url, writer=None, client_id="bank-init", timeout=60) as db:
            db.wait_writer(120)
            for lo in range(0, w.accounts, 2_000):
                tx = db.transaction()
                for i in range(lo, min(lo + 2_000, w.accounts)):
                    tx.put(_acct(i), w.balance)
                tx.commit(60)
        argses = [(url, w, form, p) for p in range(w.processes)]
        cpu = _ServerCpu({"writer": writer.pid, **({"broker": broker} if broker else {})})
        results, elapsed = run_processes(_ledger_process, argses, on_go=cpu.go, on_done=cpu.done)
        tally = Tally()
        for r in results:
            tally.merge(r)
        final = _read_balances(url)
    shape = (
        f"@transactional, {w.clients} threads"
        if form == "transactional"
        else f"pipelined, {w.clients} threads x submit_many of {w.batch}"
    )
    return _result(w, f"ledgerlog {label}, {shape}", tally, elapsed, cpu.used, final)


def run_embedded(w: Workload, form: str) -> Result:
    tmp = tempfile.mkdtemp(prefix="ledgerlog-bank-")
    try:
        return run_ledgerlog(str(Path(tmp) / "bank"), w, form, "embedded (fsync on)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_pulsar(service_url: str, w: Workload, form: str, broker: int | None = None) -> Result:
    url = f"{service_url}/public/default/bank-{uuid.uuid4().hex[:10]}"
    return run_ledgerlog(url, w, form, "on Pulsar", broker)


# -- report -----------------------------------------------------------------------------------


def _line(r: Result) -> str:
    cpu_clients, cpu_servers = r.cpu_us()
    return (
        f"  {r.label:<70} {r.rate:>9,.0f} {r.abort_share:>7.1%} {r.p50_ms:>8.1f} "
        f"{r.p99_ms:>8.1f} {cpu_clients:>6.0f} {cpu_servers:>6.0f} {r.cpu_ceiling:>8,.0f}  "
        f"{r.check}" + (f" ({r.gave_up} gave up)" if r.gave_up else "")
    )


def report(w: Workload, results: dict[str, Result]) -> dict[str, Any]:
    print(
        f"  {'system, client shape':<70} {'commit/s':>9} {'aborts':>7} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'cpu/c':>6} {'cpu/s':>6} {'cpu max':>8}  balances"
    )
    for r in results.values():
        print(_line(r), flush=True)
    print(
        f"  cpu/c, cpu/s: CPU us per commit in the client processes / in the servers "
        f"(PostgreSQL; ledgerlog's writer process, and the broker JVM on Pulsar); cpu max: "
        f"commits/s if all {os.cpu_count()} cores did only this"
    )
    for key, r in results.items():
        n = max(r.committed, 1)
        parts = ", ".join(f"{k} {1e6 * v / n:,.0f}" for k, v in r.server_cpu.items())
        print(f"  server CPU us per commit, {key}: {parts}")
    verdict: dict[str, Any] = {}
    pgs = [r for k, r in results.items() if k.startswith("postgres")]
    if not pgs or not max(r.rate for r in pgs):
        return verdict
    pg = max(pgs, key=lambda r: r.rate)
    others = {k: r for k, r in results.items() if not k.startswith("postgres")}
    for key, r in others.items():
        verdict[key] = r.rate / pg.rate
    print(
        f"  ratios to PostgreSQL's better run ({pg.rate:,.0f}/s): "
        + ", ".join(f"{k} {v:.2f}x" for k, v in verdict.items())
    )
    if pg.cpu_ceiling:
        # Less sensitive to other load than the rates (systems run one after another).
        print(
            "  ratios of the CPU-bound ceilings: "
            + ", ".join(f"{k} {r.cpu_ceiling / pg.cpu_ceiling:.2f}x" for k, r in others.items())
        )
    for form in FORMS:
        pr = results.get(f"pulsar-{form}")
        if pr is None:
            continue
        met = (
            pr.rate >= TARGET_RATIO * pg.rate and pr.balances_ok and all(p.balances_ok for p in pgs)
        )
        print(
            f"  target ledgerlog on Pulsar ({form}) >= {TARGET_RATIO:g}x PostgreSQL "
            f"SERIALIZABLE, balances ok on both: {pr.rate / pg.rate:.2f}x, "
            f"{'met' if met else 'NOT met'}"
        )
        verdict[f"met-{form}"] = met
    return verdict


def main(
    seconds: float = 10.0,
    *,
    scenarios: Sequence[str] = ("uniform", "hot"),
    systems: Sequence[str] = SYSTEMS,
    forms: Sequence[str] = tuple(FORMS),
    processes: int = 2,
    threads: int = 8,
    accounts: int = 10_000,
    warmup: float | None = None,
) -> dict[str, Any]:
    """`warmup` seconds (default: half of `seconds`) of the uniform workload run once on
    every system and form, unmeasured, before the measured runs."""
    quiet()
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(postgres_server()) if "postgres" in systems else None
        if pg is not None:
            settings = ", ".join(f"{k}={v}" for k, v in PG_SETTINGS.items())
            print(f"PostgreSQL: fsync, synchronous_commit, full_page_writes on; {settings}")
        broker = None
        if "pulsar" in systems:
            from ledgerlog.devservers.pulsar import LocalPulsar

            broker = stack.enter_context(LocalPulsar())
        warm_s = seconds / 2 if warmup is None else warmup
        if warm_s > 0:
            # A freshly started broker JVM compiles hot code for minutes; measured at once,
            # that compilation (a C2 thread busy for seconds at a time on a 2-core machine)
            # counted as ledgerlog's broker CPU and cost Pulsar runs throughput. Every
            # system runs once unmeasured first, PostgreSQL too (its caches warm alike).
            w = Workload(accounts=accounts, processes=processes, threads=threads, seconds=warm_s)
            print(f"warm-up: {warm_s:g}s of the uniform workload per system, not measured")
            if pg is not None:
                run_postgres(pg.create_database(f"warm_{uuid.uuid4().hex[:8]}"), w, pg.pid)
            for form in forms:
                if "embedded" in systems:
                    run_embedded(w, form)
                if broker is not None:
                    run_pulsar(broker.service_url, w, form, broker.pid)
        out: dict[str, Any] = {}
        for name in scenarios:
            w = Workload(
                accounts=accounts,
                processes=processes,
                threads=threads,
                seconds=seconds,
                **SCENARIOS[name],
            )
            print(f"bank, {name}: {w.describe()} (load average {load_average()})", flush=True)
            results: dict[str, Result] = {}
            if pg is not None:
                dsn = pg.create_database(f"bank_{uuid.uuid4().hex[:8]}")
                results["postgres"] = run_postgres(dsn, w, pg.pid)
            for form in forms:
                if "embedded" in systems:
                    results[f"embedded-{form}"] = run_embedded(w, form)
                if broker is not None:
                    results[f"pulsar-{form}"] = run_pulsar(broker.service_url, w, form, broker.pid)
            if pg is not None:
                # Again at the end: other load on the machine drifts between systems run
                # one after another; ratios use PostgreSQL's better run.
                dsn = pg.create_database(f"bank_{uuid.uuid4().hex[:8]}")
                again = run_postgres(dsn, w, pg.pid)
                results["postgres-again"] = attrs.evolve(again, label=f"{again.label}, again")
            verdict = report(w, results)
            print(f"  (load average after: {load_average()})", flush=True)
            out[name] = {"results": results, "verdict": verdict}
        return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.bank_bench", description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    ap.add_argument("--system", choices=SYSTEMS, action="append")
    ap.add_argument("--form", choices=sorted(FORMS), action="append")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--accounts", type=int, default=10_000)
    ap.add_argument("--warmup", type=float, default=None, help="seconds (default: half)")
    a = ap.parse_args()
    main(
        a.seconds,
        scenarios=a.scenario or ("uniform", "hot"),
        systems=a.system or SYSTEMS,
        forms=a.form or tuple(FORMS),
        processes=a.processes,
        threads=a.threads,
        accounts=a.accounts,
        warmup=a.warmup,
    )
