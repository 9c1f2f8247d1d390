"""The C validator state (ledgerlog.validator._cstate) against the pure-Python reference.

The two implementations must be indistinguishable from outside: the same outcomes, the
same digests and the same snapshot bytes at every seq, and a snapshot taken under one must
continue identically under the other. Hypothesis drives both over random workloads (point
reads, ranges, events, deletes, duplicates, too-old and malformed transactions, gaps, tiny
windows so pruning happens all the time, snapshot/restore swaps at random points), with
the C hash tables also run with their hashes masked down to a few bits or to nothing, so
that every lookup walks long probe runs of colliding keys.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers import record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ledgerlog.validator as V
from ledgerlog.codec import WireTxn
from ledgerlog.errors import ConfigError, FormatError
from ledgerlog.validator import ValidatorState, process_entry, validate_batch

HAVE_C = "c" in V.IMPLEMENTATIONS
needs_c = pytest.mark.skipif(not HAVE_C, reason="the C extension is not built")
ROOT = Path(__file__).resolve().parent.parent
FULL_MASK = 0xFFFFFFFF


# -- helpers -------------------------------------------------------------------------------


def c_state(window: int, tag_mask: int = FULL_MASK) -> ValidatorState:
    st_ = ValidatorState(window, implementation="c")
    if tag_mask != FULL_MASK:
        st_._c = V._cstate.State(window, tag_mask=tag_mask)
    return st_


def restore(snap: bytes, impl: str, tag_mask: int = FULL_MASK) -> ValidatorState:
    st_ = ValidatorState.restore(snap, implementation=impl)
    if impl == "c" and tag_mask != FULL_MASK:
        cs = V._cstate.State(st_.window, tag_mask=tag_mask)
        cs.load(*st_._c.export())
        st_._c = cs
    return st_


def assert_same(py: ValidatorState, c: ValidatorState, *, deep: bool = True) -> None:
    assert py.implementation == "python" and c.implementation == "c"
    assert (py.next_seq, py.digest, py.epoch, py.writer_id) == (
        c.next_seq,
        c.digest,
        c.epoch,
        c.writer_id,
    )
    assert py.size() == c.size()
    if deep:
        c._c.check()
        assert c._c.last_writes() == py.last_write
        assert c._c.committed_ids() == py.committed
        assert py.snapshot() == c.snapshot()
        # The range indexes (built on a first range read, dropped by restore) must list
        # exactly the remembered keys, in order.
        for index in (py._index, c._c.index):
            if index is not None:
                assert list(index) == sorted(py.last_write)


def wire(
    cid: str,
    cseq: int,
    rv: int,
    reads: list[str] = [],  # noqa: B006
    ranges: list[tuple[str, str | None]] = [],  # noqa: B006
    writes: list[tuple[int, str, Any]] = [],  # noqa: B006
    events: list[tuple[str, Any, list[str]]] = [],  # noqa: B006
) -> bytes:
    return msgspec.msgpack.encode(WireTxn(cid, cseq, rv, reads, ranges, writes, events))


# -- random workloads ----------------------------------------------------------------------

KEYS = [
    "a",
    "b",
    "k1",
    "k2",
    "",
    "\x00",
    "ü",
    "z",
    "exactly-16-bytes",  # the longest key kept inside a slot
    "exactly-17-bytes!",  # the shortest kept in the arena
    "a-long-key-of-thirty-two-bytes!!",
    "日本語のキー、長いもの",
    "acct:000001",
    "acct:000002",
]
CLIENTS = ["c", "ü-client", "client-with-a-rather-long-identifier", ""]
CSEQS = [0, 1, 2, 3, 2**63, 2**64 - 1]

key_st = st.sampled_from(KEYS)
lag_st = st.sampled_from([1, 1, 2, 3, 5, 8, 13, 40, 0, -1, "zero", "neg"])
junk_st = st.sampled_from(
    [
        b"\xc1",
        b"",
        msgspec.msgpack.encode(["junk", 1]),
        msgspec.msgpack.encode("not a transaction"),
        wire("c\x7f", 1, 0).replace(b"c\x7f", b"c\xff"),  # invalid UTF-8
        wire("c", 1, 0, writes=[(1, "k\x7f", 1)]).replace(b"k\x7f", b"k\xff"),
    ]
)


@st.composite
def txn_spec(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 19)) == 0:
        return ("junk", draw(junk_st))
    ops = st.sampled_from([1, 1, 1, 2, 2, 3 if draw(st.integers(0, 15)) == 0 else 1])
    value = st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3))
    return (
        "txn",
        draw(st.sampled_from(CLIENTS)),
        draw(st.sampled_from(CSEQS) if draw(st.booleans()) else st.integers(0, 4)),
        draw(lag_st),
        draw(st.lists(key_st, max_size=4)),
        draw(
            st.lists(st.tuples(key_st, st.one_of(st.none(), key_st)), max_size=2)
            if draw(st.integers(0, 3)) == 0
            else st.just([])
        ),
        draw(st.lists(st.tuples(ops, key_st, value), max_size=3)),
        draw(
            st.lists(st.tuples(st.just("ev"), value, st.lists(key_st, max_size=2)), max_size=2)
            if draw(st.integers(0, 4)) == 0
            else st.just([])
        ),
    )


def build(spec: Any, seq: int) -> bytes:
    if spec[0] == "junk":
        return bytes(spec[1])
    _, cid, cseq, lag, reads, ranges, writes, events = spec
    if lag == "zero":
        rv = 0
    elif lag == "neg":
        rv = -1
    elif lag <= 0:
        rv = seq - lag  # at or after its own seq: malformed
    else:
        rv = max(0, seq - lag)
    return wire(cid, cseq, rv, reads, ranges, writes, events)


step_st = st.one_of(
    st.tuples(
        st.just("record"),
        st.lists(txn_spec(), min_size=0, max_size=6),
        st.sampled_from([0, 0, 0, 0, 0, 1, 3]),
    ),
    st.tuples(st.just("swap"), st.sampled_from(["cross", "same", "c_from_py"])),
)


@needs_c
@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    window=st.sampled_from([1, 2, 3, 5, 8, 2**64 - 1]),
    tag_mask=st.sampled_from([FULL_MASK, FULL_MASK, 0xF, 0]),
    steps=st.lists(step_st, min_size=1, max_size=25),
)
def test_c_and_python_are_indistinguishable(window: int, tag_mask: int, steps: list[Any]) -> None:
    py = ValidatorState(window, implementation="python")
    c = c_state(window, tag_mask)
    for s in (py, c):
        s.epoch = 1
    for step in steps:
        if step[0] == "swap":
            snap_py, snap_c = py.snapshot(), c.snapshot()
            assert snap_py == snap_c
            if step[1] == "cross":  # each continues from the other's snapshot
                py, c = restore(snap_c, "python"), restore(snap_py, "c", tag_mask)
            elif step[1] == "same":
                py, c = py.fork(), restore(snap_c, "c", tag_mask)
            else:
                c = restore(snap_py, "c", tag_mask)
            assert_same(py, c)
            continue
        _, specs, gap = step
        first = py.next_seq + gap
        data = record([build(sp, first + i) for i, sp in enumerate(specs)], first)
        ra, rc = process_entry(py, data), process_entry(c, data)
        assert ra == rc
        assert_same(py, c, deep=len(specs) % 2 == 0)
    assert_same(py, c)


@needs_c
@pytest.mark.parametrize("seed", range(6))
def test_long_random_runs_agree(seed: int) -> None:
    """Longer runs than hypothesis makes: the tables grow, shrink and wrap their rings."""
    rng = random.Random(seed)
    window = rng.choice([3, 17, 64, 500])
    keys = [f"key/{i}" for i in range(300)] + [f"a-much-longer-key-name/{i}" for i in range(50)]
    py = ValidatorState(window, implementation="python")
    c = c_state(window, rng.choice([FULL_MASK, 0xFF]))
    py.epoch = c.epoch = 1
    for n in range(150):
        first = py.next_seq
        raws = []
        for i in range(rng.randrange(1, 60)):
            seq = first + i
            raws.append(
                wire(
                    f"client/{rng.randrange(5)}",
                    rng.randrange(200),
                    max(0, seq - rng.choice([1, 2, 5, window, window + 2])),
                    rng.sample(keys, rng.randrange(5)),
                    [(k, None) for k in rng.sample(keys, 1)] if rng.random() < 0.05 else [],
                    [(rng.choice([1, 1, 2]), rng.choice(keys), i) for _ in range(rng.randrange(4))],
                    [("e", None, rng.sample(keys, 2))] if rng.random() < 0.1 else [],
                )
            )
        out_py = validate_batch(py, raws, first)
        out_c = validate_batch(c, raws, first)
        assert out_py == out_c
        assert_same(py, c, deep=n % 10 == 0)
        if n % 37 == 36:
            py, c = restore(c.snapshot(), "python"), restore(py.snapshot(), "c")
    assert_same(py, c)


@needs_c
def test_seq_past_u64_fails_the_same_way() -> None:
    """The reference cannot pack a seq past 2**64-1 into the digest (a known bug, see
    test_validator_rules); the C path must decide the same up to there and then fail the
    same way, leaving digest and next_seq as they were."""
    for impl in ("python", "c"):
        s = ValidatorState(5, implementation=impl)
        s.next_seq = 2**64 - 2
        good = [wire("c", 1, 0, writes=[(1, "a", 1)]), wire("c", 2, 2**64 - 2, reads=["a"])]
        outcomes, applied = validate_batch(s, good, 2**64 - 2)
        assert [o[2] for o in outcomes] == [0, 0] and len(applied) == 2
        digest = s.digest
        with pytest.raises(struct.error):
            validate_batch(s, [wire("c", 3, 0)], 2**64)
        assert (s.digest, s.next_seq) == (digest, 2**64)
        assert validate_batch(s, [], 2**64) == ([], [])


# -- the table, directly -------------------------------------------------------------------


def load_keys(cs: Any, groups: list[tuple[int, list[str]]]) -> None:
    cs.load([[s, ks] for s, ks in groups], [])


@needs_c
@pytest.mark.parametrize("tag_mask", [FULL_MASK, 0x3F, 0])
def test_table_growth_deletion_and_collisions(tag_mask: int) -> None:
    n = 3000 if tag_mask else 400  # all keys in one probe run: quadratic, keep it small
    cs = V._cstate.State(10**9, tag_mask=tag_mask)
    keys = [f"k{i}" for i in range(n)] + [f"a-key-longer-than-sixteen-bytes-{i}" for i in range(n)]
    random.Random(1).shuffle(keys)
    load_keys(cs, [(i + 1, [k]) for i, k in enumerate(keys)])
    figures = cs.check()
    assert figures["keys"] == len(keys) and figures["key_capacity"] >= len(keys) * 4 // 3
    assert all(cs.get(k) == i + 1 for i, k in enumerate(keys))
    assert cs.get("absent") == 0 and cs.get("k") == 0
    # Rewrite the first half, then prune the older half: rewritten keys survive with
    # their new seq, the others go.
    half = keys[: len(keys) // 2]
    base = len(keys)
    load_keys(cs, [(base + i + 1, [k]) for i, k in enumerate(half)])
    cs.prune(base)
    cs.check()
    assert cs.last_writes() == {k: base + i + 1 for i, k in enumerate(half)}
    cs.prune(2 * base)
    assert cs.check()["keys"] == 0 and cs.size() == 0
    assert cs.last_writes() == {} and cs.export() == ([], [])
    # and it works again after emptying
    load_keys(cs, [(10**6, ["again", "a-key-longer-than-sixteen-bytes-again"])])
    assert cs.get("again") == 10**6 == cs.get("a-key-longer-than-sixteen-bytes-again")
    cs.check()


@needs_c
@settings(max_examples=150, deadline=None)
@given(
    tag_mask=st.sampled_from([FULL_MASK, 0x7, 0]),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("w"), st.lists(key_st, max_size=3)),
            st.tuples(st.just("p"), st.integers(0, 3)),
            st.tuples(st.just("id"), st.sampled_from(CLIENTS), st.sampled_from(CSEQS)),
        ),
        max_size=60,
    ),
)
def test_table_against_a_dict_model(tag_mask: int, ops: list[Any]) -> None:
    """load/prune against the Python reference's rules, written out as a model."""
    cs = V._cstate.State(10**9, tag_mask=tag_mask)
    last: dict[str, int] = {}
    hist: list[tuple[int, list[str]]] = []
    ids: dict[tuple[str, int], int] = {}
    ihist: list[tuple[int, tuple[str, int]]] = []
    seq = 0
    for op in ops:
        if op[0] == "w":
            seq += 1
            cs.load([[seq, op[1]]], [])
            hist.append((seq, op[1]))
            last.update(dict.fromkeys(op[1], seq))
        elif op[0] == "id":
            seq += 1
            cs.load([], [[seq, op[1], op[2]]])
            ihist.append((seq, (op[1], op[2])))
            ids[(op[1], op[2])] = seq
        else:
            cutoff = max(0, seq - op[1])
            cs.prune(cutoff)
            while hist and hist[0][0] <= cutoff:
                s, ks = hist.pop(0)
                for k in ks:
                    if last.get(k) == s:
                        del last[k]
            while ihist and ihist[0][0] <= cutoff:
                s, tid = ihist.pop(0)
                if ids.get(tid) == s:
                    del ids[tid]
        cs.check()
        assert cs.last_writes() == last
        assert cs.committed_ids() == ids
        assert cs.size() == len(last) + len(ids) + len(hist)
        for k in KEYS:
            assert cs.get(k) == last.get(k, 0)
        for tid, s in ids.items():
            assert cs.committed_seq(*tid) == s
    assert cs.export() == ([[s, ks] for s, ks in hist], [[s, *t] for s, t in ihist])


