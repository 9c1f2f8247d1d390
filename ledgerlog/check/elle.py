"""List-append inference (after Elle, Kingsbury & Alvaro, VLDB 2020) and cycle search.

From the history alone: a version order per key (the longest read; every read of the key
must be a prefix of it), then dependency edges between transactions:

- ww: the appender of element i precedes the appender of element i+1;
- wr: the appender of the last element a read saw precedes the reader;
- rw: a reader precedes the appender of the element after the ones it saw;
- rt (``realtime=True``): a transaction that completed ``ok`` precedes one invoked later.

Cycles are found per strongly connected component (Tarjan), then by a shortest-cycle
BFS inside the component over the edge types each anomaly class allows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import pairwise

from ledgerlog.check.history import History, Key, Txn, Value

__all__ = ["Anomaly", "Cycle", "Finding", "Step", "Verdict", "check_list_append"]

WW, WR, RW, RT = "ww", "wr", "rw", "rt"

# The anomaly classes in report order; cycle classes are searched over the edge types
# given, counting edges of one type, and accept a count by a predicate.
_CYCLE_SPECS: tuple[tuple[str, frozenset[str], str | None, Callable[[int], bool]], ...] = (
    ("G0", frozenset({WW}), None, lambda n: True),
    ("G1c", frozenset({WW, WR}), WR, lambda n: n >= 1),
    ("G-single", frozenset({WW, WR, RW}), RW, lambda n: n == 1),
    ("G2-item", frozenset({WW, WR, RW}), RW, lambda n: n >= 2),
)
_RT_SPEC = ("strict-serializability", frozenset({WW, WR, RW, RT}), RT, lambda n: n >= 1)
_MAX_STARTS = 64  # BFS starts per component: bounds the search on huge components


def _abbrev(seen: tuple[Value, ...], n: int = 4) -> str:
    """A read for humans: long ones show their length and last elements."""
    if len(seen) <= 2 * n:
        return "[" + ", ".join(repr(v) for v in seen) + "]"
    return f"[({len(seen) - n} more), " + ", ".join(repr(v) for v in seen[-n:]) + "]"


def _sk(x: Key | Value) -> tuple[int, int, str]:
    return (0, x, "") if isinstance(x, int) else (1, 0, x)


@dataclass(frozen=True, slots=True)
class Step:
    """One edge of a cycle: ``src`` precedes ``dst`` because of ``kind`` on ``key``."""

    src: int
    dst: int
    kind: str
    key: Key | None
    why: str


@dataclass(frozen=True, slots=True)
class Cycle:
    """A dependency cycle: each step's ``dst`` is the next step's ``src``."""

    name: str
    steps: tuple[Step, ...]

    @property
    def txns(self) -> tuple[int, ...]:
        return tuple(s.src for s in self.steps)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(s.kind for s in self.steps)

    def format(self, txns: dict[int, Txn] | None = None) -> str:
        lines = [f"{self.name} cycle: " + " -> ".join(f"T{t}" for t in (*self.txns, self.txns[0]))]
        for s in self.steps:
            lines.append(f"  T{s.src} -{s.kind}-> T{s.dst}: {s.why}")
        if txns:
            lines.extend("  " + txns[t].describe() for t in self.txns if t in txns)
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Finding:
    """A non-cycle anomaly (G1a, G1b, incompatible-order, ...) and the txns involved."""

    name: str
    txns: tuple[int, ...]
    key: Key | None
    why: str

    def format(self, txns: dict[int, Txn] | None = None) -> str:
        lines = [f"{self.name}: {self.why}"]
        if txns:
            lines.extend("  " + txns[t].describe() for t in self.txns if t in txns)
        return "\n".join(lines)


Anomaly = Cycle | Finding


@dataclass(frozen=True)
class Verdict:
    """``valid`` iff no anomaly was found; ``anomalies`` maps a name to its instances."""

    valid: bool
    anomalies: dict[str, list[Anomaly]]
    realtime: bool
    txns: dict[int, Txn] = field(repr=False)

    def format(self) -> str:
        counts = {
            s: sum(1 for t in self.txns.values() if t.status == s) for s in ("ok", "info", "fail")
        }
        model = "strict serializability" if self.realtime else "serializability"
        head = (
            f"{len(self.txns)} transactions ({counts['ok']} ok, {counts['info']} info,"
            f" {counts['fail']} fail), checked for {model}: "
        )
        if self.valid:
            return head + "valid\n"
        names = ", ".join(f"{n} ({len(a)})" for n, a in self.anomalies.items())
        out = [head + "INVALID: " + names]
        for anomalies in self.anomalies.values():
            for a in anomalies:
                out.append(a.format(self.txns))
        return "\n".join(out) + "\n"


Graph = dict[int, dict[int, dict[str, tuple[Key | None, str]]]]


def _add(g: Graph, a: int, b: int, kind: str, key: Key | None, why: str) -> None:
    if a == b:
        return
    g.setdefault(a, {}).setdefault(b, {}).setdefault(kind, (key, why))


def check_list_append(history: History, *, realtime: bool = False) -> Verdict:
    txns = history.transactions()
    findings: dict[str, list[Anomaly]] = {}

    def report(name: str, ids: Iterable[int], key: Key | None, why: str) -> None:
        findings.setdefault(name, []).append(Finding(name, tuple(ids), key, why))

    # Who appended what; appends of failed txns are kept to recognise G1a.
    appender: dict[tuple[Key, Value], Txn] = {}
    appends_to: dict[tuple[int, Key], list[Value]] = {}
    for t in txns:
        for k, v in t.appends():
            other = appender.get((k, v))
            if other is not None and other.id != t.id:
                report(
                    "duplicate-appends",
                    (other.id, t.id),
                    k,
                    f"T{other.id} and T{t.id} both append {v!r} to key {k!r}",
                )
            appender.setdefault((k, v), t)
            appends_to.setdefault((t.id, k), []).append(v)

    # Reads of committed txns: all of them fix the version order; a txn's first read of a
    # key before it appends to it ("external") gives its wr/rw edges.
    reads: dict[Key, list[tuple[Txn, tuple[Value, ...]]]] = {}
    external: list[tuple[Txn, Key, tuple[Value, ...]]] = []
    for t in txns:
        if t.status != "ok":
            continue
        touched: set[Key] = set()
        for f, k, seen in t.ops:
            if f == "append":
                touched.add(k)
            elif seen is not None:
                reads.setdefault(k, []).append((t, seen))
                if k not in touched:
                    external.append((t, k, seen))
                    touched.add(k)

    # Version orders: the longest read of each key, if every read is a prefix of it.
    order: dict[Key, tuple[Value, ...]] = {}
    incompatible: set[Key] = set()
    for k in sorted(reads, key=_sk):
        longest = max(reads[k], key=lambda r: len(r[1]))
        bad = [r for r in reads[k] if longest[1][: len(r[1])] != r[1]]
        if bad:
            t, seen = bad[0]
            report(
                "incompatible-order",
                (longest[0].id, t.id),
                k,
                f"key {k!r}: T{longest[0].id} read {_abbrev(longest[1])} but T{t.id} read"
                f" {_abbrev(seen)}, not a prefix of it",
            )
            incompatible.add(k)
        else:
            order[k] = longest[1]

    # Each element read once: for a compatible key the longest read holds them all, and
    # the shortest read reaching an element is blamed for it.
    observed: set[int] = set()
    for k in sorted(reads, key=_sk):
        if k in incompatible:
            scans = reads[k]
        else:
            scans = []
            covered = 0
            for t, seen in sorted(reads[k], key=lambda r: len(r[1])):
                if len(seen) > covered:
                    scans.append((t, seen[covered:]))
                    covered = len(seen)
            if len(set(order[k])) != len(order[k]):
                t = max(reads[k], key=lambda r: len(r[1]))[0]
                report(
                    "duplicate-elements", (t.id,), k, f"T{t.id} read key {k!r} = {list(order[k])}"
                )
        for t, seen in scans:
            if k in incompatible and len(set(seen)) != len(seen):
                report("duplicate-elements", (t.id,), k, f"T{t.id} read key {k!r} = {list(seen)}")
            for v in seen:
                w = appender.get((k, v))
                if w is None:
                    report(
                        "garbage-read",
                        (t.id,),
                        k,
                        f"T{t.id} read {v!r} in key {k!r}, never appended",
                    )
                elif w.status == "fail" and w.id != t.id:
                    report(
                        "G1a",
                        (t.id, w.id),
                        k,
                        f"T{t.id} read {v!r} in key {k!r}, appended by failed T{w.id}",
                    )
                else:
                    observed.add(w.id)
        for t, seen in reads[k]:
            if seen:
                w = appender.get((k, seen[-1]))
                if w is not None and w.id != t.id and w.status != "fail":
                    mine = appends_to[(w.id, k)]
                    if seen[-1] != mine[-1]:
                        report(
                            "G1b",
                            (t.id, w.id),
                            k,
                            f"T{t.id} read key {k!r} = {_abbrev(seen)}, ending at {seen[-1]!r},"
                            f" an intermediate append of T{w.id} (whose last is {mine[-1]!r})",
                        )

    nodes = {t.id for t in txns if t.status == "ok" or (t.status == "info" and t.id in observed)}
    for k in order:
        order[k] += _unread_tail(k, order[k], txns)

    g: Graph = {}

    def node_of(k: Key, v: Value) -> int | None:
        w = appender.get((k, v))
        return w.id if w is not None and w.id in nodes else None

    for k, vs in order.items():
        for a, b in pairwise(vs):
            ta, tb = node_of(k, a), node_of(k, b)
            if ta is not None and tb is not None:
                _add(g, ta, tb, WW, k, f"key {k!r}: appended {a!r}, then {b!r}")
    for t, k, seen in external:
        if seen:
            src = node_of(k, seen[-1])
            if src is not None:
                _add(
                    g,
                    src,
                    t.id,
                    WR,
                    k,
                    f"key {k!r}: T{t.id} read {_abbrev(seen)},"
                    f" last {seen[-1]!r} appended by T{src}",
                )
        known = order.get(k)
        if known is not None and len(known) > len(seen):
            nxt = known[len(seen)]
            dst = node_of(k, nxt)
            if dst is not None:
                _add(
                    g,
                    t.id,
                    dst,
                    RW,
                    k,
                    f"key {k!r}: T{t.id} read {_abbrev(seen)}, missing the next element"
                    f" {nxt!r} from T{dst}",
                )

    if realtime:
        _add_realtime(g, txns, nodes)

    anomalies: dict[str, list[Anomaly]] = {}
    in_cycles: set[int] = set()
    for name, kinds, counted, ok in _CYCLE_SPECS:
        found = _find_cycles(g, name, kinds, counted, ok)
        if found:
            anomalies[name] = list[Anomaly](found)
            for c in found:
                in_cycles.update(c.txns)
    if realtime:
        name, kinds, counted, ok = _RT_SPEC
        rt_found = _find_cycles(g, name, kinds, counted, ok, skip=in_cycles)
        if rt_found:
            anomalies[name] = list[Anomaly](rt_found)
    for name in sorted(findings):
        anomalies[name] = sorted(findings[name], key=lambda a: (a.txns, str(a)))
    anomalies = dict(sorted(anomalies.items()))
    return Verdict(not anomalies, anomalies, realtime, {t.id: t for t in txns})


def _unread_tail(k: Key, longest: tuple[Value, ...], txns: list[Txn]) -> tuple[Value, ...]:
    """Appends to ``k`` that no read saw must follow the longest read (reads are prefixes
    of one order). If they all belong to one ok txn and no other txn (ok or info) has an
    unread append to ``k`` that may have committed, they are the next elements, in that
    txn's order: this orders a write nobody read after the reads that missed it."""
    seen = set(longest)
    owners = [
        t
        for t in txns
        if t.status != "fail" and any(kk == k and v not in seen for kk, v in t.appends())
    ]
    if len(owners) != 1 or owners[0].status != "ok":
        return ()
    return tuple(v for kk, v in owners[0].appends() if kk == k and v not in seen)


