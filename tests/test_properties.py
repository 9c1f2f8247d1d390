"""Property tests of the validator's invariants: serializability (DESIGN.md invariant 2),
determinism across replicas and processes (1), bad input contained (5).

The workload model is small on purpose: six keys, a handful of clients, a window of a few
seqs, so that conflicts, too-old aborts, duplicates and pruning all happen often.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from helpers import epoch_start, rebatch, record, txn, wire_txn, wrap
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledgerlog import codec
from ledgerlog.errors import FormatError
from ledgerlog.model import Delete, Event, KeyRange, Put
from ledgerlog.validator import (
    EntryResult,
    SequencerState,
    ValidatorState,
    process_entry,
)

KEYS = ("a", "b", "c", "d", "e", "f")
BOUNDS = ("", "a", "b", "c", "d", "e", "f", "g")
MOD = 1_000_003
Pick = Callable[[int, int], int]


def _num(v: Any) -> int:
    """A value as the transaction logic reads it (damaged entries may write anything)."""
    return v if type(v) is int else 0 if v is None else 1


def _compute(
    reads: list[str],
    ranges: list[tuple[str, str | None]],
    read_value: Callable[[str], int],
    tag: int,
) -> int:
    """The transaction logic: what it writes is a function of what it read."""
    s = tag
    for k in reads:
        s = (s * 31 + read_value(k)) % MOD
    for start, end in ranges:
        for k in KEYS:
            if start <= k and (end is None or k < end):
                s = (s * 37 + read_value(k)) % MOD
    return s


class Workload:
    """Generates a ledger the way clients and writers would make it, plus the hostile
    entries a ledger may hold. Clients read from a replica at a past seq (the generator's
    own validator replica), and write values computed from what they read."""

    def __init__(self, pick: Pick, window: int) -> None:
        self.pick = pick
        self.window = window
        self.replica = ValidatorState(window)
        self.sequencer = SequencerState()
        self.entries: list[bytes] = []
        self.epoch = 0
        self.counter = 0
        self.sent: list[bytes] = []
        self.legit: set[bytes] = set()
        """Every transaction a client made (hostile entries may hold others)."""
        # key -> [(seq, value or None)] of committed puts/deletes, in seq order
        self.values: dict[str, list[tuple[int, int | None]]] = {}

    def chance(self, percent: int) -> bool:
        return self.pick(0, 99) < percent

    def value_at(self, key: str, version: int) -> int:
        v = None
        for s, val in self.values.get(key, ()):
            if s > version:
                break
            v = val
        return _num(v)

    def feed(self, data: bytes) -> None:
        self.entries.append(data)
        kind = self.sequencer.advance(data)
        res = process_entry(self.replica, data)
        assert kind == res.kind
        assert (self.sequencer.epoch, self.sequencer.next_seq) == (
            self.replica.epoch,
            self.replica.next_seq,
        )
        for seq, w in res.committed:
            for op, k, v in w.writes:
                self.values.setdefault(k, []).append((seq, v if op == codec.OP_PUT else None))

    def make_txn(self, seq: int) -> bytes:
        pick = self.pick
        if self.sent and self.chance(8):
            return self.sent[pick(0, len(self.sent) - 1)]  # a retry of an earlier submission
        if self.chance(4):
            return self._malformed(seq)
        self.counter += 1
        client = f"c{pick(0, 3)}"
        last = self.replica.next_seq - 1
        rv = max(0, last - pick(0, self.window + (4 if self.chance(15) else 0)))
        reads = [KEYS[pick(0, 5)] for _ in range(pick(0, 3))]
        ranges: list[tuple[str, str | None]] = []
        for _ in range(pick(0, 2) // 2 + (1 if self.chance(15) else 0)):
            lo = pick(0, len(BOUNDS) - 1)
            hi = pick(lo, len(BOUNDS))
            ranges.append((BOUNDS[lo], BOUNDS[hi] if hi < len(BOUNDS) else None))
        value = _compute(reads, ranges, lambda k: self.value_at(k, rv), self.counter)
        writes: list[Put | Delete] = []
        for _ in range(pick(0, 2)):
            k = KEYS[pick(0, 5)]
            writes.append(Delete(k) if self.chance(15) else Put(k, value))
        events = []
        if self.chance(12):
            events.append(
                Event("ev", {"n": self.counter}, tuple(KEYS[pick(0, 5)] for _ in range(pick(1, 2))))
            )
        t = txn(
            client,
            self.counter,
            rv,
            reads=reads,
            ranges=ranges,
            events=events,
            valid_time=self.counter,
        )
        data = codec.encode_transaction(
            type(t)(
                t.txn_id, t.read_version, t.reads, t.ranges, tuple(writes), t.events, t.valid_time
            )
        )
        self.sent.append(data)
        self.legit.add(data)
        return data

    def _malformed(self, seq: int) -> bytes:
        k = self.pick(0, 3)
        if k == 0:
            return msgspec.msgpack.encode(["junk", seq])
        if k == 1:
            return wire_txn("bad", seq, 0, ranges=[("b", "a")])
        if k == 2:
            return wire_txn("bad", seq, 0, writes=[(7, "a", 1)])
        return codec.encode_transaction(txn("bad", seq, seq + self.pick(0, 2), puts={"a": 1}))

    def make_record(self, first: int, epoch: int) -> bytes:
        n = self.pick(0, 4)
        return record(
            [self.make_txn(first + i) for i in range(n)],
            first,
            epoch,
            hlc=len(self.entries),
            writer=f"w{epoch}",
        )

    def step(self) -> None:
        pick = self.pick
        r = pick(0, 99)
        nxt = self.sequencer.next_seq
        if self.epoch == 0 or r < 6:
            self.epoch += pick(1, 2)
            self.feed(epoch_start(self.epoch, f"w{self.epoch}", len(self.entries)))
        elif r < 9:
            self.feed(epoch_start(pick(1, self.epoch), "old"))
        elif r < 13:
            self.feed(self.make_record(nxt, self.epoch + pick(0, 1) * 2 - 1 or 1))
        elif r < 16 and nxt > 1:
            self.feed(self.make_record(max(1, nxt - pick(1, 3)), self.epoch))
        elif r < 19:
            self.feed(self.make_record(nxt + pick(1, 3), self.epoch))
        elif r < 25:
            self.feed(self.garbage())
        else:
            self.feed(self.make_record(nxt, self.epoch))

    def garbage(self) -> bytes:
        base = self.make_record(self.sequencer.next_seq, self.epoch)
        return self._damage(base)

    def _damage(self, base: bytes) -> bytes:
        pick = self.pick
        k = pick(0, 4)
        if k == 0:
            return bytes(pick(0, 255) for _ in range(pick(0, 30)))
        if k == 1:
            return base[: pick(0, len(base) - 1)]
        if k == 2:
            i = pick(0, len(base) - 1)
            return base[:i] + bytes([base[i] ^ (1 << pick(0, 7))]) + base[i + 1 :]
        if k == 3:
            body = bytearray(base[codec.HEADER_SIZE :])
            if body:
                body[pick(0, len(body) - 1)] = pick(0, 255)
            return wrap(codec.KIND_RECORD, bytes(body))
        return codec.encode_intake([self.make_txn(1)])

    def run(self, steps: int) -> list[bytes]:
        for _ in range(steps):
            self.step()
        return self.entries


def _hyp_pick(data: st.DataObject) -> Pick:
    return lambda lo, hi: data.draw(st.integers(lo, hi))


def _run(
    entries: list[bytes],
    window: int,
    state: ValidatorState | None = None,
) -> tuple[list[EntryResult], list[tuple[int, bytes]]]:
    st_ = ValidatorState(window) if state is None else state
    results = []
    digests = []
    for data in entries:
        results.append(process_entry(st_, data))
        digests.append((st_.next_seq - 1, st_.digest))
    return results, digests


# -- (a) serializability -----------------------------------------------------------------


def _last_writer(history: dict[str, list[int]], key: str, version: int) -> int:
    w = 0
    for s in history.get(key, ()):
        if s > version:
            break
        w = s
    return w


class Reference:
    """The rules of the validator's docstring written as plainly as possible: full
    history, no pruning, no index. Catches over-eager aborts, which serializability
    alone cannot see."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.epoch = 0
        self.next_seq = 1
        self.writes: dict[str, int] = {}  # key -> seq of its latest committed write
        self.ids: dict[tuple[str, int], int] = {}  # txn id -> seq of its latest commit

    def entry(self, data: bytes) -> tuple[str, list[tuple[Any, ...]]]:
        try:
            e = codec.decode_entry(data)
        except FormatError:
            return "malformed", [(0, None)]
        if isinstance(e, codec.WireIntake):
            return "malformed", [(0, None)]
        if isinstance(e, codec.WireEpoch):
            if e.epoch > self.epoch:
                self.epoch = e.epoch
                return "epoch", []
            return "rejected", []
        if e.epoch != self.epoch or e.first_seq < self.next_seq:
            ids = []
            for r in e.txns:
                try:
                    t = codec.decode_wire_txn(r)
                    ids.append((0, (t.client_id, t.client_seq)))
                except ValueError:
                    ids.append((0, None))
            return "rejected", ids
        out = [self.decide(bytes(r), e.first_seq + i) for i, r in enumerate(e.txns)]
        self.next_seq = e.first_seq + len(e.txns)
        return "record", out

    def decide(self, data: bytes, seq: int) -> tuple[Any, ...]:
        try:
            t = codec.decode_wire_txn(data)
        except ValueError:
            return (seq, None, 4, None, None)
        tid = (t.client_id, t.client_seq)
        floor = seq - 1 - self.window
        if codec.check_wire_txn(t) or t.read_version >= seq:
            return (seq, tid, 4, None, None)
        if tid in self.ids and self.ids[tid] > floor:
            return (seq, tid, 3, None, self.ids[tid])
        if t.reads or t.ranges:
            if t.read_version < floor:
                return (seq, tid, 2, None, None)
            for k in t.reads:
                if self.writes.get(k, 0) > t.read_version:
                    return (seq, tid, 1, k, self.writes[k])
            for start, end in t.ranges:
                for k in sorted(self.writes):
                    if k in KeyRange(start, end) and self.writes[k] > t.read_version:
                        return (seq, tid, 1, k, self.writes[k])
        for k in [k for _op, k, _v in t.writes] + [k for e in t.events for k in e[2]]:
            self.writes[k] = seq
        self.ids[tid] = seq
        return (seq, tid, 0, None, None)


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), window=st.integers(2, 10), steps=st.integers(1, 40))
def test_committed_history_is_serializable(data: st.DataObject, window: int, steps: int) -> None:
    wl = Workload(_hyp_pick(data), window)
    entries = wl.run(steps)
    results, _ = _run(entries, window)

    ref = Reference(window)
    for data, res in zip(entries, results, strict=True):
        kind, outcomes = ref.entry(data)
        assert res.kind == kind
        assert [o[: len(x)] for o, x in zip(res.outcomes, outcomes, strict=True)] == outcomes

    committed = [c for r in results for c in r.committed]
    seqs = [s for s, _ in committed]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    # Serial replay in seq order.
    writers: dict[str, list[int]] = {}  # key -> seqs of committed writes (incl. event keys)
    serial: dict[str, int] = {}  # key -> value, from re-executing each txn serially
    applied: dict[str, int] = {}  # key -> value, from the values the txns actually wrote
    for seq, w in committed:
        rv = w.read_version
        assert rv < seq
        for k in w.reads:
            assert _last_writer(writers, k, rv) == _last_writer(writers, k, seq - 1), (seq, k)
        for start, end in w.ranges:
            r = KeyRange(start, end)
            for k in writers:
                if k in r:
                    assert _last_writer(writers, k, rv) == _last_writer(writers, k, seq - 1), (
                        seq,
                        k,
                    )
        # A damaged entry with a good checksum may carry a transaction no client made:
        # its writes are taken as they are; a client's must match a serial re-execution.
        legit = msgspec.msgpack.encode(w) in wl.legit
        assert w.client_id != "bad" or not legit, (seq, w)  # those are all malformed
        expected = _compute(w.reads, w.ranges, lambda k: _num(serial.get(k)), w.valid_time)
        for op, k, v in w.writes:
            if op == codec.OP_PUT:
                if legit:
                    assert v == expected, (seq, k)
                serial[k] = expected if legit else v
                applied[k] = v
            else:
                serial.pop(k, None)
                applied.pop(k, None)
        for k in {k for _op, k, _v in w.writes} | {k for e in w.events for k in e[2]}:
            writers.setdefault(k, []).append(seq)
    assert applied == serial
    assert applied == {k: v[-1][1] for k, v in wl.values.items() if v[-1][1] is not None}

    # Every seq a record gave out got exactly one decision.
    decided = [o[0] for r in results if r.kind == "record" for o in r.outcomes]
    assert decided == sorted(set(decided))


