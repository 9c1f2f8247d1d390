"""The backend conformance suite on a real ZooKeeper + 4 bookies (one ensemble per session),
with 3/3/2 quorums; again with a writer rolling its BookKeeper ledger every 2 entries."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("py4j")

from ledgerlog.backends.base import Backend
from ledgerlog.backends.bookkeeper import BookKeeperBackend
from ledgerlog.testing.conformance import *  # noqa: F403
from ledgerlog.testing.conformance import Harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LEASE_TIMEOUT = 2.0


class BookKeeperHarness(Harness):
    takeover_timeout = 20.0

    def __init__(self, cluster: Any, roll_entries: int | None = None) -> None:
        self.cluster = cluster
        self.roll = "" if roll_entries is None else f"&roll_entries={roll_entries}"
        self._opened: list[BookKeeperBackend] = []

    def new_ledger(self) -> str:
        return f"conf-{uuid.uuid4().hex[:12]}"

    def open(self, ledger: str) -> Backend:
        backend = BookKeeperBackend.from_url(
            f"bookkeeper://{self.cluster.zk_connect}/{ledger}?ensemble=3&write=3&ack=2" + self.roll,
            lease_timeout=LEASE_TIMEOUT,
        )
        self._opened.append(backend)
        return backend

    def depose(self, backend: Backend) -> None:
        # A hung writer stops renewing its lease (its JVM and ZooKeeper session live on).
        assert isinstance(backend, BookKeeperBackend)
        assert backend.active_writers, "no elected writer to depose"
        for w in backend.active_writers:
            w.stop_heartbeat()

    def close(self) -> None:
        for b in self._opened:
            b.close()


@pytest.fixture(scope="module")
def gateway_pin(local_bookkeeper: Any) -> Iterator[BookKeeperBackend]:
    """Keeps the process's shared gateway JVM up between tests (each test closes its own
    backends, which would otherwise stop and restart it every time)."""
    pin = BookKeeperBackend(local_bookkeeper.zk_connect, "pin", lease_timeout=LEASE_TIMEOUT)
    yield pin
    pin.close()


@pytest.fixture(params=[None, 2], ids=["default", "rolling"])
def harness(
    request: pytest.FixtureRequest, local_bookkeeper: Any, gateway_pin: BookKeeperBackend
) -> Iterator[Harness]:
    # "rolling": a writer moves to a new BookKeeper ledger every 2 entries, so every
    # conformance scenario also crosses rollovers.
    h = BookKeeperHarness(local_bookkeeper, request.param)
    yield h
    h.close()
