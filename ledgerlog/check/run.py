"""The consistency harness: concurrent clients, faults, a history, and three verdicts.

:func:`run_check` starts writer processes (standbys that elect one) and client processes
(threads running a workload, see :mod:`ledgerlog.check.workload`) on any ledger URL,
applies a fault schedule for ``seconds`` (:class:`~ledgerlog.check.faults.Nemesis`),
heals, stops the clients, and then checks:

1. the history: list-append with :func:`check_list_append` (G0 ... G2-item, and strict
   serializability for the clients that synced), bank with :func:`check_bank`;
2. the ledger, replayed by a fresh reader: every transaction a client saw committed is
   committed exactly once, none it saw aborted is, nothing commits twice, seqs are dense;
3. the replicas: every client's replica, the fresh reader and a ``ledgerlog verify``
   process reach the same digest at the same final seq.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ledgerlog.check.bank import BankVerdict, check_bank
from ledgerlog.check.elle import Verdict, check_list_append
from ledgerlog.check.faults import Nemesis, ProcGroup, TcpProxy, check_faults
from ledgerlog.check.history import History
from ledgerlog.check.procs import Proc, spawn
from ledgerlog.check.workload import (
    WORKLOADS,
    WorkloadConfig,
    account_key,
    list_key,
    merge_histories,
    read_history_lines,
    txn_id_text,
)

__all__ = ["FINAL_PROCESS", "LedgerAudit", "RunConfig", "RunReport", "run_check"]

_WORKLOAD = "ledgerlog.check.workload"
#: The process of the final read (an int, as Elle wants, above any client's).
FINAL_PROCESS = 999_999_999


@dataclass(frozen=True)
class RunConfig:
    url: str
    out_dir: Path
    workload: str = "list-append"
    clients: int = 2
    threads: int = 3
    writers: int = 2
    seconds: float = 20.0
    faults: tuple[str, ...] = ()
    seed: int = 0
    realtime: bool = True
    client_url: str | None = None  # where clients connect (e.g. through a proxy)
    backend_options: dict[str, Any] = field(default_factory=dict)
    writer_options: dict[str, Any] = field(default_factory=dict)
    workload_config: WorkloadConfig = field(default_factory=WorkloadConfig)
    timeout: float = 10.0  # a client's wait for a decision
    fault_gap: tuple[float, float] = (1.0, 3.0)
    fault_duration: tuple[float, float] = (1.0, 4.0)
    fault_limits: dict[str, int] = field(default_factory=dict)  # e.g. {"restart-broker": 1}


@dataclass
class RunReport:
    config: RunConfig
    history_path: Path
    verdict_text: str
    history_valid: bool
    problems: list[str]  # ledger and replica problems (lost commits, digests, hangs)
    counts: dict[str, int]
    faults: list[str]
    final_seq: int
    digest: str
    seconds: float
    notes: list[str] = field(default_factory=list)  # oddities that are no violation

    @property
    def valid(self) -> bool:
        return self.history_valid and not self.problems

    def format(self) -> str:
        c = self.config
        lines = [
            f"ledgerlog check: {c.workload} on {c.url}, {c.clients} client processes x"
            f" {c.threads} threads, {c.writers} writers, {c.seconds:g}s, seed {c.seed}",
            f"faults: {', '.join(self.faults) or 'none'}",
            "operations: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())),
            f"history: {self.history_path}",
            self.verdict_text.rstrip("\n"),
            f"ledger: final seq {self.final_seq}, digest {self.digest[:16]}…",
        ]
        lines.extend(f"note: {n}" for n in self.notes)
        if self.problems:
            lines.append(f"INVALID: {len(self.problems)} ledger/replica problems")
            lines.extend(f"  {p}" for p in self.problems[:20])
        lines.append("verdict: " + ("VALID" if self.valid else "INVALID"))
        return "\n".join(lines) + "\n"


class LedgerAudit:
    """A fresh reader of the whole ledger: every decision by txn id, and the final state."""

    def __init__(self, url: str, **backend_options: Any) -> None:
        from ledgerlog.client import open_backend
        from ledgerlog.reader import Reader
        from ledgerlog.views.memory import MemoryView

        self.backend = open_backend(url, **backend_options)
        self.view = MemoryView()
        self.reader = Reader(self.backend, [self.view], name="audit")
        self.committed: dict[str, int] = {}
        self.decided: set[str] = set()
        self.seqs: list[int] = []

    def poll(self, timeout: float = 0.2, max_entries: int = 1024) -> int:
        n = 0
        for res in self.reader.poll(timeout=timeout, max_entries=max_entries):
            for d in res.decisions:
                if d.seq is None or d.txn_id is None:
                    continue
                n += 1
                self.seqs.append(d.seq)
                tid = txn_id_text(d.txn_id.client_id, d.txn_id.client_seq)
                self.decided.add(tid)
                if d.committed:
                    self.committed[tid] = self.committed.get(tid, 0) + 1
        return n

    def settle(self, quiet: float = 2.0, timeout: float = 120.0) -> int:
        """Read until nothing new came for `quiet` seconds; returns the last seq."""
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < quiet:
            if self.poll():
                last = time.monotonic()
        return self.reader.last_seq

    @property
    def digest(self) -> str:
        return self.reader.digest.hex()

    def catch_up(self, seq: int, timeout: float = 120.0) -> None:
        """Read on to `seq` exactly (an entry boundary some other replica stopped at)."""
        deadline = time.monotonic() + timeout
        while self.reader.last_seq < seq and time.monotonic() < deadline:
            self.poll(max_entries=1)

    def value(self, key: str) -> Any:
        got = self.view.get_versioned(key)
        return None if got is None else got[0]

    def check(self, ops: Sequence[dict[str, Any]]) -> list[str]:
        """Exactly once for what clients saw: ``ok`` commits once, ``fail`` never,
        ``info`` at most once; nothing commits twice; seqs dense."""
        problems: list[str] = []
        for op in ops:
            tid = op.get("txn_id")
            if tid is None or op["type"] == "invoke":
                continue
            n = self.committed.get(tid, 0)
            if op["type"] == "ok" and n != 1:
                what = "lost" if n == 0 else f"committed {n} times"
                problems.append(f"acknowledged txn {tid} (operation {op['index']}) is {what}")
            elif op["type"] == "fail" and n:
                problems.append(f"aborted txn {tid} (operation {op['index']}) committed")
        for tid, n in self.committed.items():
            if n > 1:
                problems.append(f"txn {tid} committed {n} times")
        if sorted(self.seqs) != list(range(1, len(self.seqs) + 1)):
            problems.append("seqs are not dense")
        return problems

    def close(self) -> None:
        self.reader.close()
        self.backend.close()


def _verify(url: str) -> tuple[int, str]:
    """``ledgerlog verify URL`` in a process of its own: (seq, digest)."""
    out = subprocess.run(
        [sys.executable, "-m", "ledgerlog", "verify", url],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    seq = re.search(r"^seq:\s+(\d+)", out.stdout, re.M)
    digest = re.search(r"^digest:\s+([0-9a-f]+)", out.stdout, re.M)
    if out.returncode or seq is None or digest is None:
        raise RuntimeError(f"ledgerlog verify failed ({out.returncode}): {out.stderr[-2000:]}")
    return int(seq.group(1)), digest.group(1)


def _opt_args(options: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in options.items():
        out += ["--option", f"{k}={json.dumps(v)}"]
    return out


def _wait_all(procs: Sequence[Proc], text: str, timeout: float) -> list[Proc]:
    """Wait until every process logged `text`; returns those that did not."""
    deadline = time.monotonic() + timeout
    missing = list(procs)
    while missing and time.monotonic() < deadline:
        missing = [p for p in missing if text not in p.log()]
        time.sleep(0.05)
    return missing


def _wait_any(procs: Sequence[Proc], text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in p.log() for p in procs):
            return True
        time.sleep(0.05)
    return False


def run_check(
    cfg: RunConfig,
    *,
    pulsar: Any = None,
    bookkeeper: Any = None,
    proxy: TcpProxy | None = None,
    out: TextIO | None = None,
) -> RunReport:
    out = out if out is not None else sys.stdout
    check_faults(cfg.faults, pulsar=pulsar, bookkeeper=bookkeeper, proxy=proxy)
    if cfg.workload not in WORKLOADS:
        raise ValueError(f"unknown workload {cfg.workload!r} (one of {', '.join(WORKLOADS)})")
    t0 = time.monotonic()
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (*run_dir.glob("history-*.jsonl"), *run_dir.glob("report-*.json")):
        stale.unlink()
    for name in ("STOP", "FINAL"):
        (run_dir / name).unlink(missing_ok=True)
    rng = random.Random(cfg.seed)
    out.write(f"ledgerlog check: seed {cfg.seed}, run directory {run_dir}\n")
    out.flush()
    wcfg = WorkloadConfig(**{**asdict(cfg.workload_config), "workload": cfg.workload})
    client_url = cfg.client_url or cfg.url
    nemesis_ops: list[dict[str, Any]] = []

    def record(fault: str, what: str) -> None:
        nemesis_ops.append(
            {"type": "info", "f": fault, "value": what, "process": "nemesis",
             "time": time.monotonic_ns()}
        )  # fmt: skip
        out.write(f"  [{time.monotonic() - t0:6.1f}s] nemesis: {what}\n")
        out.flush()

    def start_writer(i: int, gen: int) -> Proc:
        argv = ["-m", _WORKLOAD, "writer", cfg.url, "--writer-id", f"w{i}-g{gen}"]
        argv += _opt_args({**cfg.backend_options, **cfg.writer_options})
        return spawn(argv, log_dir=run_dir, name=f"writer-{i}")

    stride = cfg.clients * cfg.threads

    def start_client(i: int, gen: int) -> Proc:
        argv = [
            "-m", _WORKLOAD, "client", client_url, "--name", f"c{i}", "--dir", str(run_dir),
            "--slot", str(i * cfg.threads), "--stride", str(stride), "--generation", str(gen),
            "--threads", str(cfg.threads), "--seed", str(cfg.seed),
            "--config", json.dumps(asdict(wcfg)), "--timeout", str(cfg.timeout),
            *_opt_args(cfg.backend_options),
        ]  # fmt: skip
        return spawn(argv, log_dir=run_dir, name=f"client-{i}")

    writers = ProcGroup("writer", start_writer, cfg.writers)
    clients = ProcGroup("client", start_client, cfg.clients)
    problems: list[str] = []
    notes: list[str] = []
    audit: LedgerAudit | None = None
    final_digest = ""
    nemesis: Nemesis | None = None
    initial: dict[str, int] = {}
    try:
        writers.start_all()
        if not _wait_any(writers.procs, "ELECTED", 90):
            raise RuntimeError("no writer was elected:\n" + writers.procs[0].log()[-3000:])
        if cfg.workload == "bank":
            initial = _init_bank(cfg, wcfg)
        clients.start_all()
        late = _wait_all(clients.procs, "CLIENT", 120)
        if late:
            raise RuntimeError(f"client did not start:\n{late[0].log()[-3000:]}")
        out.write(f"  [{time.monotonic() - t0:6.1f}s] {cfg.clients} clients running\n")
        nemesis = Nemesis(
            cfg.faults, rng, record, writers=writers, clients=clients, pulsar=pulsar,
            bookkeeper=bookkeeper, proxy=proxy, gap=cfg.fault_gap, duration=cfg.fault_duration,
            limits=cfg.fault_limits,
        ).start()  # fmt: skip
        nemesis.wait(cfg.seconds)
        nemesis.stop()
        if nemesis.error is not None:
            problems.append(f"the nemesis failed: {nemesis.error!r}")
        out.write(f"  [{time.monotonic() - t0:6.1f}s] faults healed; stopping clients\n")
        (run_dir / "STOP").touch()
        for p in _wait_all(clients.procs, "STOPPED", 90):
            problems.append(f"{p.name} did not stop within 90s (killed): {p.log()[-1500:]}")
            p.kill()
        if not _wait_any(writers.procs, "ELECTED", 60) or writers.leader() is None:
            problems.append("no writer is elected after the faults were healed")
        audit = LedgerAudit(cfg.url, **cfg.backend_options)
        # Quiet for a while: killed clients' last submissions (durable in the intake) are
        # usually appended by now. Replicas report their digest at this seq even if the
        # ledger grew since (seen after a writer's re-election), and verify's is compared
        # at its own end.
        final_seq = audit.settle(quiet=4.0)
        final_digest = audit.digest
        (run_dir / "FINAL.tmp").write_text(json.dumps({"seq": final_seq}))
        (run_dir / "FINAL.tmp").rename(run_dir / "FINAL")
        live = [p for p in clients.procs if p.alive()]
        for p in _wait_all(live, "REPORT", 120):
            problems.append(f"{p.name} reported no digest: {p.log()[-1500:]}")
        for i in range(cfg.clients):
            rp = run_dir / f"report-c{i}.json"
            if not rp.exists():
                continue
            rep = json.loads(rp.read_text())
            if rep["at"] != final_seq or rep["digest"] != final_digest:
                problems.append(
                    f"client c{i}'s replica (at seq {rep['seq']}) has digest {rep['digest']}"
                    f" at seq {rep['at']}, the fresh reader at seq {final_seq} {final_digest}"
                )
        vseq, vdigest = _verify(cfg.url)
        if vseq > final_seq:
            # Quiet is no proof that nothing more will come: a durable submission of a
            # killed client can be appended after it. Compare at verify's seq instead.
            notes.append(f"the ledger grew from seq {final_seq} to {vseq} after it was named")
            audit.catch_up(vseq)
        # The audit has read at least to final_seq: a verify that stopped short differs too.
        if (vseq, vdigest) != (audit.reader.last_seq, audit.digest):
            problems.append(
                f"ledgerlog verify: seq {vseq} digest {vdigest}; fresh reader: seq"
                f" {audit.reader.last_seq} digest {audit.digest}"
            )
    finally:
        if nemesis is not None:
            nemesis.stop()
        clients.stop_all()
        writers.stop_all()
    for p in (*writers.history, *clients.history):
        # -9: the nemesis or a stop that timed out; anything else is a crash of its own,
        # a problem unless it came after the process had stopped its work.
        rc = p.popen.returncode
        if rc not in (0, -9):
            what = f"{p.name} (pid {p.pid}) exited with {rc}: {p.log()[-300:].strip()!r}"
            (notes if "STOPPED" in p.log() else problems).append(what)
    try:
        assert audit is not None
        final_ops = _final_read(cfg, audit, run_dir)
        ops = merge_histories(sorted(run_dir.glob("history-*.jsonl")), [*nemesis_ops, *final_ops])
        history_path = run_dir / "history.json"
        history_path.write_text(json.dumps(ops, indent=None, separators=(",", ":")) + "\n")
        problems = audit.check(ops) + problems
        out.write(f"  [{time.monotonic() - t0:6.1f}s] checking {len(ops)} operations\n")
        counts: dict[str, int] = {}
        for op in ops:
            if op["type"] != "invoke" and op["process"] != "nemesis":
                counts[op["type"]] = counts.get(op["type"], 0) + 1
        verdict: Verdict | BankVerdict
        if cfg.workload == "list-append":
            verdict = check_list_append(History.from_json(ops), realtime=cfg.realtime)
        else:
            final = {str(a): audit.value(account_key(a)) for a in range(wcfg.accounts)}
            verdict = check_bank(ops, initial=initial, final=final, committed=set(audit.committed))
        report = RunReport(
            cfg,
            history_path,
            verdict.format(),
            verdict.valid,
            problems,
            counts,
            [] if nemesis is None else nemesis.applied,
            final_seq,
            final_digest,
            time.monotonic() - t0,
            notes,
        )
    finally:
        if audit is not None:
            audit.close()
    out.write(report.format())
    out.flush()
    return report


def _init_bank(cfg: RunConfig, wcfg: WorkloadConfig) -> dict[str, int]:
    import ledgerlog

    initial = {str(a): wcfg.initial_balance for a in range(wcfg.accounts)}
    db = ledgerlog.open(cfg.url, writer=None, client_id="bank-init", **cfg.backend_options)
    try:
        with db.transaction() as tx:
            for a in range(wcfg.accounts):
                tx.put(account_key(a), wcfg.initial_balance)
    finally:
        db.close()
    return initial


def _final_read(cfg: RunConfig, audit: LedgerAudit, run_dir: Path) -> list[dict[str, Any]]:
    """One more operation, after everything: the fresh replica's final state (it read the
    ledger to its end, so it counts as synced)."""
    now = time.monotonic_ns()
    inv: Any
    done: Any
    if cfg.workload == "list-append":
        keys: set[int] = set()
        for path in run_dir.glob("history-*.jsonl"):
            for op in read_history_lines(path):
                if op.get("f") == "txn":
                    keys.update(m[1] for m in op.get("value") or ())
        inv = [["r", k, None] for k in sorted(keys)]
        done = [["r", k, list(audit.value(list_key(k)) or [])] for k in sorted(keys)]
        f = "txn"
    else:
        accounts = cfg.workload_config.accounts
        inv = None
        done = {str(a): audit.value(account_key(a)) for a in range(accounts)}
        f = "read"
    return [
        {
            "type": "invoke",
            "f": f,
            "value": inv,
            "process": FINAL_PROCESS,
            "time": now,
            "sync": True,
        },
        {"type": "ok", "f": f, "value": done, "process": FINAL_PROCESS, "time": now + 1},
    ]


def parse_faults(text: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in text.split(",") if f.strip())