# -- (b) determinism across replicas ---------------------------------------------------


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), window=st.integers(1, 8), steps=st.integers(1, 40))
def test_replicas_agree(data: st.DataObject, window: int, steps: int) -> None:
    entries = Workload(_hyp_pick(data), window).run(steps)
    base, base_digests = _run(entries, window)

    # Split into single-transaction records: a digest at every seq.
    singles = rebatch(entries, base, [1])
    single_results, single_digests = _run(singles, window)
    per_seq = dict(single_digests)
    by_seq = {o[0]: o for r in single_results if r.kind == "record" for o in r.outcomes}

    def check(results: list[EntryResult], digests: list[tuple[int, bytes]]) -> None:
        for r in results:
            if r.kind == "record":
                for o in r.outcomes:
                    assert by_seq[o[0]] == o
        for seq, dg in digests:
            assert per_seq.get(seq, dg) == dg

    check(base, base_digests)
    assert {o[0] for r in base if r.kind == "record" for o in r.outcomes} == set(by_seq)

    # Other batchings.
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    check(*_run(rebatch(entries, base, sizes), window))

    # Restored from a snapshot (and a fork) taken midway.
    cut = data.draw(st.integers(0, len(entries)))
    head = ValidatorState(window)
    _run(entries[:cut], window, head)
    for replica in (ValidatorState.restore(head.snapshot()), head.fork()):
        results, digests = _run(entries[cut:], window, replica)
        assert results == base[cut:]
        assert digests == base_digests[cut:]

    # And the non-record results (rejections, malformed entries) agree too.
    again, again_digests = _run(entries, window)
    assert again == base and again_digests == base_digests


