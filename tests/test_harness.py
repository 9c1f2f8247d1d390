"""The consistency harness on the embedded backend: the runner's histories, the bank
checker, real-time edges only for synced clients, the ledger audit, the TCP proxy."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ledgerlog.check import History, check_list_append
from ledgerlog.check.bank import check_bank
from ledgerlog.check.faults import Nemesis, ProcGroup, TcpProxy
from ledgerlog.check.run import FINAL_PROCESS, LedgerAudit, RunConfig, run_check
from ledgerlog.check.workload import HistoryFile, WorkloadConfig, merge_histories

# -- bank checker ---------------------------------------------------------------------------

INITIAL = {"0": 10, "1": 10, "2": 10}


def _op(i: int, typ: str, f: str, value: Any, process: int = 0, **kw: Any) -> dict[str, Any]:
    return {"type": typ, "f": f, "value": value, "process": process, "index": i, **kw}


def _bank_history(read: dict[str, int]) -> list[dict[str, Any]]:
    t = {"from": 0, "to": 1, "amount": 3}
    return [
        _op(0, "invoke", "transfer", t),
        _op(1, "ok", "transfer", t, txn_id="c#1"),
        _op(2, "invoke", "transfer", {"from": 1, "to": 2, "amount": 5}, process=1),
        _op(3, "fail", "transfer", {"from": 1, "to": 2, "amount": 5}, process=1, txn_id="c#2"),
        _op(4, "invoke", "read", None),
        _op(5, "ok", "read", read),
    ]


def test_bank_clean_history_is_valid() -> None:
    ops = _bank_history({"0": 7, "1": 13, "2": 10})
    v = check_bank(ops, initial=INITIAL, final={"0": 7, "1": 13, "2": 10}, committed={"c#1"})
    assert v.valid, v.format()
    assert v.counts == {"transfer ok": 1, "transfer fail": 1, "read ok": 1}


def test_bank_violated_total_is_detected() -> None:
    v = check_bank(_bank_history({"0": 7, "1": 10, "2": 10}), initial=INITIAL)
    assert not v.valid
    assert "read total 27 != 30" in v.format()


def test_bank_negative_balance_and_missing_account_are_detected() -> None:
    v = check_bank(_bank_history({"0": -3, "1": 23, "2": 10}), initial=INITIAL)
    assert not v.valid and "negative balances" in v.problems[0]
    assert check_bank(
        _bank_history({"0": -3, "1": 23, "2": 10}), initial=INITIAL, allow_negative=True
    ).valid
    v = check_bank(_bank_history({"0": 7, "1": 23}), initial=INITIAL)
    assert not v.valid and "one balance per account" in v.problems[0]


def test_bank_final_balances_must_match_committed_transfers() -> None:
    ops = _bank_history({"0": 7, "1": 13, "2": 10})
    # The failed transfer committed after all: the final state shows it.
    v = check_bank(ops, initial=INITIAL, final={"0": 7, "1": 8, "2": 15}, committed={"c#1", "c#2"})
    assert not v.valid
    assert any("failed transfer c#2 committed" in p for p in v.problems)
    # The acknowledged transfer is missing from the ledger (a lost commit).
    v = check_bank(ops, initial=INITIAL, final=INITIAL, committed=set())
    assert any("ok transfer c#1 is not committed" in p for p in v.problems)
    # Balances that no set of committed transfers explains.
    v = check_bank(ops, initial=INITIAL, final={"0": 6, "1": 14, "2": 10}, committed={"c#1"})
    assert any("final balances differ" in p for p in v.problems)


def test_bank_counts_a_crashed_transfer_the_ledger_committed() -> None:
    t = {"from": 2, "to": 0, "amount": 4}
    ops = [*_bank_history({"0": 7, "1": 13, "2": 10}), _op(6, "invoke", "transfer", t, 2,
           txn_id="d#1")]  # fmt: skip
    after = {"0": 11, "1": 13, "2": 6}
    assert check_bank(ops, initial=INITIAL, final=after, committed={"c#1", "d#1"}).valid
    before = {"0": 7, "1": 13, "2": 10}
    assert check_bank(ops, initial=INITIAL, final=before, committed={"c#1"}).valid
    assert not check_bank(ops, initial=INITIAL, final=before, committed={"c#1", "d#1"}).valid


# -- real time and sync ----------------------------------------------------------------------


def _stale_read_history(sync: bool | None) -> History:
    """T1 appends 1 to x and completes; T2 starts afterwards and reads x = [] (a replica
    that has not caught up)."""
    inv2: dict[str, Any] = {"type": "invoke", "f": "txn", "value": [["r", "x", None]]}
    if sync is not None:
        inv2["sync"] = sync
    ops = [
        {"type": "invoke", "f": "txn", "value": [["append", "x", 1]], "process": 0},
        {"type": "ok", "f": "txn", "value": [["append", "x", 1]], "process": 0},
        {**inv2, "process": 1},
        {"type": "ok", "f": "txn", "value": [["r", "x", []]], "process": 1},
    ]
    return History.from_json(ops)


def test_realtime_edges_only_into_synced_invocations() -> None:
    assert check_list_append(_stale_read_history(False), realtime=False).valid
    # Not synced: reading a stale replica is serializable, and allowed.
    assert check_list_append(_stale_read_history(False), realtime=True).valid
    # Synced (or not said, as in Jepsen's histories): the stale read is a violation.
    for sync in (True, None):
        v = check_list_append(_stale_read_history(sync), realtime=True)
        assert not v.valid and "strict-serializability" in v.anomalies, v.format()
    assert History.from_json(_stale_read_history(False).to_json()).ops[2].sync is False


# -- recording -------------------------------------------------------------------------------


def test_merge_orders_by_time_and_drops_an_unfinished_line(tmp_path: Path) -> None:
    a, b = HistoryFile(tmp_path / "history-a.jsonl"), HistoryFile(tmp_path / "history-b.jsonl")
    a.write({"type": "invoke", "f": "txn", "value": [["r", 1, None]], "process": 0})
    b.write({"type": "invoke", "f": "txn", "value": [["append", 1, 5]], "process": 1})
    b.write({"type": "submit", "process": 1, "txn_id": "b#1"})  # sent, then the crash
    a.write({"type": "ok", "f": "txn", "value": [["r", 1, []]], "process": 0})
    a.close()
    b.close()
    with open(tmp_path / "history-b.jsonl", "a") as fh:
        fh.write('{"type": "ok", "f": "txn", "val')  # a kill mid-write
    ops = merge_histories(sorted(tmp_path.glob("history-*.jsonl")))
    assert [(o["process"], o["type"], o["index"]) for o in ops] == [
        (0, "invoke", 0),
        (1, "invoke", 1),
        (0, "ok", 2),
    ]
    txns = History.from_json(ops).transactions()
    assert [t.status for t in txns] == ["ok", "info"]  # the unfinished one is unknown
    assert ops[1]["txn_id"] == "b#1"  # traceable in the ledger


# -- a whole run on the embedded backend -----------------------------------------------------


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[dict[str, Any]]]:
    d = tmp_path_factory.mktemp("run")
    cfg = RunConfig(
        url=str(d / "ledger"),
        out_dir=d / "run",
        clients=2,
        threads=2,
        seconds=6,
        faults=("kill-writer", "kill-client"),
        seed=7,
        backend_options={"lease_timeout": 2.0},
        workload_config=WorkloadConfig(pause=0.005),
        fault_gap=(0.5, 1.0),
        fault_duration=(0.5, 1.0),
    )
    report = run_check(cfg)
    return report, json.loads(report.history_path.read_text())


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_embedded_run_is_valid_and_records_an_elle_history(embedded_run: Any) -> None:
    report, ops = embedded_run
    assert report.valid, report.format()
    assert report.faults, "the nemesis applied no fault"
    assert any(o["process"] == "nemesis" and "kill -9" in o["value"] for o in ops)
    txns = History.from_json(ops).transactions()
    assert sum(t.status == "ok" for t in txns) > 50
    assert any(t.status == "fail" for t in txns)  # contention: conflicts happen
    assert [o["index"] for o in ops] == list(range(len(ops)))
    for o in ops:
        assert o["type"] in ("invoke", "ok", "fail", "info")
        if o["f"] == "txn" and o["type"] == "ok":
            assert all(m[0] in ("r", "append") for m in o["value"])
            # a committed writer's id is recorded for the audit
            if any(m[0] == "append" for m in o["value"]):
                assert "txn_id" in o
    # The final read holds every acknowledged append.
    final = next(o for o in ops if o["process"] == FINAL_PROCESS and o["type"] == "ok")
    lists = {m[1]: m[2] for m in final["value"]}
    for o in ops:
        if o["type"] == "ok" and o["f"] == "txn" and o["process"] != FINAL_PROCESS:
            for m in o["value"]:
                if m[0] == "append":
                    assert m[2] in lists[m[1]]


@pytest.mark.timeout(60)
@pytest.mark.slow
def test_broken_histories_from_a_run_are_detected(embedded_run: Any) -> None:
    _report, ops = embedded_run
    assert check_list_append(History.from_json(ops), realtime=True).valid
    failed = next(o for o in ops if o["type"] == "fail" and o["f"] == "txn"
                  and any(m[0] == "append" for m in o["value"]))  # fmt: skip
    key, value = next((m[1], m[2]) for m in failed["value"] if m[0] == "append")
    # A read that saw the failed transaction's append: G1a.
    broken = [dict(o) for o in ops]
    final = next(o for o in broken if o["process"] == FINAL_PROCESS and o["type"] == "ok")
    final["value"] = [["r", m[1], [*m[2], value]] if m[1] == key else m for m in final["value"]]
    v = check_list_append(History.from_json(broken))
    assert not v.valid and "G1a" in v.anomalies, v.format()
    # Two reads of a key that disagree on its order.
    reads = [
        o
        for o in ops
        if o["type"] == "ok" and o["f"] == "txn" and o["process"] != FINAL_PROCESS
        and any(m[0] == "r" and len(m[2]) >= 2 for m in o["value"])
    ]  # fmt: skip
    assert reads
    victim = reads[0]
    broken = [dict(o) for o in ops]
    pos = broken.index(victim)
    broken[pos] = {
        **victim,
        "value": [
            ["r", m[1], [m[2][1], m[2][0], *m[2][2:]]] if m[0] == "r" and len(m[2]) >= 2 else m
            for m in victim["value"]
        ],
    }
    v = check_list_append(History.from_json(broken))
    assert not v.valid and "incompatible-order" in v.anomalies, v.format()


@pytest.mark.timeout(60)
@pytest.mark.slow
def test_audit_finds_lost_and_doubled_commits(embedded_run: Any) -> None:
    report, ops = embedded_run
    audit = LedgerAudit(report.config.url)
    try:
        audit.settle(quiet=0.2)
        assert audit.check(ops) == []
        assert audit.reader.last_seq == report.final_seq
        assert audit.digest == report.digest
        ok = next(o for o in ops if o["type"] == "ok" and "txn_id" in o)
        fake = {**ok, "txn_id": "nobody#1", "index": 10**6}
        failed = next(o for o in ops if o["type"] == "fail" and "txn_id" in o)
        wrongly = {**failed, "txn_id": ok["txn_id"], "index": 10**6 + 1}
        problems = audit.check([*ops, fake, wrongly])
        assert any("nobody#1" in p and "lost" in p for p in problems), problems
        assert any(ok["txn_id"] in p and "aborted" in p for p in problems), problems
    finally:
        audit.close()


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_bank_run_on_embedded_is_valid(tmp_path: Path) -> None:
    cfg = RunConfig(
        url=str(tmp_path / "ledger"),
        out_dir=tmp_path / "run",
        workload="bank",
        clients=2,
        threads=2,
        seconds=4,
        faults=("pause-writer",),
        seed=3,
        backend_options={"lease_timeout": 1.0},
        workload_config=WorkloadConfig(pause=0.005),
        fault_gap=(0.5, 1.0),
        fault_duration=(1.5, 2.0),
    )
    report = run_check(cfg)
    assert report.valid, report.format()
    ops = json.loads(report.history_path.read_text())
    reads = [o for o in ops if o["f"] == "read" and o["type"] == "ok"]
    assert reads and all(sum(o["value"].values()) == 500 for o in reads)
    assert any(o["f"] == "transfer" and o["type"] == "ok" for o in ops)


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_a_ledger_that_grows_after_the_final_seq_is_named_is_no_violation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed client's durable submission can be appended after the audit's quiet
    period: replicas and ``ledgerlog verify`` are then compared at their own seqs."""
    import ledgerlog

    settle = LedgerAudit.settle
    grown: list[int] = []

    def settle_then_grow(audit: LedgerAudit, quiet: float = 2.0, timeout: float = 120.0) -> int:
        seq = settle(audit, quiet, timeout)
        with ledgerlog.open(audit.backend.url, writer=None, client_id="late") as db:
            for i in range(3):
                with db.transaction() as tx:
                    tx.put(f"late/{i}", i)
            grown.append(db.last_seq)
        return seq

    monkeypatch.setattr(LedgerAudit, "settle", settle_then_grow)
    cfg = RunConfig(
        url=str(tmp_path / "ledger"),
        out_dir=tmp_path / "run",
        clients=2,
        threads=2,
        seconds=2,
        faults=(),
        seed=5,
        backend_options={"lease_timeout": 2.0},
        workload_config=WorkloadConfig(pause=0.005),
    )
    report = run_check(cfg)
    assert grown and grown[0] >= report.final_seq + 3
    assert report.valid, report.format()
    assert any(f"to {grown[0]}" in n for n in report.notes), report.notes
    reports = [json.loads(p.read_text()) for p in (tmp_path / "run").glob("report-*.json")]
    assert len(reports) == 2
    assert all(r["at"] == report.final_seq and r["digest"] == report.digest for r in reports)


