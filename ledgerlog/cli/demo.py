"""``ledgerlog demo``: a bank on an embedded ledger, moved by several processes at once.

The parent creates the ledger and the accounts and serves as the writer; each worker
process opens the same ledger (its own replica, a standby writer) and runs threads that
transfer money between random accounts with ``@transactional``. At the end every worker
syncs and reports its replica's seq, digest and total balance: the demo checks that
money is conserved and that every replica reached the same digest.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any, TextIO

import ledgerlog
from ledgerlog.errors import LedgerlogError, RetryLimitError

INITIAL_BALANCE = 1_000


@dataclass
class DemoResult:
    committed: int
    aborted: int
    retries_exhausted: int
    seconds: float
    seq: int
    total: int
    expected_total: int
    digests: dict[str, str]

    @property
    def conserved(self) -> bool:
        return self.total == self.expected_total

    @property
    def replicas_agree(self) -> bool:
        return len(set(self.digests.values())) == 1


def _account(i: int) -> str:
    return f"acct:{i:06d}"


def _worker(
    path: str,
    index: int,
    accounts: int,
    threads: int,
    stop: MpEvent,
    all_stopped: MpEvent,
    counters: Any,
    results: Any,
) -> None:
    """One client process: `threads` threads transferring until `stop` is set."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    db = ledgerlog.open(path, client_id=f"demo-{index}-{mp.current_process().pid}")
    committed = exhausted = 0
    lock = threading.Lock()

    @ledgerlog.transactional(retries=20)
    def transfer(tx: ledgerlog.Tx, src: str, dst: str, amount: int) -> None:
        a = tx.get(src, 0)
        if a < amount:
            return  # nothing to move; still a (read-only) transaction
        tx.put(src, a - amount)
        tx.put(dst, tx.get(dst, 0) + amount)

    def run(seed: int) -> None:
        nonlocal committed, exhausted
        rnd = random.Random(seed)
        while not stop.is_set():
            src, dst = rnd.sample(range(accounts), 2)
            try:
                transfer(db, _account(src), _account(dst), rnd.randint(1, 50))
                with lock:
                    committed += 1
                    counters[index] = committed
            except RetryLimitError:
                with lock:
                    exhausted += 1

    ts = [threading.Thread(target=run, args=(index * 1000 + t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    results.put(("stopped", index, committed, exhausted))
    # Once every worker has stopped submitting, a sync brings all replicas to the same
    # final seq, where their digests must be equal.
    all_stopped.wait(120)
    seq = db.sync(timeout=60)
    total = sum(v for _k, v in db.range("acct:", "acct;"))
    results.put(("final", index, seq, db.digest.hex(), total))
    db.close()


def run_demo(
    path: str | None,
    workers: int = 3,
    threads: int = 8,
    accounts: int = 1_000,
    seconds: float = 10.0,
    out: TextIO | None = None,
    keep: bool = False,
) -> DemoResult:
    if out is None:
        out = sys.stdout  # resolved now, not at import: callers may have redirected it
    tmp = None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="ledgerlog-demo-")
        path = str(Path(tmp) / "bank")
    if workers < 1 or threads < 1 or accounts < 2 or seconds <= 0:
        raise ledgerlog.ConfigError("workers, threads >= 1, accounts >= 2, seconds > 0")
    ctx = mp.get_context("spawn")
    db = ledgerlog.open(path, client_id="demo-parent")
    try:
        db.wait_writer(30)
        expected = accounts * INITIAL_BALANCE
        if not db.range("acct:", "acct;"):
            for lo in range(0, accounts, 500):

                @ledgerlog.transactional
                def init(tx: ledgerlog.Tx, lo: int = lo) -> None:
                    for i in range(lo, min(lo + 500, accounts)):
                        tx.put(_account(i), INITIAL_BALANCE)

                init(db)
        else:
            expected = sum(v for _k, v in db.range("acct:", "acct;"))
        db.sync()
        start_seq = db.last_seq

        out.write(
            f"ledgerlog demo: {workers} processes x {threads} threads moving money between "
            f"{accounts} accounts for {seconds:g}s\nledger: {path}\n"
        )
        stop = ctx.Event()
        all_stopped = ctx.Event()
        counters: Any = ctx.Array("q", workers)
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=_worker,
                args=(path, i, accounts, threads, stop, all_stopped, counters, results),
            )
            for i in range(workers)
        ]
        for p in procs:
            p.start()
        aborted_seen = 0

        def count(results_: Any) -> None:
            nonlocal aborted_seen
            for r in results_:
                if r.kind == "record":
                    aborted_seen += sum(1 for o in r.outcomes if o[2] != 0)

        db.reader.subscribe(count)
        t0 = time.monotonic()
        last_line = ""
        while time.monotonic() - t0 < seconds:
            time.sleep(0.5)
            elapsed = time.monotonic() - t0
            done = sum(counters[i] for i in range(workers))
            last_line = (
                f"\r[{elapsed:5.1f}s] committed {done:>9,}  aborted {aborted_seen:>7,}  "
                f"{done / elapsed:>8,.0f} tx/s  seq {db.last_seq:,}"
            )
            out.write(last_line)
            out.flush()
            if any(not p.is_alive() for p in procs):
                break
        elapsed = time.monotonic() - t0
        stop.set()
        stopped: dict[int, tuple[Any, ...]] = {}
        deadline = time.monotonic() + 120
        while len(stopped) < workers and time.monotonic() < deadline:
            msg = results.get(timeout=120)
            if msg[0] == "stopped":
                stopped[msg[1]] = msg
        all_stopped.set()
        finals: dict[int, tuple[Any, ...]] = {}
        while len(finals) < workers and time.monotonic() < deadline:
            msg = results.get(timeout=120)
            if msg[0] == "final":
                finals[msg[1]] = msg
        for p in procs:
            p.join(30)
        seq = db.sync()
        committed = sum(m[2] for m in stopped.values())
        exhausted = sum(m[3] for m in stopped.values())
        digests = {f"worker-{i}": m[3] for i, m in sorted(finals.items())}
        digests["parent"] = db.digest.hex()
        total = sum(v for _k, v in db.range("acct:", "acct;"))
        out.write("\n")
        res = DemoResult(committed, aborted_seen, exhausted, elapsed, seq, total, expected, digests)
        seqs = {m[2] for m in finals.values()} | {seq}
        out.write(
            f"committed {committed:,} transfers, aborted {aborted_seen:,} attempts "
            f"(retried), {exhausted} gave up; {committed / elapsed:,.0f} committed tx/s; "
            f"{seq - start_seq:,} seqs\n"
        )
        out.write(
            f"money conserved: {'yes' if res.conserved else 'NO'} "
            f"(total {total:,}, expected {expected:,})\n"
        )
        agree = res.replicas_agree and len(seqs) == 1
        out.write(
            f"replicas agree: {'yes' if agree else 'NO'} ({len(digests)} replicas at seq "
            f"{', '.join(str(s) for s in sorted(seqs))}, digest {digests['parent'][:16]}…)\n"
        )
        if not agree or not res.conserved:
            raise LedgerlogError("the demo's checks failed (see above)")
        return res
    finally:
        db.close()
        if tmp is not None and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
