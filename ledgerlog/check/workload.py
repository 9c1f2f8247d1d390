"""The client side of the consistency harness: workloads that record histories.

Run as ``python -m ledgerlog.check.workload ROLE ...``, a child process is either a
``client`` (threads running the list-append or bank workload against one ledger, each
operation appended to a JSON-lines history file before and after it runs) or a
``writer`` (a standby writer that prints ``ELECTED epoch=N``). The parent
(:mod:`ledgerlog.check.run`) kills, pauses and restarts them, then merges the files with
:func:`merge_histories` into one history in the JSON form Jepsen's Elle reads.

Outcomes are recorded conservatively: an operation that raised before it was submitted,
or that the validator aborted (``ConflictError``, ``TransactionAborted``), is ``fail``;
anything else that went wrong after submission (``CommitUnknownError``, a backend error,
a crash: no completion at all) is ``info``. Every submitted operation carries its
``txn_id`` so the ledger audit can look its decision up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ledgerlog.check.procs import say as _say
from ledgerlog.check.procs import serve_writer

WORKLOADS = ("list-append", "bank")
LIST_PREFIX = "la/"
ACCOUNT_PREFIX = "acct/"


def list_key(k: int) -> str:
    return f"{LIST_PREFIX}{k:06d}"


def account_key(a: int) -> str:
    return f"{ACCOUNT_PREFIX}{a:04d}"


def txn_id_text(client_id: str, client_seq: int) -> str:
    return f"{client_id}#{client_seq}"


# -- recording ------------------------------------------------------------------------------


class HistoryFile:
    """One process's operations, a JSON object per line, written with one ``write`` each
    (O_APPEND), so a SIGKILL leaves at most an unfinished last line."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()

    def write(self, op: dict[str, Any]) -> None:
        op = {**op, "time": time.monotonic_ns()}
        line = (json.dumps(op, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)

    def close(self) -> None:
        os.close(self._fd)


def read_history_lines(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The operations of one history file; an unfinished last line (a kill mid-write) is
    dropped. A ``submit`` line (written just before a transaction is sent) is folded into
    its process's pending invocation as ``txn_id``: a transaction whose client died
    before its completion stays traceable in the ledger."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    ops: list[dict[str, Any]] = []
    pending: dict[Any, dict[str, Any]] = {}
    for line in lines[:-1]:
        if not line.strip():
            continue
        op = json.loads(line)
        if op["type"] == "submit":
            if op["process"] in pending:
                pending[op["process"]]["txn_id"] = op["txn_id"]
            continue
        if op["type"] == "invoke":
            pending[op["process"]] = op
        else:
            pending.pop(op["process"], None)
        ops.append(op)
    return ops


def merge_histories(
    paths: Iterable[str | os.PathLike[str]], extra: Iterable[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """All operations in time order (CLOCK_MONOTONIC is one clock for every process on a
    machine), indexed from 0. Within a file the order is kept as written."""
    ops: list[tuple[int, int, int, dict[str, Any]]] = []
    for n, path in enumerate(sorted(map(str, paths))):
        for i, op in enumerate(read_history_lines(path)):
            ops.append((int(op["time"]), n, i, op))
    for i, op in enumerate(extra):
        ops.append((int(op["time"]), -1, i, op))
    ops.sort(key=lambda t: t[:3])
    return [{**op, "index": idx} for idx, (_t, _n, _i, op) in enumerate(ops)]


# -- workloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadConfig:
    workload: str = "list-append"
    keys: int = 6  # list-append: active keys at a time (contention)
    max_list: int = 40  # list-append: a key is retired once its list is this long
    max_mops: int = 4
    accounts: int = 5  # bank
    initial_balance: int = 100
    max_transfer: int = 5
    sync_ratio: float = 0.5  # share of threads that sync() before every transaction
    pause: float = 0.0  # seconds between a thread's transactions


@dataclass(frozen=True)
class Completion:
    """How an operation ended: the completion's type and value, and the txn id of what
    was submitted (None when nothing was)."""

    type: str
    value: Any
    txn_id: str | None = None
    error: str | None = None


Announce = Callable[[str], None]


def _commit(tx: Any, value: Any, announce: Announce) -> Completion:
    """Submit `tx`; map the result to ok / fail (the validator aborted it) / info."""
    import ledgerlog

    tid = txn_id_text(tx.txn_id.client_id, tx.txn_id.client_seq)
    if not tx.read_only:
        announce(tid)  # before it can reach the ledger: a crash from here on is "info"
    try:
        tx.commit()
    except (ledgerlog.ConflictError, ledgerlog.TransactionAborted) as exc:
        return Completion("fail", value, tid, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # unknown: it may still commit
        return Completion("info", value, tid, f"{type(exc).__name__}: {exc}")
    return Completion("ok", value, None if tx.read_only else tid)


class ListAppend:
    """Elle's list-append: each transaction reads and appends to a few keys from a small
    window of active keys; a key whose list reached ``max_list`` is retired and the window
    slides on (every thread sees the same lists, so they slide together)."""

    def __init__(self, db: Any, cfg: WorkloadConfig, rng: random.Random) -> None:
        self.db, self.cfg, self.rng = db, cfg, rng
        self.low = 0
        self.counter = 0

    def _slide(self) -> None:
        while len(self.db.get(list_key(self.low), [])) >= self.cfg.max_list:
            self.low += 1

    def invocation(self, process: int) -> tuple[str, Any]:
        self._slide()
        mops: list[list[Any]] = []
        for _ in range(self.rng.randint(1, self.cfg.max_mops)):
            k = self.low + self.rng.randrange(self.cfg.keys)
            if self.rng.random() < 0.5:
                mops.append(["r", k, None])
            else:
                self.counter += 1
                mops.append(["append", k, process * 1_000_000 + self.counter])
        return "txn", mops

    def run(self, value: Any, announce: Announce) -> Completion:
        tx = self.db.transaction()
        done: list[list[Any]] = []
        for f, k, v in value:
            cur = tx.get(list_key(k), [])
            if f == "r":
                done.append(["r", k, list(cur)])
            else:
                tx.put(list_key(k), [*cur, v])
                done.append(["append", k, v])
        return _commit(tx, done, announce)


class Bank:
    """Transfers between a few accounts (never below zero) and reads of all of them."""

    def __init__(self, db: Any, cfg: WorkloadConfig, rng: random.Random) -> None:
        self.db, self.cfg, self.rng = db, cfg, rng

    def invocation(self, process: int) -> tuple[str, Any]:
        if self.rng.random() < 0.3:
            return "read", None
        a, b = self.rng.sample(range(self.cfg.accounts), 2)
        return "transfer", {
            "from": a,
            "to": b,
            "amount": self.rng.randint(1, self.cfg.max_transfer),
        }

    def run(self, value: Any, announce: Announce) -> Completion:
        tx = self.db.transaction()
        if value is None:
            seen = {str(a): tx.get(account_key(a)) for a in range(self.cfg.accounts)}
            return _commit(tx, seen, announce)
        src, dst, amount = value["from"], value["to"], value["amount"]
        have = tx.get(account_key(src), 0)
        if have < amount:
            tx.abandon()
            return Completion("fail", value, None, "insufficient funds")
        tx.put(account_key(src), have - amount)
        tx.put(account_key(dst), tx.get(account_key(dst), 0) + amount)
        return _commit(tx, value, announce)


def make_workload(db: Any, cfg: WorkloadConfig, rng: random.Random) -> ListAppend | Bank:
    if cfg.workload == "list-append":
        return ListAppend(db, cfg, rng)
    if cfg.workload == "bank":
        return Bank(db, cfg, rng)
    raise ValueError(f"unknown workload {cfg.workload!r} (one of {', '.join(WORKLOADS)})")


def run_thread(
    db: Any,
    cfg: WorkloadConfig,
    rec: HistoryFile,
    *,
    slot: int,
    stride: int,
    generation: int,
    seed: int,
    sync: bool,
    stop: Callable[[], bool],
) -> None:
    """One logical client: invoke, run, complete, until `stop()`. After an ``info`` the
    thread continues as a new process (as Jepsen does: the old one may still be pending)."""
    rng = random.Random(seed)
    work = make_workload(db, cfg, rng)
    process = slot + stride * generation

    def announce(tid: str) -> None:
        rec.write({"type": "submit", "process": process, "txn_id": tid})

    while not stop():
        f, value = work.invocation(process)
        rec.write({"type": "invoke", "f": f, "value": value, "process": process, "sync": sync})
        try:
            if sync:
                db.sync()
            out = work.run(value, announce)
        except Exception as exc:  # raised before anything was submitted
            out = Completion("fail", value, None, f"{type(exc).__name__}: {exc}")
        done: dict[str, Any] = {"type": out.type, "f": f, "value": out.value, "process": process}
        if out.txn_id is not None:
            done["txn_id"] = out.txn_id
        if out.error is not None:
            done["error"] = out.error[:200]
        rec.write(done)
        if out.type == "info":
            generation += 1
            process = slot + stride * generation
        if cfg.pause:
            time.sleep(cfg.pause)


# -- child roles --------------------------------------------------------------------------------


def _configure_logging() -> None:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
    )
    logging.basicConfig(level=logging.WARNING)


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        k, _, v = pair.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def child_client(argv: Sequence[str]) -> int:
    import ledgerlog

    ap = argparse.ArgumentParser(prog="workload client")
    ap.add_argument("url")
    ap.add_argument("--name", required=True)
    ap.add_argument("--dir", required=True, help="run directory (history, stop, final files)")
    ap.add_argument("--slot", type=int, required=True, help="first thread slot")
    ap.add_argument("--stride", type=int, required=True)
    ap.add_argument("--generation", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="{}", help="WorkloadConfig fields as JSON")
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--option", action="append", default=[], help="backend option k=v")
    a = ap.parse_args(argv)
    _configure_logging()
    cfg = WorkloadConfig(**json.loads(a.config))
    run_dir = Path(a.dir)
    stop_file, final_file = run_dir / "STOP", run_dir / "FINAL"
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    def stop() -> bool:
        return stopping.is_set() or stop_file.exists()

    db = ledgerlog.open(
        a.url,
        client_id=f"{a.name}-g{a.generation}",
        writer=None,
        timeout=a.timeout,
        **_options(a.option),
    )
    # Start from the ledger's present (the bank's accounts exist): reads of an older
    # snapshot would be serializable, but not what the workload's checker expects.
    db.sync()
    rec = HistoryFile(run_dir / f"history-{a.name}-g{a.generation}.jsonl")
    _say(f"CLIENT {a.name} pid={os.getpid()}")
    threads = []
    for j in range(a.threads):
        slot = a.slot + j
        # Whether a thread syncs is fixed per slot: a restarted process keeps the mix.
        sync = random.Random(f"sync-{slot}").random() < cfg.sync_ratio
        kw = dict(
            slot=slot,
            stride=a.stride,
            generation=a.generation * 1000,
            seed=a.seed * 1_000_003 + slot * 7919 + a.generation,
            sync=sync,
            stop=stop,
        )
        threads.append(threading.Thread(target=run_thread, args=(db, cfg, rec), kwargs=kw))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _say("STOPPED")
    # Wait for the parent to name the final seq, then report this replica's digest there.
    deadline = time.monotonic() + 300
    while not final_file.exists() and time.monotonic() < deadline and not stopping.is_set():
        time.sleep(0.05)
    if final_file.exists():
        target = int(json.loads(final_file.read_text())["seq"])
        db.reader.wait_for_seq(target, timeout=120)
        seq = db.last_seq
        # The ledger may have grown past the named seq (a killed client's durable
        # submissions appended late): the digest is the one at the named seq all the same.
        digest = db.digest if seq == target else db.reader.digest_at(target)
        report = {
            "name": a.name,
            "seq": seq,
            "at": target,
            "digest": digest.hex() if digest else None,
        }
        tmp = run_dir / f"report-{a.name}.tmp"
        tmp.write_text(json.dumps(report))
        tmp.rename(run_dir / f"report-{a.name}.json")
        _say(f"REPORT {json.dumps(report)}")
    rec.close()
    db.close()
    return 0


def child_writer(argv: Sequence[str]) -> int:
    from ledgerlog.client import open_backend

    ap = argparse.ArgumentParser(prog="workload writer")
    ap.add_argument("url")
    ap.add_argument("--writer-id", required=True)
    ap.add_argument("--option", action="append", default=[], help="backend option k=v")
    a = ap.parse_args(argv)
    _configure_logging()
    return serve_writer(open_backend(a.url, **_options(a.option)), a.writer_id)


ROLES: dict[str, Callable[[Sequence[str]], int]] = {
    "client": child_client,
    "writer": child_writer,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ROLES:
        print(f"usage: python -m ledgerlog.check.workload {{{','.join(ROLES)}}} ...")
        return 2
    return ROLES[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
