"""The bank benchmark's workloads, run briefly against real PostgreSQL and real Pulsar.

A smoke run, not a measurement (no timing is asserted): the same tiny hot-skewed workload
on PostgreSQL SERIALIZABLE (the session's LocalPostgres) and on ledgerlog over the
session's LocalPulsar, in both client forms, and the final balances check (sum conserved,
every balance = initial + the committed transfers' effects) must pass on each.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from bench.bank_bench import Workload, run_postgres, run_pulsar

pytestmark = pytest.mark.integration

TINY = Workload(accounts=200, hot=5, hot_fraction=0.5, processes=2, threads=2, seconds=1.0, batch=8)


def test_postgres_serializable_bank_run_keeps_balances(local_postgres: Any) -> None:
    dsn = local_postgres.create_database(f"bank_{uuid.uuid4().hex[:8]}")
    r = run_postgres(dsn, TINY)
    assert r.committed > 0, r
    assert r.balances_ok, r.check
    assert r.label.startswith("PostgreSQL") and "SERIALIZABLE" in r.label


@pytest.mark.parametrize("form", ["transactional", "pipelined"])
def test_pulsar_bank_run_keeps_balances(local_pulsar: Any, form: str) -> None:
    r = run_pulsar(local_pulsar.service_url, TINY, form)
    assert r.committed > 0, r
    assert r.balances_ok, r.check
