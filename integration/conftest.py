"""Fixtures shared by the integration suite.

One Pulsar standalone serves the whole session: starting one costs tens of seconds of a
2-core machine, and every test isolates itself with fresh topic or ledger names anyway.
Tests that restart or pause it must leave it running and healthy.

``pulsar_target`` runs a test against each of three Pulsar setups (the test ids carry the
variant's name, which the root conftest.py relies on to allow the last two to skip):

- ``local-jvm``: the session's :class:`LocalPulsar` (always; never skips);
- ``testcontainers``: the official ``apachepulsar/pulsar:4.0.7`` image in standalone mode,
  with the same config essentials as ``java/pulsar/standalone.conf``, when a Docker engine
  answers (``pip install -e '.[docker]'``); skips with the reason otherwise;
- ``external``: a cluster named by ``LEDGERLOG_PULSAR_URL`` (``pulsar://host:6650`` or
  ``pulsar+ssl://host:6651``), with ``LEDGERLOG_PULSAR_TOKEN``, the ``tls_*`` options of a
  ledger URL as ``LEDGERLOG_PULSAR_TLS_*`` (e.g. ``LEDGERLOG_PULSAR_TLS_TRUST_CERTS_FILE_PATH``)
  and ``LEDGERLOG_PULSAR_NAMESPACE`` (``tenant/namespace``, default ``public/default``);
  skips when ``LEDGERLOG_PULSAR_URL`` is unset.

Fault tests (kill, pause, restart of the broker process) use ``local_pulsar`` directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ledgerlog.devservers._common import free_loopback_ports
from ledgerlog.devservers.pulsar import LocalPulsar, project_java_dir

# The C++ Pulsar client logs every connection at INFO; keep test output readable.
logging.getLogger("ledgerlog.pulsar.client").setLevel(logging.WARNING)

PULSAR_IMAGE = "apachepulsar/pulsar:4.0.7"
DOCKER_PROBE_TIMEOUT = 3.0
CONTAINER_START_TIMEOUT = 240.0

#: The standalone.conf keys the backend's guarantees rest on (deduplication, nothing ever
#: trimmed or deleted behind readers, prompt delivery); the container gets the same values.
ESSENTIAL_CONFIG = (
    "brokerDeduplicationEnabled",
    "brokerDeduplicationMaxNumberOfProducers",
    "brokerDeduplicationEntriesInterval",
    "brokerDeduplicationProducerInactivityTimeoutMinutes",
    "defaultRetentionTimeInMinutes",
    "defaultRetentionSizeInMB",
    "brokerDeleteInactiveTopicsEnabled",
    "subscriptionExpirationTimeMinutes",
    "ttlDurationDefaultInSeconds",
    "backlogQuotaCheckEnabled",
    "backlogQuotaDefaultLimitBytes",
    "backlogQuotaDefaultLimitSecond",
    "allowAutoTopicCreation",
    "allowAutoTopicCreationType",
    "allowAutoSubscriptionCreation",
    "autoSkipNonRecoverableData",
    "managedLedgerAddEntryTimeoutSeconds",
    "managedLedgerReadEntryTimeoutSeconds",
    "managedLedgerNewEntriesCheckDelayInMillis",
    "transactionCoordinatorEnabled",
    "journalSyncData",
    "journalMaxGroupWaitMSec",
)


@dataclass(frozen=True)
class PulsarTarget:
    """Where a test's ledgers live: a service URL plus what a client needs to reach it."""

    name: str
    service_url: str
    admin_url: str | None = None
    token: str | None = None
    namespace: str = "public/default"
    params: dict[str, str] = field(default_factory=dict)  # tls_* and other URL options

    def url(self, ledger: str, **options: Any) -> str:
        """A ``ledgerlog.open`` URL for `ledger`, carrying the token and TLS options."""
        query = dict(self.params)
        if self.token:
            query["token"] = self.token
        query.update({k: str(v) for k, v in options.items()})
        tail = f"?{urllib.parse.urlencode(query)}" if query else ""
        return f"{self.service_url}/{self.namespace}/{ledger}{tail}"


