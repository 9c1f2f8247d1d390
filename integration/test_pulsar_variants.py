"""The ``pulsar_target`` variants themselves (integration/conftest.py).

Where no Docker engine answers, the testcontainers variant must skip with a clear reason,
quickly, never error; the external variant is configured from the environment only.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _fixtures() -> ModuleType:
    """integration/conftest.py as a plain module (``import conftest`` is ambiguous here)."""
    name = "_ledgerlog_integration_conftest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _dead_docker_host() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"  # nothing listens there once the socket is closed


def test_testcontainers_probe_names_why_without_an_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("testcontainers", reason="testcontainers is not installed")
    monkeypatch.setenv("DOCKER_HOST", _dead_docker_host())
    started = time.monotonic()
    reason = _fixtures().docker_unavailable_reason(timeout=2.0)
    assert reason is not None and "no Docker engine answers" in reason, reason
    assert time.monotonic() - started < 10


def test_testcontainers_variant_skips_cleanly_without_an_engine() -> None:
    """The conformance suite's testcontainers variant, in a pytest of its own with a
    Docker host that does not answer: every test skips with the reason, nothing errors,
    and the local broker is never started for it."""
    env = dict(os.environ)
    env["DOCKER_HOST"] = _dead_docker_host()
    env.pop("LEDGERLOG_REQUIRE_INTEGRATION", None)
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "integration/test_conformance_pulsar.py",
            "-k",
            "testcontainers",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    summary = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ skipped, \d+ deselected in [\d.]+s", summary), out
    assert "testcontainers variant: no Docker engine answers" in out, out
    assert time.monotonic() - started < 90


def test_external_variant_reads_its_environment() -> None:
    target = _fixtures().external_target(
        {
            "LEDGERLOG_PULSAR_URL": "pulsar+ssl://pulsar.example:6651/",
            "LEDGERLOG_PULSAR_TOKEN": "tok",
            "LEDGERLOG_PULSAR_TLS_TRUST_CERTS_FILE_PATH": "/etc/ca.pem",
            "LEDGERLOG_PULSAR_NAMESPACE": "acme/ledgers",
        }
    )
    assert target is not None and target.name == "external"
    url = target.url("orders", lease_timeout=2)
    assert url.startswith("pulsar+ssl://pulsar.example:6651/acme/ledgers/orders?")
    assert "token=tok" in url and "tls_trust_certs_file_path=%2Fetc%2Fca.pem" in url
    assert _fixtures().external_target({}) is None
    from ledgerlog.backends.pulsar import PulsarBackend

    backend = PulsarBackend.from_url(url)  # every passed-through option is one it knows
    try:
        assert backend.topic == "persistent://acme/ledgers/orders" and backend.has_auth_token
    finally:
        backend.close()