@needs_c
def test_keys_that_are_not_valid_utf8_round_trip() -> None:
    """Lone surrogates cannot come from msgpack, but the table must not choke on them."""
    cs = V._cstate.State(100)
    weird = ["\ud800", "x\udfffy" * 7, "\ud800"]
    cs.load([[1, weird]], [[1, "\udc80", 5]])
    cs.check()
    assert cs.get("\ud800") == 1 and cs.get("x\udfffy" * 7) == 1
    assert cs.committed_seq("\udc80", 5) == 1
    assert cs.export() == ([[1, weird]], [[1, "\udc80", 5]])


@needs_c
def test_state_refuses_reentrant_use() -> None:
    st_ = c_state(10)
    cs = st_._c

    def evil_decode(raw: Any) -> Any:
        return cs.validate_batch([b""], 1, b"")

    try:
        V._cstate.configure(
            evil_decode, (ValueError,), V.SortedList, WireTxn, WireTxn.__struct_fields__[:7]
        )
        with pytest.raises(RuntimeError, match="re-entrantly"):
            cs.validate_batch([b"x"], 1, b"")
    finally:
        V._cstate.configure(
            V.decode_wire_txn,
            V._TXN_DECODE_ERRORS,
            V.SortedList,
            WireTxn,
            WireTxn.__struct_fields__[:7],
        )
    cs.check()
    assert validate_batch(st_, [wire("c", 1, 0)], 1)[0][0][2] == 0