def test_unknown_fault_is_refused(tmp_path: Path) -> None:
    cfg = RunConfig(url=str(tmp_path / "l"), out_dir=tmp_path / "r", faults=("proxy",))
    with pytest.raises(ValueError, match="needs a server or proxy"):
        run_check(cfg)
    with pytest.raises(ValueError, match="unknown fault"):
        Nemesis(("flood",), __import__("random").Random(0), lambda f, w: None)
    assert not (tmp_path / "r").exists()  # refused before anything started


# -- the TCP proxy ---------------------------------------------------------------------------


class _Server:
    """A loopback server that echoes, or (pulsar=True) answers each frame with a frame
    carrying its own address in the command and in the payload."""

    def __init__(self, frames: bool = False) -> None:
        self.frames = frames
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"pulsar://127.0.0.1:{self.port}".encode()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                if self.frames:
                    cmd = b"\x0a" + self.url
                    payload = b"payload:" + self.url
                    body = struct.pack(">I", len(cmd)) + cmd + payload
                    conn.sendall(struct.pack(">I", len(body)) + body)
                else:
                    conn.sendall(data)


def _roundtrip(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        got = b""
        while len(got) < len(data) and (chunk := s.recv(65536)):
            got += chunk
        return got


def test_proxy_forwards_counts_drops_and_delays() -> None:
    server = _Server()
    proxy = TcpProxy("127.0.0.1", server.port).start()
    try:
        assert _roundtrip(proxy.port, b"x" * 10_000) == b"x" * 10_000
        assert proxy.bytes_up == 10_000 and proxy.bytes_down == 10_000
        assert proxy.connections == 1
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(b"hello")
            assert s.recv(100) == b"hello"
            proxy.drop(60)
            s.settimeout(5)
            with pytest.raises(OSError):  # reset, or closed
                s.sendall(b"again")
                if not s.recv(100):
                    raise ConnectionResetError("closed")
        with (
            pytest.raises(OSError),  # refused while dropping
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s,
        ):
            s.sendall(b"more")
            if not s.recv(100):
                raise ConnectionResetError("closed")
        proxy.heal()
        assert _roundtrip(proxy.port, b"back") == b"back"
        proxy.delay(300, 60)
        t = time.monotonic()
        assert _roundtrip(proxy.port, b"slow") == b"slow"
        assert time.monotonic() - t >= 0.5  # held both ways
    finally:
        proxy.close()
        server.sock.close()


def test_pulsar_proxy_rewrites_the_broker_address_in_commands_only() -> None:
    server = _Server(frames=True)
    proxy = TcpProxy("127.0.0.1", server.port, pulsar=True).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(b"lookup")
            (total,) = struct.unpack(">I", _recv_exactly(s, 4))
            body = _recv_exactly(s, total)
        (cmd_size,) = struct.unpack(">I", body[:4])
        assert body[4 : 4 + cmd_size] == b"\x0a" + proxy.url.encode()
        assert body[4 + cmd_size :] == b"payload:" + server.url  # payload untouched
        assert proxy.rewrites == 1
    finally:
        proxy.close()
        server.sock.close()


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        assert chunk, "connection closed"
        got += chunk
    return got


def test_procgroup_restart_and_leader(tmp_path: Path) -> None:

    from ledgerlog.check.procs import spawn

    def start(i: int, gen: int) -> Any:
        code = f"print('ELECTED epoch={i + 2 * gen}', flush=True); import time; time.sleep(60)"
        return spawn(["-c", code], log_dir=tmp_path, name=f"p{i}")

    g = ProcGroup("p", start, 2)
    try:
        g.start_all()
        assert all(p.wait_for("ELECTED", 20) for p in g.procs)
        assert g.leader() == 1
        g.kill(1)
        assert g.leader() == 0
        g.restart(1)
        assert g.procs[1].wait_for("ELECTED epoch=3", 20)
        assert g.leader() == 1 and g.generations == [0, 1]
        g.pause(0)
        g.heal()
        assert not g.paused
    finally:
        g.stop_all()
    assert not any(p.alive() for p in g.history)


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_cli_check_run_and_history(tmp_path: Path) -> None:
    from ledgerlog.check.__main__ import main as check_main
    from ledgerlog.cli import main

    out = tmp_path / "run"
    code = main(
        ["check", "run", str(tmp_path / "ledger"), "--seconds", "2", "--clients", "1",
         "--threads", "2", "--writers", "1", "--seed", "5", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    history = out / "history.json"
    assert check_main([str(history), "--realtime"]) == 0
    # The same file, made inconsistent: a read that disagrees with the final one.
    ops = json.loads(history.read_text())
    final = next(o for o in ops if o["process"] == FINAL_PROCESS and o["type"] == "ok")
    k, seen = next((m[1], m[2]) for m in final["value"] if len(m[2]) >= 2)
    final["value"] = [["r", k, seen[::-1]] if m[1] == k else m for m in final["value"]]
    history.write_text(json.dumps(ops))
    assert check_main([str(history)]) == 1
    # A fault with nothing to act on is a usage error, before anything starts.
    assert main(["check", "run", str(tmp_path / "l2"), "--faults", "restart-broker"]) == 2
    assert not (tmp_path / "l2").exists()