# -- local JVM -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def local_pulsar() -> Iterator[LocalPulsar]:
    """A LocalPulsar (broker + bookie in one JVM) for the whole session, stopped at its end."""
    server = LocalPulsar()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[pytest.TestReport]:
    """A failed test that used the session's broker reports the tail of the broker's log
    with it: the broker's data directory, log included, is gone once the session ends,
    and a broker-side stall (a subscribe that timed out after 30 s, say) is otherwise
    undiagnosable after the fact."""
    report: pytest.TestReport = yield
    if report.when == "call" and report.failed:
        server = getattr(item, "funcargs", {}).get("local_pulsar")
        if isinstance(server, LocalPulsar):
            report.sections.append(("broker log (last 80 lines)", server.log_tail(80)))
    return report


# -- testcontainers --------------------------------------------------------------------------


def docker_unavailable_reason(timeout: float = DOCKER_PROBE_TIMEOUT) -> str | None:
    """None when testcontainers is installed and a Docker engine answers a ping within
    `timeout`; otherwise why not, in words fit for a skip reason."""
    try:
        from testcontainers.core.docker_client import DockerClient
    except ImportError:
        return "testcontainers is not installed (pip install -e '.[docker]')"
    try:
        client = DockerClient(timeout=timeout)
        try:
            client.client.ping()
        finally:
            with contextlib.suppress(Exception):
                client.client.close()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = os.environ.get("DOCKER_HOST", "the default socket")
        return f"no Docker engine answers at {where} within {timeout}s: {first[:200]}"
    return None


def _standalone_conf_values(keys: tuple[str, ...]) -> dict[str, str]:
    values: dict[str, str] = {}
    text = (project_java_dir() / "standalone.conf").read_text(encoding="utf-8")
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            if key.strip() in keys:
                values[key.strip()] = value.strip()
    return values