@needs_c
def test_blake2b_matches_hashlib() -> None:
    rng = random.Random(5)
    for n in [*range(0, 300), 1000, 4096, 100_000]:
        data = rng.randbytes(n)
        for size in (16, 32, 64, 1):
            assert V._cstate.blake2b(data, size) == hashlib.blake2b(data, digest_size=size).digest()


@needs_c
def test_constructor_and_argument_checks() -> None:
    with pytest.raises(ValueError):
        V._cstate.State(0)
    with pytest.raises(TypeError):
        V._cstate.State("5")
    cs = V._cstate.State(2**80)  # any positive window; beyond 2**64 nothing is ever too old
    with pytest.raises(TypeError):
        cs.get(5)
    with pytest.raises((TypeError, ValueError)):
        cs.load([[-1, ["a"]]], [])
    with pytest.raises(TypeError):
        cs.load([[1, [5]]], [])
    with pytest.raises(OverflowError):
        cs.validate_batch([], -1, b"")
    with pytest.raises(ConfigError):
        ValidatorState(5, implementation="rust")


def test_restore_rejects_what_neither_implementation_can_hold() -> None:
    base = [1, 10, 1, "w", 5, bytes(16)]
    for hist, chist in [([[-1, ["a"]]], []), ([], [[1, "c", -1]]), ([[1, [1]]], [])]:
        data = msgspec.msgpack.encode([*base, hist, chist])
        for impl in V.IMPLEMENTATIONS:
            with pytest.raises(FormatError):
                ValidatorState.restore(data, implementation=impl)
    ok = msgspec.msgpack.encode([*base, [[3, []], [3, ["a", "a"]], [2, ["b"]]], [[4, "c", 0]]])
    snaps = {ValidatorState.restore(ok, implementation=i).snapshot() for i in V.IMPLEMENTATIONS}
    assert snaps == {ok}  # odd but valid histories (empty, repeated, unordered) round-trip


