"""The ``ledgerlog`` command, in process through ``ledgerlog.cli.main`` and as a real
``python -m ledgerlog`` subprocess: demo, verify, inspect, tail, and one-line errors."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import ledgerlog
import ledgerlog.cli.demo  # imported up front, as any earlier user of it would
from ledgerlog.backends.file import FileBackend
from ledgerlog.cli import main

pytestmark = pytest.mark.timeout(30)

WRITER_ID = "cli-test"


@dataclass
class Sample:
    path: Path
    seq: int
    digest: str
    committed: dict[int, str]  # seq -> txn id
    aborted: tuple[int, str]  # (seq, txn id) of the conflict abort
    conflict_seq: int  # the seq that wrote 'a' under it


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    """A closed ledger: three commits, one conflict abort, an event, a delete."""
    path = tmp_path_factory.mktemp("cli") / "bank"
    committed: dict[int, str] = {}
    db = ledgerlog.open(path, client_id=WRITER_ID, fsync=False, timeout=10.0)
    try:
        db.wait_writer(10)
        with db.transaction() as t:
            t.put("a", 1)
            t.put("b", 2)
        committed[t.decision.seq] = str(t.txn_id)  # type: ignore[union-attr,index]
        loser = db.transaction()
        loser.get("a")
        with db.transaction() as t:
            t.put("a", 10)
        conflict_seq = t.decision.seq  # type: ignore[union-attr]
        committed[conflict_seq] = str(t.txn_id)  # type: ignore[index]
        loser.put("c", 3)
        with pytest.raises(ledgerlog.ConflictError) as ei:
            loser.commit()
        aborted = (ei.value.decision.seq, str(loser.txn_id))
        with db.transaction() as t:
            t.emit("audit", {"n": 1}, conflict_keys=["b"])
            t.delete("b")
        committed[t.decision.seq] = str(t.txn_id)  # type: ignore[union-attr,index]
    finally:
        db.close()
    reader = ledgerlog.Reader(FileBackend(path, create=False), name="test")
    try:
        seq = reader.catch_up(10)
        digest = reader.digest.hex()
    finally:
        reader.close()
    assert seq == 4 and aborted[0] == 3
    return Sample(path, seq, digest, committed, aborted, conflict_seq)  # type: ignore[arg-type]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def run_module(*args: str, timeout: float = 25) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledgerlog", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# -- demo -------------------------------------------------------------------------------------

DEMO_ARGS = ["demo", "--seconds", "3", "--workers", "2", "--threads", "2", "--accounts", "50"]


@pytest.mark.timeout(90)
def test_demo_subprocess(tmp_path: Path) -> None:
    out = run_module(*DEMO_ARGS, "--path", str(tmp_path / "bank"), timeout=80)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "money conserved: yes" in out.stdout
    assert "replicas agree: yes" in out.stdout
    assert "Traceback" not in out.stderr
    # The ledger it kept verifies, and the demo's final digest is the ledger's.
    m = re.search(
        r"replicas agree: yes \(3 replicas at seq (\d+), digest ([0-9a-f]{16})", out.stdout
    )
    assert m, out.stdout
    v = run_module("verify", str(tmp_path / "bank"))
    assert v.returncode == 0, v.stderr
    assert f"seq:     {m.group(1)}" in v.stdout
    assert f"digest:  {m.group(2)}" in v.stdout


@pytest.mark.timeout(90)
def test_demo_in_process_writes_to_current_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buf)
    rc = main([*DEMO_ARGS, "--path", str(tmp_path / "bank")])
    monkeypatch.undo()
    assert rc == 0
    assert "money conserved: yes" in buf.getvalue()
    assert "replicas agree: yes" in buf.getvalue()


def test_demo_bad_arguments_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rc, _out, err = run(["demo", "--accounts", "1", "--path", str(tmp_path / "d")], capsys)
    assert rc == 1
    assert err.strip().splitlines() == [
        "ledgerlog: error: workers, threads >= 1, accounts >= 2, seconds > 0"
    ]


# -- verify -----------------------------------------------------------------------------------


def test_verify(sample: Sample, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(["verify", str(sample.path)], capsys)
    assert rc == 0, err
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["ledger"].strip() == f"file://{sample.path}"
    assert lines["seq"].strip() == str(sample.seq)
    assert lines["epoch"].strip() == "1"
    assert lines["digest"].strip() == sample.digest
    assert lines["counts"].strip() == "committed 3, conflict 1, epoch entries 1"
    assert "replay" in lines


def test_verify_subprocess_matches(sample: Sample) -> None:
    out = run_module("verify", str(sample.path))
    assert out.returncode == 0, out.stderr
    assert f"digest:  {sample.digest}\n" in out.stdout
    assert f"seq:     {sample.seq}\n" in out.stdout
    assert "Traceback" not in out.stderr


def test_verify_accepts_a_file_url(sample: Sample, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["verify", f"file://{sample.path}"], capsys)
    assert rc == 0
    assert f"digest:  {sample.digest}" in out


# -- inspect ----------------------------------------------------------------------------------


def test_inspect(sample: Sample, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(["inspect", str(sample.path)], capsys)
    assert rc == 0, err
    lines = out.splitlines()
    assert re.fullmatch(
        rf"@\d+:\d+ epoch start 1 by {WRITER_ID} at \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\dZ: accepted",
        lines[0],
    ), lines[0]
    heads = [ln for ln in lines if " record epoch " in ln]
    assert len(heads) == 4
    for seq, head in enumerate(heads, start=1):
        assert re.fullmatch(
            rf"@\d+:\d+ record epoch 1 seqs {seq}\.\.{seq} by {WRITER_ID} at .*Z", head
        ), head
    body = [ln.strip() for ln in lines if ln.startswith("    ")]
    s1, s2, s4 = sorted(sample.committed)
    a_seq, a_id = sample.aborted
    assert body == [
        f"txn {sample.committed[s1]} committed at seq {s1}: read@0 2 writes",
        f"txn {sample.committed[s2]} committed at seq {s2}: read@1 1 writes",
        f"txn {a_id} aborted at seq {a_seq}: conflict on key 'a' written at seq "
        f"{sample.conflict_seq}: read@1 reads a 1 writes",
        f"txn {sample.committed[s4]} committed at seq {s4}: read@3 1 writes 1 events",
    ]


def test_inspect_limit_and_from_seq(sample: Sample, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["inspect", str(sample.path), "--limit", "2"], capsys)
    assert rc == 0
    assert sum(1 for ln in out.splitlines() if ln.startswith("@")) == 2
    rc, out, _ = run(["inspect", str(sample.path), "--from-seq", "3"], capsys)
    assert rc == 0
    assert "seqs 1..1" not in out and "seqs 2..2" not in out
    assert "seqs 3..3" in out and "seqs 4..4" in out


# -- tail -------------------------------------------------------------------------------------


def test_tail_no_follow(sample: Sample, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(["tail", "--no-follow", str(sample.path)], capsys)
    assert rc == 0, err
    a_seq, a_id = sample.aborted
    expected = [f"-- epoch 1 started by writer {WRITER_ID}"]
    for seq in range(1, sample.seq + 1):
        if seq == a_seq:
            expected.append(
                f"txn {a_id} aborted at seq {seq}: conflict on key 'a' written at seq "
                f"{sample.conflict_seq}"
            )
        else:
            expected.append(f"txn {sample.committed[seq]} committed at seq {seq}")
    assert out.splitlines() == expected


def test_tail_from_seq(sample: Sample, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["tail", "--no-follow", "--from-seq", "3", str(sample.path)], capsys)
    assert rc == 0
    shown = [int(m) for m in re.findall(r"^txn \S+ \w+ at seq (\d+)", out, re.M)]
    assert shown == [3, 4]


def test_tail_json_no_follow(sample: Sample, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(["tail", "--json", "--no-follow", str(sample.path)], capsys)
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0] == {"type": "epoch", "epoch": 1, "writer_id": WRITER_ID}
    rows = [r for r in lines if r["type"] == "decision"]
    assert len(rows) == len(lines) - 1
    assert [r["seq"] for r in rows] == [1, 2, 3, 4]
    a_seq, a_id = sample.aborted
    for r in rows:
        assert set(r) == {
            "type",
            "seq",
            "txn_id",
            "outcome",
            "reason",
            "conflict_key",
            "conflict_seq",
            "detail",
        }
        if r["seq"] == a_seq:
            assert r == {
                "type": "decision",
                "seq": a_seq,
                "txn_id": a_id,
                "outcome": "aborted",
                "reason": "conflict",
                "conflict_key": "a",
                "conflict_seq": sample.conflict_seq,
                "detail": None,
            }
        else:
            assert r["outcome"] == "committed" and r["reason"] is None
            assert r["txn_id"] == sample.committed[r["seq"]]


def test_tail_subprocess(sample: Sample) -> None:
    out = run_module("tail", "--no-follow", str(sample.path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"-- epoch 1 started by writer {WRITER_ID}"
    assert "aborted at seq 3: conflict on key 'a'" in out.stdout
    out = run_module("tail", "--json", "--no-follow", str(sample.path))
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 5  # the epoch start, then 4 decisions


# -- errors -----------------------------------------------------------------------------------


def _non_ledger(tmp_path: Path) -> Path:
    d = tmp_path / "not-a-ledger"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    return d


@pytest.mark.parametrize("command", ["verify", "inspect", "tail"])
def test_errors_are_one_line_in_process(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"
    rc, out, err = run([command, str(missing)], capsys)
    assert rc == 1
    assert out == ""
    assert err.splitlines() == [f"ledgerlog: error: no ledger at {missing}"]
    assert not missing.exists()  # reading commands never create a ledger
    d = _non_ledger(tmp_path)
    rc, out, err = run([command, str(d)], capsys)
    assert rc == 1
    assert len(err.splitlines()) == 1 and err.startswith("ledgerlog: error: ")
    assert str(d) in err and "Traceback" not in err
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]


def test_errors_are_one_line_in_a_subprocess(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    out = run_module("verify", str(missing))
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.splitlines() == [f"ledgerlog: error: no ledger at {missing}"]
    d = _non_ledger(tmp_path)
    out = run_module("inspect", str(d))
    assert out.returncode == 1
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("ledgerlog: error: ") and str(d) in out.stderr
    out = run_module("verify", "foo://host/x")
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "ledgerlog: error: unknown ledger URL scheme 'foo' in 'foo://host/x'"
    ]


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _out, err = run(["verify"], capsys)
    assert rc == 2
    assert "Missing argument 'LEDGER'" in err and "Traceback" not in err
    rc, _out, err = run(["frobnicate"], capsys)
    assert rc == 2
    assert "No such command 'frobnicate'" in err
    rc, out, _err = run(["--help"], capsys)
    assert rc == 0
    for command in ("demo", "verify", "inspect", "tail", "writer"):
        assert command in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_writer_stops_gracefully_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    ledger = tmp_path / "ledger"

    def start_writer(name: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "ledgerlog", "writer", str(ledger), "--writer-id", name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    first = start_writer("first")
    db = None
    try:
        db = ledgerlog.open(ledger, writer=None, client_id="c", timeout=20)
        db.wait_writer(20)
        with db.transaction() as tx:
            tx.put("k", 1)
        first.send_signal(sig)
        _, err = first.communicate(timeout=20)
        # Before: SIGTERM killed it outright (status -15, nothing said).
        assert first.returncode == 0, err
        assert f"{sig.name}: letting appends in flight land" in err
        assert "writer first stopped" in err
        # Its term was handed back: another writer serves the same ledger.
        second = start_writer("second")
        try:
            with db.transaction() as tx:
                tx.put("k", tx.get("k") + 1)
            assert db.get("k") == 2
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(20) == 0
    finally:
        if db is not None:
            db.close()
        if first.poll() is None:
            first.kill()
            first.wait()