def _add_realtime(g: Graph, txns: list[Txn], nodes: set[int]) -> None:
    """rt edges, transitively reduced as in Elle: a txn invoked gets an edge from every txn
    on the current frontier of completed ones; when it completes ok it replaces them.

    A txn whose invocation says ``"sync": false`` read a replica that may lag: it gets no
    incoming rt edge (nothing it missed is an anomaly), so it replaces nobody on the
    frontier either; its own completion still precedes later txns."""
    events: list[tuple[int, int, Txn]] = []
    for t in txns:
        if t.id not in nodes:
            continue
        events.append((t.invoke_pos, 1, t))
        if t.status == "ok" and t.complete_pos is not None:
            events.append((t.complete_pos, 0, t))
    events.sort(key=lambda e: (e[0], e[1]))
    frontier: dict[int, Txn] = {}
    preds: dict[int, list[int]] = {}
    for pos, kind, t in events:
        if kind == 1:
            if not t.realtime:
                continue
            preds[t.id] = sorted(frontier)
            for p in preds[t.id]:
                a = frontier[p]
                _add(
                    g,
                    a.id,
                    t.id,
                    RT,
                    None,
                    f"T{a.id} completed (position {a.complete_pos}) before T{t.id}"
                    f" was invoked (position {pos})",
                )
        else:
            for p in preds.get(t.id, ()):
                frontier.pop(p, None)
            frontier[t.id] = t


