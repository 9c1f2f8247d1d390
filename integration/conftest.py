"""Fixtures shared by the integration suite.

One Pulsar standalone serves the whole session: starting one costs tens of seconds of a
2-core machine, and every test isolates itself with fresh topic or ledger names anyway.
Tests that restart or pause it must leave it running and healthy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from ledgerlog.devservers.pulsar import LocalPulsar

# The C++ Pulsar client logs every connection at INFO; keep test output readable.
logging.getLogger("ledgerlog.pulsar.client").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def local_pulsar() -> Iterator[LocalPulsar]:
    """A LocalPulsar (broker + bookie in one JVM) for the whole session, stopped at its end."""
    server = LocalPulsar()
    server.start()
    try:
        yield server
    finally:
        server.stop()
