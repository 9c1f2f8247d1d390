"""Validator throughput: decode + validate + apply, transactions/s on one core.

Workload: records of 100 transactions, each reading 4 point keys and writing 2, over
100,000 accounts, read_version 50 seqs behind (a realistic in-flight lag), window
100,000 seqs. A variant adds one range read (about 5 keys wide) per transaction.
Baseline measured in the same run: decoding the same records alone (the floor any
validator pays), so the ratio shows what validation itself costs.

Each figure is given for the validator implementation in use (the C extension when it is
built, see ledgerlog.validator.IMPLEMENTATION) and, beside it, for the pure-Python
reference. Rates are wall-clock; the CPU-time rate is shown too, since on a shared
machine the wall clock also counts time spent waiting for the CPU.
"""

from __future__ import annotations

import argparse
import gc
import random
import time

from ledgerlog.codec import (
    decode_entry,
    decode_wire_txn,
    encode_epoch,
    encode_record,
    encode_transaction,
)
from ledgerlog.model import START, KeyRange, Put, Transaction, TxnId
from ledgerlog.validator import IMPLEMENTATION, IMPLEMENTATIONS, ValidatorState, process_entry
from ledgerlog.views.base import Checkpoint
from ledgerlog.views.memory import MemoryView

TARGET = 200_000


def make_records(n: int, keys: int, ranges: bool, seed: int = 1) -> list[bytes]:
    rnd = random.Random(seed)
    recs = [encode_epoch(1, "bench", 1)]
    seq = 1
    for _ in range(n // 100):
        txns = []
        for _ in range(100):
            ks = [f"acct:{rnd.randrange(keys):06d}" for _ in range(4)]
            rr = []
            if ranges:
                lo = rnd.randrange(keys)
                rr = [KeyRange(f"acct:{lo:06d}", f"acct:{lo + 5:06d}")]
            txns.append(
                encode_transaction(
                    Transaction(
                        TxnId("bench", seq),
                        max(0, seq - 50),
                        reads=ks,
                        ranges=rr,
                        writes=[Put(ks[0], seq), Put(ks[1], -seq)],
                    )
                )
            )
            seq += 1
        recs.append(encode_record(1, seq - 100, 1, "bench", txns))
    return recs


def run_validator(
    recs: list[bytes], window: int, implementation: str | None = None
) -> tuple[float, float, int]:
    """(txns/s wall clock, txns/s CPU time, state size at the end)."""
    state = ValidatorState(window, implementation=implementation)
    view = MemoryView(window=window)
    gc.collect()
    t0 = time.perf_counter()
    c0 = time.process_time()
    n = 0
    for r in recs:
        res = process_entry(state, r)
        n += len(res.outcomes)
        view.apply(res.committed, Checkpoint(START, state.next_seq, state.digest, b""))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return n / wall, n / max(cpu, 1e-9), state.size()


def run_decode_only(recs: list[bytes]) -> float:
    t0 = time.perf_counter()
    n = 0
    for r in recs[1:]:
        for raw in decode_entry(r).txns:  # type: ignore[union-attr]
            decode_wire_txn(raw)
            n += 1
    return n / (time.perf_counter() - t0)


def main(n: int = 300_000) -> dict[str, float]:
    others = [i for i in IMPLEMENTATIONS if i != IMPLEMENTATION]
    print(
        f"validator implementation: {IMPLEMENTATION}"
        + (f" (also measured: {', '.join(others)})" if others else " (C extension not built)")
    )
    out: dict[str, float] = {}
    for label, ranges in (("point reads", False), ("with a range read", True)):
        recs = make_records(n, 100_000, ranges)
        base = run_decode_only(recs)
        rate, cpu_rate, size = run_validator(recs, 100_000)
        out[label] = rate
        print(
            f"validator, 4 reads + 2 writes, {label:<18}: {rate:>10,.0f} txn/s "
            f"[{IMPLEMENTATION}] (CPU time: {cpu_rate:,.0f}/s; decode-only baseline "
            f"{base:>10,.0f} txn/s, ratio {rate / base:.2f}; "
            + (
                "no target for range reads; "
                if ranges
                else f"target {TARGET:,}: {'met' if rate >= TARGET else 'NOT met'}; "
            )
            + f"state {size:,} entries for window 100,000)"
        )
        for impl in others:
            rate, cpu_rate, size = run_validator(recs, 100_000, impl)
            out[f"{label} [{impl}]"] = rate
            print(
                f"    the same with the {impl} implementation{'':<5}: {rate:>10,.0f} txn/s "
                f"(CPU time: {cpu_rate:,.0f}/s; state {size:,} entries)"
            )
    # Memory bound: the state stays bounded by the window whatever the ledger's length.
    recs = make_records(200_000, 10_000_000, False, seed=2)
    for impl in (IMPLEMENTATION, *others):
        _, _, size_small = run_validator(recs, 10_000, impl)
        print(f"validator state after 200,000 txns, window 10,000: {size_small:,} entries [{impl}]")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.validator_bench", description=__doc__)
    parser.add_argument("-n", type=int, default=300_000, help="transactions validated")
    args = parser.parse_args()
    main(args.n)
