"""The list-append history checker (ledgerlog.check): known anomalies, clean histories,
a property over serially executed histories, a mutation test, loading and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ledgerlog.check import Cycle, Finding, History, HistoryError, check_list_append
from ledgerlog.check.__main__ import main

# -- a tiny DSL for hand-written histories ------------------------------------------------


def A(k: Any, v: Any) -> list[Any]:
    return ["append", k, v]


def R(k: Any, seen: list[Any] | None = None) -> list[Any]:
    return ["r", k, seen]


def _invoke_value(ops: list[list[Any]]) -> list[list[Any]]:
    return [[f, k, None] if f == "r" else [f, k, v] for f, k, v in ops]


def inv(p: int, ops: list[list[Any]]) -> dict[str, Any]:
    return {"type": "invoke", "f": "txn", "value": _invoke_value(ops), "process": p}


def done(p: int, ops: list[list[Any]], typ: str = "ok") -> dict[str, Any]:
    return {"type": typ, "f": "txn", "value": ops, "process": p}


def hist(*events: dict[str, Any] | list[dict[str, Any]]) -> History:
    flat: list[dict[str, Any]] = []
    for e in events:
        flat.extend(e if isinstance(e, list) else [e])
    return History.from_json([{**e, "index": i, "time": i * 1000} for i, e in enumerate(flat)])


def txn(p: int, ops: list[list[Any]], typ: str = "ok") -> list[dict[str, Any]]:
    """An invocation immediately followed by its completion."""
    return [inv(p, ops), done(p, ops, typ)]


def only(verdict: Any, name: str) -> list[Any]:
    assert not verdict.valid
    assert list(verdict.anomalies) == [name], verdict.format()
    return list(verdict.anomalies[name])


def cycle(verdict: Any, name: str) -> Cycle:
    (c,) = only(verdict, name)
    assert isinstance(c, Cycle)
    return c


# -- anomalies ----------------------------------------------------------------------------


def test_g0_write_cycle() -> None:
    h = hist(
        inv(0, [A("x", 1), A("y", 2)]),
        inv(1, [A("x", 2), A("y", 1)]),
        done(0, [A("x", 1), A("y", 2)]),
        done(1, [A("x", 2), A("y", 1)]),
        txn(2, [R("x", [1, 2]), R("y", [1, 2])]),
    )
    c = cycle(check_list_append(h), "G0")
    assert sorted(c.txns) == [0, 1]
    assert c.kinds == ("ww", "ww")
    assert {s.key for s in c.steps} == {"x", "y"}


def test_g1a_aborted_read() -> None:
    h = hist(txn(0, [A("x", 1)], "fail"), txn(1, [R("x", [1])]))
    (f,) = only(check_list_append(h), "G1a")
    assert isinstance(f, Finding)
    assert f.txns == (2, 0) and f.key == "x"


def test_g1b_intermediate_read() -> None:
    # The writer's outcome is unknown (info) but its appends were read, so it committed;
    # its final append 2 was never read, so it cannot be ordered: G1b alone.
    h = hist(txn(0, [A("x", 1), A("x", 2)], "info"), txn(1, [R("x", [1])]))
    (f,) = only(check_list_append(h), "G1b")
    assert f.txns == (2, 0) and f.key == "x"


def test_g1b_by_an_ok_writer_also_closes_a_g_single_cycle() -> None:
    # Reading T0's intermediate state puts the reader between T0's appends: wr then rw.
    h = hist(txn(0, [A("x", 1), A("x", 2)]), txn(1, [R("x", [1])]))
    v = check_list_append(h)
    assert set(v.anomalies) == {"G1b", "G-single"}
    (c,) = v.anomalies["G-single"]
    assert isinstance(c, Cycle) and sorted(c.txns) == [0, 2]


def test_g1c_circular_information_flow() -> None:
    h = hist(
        inv(0, [A("x", 1), R("y")]),
        inv(1, [A("y", 1), R("x")]),
        done(0, [A("x", 1), R("y", [1])]),
        done(1, [A("y", 1), R("x", [1])]),
    )
    c = cycle(check_list_append(h), "G1c")
    assert sorted(c.txns) == [0, 1]
    assert c.kinds == ("wr", "wr")


def test_g_single_read_skew() -> None:
    h = hist(
        inv(1, [R("x"), R("y")]),
        txn(0, [A("x", 1), A("y", 1)]),
        done(1, [R("x", []), R("y", [1])]),
    )
    c = cycle(check_list_append(h), "G-single")
    assert sorted(c.txns) == [0, 1]
    assert sorted(c.kinds) == ["rw", "wr"]
    rw = next(s for s in c.steps if s.kind == "rw")
    assert (rw.src, rw.dst, rw.key) == (0, 1, "x")


def test_g2_item_write_skew() -> None:
    h = hist(
        inv(0, [R("x"), A("y", 1)]),
        inv(1, [R("y"), A("x", 1)]),
        done(0, [R("x", []), A("y", 1)]),
        done(1, [R("y", []), A("x", 1)]),
    )
    c = cycle(check_list_append(h), "G2-item")
    assert sorted(c.txns) == [0, 1]
    assert c.kinds == ("rw", "rw")


def test_incompatible_order() -> None:
    h = hist(
        txn(0, [A("x", 1)]),
        txn(1, [A("x", 2)]),
        txn(2, [R("x", [1, 2])]),
        txn(3, [R("x", [2])]),
    )
    (f,) = only(check_list_append(h), "incompatible-order")
    assert f.txns == (4, 6) and f.key == "x"


def test_realtime_only_violation() -> None:
    # T0 commits x=[1] and completes; T2 starts afterwards yet reads x empty: serializable
    # (T2 before T0) but not strictly serializable.
    h = hist(txn(0, [A("x", 1)]), txn(1, [R("x", [])]))
    assert check_list_append(h).valid
    v = check_list_append(h, realtime=True)
    c = cycle(v, "strict-serializability")
    assert sorted(c.txns) == [0, 2]
    assert sorted(c.kinds) == ["rt", "rw"]
    assert "strict-serializability" in v.format() and "T0 -rt-> T2" in v.format()


def test_info_append_counts_when_observed() -> None:
    # The info txn's appends were seen (y), so it committed: read skew with it is G-single.
    h = hist(
        inv(1, [R("x"), R("y")]),
        inv(0, [A("x", 1), A("y", 1)]),
        done(0, [A("x", 1), A("y", 1)], "info"),
        done(1, [R("x", []), R("y", [1])]),
        txn(2, [R("x", [1])]),
    )
    c = cycle(check_list_append(h), "G-single")
    assert sorted(c.txns) == [0, 1]


def test_format_names_cycle_and_edges() -> None:
    h = hist(
        inv(0, [R("x"), A("y", 1)]),
        inv(1, [R("y"), A("x", 1)]),
        done(0, [R("x", []), A("y", 1)]),
        done(1, [R("y", []), A("x", 1)]),
    )
    text = check_list_append(h).format()
    assert "INVALID: G2-item (1)" in text
    assert "G2-item cycle: T0 -> T1 -> T0" in text
    assert "T0 -rw-> T1: key 'x'" in text
    assert "T1 (process 1, ok): [r('y')=[] append('x', 1)]" in text


# -- clean histories ----------------------------------------------------------------------


def test_serial_history_is_valid() -> None:
    h = hist(
        txn(0, [A("x", 1), R("x", [1])]),
        txn(1, [R("x", [1]), A("x", 2), A("y", 1)]),
        txn(0, [R("x", [1, 2]), R("y", [1])]),
    )
    for rt in (False, True):
        v = check_list_append(h, realtime=rt)
        assert v.valid and v.anomalies == {}, v.format()
        assert v.format().endswith("valid\n")


def test_concurrent_but_serializable() -> None:
    h = hist(
        inv(0, [A("x", 1)]),
        inv(1, [R("x"), A("y", 1)]),
        inv(2, [R("y")]),
        done(1, [R("x", []), A("y", 1)]),
        done(0, [A("x", 1)]),
        done(2, [R("y", [1])]),
        txn(3, [R("x", [1]), R("y", [1])]),
    )
    assert check_list_append(h).valid
    assert check_list_append(h, realtime=True).valid


def test_info_ops_are_clean() -> None:
    h = hist(
        inv(0, [A("x", 1)]),
        done(0, [A("x", 1)], "info"),  # observed below: committed
        inv(1, [A("x", 2)]),
        done(1, [A("x", 2)], "info"),  # never observed: may not have committed
        txn(2, [A("x", 3)], "fail"),
        txn(3, [R("x", [1])]),
        inv(4, [A("y", 9)]),  # left open: info
    )
    v = check_list_append(h, realtime=True)
    assert v.valid, v.format()
    statuses = {t.status for t in h.transactions()}
    assert statuses == {"ok", "info", "fail"}


# -- property: serial executions are valid; a corrupted read is detected -------------------


@st.composite
def serial_histories(draw: st.DrawFn, min_txns: int = 1) -> list[dict[str, Any]]:
    """Transactions executed one at a time against a model (the commit order), with
    invocations and completions of several processes interleaved around commit points."""
    nproc = draw(st.integers(1, 4))
    n = draw(st.integers(min_txns, 14))
    keys = ["x", "y", "z"]
    model: dict[str, list[int]] = {k: [] for k in keys}
    counter = iter(range(1, 10_000))
    events: list[dict[str, Any]] = []
    # per process: None idle, else [ops, fate, committed-result or None]
    state: dict[int, list[Any] | None] = dict.fromkeys(range(nproc))
    started = 0
    while started < n or any(s is not None for s in state.values()):
        choices = [p for p, s in state.items() if s is not None or started < n]
        p = draw(st.sampled_from(choices))
        s = state[p]
        if s is None:
            ops = [
                ["append", k, next(counter)] if f == "append" else ["r", k, None]
                for f, k in draw(
                    st.lists(
                        st.tuples(st.sampled_from(["append", "r"]), st.sampled_from(keys)),
                        min_size=1,
                        max_size=4,
                    )
                )
            ]
            fate = draw(st.sampled_from(["ok", "ok", "ok", "ok", "info", "fail", "lost"]))
            events.append({"type": "invoke", "f": "txn", "value": ops, "process": p})
            state[p] = [ops, fate, None]
            started += 1
        elif s[2] is None and s[1] in ("ok", "info") and draw(st.booleans()):
            result = []
            for f, k, v in s[0]:  # the commit point: executed against the model
                if f == "append":
                    model[k].append(v)
                    result.append([f, k, v])
                else:
                    result.append([f, k, list(model[k])])
            s[2] = result
        elif s[2] is not None or s[1] in ("fail", "lost"):
            if s[1] == "ok":
                events.append({"type": "ok", "f": "txn", "value": s[2], "process": p})
            else:
                typ = "fail" if s[1] == "fail" else "info"
                events.append({"type": typ, "f": "txn", "value": s[0], "process": p})
            state[p] = None
    final = [["r", k, list(model[k])] for k in keys]
    events.append(
        {"type": "invoke", "f": "txn", "value": [["r", k, None] for k in keys], "process": nproc}
    )
    events.append({"type": "ok", "f": "txn", "value": final, "process": nproc})
    return [{**e, "index": i} for i, e in enumerate(events)]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
@given(serial_histories())
def test_serial_executions_are_valid(events: list[dict[str, Any]]) -> None:
    h = History.from_json(events)
    v = check_list_append(h, realtime=True)
    assert v.valid, v.format()
    assert check_list_append(History.loads(h.dumps(jsonl=True))).valid


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
)
@given(serial_histories(min_txns=8), st.data())
def test_dropping_a_read_element_is_detected(
    events: list[dict[str, Any]], data: st.DataObject
) -> None:
    # Reads (not the final read of everything) that saw at least 3 elements.
    spots = [
        (i, j)
        for i, e in enumerate(events[:-1])
        if e["type"] == "ok"
        for j, (f, _k, seen) in enumerate(e["value"])
        if f == "r" and len(seen) >= 3
    ]
    assume(spots)
    i, j = data.draw(st.sampled_from(spots))
    f, k, seen = events[i]["value"][j]
    drop = data.draw(st.integers(1, len(seen) - 2))
    corrupt = json.loads(json.dumps(events))
    corrupt[i]["value"][j] = [f, k, seen[:drop] + seen[drop + 1 :]]
    v = check_list_append(History.from_json(corrupt))
    assert not v.valid
    assert "incompatible-order" in v.anomalies


# -- loading, malformed histories, the command line ---------------------------------------


def test_load_save_json_and_jsonl(tmp_path: Path) -> None:
    h = hist(txn(0, [A("x", 1)]), txn(1, [R("x", [1])]))
    for jsonl in (False, True):
        p = tmp_path / ("h.jsonl" if jsonl else "h.json")
        h.save(p, jsonl=jsonl)
        assert History.load(p).ops == h.ops


def test_edn_style_keywords_are_accepted() -> None:
    h = History.from_json(
        [
            {"type": ":invoke", "f": ":txn", "value": [[":append", 1, 1]], "process": 0},
            {"type": ":ok", "f": ":txn", "value": [[":append", 1, 1]], "process": 0},
        ]
    )
    assert check_list_append(h).valid


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ({"not": "a list"}, "JSON list"),
        ([{"type": "bogus", "f": "txn", "value": [], "process": 0}], "type must be"),
        ([{"type": "ok", "f": "txn", "value": [], "process": 0}], "without an invocation"),
        (
            [inv(0, [A("x", 1)]), inv(0, [A("x", 2)])],
            "still pending",
        ),
        ([inv(0, [A("x", 1)]), done(0, [A("x", 2)])], "does not match"),
        ([inv(0, [["write", "x", 1]])], "unknown micro-op"),
        ([inv(0, [A("x", [1])])], "appended value"),
        ([{"type": "invoke", "f": "txn", "value": [], "index": 0}], "no process"),
        ([{**inv(0, []), "index": 3}, {**done(0, []), "index": 3}], "duplicate index"),
    ],
)
def test_malformed_histories_raise_typed_errors(events: Any, message: str) -> None:
    with pytest.raises(HistoryError, match=message):
        History.from_json(events).transactions()


def test_malformed_text_raises() -> None:
    with pytest.raises(HistoryError, match="line 2"):
        History.loads('{"type": "invoke", "f": "txn", "value": [], "process": 0}\n{oops\n')
    with pytest.raises(HistoryError, match="cannot read"):
        History.load("/nonexistent/history.json")


def test_main_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.json"
    stale = tmp_path / "stale.json"
    hist(txn(0, [A("x", 1)]), txn(1, [R("x", [1])])).save(good)
    hist(txn(0, [A("x", 1)]), txn(1, [R("x", [])])).save(stale)
    assert main([str(good)]) == 0
    assert main([str(stale)]) == 0
    assert main([str(stale), "--realtime"]) == 1
    assert "strict-serializability" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    assert main([str(bad)]) == 2
    assert "error:" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    p = tmp_path / "g2.json"
    hist(
        inv(0, [R("x"), A("y", 1)]),
        inv(1, [R("y"), A("x", 1)]),
        done(0, [R("x", []), A("y", 1)]),
        done(1, [R("y", []), A("x", 1)]),
    ).save(p)
    r = subprocess.run(
        [sys.executable, "-m", "ledgerlog.check", str(p)], capture_output=True, text=True
    )
    assert r.returncode == 1
    assert "G2-item" in r.stdout and "T0 -rw-> T1" in r.stdout


def test_garbage_and_duplicate_elements() -> None:
    h = hist(txn(0, [A("x", 1)]), txn(1, [R("x", [1, 1])]), txn(2, [R("y", [7])]))
    v = check_list_append(h)
    assert set(v.anomalies) == {"duplicate-elements", "garbage-read"}
    assert v.anomalies["garbage-read"][0].txns == (4,)
