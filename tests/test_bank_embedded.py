"""The bank benchmark's workload and balance check, run briefly on the embedded backend.

No timing is asserted: these prove the workload runs on real processes (a ``ledgerlog
writer`` and client processes, fsync on) and that the final balances check passes there,
and that the check itself catches lost or invented money. PostgreSQL and Pulsar get the
same smoke run in integration/test_bank_servers.py.
"""

from __future__ import annotations

import collections

import pytest

from bench.bank_bench import Tally, Workload, check_balances, run_embedded

TINY = Workload(accounts=200, hot=5, hot_fraction=0.5, processes=2, threads=2, seconds=1.0, batch=8)


def test_picks_are_deterministic_distinct_and_skewed() -> None:
    w = Workload(accounts=1_000, hot=10, hot_fraction=0.5)
    # Same seed, same transfers: every system is offered the same ones.
    r1, r2 = w.rng(1, 2), w.rng(1, 2)
    assert [w.pick(r1) for _ in range(50)] == [w.pick(r2) for _ in range(50)]
    rnd = w.rng(0, 0)
    many = [w.pick(rnd) for _ in range(4_000)]
    assert all(a != b and 1 <= amount <= 10 for a, b, amount in many)
    hot_share = sum((a < 10) + (b < 10) for a, b, _ in many) / (2 * len(many))
    assert 0.4 < hot_share < 0.6  # 50% of picks, plus 1% of the uniform rest
    uniform = Workload(accounts=1_000)
    rnd = uniform.rng(0, 0)
    assert sum(a < 10 for a, _, _ in (uniform.pick(rnd) for _ in range(4_000))) < 200


def test_check_catches_wrong_balances() -> None:
    w = Workload(accounts=4, balance=100)
    t = Tally()
    t.commit(0, 1, 7, 0.001)
    good = {0: 93, 1: 107, 2: 100, 3: 100}
    assert check_balances(w, good, t) == (True, "ok")
    # Conserved but not what the committed transfers did (a lost or phantom commit).
    ok, why = check_balances(w, {0: 100, 1: 100, 2: 100, 3: 100}, t)
    assert not ok and "differ" in why
    ok, why = check_balances(w, {**good, 3: 101}, t)
    assert not ok and "sum" in why
    ok, why = check_balances(w, {0: 93, 1: 107, 2: 200}, t)
    assert not ok and "accounts" in why
    t.unknown = 1
    assert not check_balances(w, good, t)[0]


def test_tally_merge_adds_up() -> None:
    a, b = Tally(), Tally()
    a.commit(0, 1, 5, 0.01)
    b.commit(1, 2, 3, 0.02)
    b.attempts, a.attempts = 4, 1
    a.merge(b)
    assert (a.committed, a.attempts) == (2, 5)
    assert a.deltas == collections.Counter({0: -5, 1: 2, 2: 3})
    assert sorted(a.latencies) == [0.01, 0.02]


@pytest.mark.parametrize("form", ["transactional", "pipelined"])
def test_embedded_bank_run_keeps_balances(form: str) -> None:
    r = run_embedded(TINY, form)
    assert r.committed > 0, r
    assert r.balances_ok, r.check
    assert r.attempts >= r.committed
