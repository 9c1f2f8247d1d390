"""A history checker for the list-append workload, after Jepsen's Elle.

>>> from ledgerlog.check import History, check_list_append
>>> verdict = check_list_append(History.load("history.json"), realtime=True)
>>> print(verdict.format())

It finds, from the history alone, G0, G1a, G1b, G1c, G-single and G2-item (plus
incompatible-order, duplicate-elements, duplicate-appends and garbage-read), and with
``realtime=True`` cycles that need a real-time edge ("strict-serializability").
:func:`check_bank` checks bank histories. The harness that records histories under
faults is :func:`ledgerlog.check.run.run_check` (``ledgerlog check run``).
"""

from __future__ import annotations

from ledgerlog.check.bank import BankVerdict, check_bank
from ledgerlog.check.elle import Anomaly, Cycle, Finding, Step, Verdict, check_list_append
from ledgerlog.check.history import History, HistoryError, Op, Txn

__all__ = [
    "Anomaly",
    "BankVerdict",
    "Cycle",
    "Finding",
    "History",
    "HistoryError",
    "Op",
    "Step",
    "Txn",
    "Verdict",
    "check_bank",
    "check_list_append",
]
