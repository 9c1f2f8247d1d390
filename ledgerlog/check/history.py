"""Histories in the JSON form Jepsen's Elle accepts for the list-append workload.

A history is a list of operations ``{"type": "invoke"|"ok"|"fail"|"info", "f": "txn",
"value": [["append", k, v], ["r", k, [..] | null], ...], "process": p, "time": ns,
"index": i}``. Each process alternates invocations and completions; :meth:`History.
transactions` pairs them. Anything malformed raises :class:`HistoryError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from ledgerlog.errors import LedgerlogError

__all__ = [
    "History",
    "HistoryError",
    "Key",
    "MicroOp",
    "Op",
    "Process",
    "Txn",
    "Value",
]

Key: TypeAlias = int | str
Value: TypeAlias = int | str
Process: TypeAlias = int | str
# ("append", key, value) or ("r", key, observed values or None when unknown)
MicroOp: TypeAlias = tuple[str, Key, Any]
OpType: TypeAlias = Literal["invoke", "ok", "fail", "info"]
Status: TypeAlias = Literal["ok", "fail", "info"]

_TYPES = ("invoke", "ok", "fail", "info")


class HistoryError(LedgerlogError, ValueError):
    """A history that cannot be read or paired (bad JSON, bad shapes, unpaired ops)."""


@dataclass(frozen=True, slots=True)
class Op:
    """One history event. ``value`` holds micro-ops as tuples; read values are tuples."""

    type: OpType
    f: str
    value: tuple[MicroOp, ...] | None
    process: Process
    index: int
    time: int | None = None
    # False when the client did not sync() before this invocation: real-time order then
    # says nothing about what it may read (see check_list_append(realtime=True)).
    sync: bool | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "f": self.f}
        if self.value is None:
            out["value"] = None
        else:
            out["value"] = [
                [m[0], m[1], list(m[2]) if isinstance(m[2], tuple) else m[2]] for m in self.value
            ]
        out["process"] = self.process
        if self.time is not None:
            out["time"] = self.time
        if self.sync is not None:
            out["sync"] = self.sync
        out["index"] = self.index
        return out


@dataclass(frozen=True, slots=True)
class Txn:
    """An invocation paired with its completion.

    ``id`` is the invocation's index. ``ops`` are the completion's micro-ops for ``ok``
    (reads carry what they saw), else the invocation's (reads unknown). ``invoke_pos`` and
    ``complete_pos`` are positions in the history (``complete_pos`` is None when the
    history ended first: the outcome is then ``info``).
    """

    id: int
    process: Process
    status: Status
    ops: tuple[MicroOp, ...]
    invoke_pos: int
    complete_pos: int | None
    realtime: bool = True  # its invocation did not say "sync": false

    def appends(self) -> Iterator[tuple[Key, Value]]:
        for m in self.ops:
            if m[0] == "append":
                yield m[1], m[2]

    def describe(self) -> str:
        body = " ".join(_format_mop(m) for m in self.ops)
        return f"T{self.id} (process {self.process}, {self.status}): [{body}]"


def _format_mop(m: MicroOp) -> str:
    if m[0] == "append":
        return f"append({m[1]!r}, {m[2]!r})"
    if m[2] is None:
        return f"r({m[1]!r})=?"
    vs = m[2]
    if len(vs) > 8:
        return f"r({m[1]!r})=[({len(vs) - 4} more), " + ", ".join(repr(v) for v in vs[-4:]) + "]"
    seen = "[" + ", ".join(repr(v) for v in vs) + "]"
    return f"r({m[1]!r})={seen}"


def _strip(x: Any) -> Any:
    # Tolerate EDN-ish keywords (":ok", ":append") in hand-converted histories.
    return x[1:] if isinstance(x, str) and x.startswith(":") else x


def _scalar(x: Any, what: str, where: str) -> int | str:
    if isinstance(x, bool) or not isinstance(x, int | str):
        raise HistoryError(f"{where}: {what} must be an int or a str, not {x!r}")
    return x


def _parse_value(raw: Any, where: str) -> tuple[MicroOp, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise HistoryError(f"{where}: value must be a list of micro-ops, not {raw!r}")
    out: list[MicroOp] = []
    for m in raw:
        if not isinstance(m, list) or len(m) != 3:
            raise HistoryError(f"{where}: micro-op must be [f, key, value], not {m!r}")
        f = _strip(m[0])
        key = _scalar(m[1], "key", where)
        if f == "append":
            out.append(("append", key, _scalar(m[2], "appended value", where)))
        elif f == "r":
            seen = m[2]
            if seen is None:
                out.append(("r", key, None))
            elif isinstance(seen, list):
                if not all(type(v) is int or type(v) is str for v in seen):
                    for v in seen:
                        _scalar(v, "read element", where)
                out.append(("r", key, tuple(seen)))
            else:
                raise HistoryError(f"{where}: a read must carry a list or null, not {seen!r}")
        else:
            raise HistoryError(f"{where}: unknown micro-op {m[0]!r} (expected append or r)")
    return tuple(out)


def _parse_op(raw: Any, pos: int) -> Op:
    where = f"operation {pos}"
    if not isinstance(raw, dict):
        raise HistoryError(f"{where}: must be a JSON object, not {raw!r}")
    typ = _strip(raw.get("type"))
    if typ not in _TYPES:
        raise HistoryError(f"{where}: type must be one of {_TYPES}, not {raw.get('type')!r}")
    f = _strip(raw.get("f"))
    if not isinstance(f, str):
        raise HistoryError(f"{where}: f must be a string, not {raw.get('f')!r}")
    if "process" not in raw:
        raise HistoryError(f"{where}: has no process")
    process = _scalar(raw["process"], "process", where)
    index = raw.get("index", pos)
    if isinstance(index, bool) or not isinstance(index, int):
        raise HistoryError(f"{where}: index must be an int, not {index!r}")
    time = raw.get("time")
    if time is not None and (isinstance(time, bool) or not isinstance(time, int)):
        raise HistoryError(f"{where}: time must be an int (ns), not {time!r}")
    value = _parse_value(raw.get("value"), where) if f == "txn" else None
    sync = raw.get("sync")
    if sync is not None and not isinstance(sync, bool):
        raise HistoryError(f"{where}: sync must be true, false or absent, not {sync!r}")
    return Op(typ, f, value, process, index, time, sync)


class History:
    """An ordered list of :class:`Op`; indexes must be unique."""

    def __init__(self, ops: Iterable[Op]) -> None:
        self.ops: tuple[Op, ...] = tuple(ops)
        seen: set[int] = set()
        for op in self.ops:
            if op.index in seen:
                raise HistoryError(f"duplicate index {op.index}")
            seen.add(op.index)

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    # Loading and saving ---------------------------------------------------------------

    @classmethod
    def from_json(cls, data: Any) -> History:
        if not isinstance(data, list):
            raise HistoryError(f"a history must be a JSON list of operations, not {data!r:.80}")
        return cls(_parse_op(raw, pos) for pos, raw in enumerate(data))

    @classmethod
    def loads(cls, text: str) -> History:
        """A JSON array of operations, or JSON lines (one operation per line)."""
        stripped = text.strip()
        if not stripped:
            return cls(())
        if stripped.startswith("["):
            try:
                return cls.from_json(json.loads(stripped))
            except json.JSONDecodeError as exc:
                raise HistoryError(f"not valid JSON: {exc}") from exc
        data: list[Any] = []
        for n, line in enumerate(stripped.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise HistoryError(f"line {n}: not valid JSON: {exc}") from exc
        return cls.from_json(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> History:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise HistoryError(f"cannot read {os.fspath(path)!r}: {exc}") from exc
        return cls.loads(text)

    def to_json(self) -> list[dict[str, Any]]:
        return [op.to_json() for op in self.ops]

    def dumps(self, *, jsonl: bool = False) -> str:
        if jsonl:
            return "".join(json.dumps(o) + "\n" for o in self.to_json())
        return json.dumps(self.to_json(), indent=1) + "\n"

    def save(self, path: str | os.PathLike[str], *, jsonl: bool = False) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.dumps(jsonl=jsonl))

    # Pairing ----------------------------------------------------------------------------

    def transactions(self) -> list[Txn]:
        """Pair each ``txn`` invocation with its process's next completion (other ``f``s,
        e.g. nemesis operations, are skipped). An invocation left open is ``info``."""
        pending: dict[Process, tuple[int, Op]] = {}
        txns: list[Txn] = []
        for pos, op in enumerate(self.ops):
            if op.f != "txn":
                continue
            where = f"operation {pos} (index {op.index}, process {op.process!r})"
            if op.type == "invoke":
                if op.process in pending:
                    raise HistoryError(
                        f"{where}: invoked while index {pending[op.process][1].index}"
                        " of the same process is still pending"
                    )
                if op.value is None:
                    raise HistoryError(f"{where}: an invocation needs a value")
                pending[op.process] = (pos, op)
                continue
            if op.process not in pending:
                raise HistoryError(f"{where}: {op.type} completion without an invocation")
            ipos, inv = pending.pop(op.process)
            assert inv.value is not None
            status: Status = "ok" if op.type == "ok" else "fail" if op.type == "fail" else "info"
            ops = _check_completion(inv.value, op.value, where) if status == "ok" else inv.value
            txns.append(Txn(inv.index, op.process, status, ops, ipos, pos, inv.sync is not False))
        for ipos, inv in pending.values():
            assert inv.value is not None
            txns.append(
                Txn(inv.index, inv.process, "info", inv.value, ipos, None, inv.sync is not False)
            )
        txns.sort(key=lambda t: t.invoke_pos)
        return txns


def _check_completion(
    inv: tuple[MicroOp, ...], done: tuple[MicroOp, ...] | None, where: str
) -> tuple[MicroOp, ...]:
    if done is None:
        raise HistoryError(f"{where}: an ok completion needs a value")
    if len(done) != len(inv):
        raise HistoryError(f"{where}: completion has {len(done)} micro-ops, invocation {len(inv)}")
    for a, b in zip(inv, done, strict=True):
        if a[0] != b[0] or a[1] != b[1] or (a[0] == "append" and a[2] != b[2]):
            raise HistoryError(f"{where}: completion micro-op {b!r} does not match {a!r}")
    return done


def build(events: Sequence[dict[str, Any]]) -> History:
    """A history from JSON-like dicts (``index`` defaults to the position)."""
    return History.from_json(list(events))