# -- (c) determinism across processes ---------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, struct, sys
    from ledgerlog.validator import ValidatorState, process_entry
    path, window = sys.argv[1], int(sys.argv[2])
    blob = open(path, "rb").read()
    out = {"hash": hash("ledgerlog-hash-probe"), "entries": []}
    st = ValidatorState(window)
    i = 0
    while i < len(blob):
        (n,) = struct.unpack_from(">I", blob, i)
        data = blob[i + 4 : i + 4 + n]
        i += 4 + n
        r = process_entry(st, data)
        out["entries"].append([r.kind, [list(o[:2]) + list(o[2:]) for o in r.outcomes],
                               [d.describe() for d in r.decisions],
                               st.next_seq, st.epoch, st.digest.hex()])
    out["snapshot"] = st.snapshot().hex()
    print(json.dumps(out))
    """
)


def _write_log(path: Path, entries: list[bytes]) -> None:
    path.write_bytes(b"".join(struct.pack(">I", len(e)) + e for e in entries))


def _in_child(path: Path, window: int, hashseed: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(window)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(proc.stdout)


def test_processes_with_different_hash_seeds_agree(tmp_path: Path) -> None:
    window = 6
    rng = random.Random(20240601)
    entries = Workload(rng.randint, window).run(400)
    base, _ = _run(entries, window)
    logs = {
        "log": entries,
        "singles": rebatch(entries, base, [1]),
        "mixed": rebatch(entries, base, [3, 1, 2]),
    }
    for name, log in logs.items():
        path = tmp_path / f"{name}.bin"
        _write_log(path, log)
        outs = [_in_child(path, window, seed) for seed in ("0", "1", "987654321")]
        assert len({o["hash"] for o in outs}) == 3, "hash randomization did not differ"
        first = outs[0]
        kinds = {e[0] for e in first["entries"]}
        assert kinds == {"record", "epoch", "rejected", "malformed"}, kinds
        for other in outs[1:]:
            assert other["entries"] == first["entries"]
            assert other["snapshot"] == first["snapshot"]
        # ... and with this process.
        st_ = ValidatorState(window)
        for rec, data in zip(first["entries"], log, strict=True):
            process_entry(st_, data)
            assert rec[5] == st_.digest.hex()
        assert first["snapshot"] == st_.snapshot().hex()
        logs[name] = first  # type: ignore[assignment]
    # Per-seq digests agree between batchings.
    per_seq = {e[3] - 1: e[5] for e in logs["singles"]["entries"]}  # type: ignore[index]
    for e in logs["mixed"]["entries"]:  # type: ignore[index]
        assert per_seq.get(e[3] - 1, e[5]) == e[5]


# -- (d) fuzz ------------------------------------------------------------------------------


def _seeded_state() -> tuple[ValidatorState, list[bytes]]:
    wl = Workload(random.Random(5).randint, 4)
    entries = wl.run(30)
    # Bring the replica to a known epoch so fuzzed records of epoch 1.. may be accepted.
    return wl.replica, entries


_SEEDED, _SAMPLES = _seeded_state()
_VALID = [e for e in _SAMPLES if len(e) > codec.HEADER_SIZE] + [
    record(
        [
            txn(
                "c",
                1,
                0,
                reads=["a"],
                ranges=[("a", None)],
                puts={"a": [1, {"x": b"y"}]},
                events=[Event("e", None, ["b"])],
            )
        ],
        _SEEDED.next_seq,
        _SEEDED.epoch,
    )
]


def _both_agree(data: bytes) -> None:
    s1, s2 = _SEEDED.fork(), _SEEDED.fork()
    r1 = process_entry(s1, data)
    r2 = process_entry(s2, data)
    assert r1 == r2
    assert r1.kind in ("record", "epoch", "rejected", "malformed")
    assert s1.snapshot() == s2.snapshot() and s1.digest == s2.digest
    assert len(r1.decisions) == len(r1.outcomes)
    sq = SequencerState(_SEEDED.epoch, _SEEDED.next_seq)
    assert sq.advance(data) == r1.kind
    assert (sq.epoch, sq.next_seq) == (s1.epoch, s1.next_seq)
    if r1.kind == "malformed":
        assert s1.snapshot() == _SEEDED.snapshot()


@settings(deadline=None, max_examples=1500)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _both_agree(data)
    _both_agree(codec.MAGIC + data)
    _both_agree(wrap(codec.KIND_RECORD, data))
    _both_agree(wrap(codec.KIND_EPOCH, data))


@settings(deadline=None, max_examples=1500)
@given(st.sampled_from(_VALID), st.data())
def test_fuzz_bit_flips_and_truncations(base: bytes, data: st.DataObject) -> None:
    mode = data.draw(st.sampled_from(["flip", "truncate", "body-flip", "body-splice"]))
    body = base[codec.HEADER_SIZE :]
    if mode == "flip":
        i = data.draw(st.integers(0, len(base) * 8 - 1))
        mutated = bytearray(base)
        mutated[i // 8] ^= 1 << (i % 8)
        out = bytes(mutated)
    elif mode == "truncate":
        out = base[: data.draw(st.integers(0, len(base) - 1))]
    elif mode == "body-flip":
        flips = data.draw(
            st.lists(st.integers(0, max(0, len(body) * 8 - 1)), min_size=1, max_size=4)
        )
        mutated = bytearray(body)
        for i in flips:
            if mutated:
                mutated[i // 8] ^= 1 << (i % 8)
        out = wrap(base[5], bytes(mutated))
    else:
        i = data.draw(st.integers(0, len(body)))
        j = data.draw(st.integers(i, len(body)))
        out = wrap(base[5], body[:i] + data.draw(st.binary(max_size=20)) + body[j:])
    _both_agree(out)