def _sccs(g: Graph, kinds: frozenset[str]) -> list[list[int]]:
    """Tarjan's strongly connected components (iterative), each sorted, nontrivial only."""
    succ: dict[int, list[int]] = {
        a: sorted(b for b, ks in bs.items() if kinds & ks.keys()) for a, bs in g.items()
    }
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on: set[int] = set()
    out: list[list[int]] = []
    counter = 0
    for root in sorted(succ):
        if root in index:
            continue
        work: list[tuple[int, int]] = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on.add(v)
            ws = succ.get(v, [])
            recursed = False
            while i < len(ws):
                w = ws[i]
                i += 1
                if w not in index:
                    work.append((v, i))
                    work.append((w, 0))
                    recursed = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if recursed:
                continue
            if low[v] == index[v]:
                comp: list[int] = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
            if work:
                u = work[-1][0]
                low[u] = min(low[u], low[v])
    out.sort()
    return out


def _find_cycles(
    g: Graph,
    name: str,
    kinds: frozenset[str],
    counted: str | None,
    ok: Callable[[int], bool],
    skip: set[int] | frozenset[int] = frozenset(),
) -> list[Cycle]:
    cycles: list[Cycle] = []
    for comp in _sccs(g, kinds):
        if skip & set(comp):
            continue
        best: Cycle | None = None
        for start in comp[:_MAX_STARTS]:
            c = _shortest_cycle(g, name, set(comp), start, kinds, counted, ok)
            if c is not None and (best is None or len(c.steps) < len(best.steps)):
                best = c
        if best is not None:
            cycles.append(best)
    return cycles


