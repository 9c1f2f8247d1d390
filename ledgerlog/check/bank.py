"""A checker for bank histories (after Jepsen's bank workload).

Operations are ``{"f": "transfer", "value": {"from": a, "to": b, "amount": n}}`` and
``{"f": "read", "value": {account: balance, ...}}`` (the completion carries what the read
saw). Checked: every ``ok`` read of all accounts sees every account and the conserved
total, and no negative balance (unless allowed); given the final balances and the txn ids
the ledger committed, that the final balances equal the initial ones plus exactly the
committed transfers, and that every ``ok`` transfer is among them and no ``fail`` one.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BankVerdict", "check_bank"]

_MAX_SHOWN = 10


@dataclass(frozen=True)
class BankVerdict:
    valid: bool
    problems: list[str]
    counts: dict[str, int] = field(default_factory=dict)

    def format(self) -> str:
        head = ", ".join(f"{v} {k}" for k, v in sorted(self.counts.items()))
        if self.valid:
            return f"bank: {head}: valid\n"
        shown = self.problems[:_MAX_SHOWN]
        more = len(self.problems) - len(shown)
        lines = [f"bank: {head}: INVALID ({len(self.problems)} problems)", *shown]
        if more:
            lines.append(f"... and {more} more")
        return "\n".join(lines) + "\n"


def check_bank(
    ops: Iterable[Mapping[str, Any]],
    *,
    initial: Mapping[str, int],
    allow_negative: bool = False,
    final: Mapping[str, int] | None = None,
    committed: Collection[str] | None = None,
) -> BankVerdict:
    """`initial` maps every account (as a string) to its opening balance. `final` and
    `committed` (txn ids, as the history's ``txn_id`` fields) come from a replay of the
    ledger; without them only the reads are checked."""
    accounts = set(initial)
    total = sum(initial.values())
    problems: list[str] = []
    counts: dict[str, int] = {}
    # Every submitted transfer by txn id: from its completion, or from its invocation when
    # the client died before completing it (the ledger decides whether it committed).
    transfers: dict[str, Mapping[str, Any]] = {}
    for op in ops:
        f, typ = op.get("f"), op.get("type")
        if f not in ("read", "transfer"):
            continue
        if typ == "invoke":
            tid, value = op.get("txn_id"), op.get("value")
            if f == "transfer" and isinstance(tid, str) and isinstance(value, Mapping):
                transfers.setdefault(tid, value)
            continue
        counts[f"{f} {typ}"] = counts.get(f"{f} {typ}", 0) + 1
        where = f"operation {op.get('index')} (process {op.get('process')})"
        value = op.get("value")
        if f == "read" and typ == "ok":
            if not isinstance(value, Mapping):
                problems.append(f"{where}: a read without balances: {value!r}")
                continue
            seen = {str(k): v for k, v in value.items()}
            if set(seen) != accounts or any(not isinstance(v, int) for v in seen.values()):
                problems.append(f"{where}: read {seen} does not hold one balance per account")
                continue
            if sum(seen.values()) != total:
                problems.append(f"{where}: read total {sum(seen.values())} != {total}: {seen}")
            negative = {k: v for k, v in seen.items() if v < 0}
            if negative and not allow_negative:
                problems.append(f"{where}: negative balances {negative}")
        elif f == "transfer":
            if not isinstance(value, Mapping) or not {"from", "to", "amount"} <= set(value):
                problems.append(f"{where}: a transfer without from/to/amount: {value!r}")
                continue
            tid = op.get("txn_id")
            if committed is not None and tid is not None:
                if typ == "ok" and tid not in committed:
                    problems.append(f"{where}: ok transfer {tid} is not committed in the ledger")
                if typ == "fail" and tid in committed:
                    problems.append(f"{where}: failed transfer {tid} committed in the ledger")
            if isinstance(tid, str):
                transfers[tid] = value
    if final is not None and committed is not None:
        expected = dict(initial)
        for tid, v in transfers.items():
            if tid in committed:
                src, dst = str(v["from"]), str(v["to"])
                expected[src] = expected.get(src, 0) - int(v["amount"])
                expected[dst] = expected.get(dst, 0) + int(v["amount"])
        got = {str(k): v for k, v in final.items()}
        if got != expected:
            diff = {
                k: (expected.get(k), got.get(k))
                for k in sorted(set(expected) | set(got))
                if expected.get(k) != got.get(k)
            }
            problems.append(f"final balances differ from the committed transfers: {diff}")
    return BankVerdict(not problems, problems, counts)
