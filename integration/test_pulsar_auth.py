"""Token authentication end to end: a local broker with ``token_auth=True``.

ledgerlog connects with ``?token=...`` in its ledger URL and commits transactions; without
a token, or with one signed by another key, opening the ledger fails with a typed
ledgerlog error that says the connection was refused, within a bounded time (the broker
drops the CONNECT and the C++ client retries until ``operation_timeout``: no hang).
"""

from __future__ import annotations

import time
import uuid

import pytest

import ledgerlog
from ledgerlog.devservers.pulsar import LocalPulsar
from ledgerlog.errors import BackendError, ConfigError

pytest.importorskip("pulsar")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

OPERATION_TIMEOUT = 5


def test_token_auth_commits_with_a_token_and_is_refused_without() -> None:
    with LocalPulsar(token_auth=True) as secured:
        ledger = f"auth-{uuid.uuid4().hex[:10]}"
        base = f"{secured.service_url}/public/default/{ledger}"
        token = secured.mint_token("ledgerlog-service")
        with ledgerlog.open(
            f"{base}?token={token}&lease_timeout=2",
            client_id="authed",
            writer="auto",
            timeout=30,
        ) as db:
            db.wait_writer(60)
            for i in range(5):
                with db.transaction() as tx:
                    tx.put(f"k{i}", i)
                assert tx.decision is not None and tx.decision.committed
            assert db.sync(30) >= 5
            assert db.get("k4") == 4

        forged = secured.mint_token("ledgerlog-service")[:-4] + "AAAA"
        for query in ("?", f"?token={forged}&"):
            url = f"{base}{query}operation_timeout={OPERATION_TIMEOUT}"
            started = time.monotonic()
            with pytest.raises((BackendError, ConfigError)) as info:
                client = ledgerlog.open(url, client_id="anonymous", writer="auto", timeout=10)
                client.close()  # not reached when the broker refuses, as it must
            elapsed = time.monotonic() - started
            message = str(info.value)
            assert "refused" in message and secured.service_url in message, message
            assert token not in message and forged not in message
            # operation_timeout bounds each broker call; opening makes one before failing.
            assert elapsed < 6 * OPERATION_TIMEOUT, f"refusal took {elapsed:.1f}s"
        log = secured.log_path.read_text(encoding="utf-8", errors="replace")
        assert "Failed to authenticate" in log


def test_an_empty_token_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="token"):
        ledgerlog.open("pulsar://127.0.0.1:1/public/default/x?token=", writer=None)
