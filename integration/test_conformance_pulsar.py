"""The backend conformance suite on a real Pulsar broker, once per variant of the
``pulsar_target`` fixture (integration/conftest.py): the local JVM standalone, the official
container through testcontainers, an external cluster (the last two skip when absent)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from ledgerlog.backends.base import Backend
from ledgerlog.testing.conformance import *  # noqa: F403
from ledgerlog.testing.conformance import Harness

pytest.importorskip("pulsar")
from ledgerlog.backends.pulsar import PulsarBackend

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LEASE_TIMEOUT = 2.0


class PulsarHarness(Harness):
    # Lease expiry plus the broker's one-second failover delay, with room for a busy box.
    takeover_timeout = 30.0

    def __init__(self, target: Any) -> None:
        self.target = target
        self._opened: list[PulsarBackend] = []

    def new_ledger(self) -> str:
        return f"conf-{uuid.uuid4().hex[:12]}"

    def open(self, ledger: str) -> Backend:
        backend = PulsarBackend.from_url(
            self.target.url(ledger),
            lease_timeout=LEASE_TIMEOUT,
            operation_timeout=15,
            append_timeout=30,
        )
        self._opened.append(backend)
        return backend

    def depose(self, backend: Backend) -> None:
        # A hung writer stops renewing its lease while its producer stays attached; a
        # standby must then fence it.
        assert isinstance(backend, PulsarBackend)
        writers = backend.active_writers
        assert writers, "no elected writer to depose"
        for w in writers:
            w.stop_heartbeat()

    def close(self) -> None:
        for b in self._opened:
            b.close()


@pytest.fixture
def harness(pulsar_target: Any) -> Iterator[Harness]:
    h = PulsarHarness(pulsar_target)
    yield h
    h.close()