def _wait_for_http_broker(admin_url: str, host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "not probed"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{admin_url}/admin/v2/brokers/health", timeout=5) as r:
                healthy = r.status == 200
            with urllib.request.urlopen(f"{admin_url}/admin/v2/namespaces/public", timeout=5) as r:
                has_ns = "public/default" in r.read().decode("utf-8", "replace")
            if healthy and has_ns:
                with socket.create_connection((host, port), timeout=2):
                    return
            last = "not ready"
        except (OSError, urllib.error.URLError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise TimeoutError(f"Pulsar container not ready after {timeout}s ({last})")


@contextlib.contextmanager
def pulsar_container() -> Iterator[PulsarTarget]:
    """The official image as a standalone. The broker listens and advertises on the same
    port numbers inside and outside the container, so the address a topic lookup returns
    is one the host can reach."""
    from testcontainers.core.container import DockerContainer

    broker_port, web_port = free_loopback_ports(2)
    container = DockerContainer(PULSAR_IMAGE)
    # The Docker host as testcontainers reaches it (localhost, or DOCKER_HOST's host).
    host = container.get_docker_client().host()
    env = {f"PULSAR_PREFIX_{k}": v for k, v in _standalone_conf_values(ESSENTIAL_CONFIG).items()}
    env.update(
        {
            "PULSAR_PREFIX_brokerServicePort": str(broker_port),
            "PULSAR_PREFIX_webServicePort": str(web_port),
            "PULSAR_PREFIX_bindAddress": "0.0.0.0",
            "PULSAR_PREFIX_advertisedAddress": host,
            "PULSAR_MEM": "-Xms256m -Xmx1g -XX:MaxDirectMemorySize=512m",
        }
    )
    container.with_envs(**env)
    container.with_bind_ports(broker_port, broker_port)
    container.with_bind_ports(web_port, web_port)
    container.with_command(
        [
            "sh",
            "-c",
            "bin/apply-config-from-env.py conf/standalone.conf && "
            "exec bin/pulsar standalone -nfw -nss",
        ]
    )
    container.start()
    try:
        admin_url = f"http://{host}:{web_port}"
        try:
            _wait_for_http_broker(admin_url, host, broker_port, CONTAINER_START_TIMEOUT)
        except TimeoutError as exc:
            out, err = container.get_logs()
            tail = (out + err).decode("utf-8", "replace").splitlines()[-40:]
            raise RuntimeError(f"{exc}\n" + "\n".join(tail)) from None
        yield PulsarTarget("testcontainers", f"pulsar://{host}:{broker_port}", admin_url)
    finally:
        container.stop()


@pytest.fixture(scope="session")
def testcontainers_pulsar() -> Iterator[PulsarTarget]:
    reason = docker_unavailable_reason()
    if reason is not None:
        pytest.skip(f"testcontainers variant: {reason}")
    with pulsar_container() as target:
        yield target


# -- external --------------------------------------------------------------------------------

EXTERNAL_PREFIX = "LEDGERLOG_PULSAR_"


def external_target(environ: dict[str, str] | None = None) -> PulsarTarget | None:
    """The cluster the environment names, or None when ``LEDGERLOG_PULSAR_URL`` is unset."""
    env = dict(os.environ if environ is None else environ)
    url = env.get(f"{EXTERNAL_PREFIX}URL", "").strip()
    if not url:
        return None
    params = {
        key[len(EXTERNAL_PREFIX) :].lower(): value
        for key, value in env.items()
        if key.startswith(f"{EXTERNAL_PREFIX}TLS_") or key == f"{EXTERNAL_PREFIX}USE_TLS"
    }
    return PulsarTarget(
        "external",
        url.rstrip("/"),
        admin_url=env.get(f"{EXTERNAL_PREFIX}ADMIN_URL") or None,
        token=env.get(f"{EXTERNAL_PREFIX}TOKEN") or None,
        namespace=env.get(f"{EXTERNAL_PREFIX}NAMESPACE", "public/default").strip("/"),
        params=params,
    )


@pytest.fixture(scope="session")
def external_pulsar() -> PulsarTarget:
    target = external_target()
    if target is None:
        pytest.skip(
            "external variant: LEDGERLOG_PULSAR_URL is not set (optionally also "
            "LEDGERLOG_PULSAR_TOKEN, LEDGERLOG_PULSAR_TLS_*, LEDGERLOG_PULSAR_NAMESPACE)"
        )
    return target


# -- the parametrized fixture ----------------------------------------------------------------

PULSAR_VARIANTS = ("local-jvm", "testcontainers", "external")


@pytest.fixture(scope="session", params=PULSAR_VARIANTS)
def pulsar_target(request: pytest.FixtureRequest) -> PulsarTarget:
    """The same test against the local JVM broker, the official container, an external
    cluster (the test id names the variant)."""
    if request.param == "local-jvm":
        local: LocalPulsar = request.getfixturevalue("local_pulsar")
        return PulsarTarget("local-jvm", local.service_url, local.admin_url)
    if request.param == "testcontainers":
        target: PulsarTarget = request.getfixturevalue("testcontainers_pulsar")
        return target
    external: PulsarTarget = request.getfixturevalue("external_pulsar")
    return external


# ---------------------------------------------------------------------------- BookKeeper
# (BookKeeper backend block: one ZooKeeper + 4 bookies for the session, each a JVM.)


@pytest.fixture(scope="session")
def local_bookkeeper() -> Iterator[object]:
    """A LocalBookKeeper (ZooKeeper + 4 bookies) for the whole session, stopped at its end.
    Four, for ledgers of ensemble 3: new ledgers (an election, a new intake producer) can
    only be created while a bookie is down if bookies >= ensemble + 1.
    Tests that kill a bookie must restart it before they return."""
    import shutil

    if shutil.which("java") is None or shutil.which("mvn") is None:
        pytest.skip("needs java and mvn")
    from ledgerlog.devservers.bookkeeper import LocalBookKeeper

    with LocalBookKeeper(4) as cluster:
        yield cluster


# ---------------------------------------------------------------------------- PostgreSQL
# (PostgreSQL view block: one LocalPostgres for the session, a server from the Debian
# package's binaries on 127.0.0.1; tests isolate themselves with a database each.)


@pytest.fixture(scope="session")
def local_postgres() -> Iterator[object]:
    """A LocalPostgres for the whole session, stopped (and its data removed) at its end.
    Never skips: .ci/run installs the server package when it is missing."""
    from ledgerlog.devservers.postgres import LocalPostgres

    with LocalPostgres() as server:
        yield server
