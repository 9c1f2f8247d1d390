"""A short randomized consistency check on each backend, under faults.

Each test runs :func:`ledgerlog.check.run.run_check`: writer and client processes, a
nemesis (kill -9 and restart of writers and clients, SIGSTOP of the writer, and per
backend a broker restart or pause, bookie kills, a TCP proxy that drops and delays the
clients' connections), then the history checker, the ledger audit (no lost or doubled
acknowledged commit) and the replicas' digests. It fails on any of them.

The seed is printed (``-s`` shows it; it is also in the failure message); set
``LEDGERLOG_CHECK_SEED`` to replay a run's schedule.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from ledgerlog.check.faults import TcpProxy
from ledgerlog.check.run import RunConfig, run_check
from ledgerlog.check.workload import WorkloadConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECONDS = float(os.environ.get("LEDGERLOG_CHECK_SECONDS", "20"))


def _seed() -> int:
    seed = int(os.environ.get("LEDGERLOG_CHECK_SEED", time.time_ns() % 1_000_000))
    print(f"consistency check seed: {seed} (LEDGERLOG_CHECK_SEED={seed} replays it)")
    return seed


def _assert_valid(report: Any) -> None:
    assert report.valid, report.format()
    assert report.faults, f"no fault was applied (seed {report.config.seed})"
    assert report.counts.get("ok", 0) > 20, report.format()


@pytest.mark.timeout(240)
def test_embedded_list_append_under_faults(tmp_path: Path) -> None:
    cfg = RunConfig(
        url=str(tmp_path / "ledger"),
        out_dir=tmp_path / "run",
        clients=2,
        threads=3,
        writers=2,
        seconds=SECONDS,
        faults=("kill-writer", "pause-writer", "kill-client"),
        seed=_seed(),
        backend_options={"lease_timeout": 2.0},
        workload_config=WorkloadConfig(pause=0.005),
    )
    _assert_valid(run_check(cfg))


@pytest.mark.timeout(360)
def test_pulsar_list_append_under_faults_through_the_proxy(
    local_pulsar: Any, tmp_path: Path
) -> None:
    host, port = local_pulsar.service_url.removeprefix("pulsar://").split(":")
    proxy = TcpProxy(host, int(port), pulsar=True).start()
    ledger = f"public/default/check-{uuid.uuid4().hex[:8]}"
    query = "?lease_timeout=3&operation_timeout=10"
    try:
        cfg = RunConfig(
            url=f"{local_pulsar.service_url}/{ledger}{query}",
            client_url=f"{proxy.url}/{ledger}{query}",
            out_dir=tmp_path / "run",
            clients=2,
            threads=3,
            writers=2,
            seconds=SECONDS,
            faults=(
                "kill-writer",
                "pause-writer",
                "kill-client",
                "proxy",
                "pause-broker",
                "restart-broker",
            ),
            seed=_seed(),
            workload_config=WorkloadConfig(pause=0.005),
            fault_duration=(1.0, 5.0),
            fault_limits={"restart-broker": 1},  # a restart costs tens of seconds here
        )
        report = run_check(cfg, pulsar=local_pulsar, proxy=proxy)
        _assert_valid(report)
        # The clients' traffic really went through the proxy: lookups were answered with
        # its address, and what every client sent (at least the submitted transactions)
        # passed through it.
        assert proxy.rewrites >= cfg.clients, proxy.rewrites
        assert proxy.connections >= cfg.clients
        assert proxy.bytes_up > 100 * report.counts.get("ok", 0)
        assert proxy.bytes_down > proxy.bytes_up
    finally:
        proxy.close()
        assert local_pulsar.is_healthy(30), "the session's broker must stay healthy"


@pytest.mark.timeout(360)
def test_bookkeeper_bank_under_faults(local_bookkeeper: Any, tmp_path: Path) -> None:
    ledger = f"check-{uuid.uuid4().hex[:8]}"
    cfg = RunConfig(
        url=f"bookkeeper://{local_bookkeeper.zk_connect}/{ledger}"
        "?ensemble=3&write=3&ack=2&lease_timeout=3",
        out_dir=tmp_path / "run",
        workload="bank",
        clients=2,
        threads=3,
        writers=2,
        seconds=SECONDS,
        faults=("kill-writer", "pause-writer", "kill-client", "restart-broker"),
        seed=_seed(),
        workload_config=WorkloadConfig(pause=0.005),
        fault_duration=(1.0, 5.0),
        fault_limits={"restart-broker": 2},
    )
    _assert_valid(run_check(cfg, bookkeeper=local_bookkeeper))
    assert all(pid is not None for pid in local_bookkeeper.bookie_pids)