def _shortest_cycle(
    g: Graph,
    name: str,
    comp: set[int],
    start: int,
    kinds: frozenset[str],
    counted: str | None,
    ok: Callable[[int], bool],
) -> Cycle | None:
    """BFS over (txn, number of ``counted`` edges so far, capped at 2) back to start."""
    State = tuple[int, int]
    parent: dict[State, tuple[State, str] | None] = {(start, 0): None}
    queue: deque[State] = deque([(start, 0)])
    while queue:
        node, n = queue.popleft()
        for b in sorted(g.get(node, {})):
            if b not in comp:
                continue
            for kind in sorted(kinds & g[node][b].keys()):
                m = min(2, n + (kind == counted))
                if b == start:
                    if ok(m):
                        return _cycle(g, name, parent, (node, n), kind, start)
                    continue
                nxt = (b, m)
                if nxt not in parent:
                    parent[nxt] = ((node, n), kind)
                    queue.append(nxt)
    return None


def _cycle(
    g: Graph,
    name: str,
    parent: dict[tuple[int, int], tuple[tuple[int, int], str] | None],
    last: tuple[int, int],
    last_kind: str,
    start: int,
) -> Cycle:
    hops: list[tuple[int, int, str]] = [(last[0], start, last_kind)]
    state = last
    while (p := parent[state]) is not None:
        prev, kind = p
        hops.append((prev[0], state[0], kind))
        state = prev
    hops.reverse()
    steps = tuple(Step(a, b, k, *g[a][b][k]) for a, b, k in hops)
    return Cycle(name, steps)