# -- selection, memory ---------------------------------------------------------------------


def _implementation_in_subprocess(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("LEDGERLOG_PURE_PYTHON", None)
    if env_value is not None:
        env["LEDGERLOG_PURE_PYTHON"] = env_value
    code = (
        "import ledgerlog.validator as v; s = v.ValidatorState(3);"
        "print(v.IMPLEMENTATION, s.implementation, ','.join(v.IMPLEMENTATIONS))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_pure_python_env_selects_python() -> None:
    assert _implementation_in_subprocess("1") == "python python python"
    assert _implementation_in_subprocess("0") == _implementation_in_subprocess(None)
    if HAVE_C:
        assert _implementation_in_subprocess(None) == "c c python,c"
    else:
        with pytest.raises(ConfigError, match="not available"):
            ValidatorState(3, implementation="c")


@needs_c
def test_no_leaks_over_a_million_transactions() -> None:
    """Python objects (allocated blocks) and RSS stay flat while the state cycles through
    its window many times over: every reference the C code takes is given back."""
    psutil = pytest.importorskip("psutil")
    rng = random.Random(3)
    window = 2000
    # Templates; each run gives them read versions relative to their real seqs.
    shapes = []
    for i in range(1000):
        shapes.append(
            (
                f"client-{i % 7}-with-a-long-name" if i % 3 else "c",
                [f"k{rng.randrange(3000)}" for _ in range(3)],
                [(f"k{rng.randrange(3000)}", None)] if i % 50 == 0 else [],
                [(1, f"k{rng.randrange(3000)}", i), (2, f"long-key-name-number-{i % 900}", None)],
                [("e", None, ["ev"])] if i % 9 == 0 else [],
                rng.choice([1, 1, 3, window + 5]),
            )
        )
    s = ValidatorState(window, implementation="c")
    proc = psutil.Process()
    enc = msgspec.msgpack.Encoder().encode

    def run(rounds: int) -> None:
        for r in range(rounds):
            for j in range(0, len(shapes), 100):
                first = s.next_seq
                raws = [
                    enc(
                        WireTxn(
                            cid, (r * 1000 + j + i) % 5000, max(0, first + i - lag), rd, rg, w, ev
                        )
                    )
                    for i, (cid, rd, rg, w, ev, lag) in enumerate(shapes[j : j + 100])
                ]
                raws[-1] = b"\xc1" if r % 2 else raws[-1]
                validate_batch(s, raws, first)

    run(20)  # warm up: tables, rings and arenas reach their steady size
    gc.collect()
    blocks, rss = sys.getallocatedblocks(), proc.memory_info().rss
    run(1000)  # 1,000,000 transactions
    gc.collect()
    assert s.next_seq > 1_000_000
    assert sys.getallocatedblocks() - blocks < 2000
    assert proc.memory_info().rss - rss < 8 * 2**20
    s._c.check()


@needs_c
@pytest.mark.slow
def test_under_debug_allocator() -> None:
    """A random workload under PYTHONMALLOC=debug, which catches writes past the end of
    blocks, double frees and use of freed memory in what the extension allocates."""
    code = textwrap.dedent(
        """
        import random, msgspec
        from ledgerlog.codec import WireTxn
        import ledgerlog.validator as V
        rng = random.Random(1)
        keys = [f"k{i}" for i in range(50)] + [f"long-key-number-{i:04d}-xx" for i in range(50)]
        for window in (1, 3, 40):
            py = V.ValidatorState(window, implementation="python")
            c = V.ValidatorState(window, implementation="c")
            for n in range(200):
                first = py.next_seq
                raws = [msgspec.msgpack.encode(WireTxn(
                    rng.choice(["a", "bb", "a-long-client-identifier"]), rng.randrange(40),
                    max(0, first + i - rng.choice([1, 2, 50])), rng.sample(keys, 3),
                    [(rng.choice(keys), None)] if rng.random() < 0.1 else [],
                    [(rng.choice([1, 2]), rng.choice(keys), i)], [])) for i in range(50)]
                assert V.validate_batch(py, raws, first) == V.validate_batch(c, raws, first)
                if n % 40 == 39:
                    c = V.ValidatorState.restore(py.snapshot(), implementation="c")
                c._c.check()
            assert py.snapshot() == c.snapshot()
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONMALLOC="debug")
    env.pop("LEDGERLOG_PURE_PYTHON", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@needs_c
@pytest.mark.slow
def test_rule_tests_pass_on_the_reference_too() -> None:
    """The decision-rule tests run on the default (C) implementation; run them once more
    on the pure-Python reference, which must keep passing them."""
    env = dict(os.environ, LEDGERLOG_PURE_PYTHON="1")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "test_validator_rules.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:]
