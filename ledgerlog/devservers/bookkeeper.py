"""A real ZooKeeper and bookies on loopback, and the project's py4j gateway to BookKeeper.

Everything runs from jars that Maven resolves for ``java/bookkeeper/pom.xml``:

* :func:`ensure_build` builds that project once (cached under ``~/.cache/ledgerlog/``) and
  returns the Java classpath.
* :class:`LocalBookKeeper` starts ZooKeeper and N bookies, each a separate JVM (so a bookie
  can be ``kill -9``-ed), all bound to 127.0.0.1, with data in a temporary directory.
* :class:`GatewayProcess` starts ``io.ledgerlog.bk.Gateway`` and connects py4j to it.

Only the standard library is needed, except py4j for :class:`GatewayProcess`.
Every JVM started here is killed if the Python thread that started it dies (Linux
``PR_SET_PDEATHSIG``), so start them from a thread that outlives them (normally the main one).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self

from ledgerlog.devservers._common import cache_dir, free_loopback_ports, parent_death_signal

if TYPE_CHECKING:
    from py4j.java_gateway import JavaGateway

__all__ = [
    "DevServerError",
    "GatewayError",
    "GatewayProcess",
    "LocalBookKeeper",
    "ensure_build",
    "pack_entries",
    "unpack_entries",
]

_REPO_ROOT = Path(__file__).resolve().parents[2]
JAVA_PROJECT = _REPO_ROOT / "java" / "bookkeeper"
GATEWAY_MAIN = "io.ledgerlog.bk.Gateway"
ZOOKEEPER_MAIN = "org.apache.zookeeper.server.ZooKeeperServerMain"
BOOKIE_MAIN = "org.apache.bookkeeper.server.Main"
BOOKIE_SHELL_MAIN = "org.apache.bookkeeper.bookie.BookieShell"
LOOPBACK = "127.0.0.1"

# The flags BookKeeper's launch scripts use on Java 17+, plus a small, single-threaded GC:
# the machines this runs on have 2 cores shared by several JVMs.
JVM_BASE_OPTS: tuple[str, ...] = (
    "-XX:+UseSerialGC",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.util.zip=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Djava.net.preferIPv4Stack=true",
    "-Dzookeeper.admin.enableServer=false",
)


class DevServerError(RuntimeError):
    """A development server could not be built, started or stopped."""


class GatewayError(RuntimeError):
    """The gateway JVM died, or did not answer within its read timeout."""


# ---------------------------------------------------------------------------------- build


def java_executable() -> str:
    """``$LEDGERLOG_JAVA``, else ``$JAVA_HOME/bin/java``, else ``java`` on PATH."""
    explicit = os.environ.get("LEDGERLOG_JAVA")
    if explicit:
        return explicit
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise DevServerError("no java executable: install a JDK 17+ or set JAVA_HOME")
    return found


def _source_digest(project: Path) -> str:
    h = hashlib.sha256()
    files = [project / "pom.xml", *sorted((project / "src").rglob("*"))]
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(project)).encode())
            h.update(b"\0")
            h.update(f.read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:16]


def _classpath_usable(classpath: str) -> bool:
    entries = classpath.split(os.pathsep)
    return bool(entries) and all(Path(e).exists() for e in entries)


def ensure_build(*, force: bool = False, timeout: float = 900.0) -> str:
    """Build the gateway jar once and return the classpath for every JVM started here.

    The build goes to ``~/.cache/ledgerlog/bookkeeper/<hash of pom and sources>/`` (or under
    ``$LEDGERLOG_CACHE_DIR``); a later call with the same sources returns the cached
    classpath without running Maven. ``$LEDGERLOG_MVN`` overrides the ``mvn`` command.
    """
    digest = _source_digest(JAVA_PROJECT)
    base = cache_dir() / "bookkeeper"
    build_dir = base / digest
    cp_file = build_dir / "classpath.txt"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and cp_file.exists():
            cached = cp_file.read_text().strip()
            if _classpath_usable(cached):
                return cached
        mvn = os.environ.get("LEDGERLOG_MVN") or shutil.which("mvn")
        if not mvn:
            raise DevServerError("Maven (mvn) is not installed; it builds java/bookkeeper")
        deps_file = build_dir / "dependencies.txt"
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(JAVA_PROJECT / "pom.xml"),
            "package",
            "dependency:build-classpath",
            f"-Dmdep.outputFile={deps_file}",
            f"-Dledgerlog.buildDir={build_dir / 'target'}",
        ]
        try:
            done = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise DevServerError(f"Maven build timed out after {timeout:.0f} s: {cmd}") from e
        if done.returncode != 0:
            out = (done.stdout + done.stderr)[-4000:]
            raise DevServerError(f"Maven build failed ({done.returncode}): {cmd}\n{out}")
        jars = sorted((build_dir / "target").glob("ledgerlog-bookkeeper-gateway-*.jar"))
        if not jars or not deps_file.exists():
            raise DevServerError(f"Maven build produced no jar or classpath in {build_dir}")
        classpath = os.pathsep.join([str(jars[-1]), deps_file.read_text().strip()])
        tmp = cp_file.with_suffix(".tmp")
        tmp.write_text(classpath + "\n")
        tmp.replace(cp_file)
        return classpath


# ---------------------------------------------------------------------------------- helpers


def pack_entries(entries: Iterable[bytes]) -> bytes:
    """Frame entries for ``Gateway.addEntries``: ``[4-byte big-endian length][bytes]...``."""
    parts: list[bytes] = []
    for e in entries:
        parts.append(len(e).to_bytes(4, "big"))
        parts.append(e)
    return b"".join(parts)


def unpack_entries(packed: bytes) -> list[tuple[int, bytes]]:
    """Parse ``Gateway.readEntries`` output: ``[8-byte id][4-byte length][bytes]...``."""
    out: list[tuple[int, bytes]] = []
    view = memoryview(packed)
    pos = 0
    while pos < len(view):
        if pos + 12 > len(view):
            raise ValueError(f"truncated entry header at byte {pos}")
        entry_id = int.from_bytes(view[pos : pos + 8], "big", signed=True)
        length = int.from_bytes(view[pos + 8 : pos + 12], "big")
        pos += 12
        if pos + length > len(view):
            raise ValueError(f"truncated entry {entry_id} at byte {pos}")
        out.append((entry_id, bytes(view[pos : pos + length])))
        pos += length
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_loopback_ports(1)[0]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def _four_letter(port: int, word: bytes, timeout: float = 2.0) -> bytes:
    """Send a ZooKeeper four-letter command and return the whole answer (b"" on error)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
            s.sendall(word)
            chunks: list[bytes] = []
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
    except OSError:
        return b""


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def _stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    alive: Callable[[], str | None] = lambda: None,
) -> None:
    """Poll ``condition``; raise DevServerError on timeout or when ``alive()`` says why not."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if condition():
            return
        problem = alive()
        if problem:
            raise DevServerError(f"{what}: {problem}")
        if time.monotonic() >= deadline:
            raise DevServerError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


# ---------------------------------------------------------------------------------- cluster


class LocalBookKeeper:
    """ZooKeeper plus ``num_bookies`` bookies on 127.0.0.1, each its own JVM.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Ports are picked free;
    data lives in a temporary directory that :meth:`stop` removes (unless ``keep_data``).
    Bookies journal with ``journalSyncData=true``; HTTP servers and auto-recovery are off.
    """

    def __init__(
        self,
        num_bookies: int = 3,
        *,
        classpath: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        keep_data: bool = False,
        heap: str = "256m",
        start_timeout: float = 120.0,
        bookie_zk_timeout_ms: int = 6000,
        extra_bookie_conf: dict[str, str] | None = None,
    ) -> None:
        if num_bookies < 1:
            raise ValueError("num_bookies must be at least 1")
        self.num_bookies = num_bookies
        self._classpath = classpath
        self._data_dir_arg = data_dir
        self.keep_data = keep_data
        self.heap = heap
        self.start_timeout = start_timeout
        self.bookie_zk_timeout_ms = bookie_zk_timeout_ms
        self.extra_bookie_conf = dict(extra_bookie_conf or {})
        self.data_dir: Path | None = None
        self.zk_port = 0
        self.bookie_ports: list[int] = []
        self.startup_seconds = 0.0
        self._zk: subprocess.Popen[bytes] | None = None
        self._bookies: list[subprocess.Popen[bytes] | None] = []

    # -- public view

    @property
    def zk_connect(self) -> str:
        """ZooKeeper connect string, ``127.0.0.1:<port>``."""
        if not self.zk_port:
            raise DevServerError("LocalBookKeeper is not started")
        return f"{LOOPBACK}:{self.zk_port}"

    @property
    def metadata_service_uri(self) -> str:
        return f"zk+hierarchical://{self.zk_connect}/ledgers"

    @property
    def bookie_ids(self) -> list[str]:
        return [f"{LOOPBACK}:{p}" for p in self.bookie_ports]

    @property
    def bookie_pids(self) -> list[int | None]:
        """Process ids of the bookies; None for one that is not running."""
        return [p.pid if p is not None and p.poll() is None else None for p in self._bookies]

    @property
    def zk_pid(self) -> int | None:
        return self._zk.pid if self._zk is not None and self._zk.poll() is None else None

    def log_path(self, name: str) -> Path:
        """Log of a process: ``"zookeeper"``, ``"bookie-0"``, ... (kept until stop)."""
        assert self.data_dir is not None
        return self.data_dir / f"{name}.log"

    # -- lifecycle

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
        if self._zk is not None:
            raise DevServerError("already started")
        began = time.monotonic()
        if self._classpath is None:
            self._classpath = ensure_build()
        if self._data_dir_arg is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="ledgerlog-bk-"))
        else:
            self.data_dir = Path(self._data_dir_arg)
            self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            ports = free_loopback_ports(1 + self.num_bookies)
            self.zk_port, self.bookie_ports = ports[0], ports[1:]
            self._start_zookeeper()
            self._init_cluster()
            self._bookies = [self._spawn_bookie(i) for i in range(self.num_bookies)]
            for i in range(self.num_bookies):
                self._wait_bookie(i, self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop every process (bookies, then ZooKeeper) and remove the data directory."""
        for proc in self._bookies:
            if proc is not None:
                _stop_process(proc)
        if self._zk is not None:
            _stop_process(self._zk)
            self._zk = None
        if self.data_dir is not None and not self.keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    # -- faults

    def kill_bookie(self, i: int) -> int:
        """``kill -9`` bookie ``i``; returns its pid."""
        proc = self._bookies[i]
        if proc is None or proc.poll() is not None:
            raise DevServerError(f"bookie {i} is not running")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        return proc.pid

    def stop_bookie(self, i: int) -> None:
        """Stop bookie ``i`` cleanly (SIGTERM)."""
        proc = self._bookies[i]
        if proc is not None:
            _stop_process(proc)

    def restart_bookie(self, i: int, timeout: float | None = None) -> int:
        """Start bookie ``i`` again on its port and data; waits until it serves. Returns pid.

        After a ``kill -9`` the bookie's old ZooKeeper registration lasts until its session
        expires (``bookie_zk_timeout_ms``); the new process waits for that before serving.
        The new bookie dies with the *thread* that calls this (the parent-death signal is per
        thread): call it from a thread that outlives the bookie's use.
        """
        proc = self._bookies[i]
        if proc is not None and proc.poll() is None:
            raise DevServerError(f"bookie {i} is still running (pid {proc.pid})")
        self._bookies[i] = self._spawn_bookie(i)
        self._wait_bookie(i, self.start_timeout if timeout is None else timeout)
        new = self._bookies[i]
        assert new is not None
        return new.pid

    def registered_bookies(self) -> list[str]:
        """Bookie ids registered writable in ZooKeeper (from the ``dump`` command)."""
        dump = _four_letter(self.zk_port, b"dump").decode("utf-8", "replace")
        prefix = "/ledgers/available/"
        found: list[str] = []
        for line in dump.splitlines():
            path = line.strip()
            if path.startswith(prefix) and "/" not in path[len(prefix) :]:
                found.append(path[len(prefix) :])
        return sorted(set(found))

    # -- internals

    def _java(self, name: str, main: str, args: Sequence[str], heap: str) -> list[str]:
        assert self._classpath is not None
        return [
            java_executable(),
            f"-Xmx{heap}",
            f"-XX:MaxDirectMemorySize={heap}",
            *JVM_BASE_OPTS,
            f"-Dledgerlog.process={name}",
            "-cp",
            self._classpath,
            main,
            *args,
        ]

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        assert self.data_dir is not None
        with open(self.log_path(name), "ab") as log:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                preexec_fn=parent_death_signal(signal.SIGKILL),
            )

    def _dead(self, name: str, proc: subprocess.Popen[bytes] | None) -> str | None:
        if proc is None:
            return "not started"
        rc = proc.poll()
        if rc is None:
            return None
        return f"process exited with code {rc}; log tail:\n{_tail(self.log_path(name))}"

    def _start_zookeeper(self) -> None:
        assert self.data_dir is not None
        zk_dir = self.data_dir / "zookeeper"
        zk_dir.mkdir(exist_ok=True)
        cfg = self.data_dir / "zoo.cfg"
        cfg.write_text(
            "\n".join(
                [
                    "tickTime=1000",
                    "initLimit=10",
                    "syncLimit=5",
                    f"dataDir={zk_dir}",
                    f"clientPort={self.zk_port}",
                    f"clientPortAddress={LOOPBACK}",
                    "maxClientCnxns=0",
                    "admin.enableServer=false",
                    "4lw.commands.whitelist=ruok,dump,srvr,stat",
                    "",
                ]
            )
        )
        self._zk = self._spawn(
            "zookeeper", self._java("zookeeper", ZOOKEEPER_MAIN, [str(cfg)], "128m")
        )
        _wait_until(
            lambda: _four_letter(self.zk_port, b"ruok") == b"imok",
            self.start_timeout,
            f"ZooKeeper on {self.zk_connect}",
            lambda: self._dead("zookeeper", self._zk),
        )

    def _bookie_conf(self, i: int) -> Path:
        assert self.data_dir is not None
        home = self.data_dir / f"bookie-{i}"
        (home / "journal").mkdir(parents=True, exist_ok=True)
        (home / "ledgers").mkdir(parents=True, exist_ok=True)
        settings = {
            "bookiePort": str(self.bookie_ports[i]),
            "listeningInterface": "lo",
            "advertisedAddress": LOOPBACK,
            "allowLoopback": "true",
            "useHostNameAsBookieID": "false",
            "metadataServiceUri": self.metadata_service_uri,
            "zkTimeout": str(self.bookie_zk_timeout_ms),
            "journalDirectories": str(home / "journal"),
            "ledgerDirectories": str(home / "ledgers"),
            "journalSyncData": "true",
            "httpServerEnabled": "false",
            "autoRecoveryDaemonEnabled": "false",
            "statsProviderClass": "org.apache.bookkeeper.stats.NullStatsProvider",
            "journalPreAllocSizeMB": "4",
            "diskUsageThreshold": "0.99",
            "diskUsageWarnThreshold": "0.98",
            **self.extra_bookie_conf,
        }
        conf = self.data_dir / f"bookie-{i}.conf"
        conf.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        return conf

    def _init_cluster(self) -> None:
        """Create BookKeeper's metadata in ZooKeeper (``bookkeeper shell initnewcluster``)."""
        conf = self._bookie_conf(0)
        assert self.data_dir is not None
        log = self.log_path("initnewcluster")
        cmd = self._java(
            "initnewcluster", BOOKIE_SHELL_MAIN, ["-conf", str(conf), "initnewcluster"], "128m"
        )
        with open(log, "ab") as out:
            try:
                rc = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    timeout=self.start_timeout,
                    preexec_fn=parent_death_signal(signal.SIGKILL),
                    check=False,
                ).returncode
            except subprocess.TimeoutExpired as e:
                raise DevServerError(f"initnewcluster timed out; log:\n{_tail(log)}") from e
        if rc != 0:
            raise DevServerError(f"initnewcluster failed with code {rc}; log:\n{_tail(log)}")

    def _spawn_bookie(self, i: int) -> subprocess.Popen[bytes]:
        conf = self._bookie_conf(i)
        return self._spawn(
            f"bookie-{i}", self._java(f"bookie-{i}", BOOKIE_MAIN, ["--conf", str(conf)], self.heap)
        )

    def _wait_bookie(self, i: int, timeout: float) -> None:
        # A bookie registers in ZooKeeper before it opens its port: both must hold.
        bookie_id = self.bookie_ids[i]
        _wait_until(
            lambda: _port_open(self.bookie_ports[i]) and bookie_id in self.registered_bookies(),
            timeout,
            f"bookie {i} ({bookie_id})",
            lambda: self._dead(f"bookie-{i}", self._bookies[i]),
        )


# ---------------------------------------------------------------------------------- gateway


class _CheckedEntryPoint:
    """The gateway's entry point, turning a lost connection into :class:`GatewayError`."""

    def __init__(self, owner: GatewayProcess, entry_point: Any) -> None:
        self._owner = owner
        self._entry_point = entry_point

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._entry_point, name)

        def call(*args: Any) -> Any:
            from py4j.protocol import Py4JError, Py4JJavaError, Py4JNetworkError

            try:
                return method(*args)
            except Py4JJavaError:
                raise  # a Java exception: the gateway is fine
            except Py4JNetworkError as e:
                raise self._owner.failure(name) from e
            except Py4JError as e:
                # py4j reports a lost or timed-out connection as a bare "An error occurred
                # while calling o0.name" (no trace); anything else is a protocol error.
                if not self._owner.is_alive() or "\n" not in str(e).strip():
                    raise self._owner.failure(name) from e
                raise

        return call


class GatewayProcess:
    """The ``io.ledgerlog.bk.Gateway`` JVM and a py4j ``JavaGateway`` connected to it.

    ``start()`` (or ``with GatewayProcess() as gp:``) launches the JVM on a free loopback port
    with a random auth token and connects; ``entry_point`` is the Java ``Gateway`` object,
    whose calls raise :class:`GatewayError` if the JVM dies or does not answer within
    ``read_timeout`` seconds. Java exceptions come as ``py4j.protocol.Py4JJavaError``.
    The JVM also exits when this Python process goes (it watches its stdin).
    """

    def __init__(
        self,
        classpath: str | None = None,
        *,
        tcp_nodelay: bool = True,
        heap: str = "256m",
        read_timeout: float = 180.0,
        start_timeout: float = 60.0,
        java_opts: Sequence[str] = (),
        log_level: str = "WARN",
    ) -> None:
        self._classpath = classpath
        self.tcp_nodelay = tcp_nodelay
        self.heap = heap
        self.read_timeout = read_timeout
        self.start_timeout = start_timeout
        self.java_opts = tuple(java_opts)
        self.log_level = log_level
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._gateway: JavaGateway | None = None
        self._log: IO[bytes] | None = None
        self._log_path: Path | None = None
        self._drain: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def gateway(self) -> JavaGateway:
        if self._gateway is None:
            raise GatewayError("gateway is not started")
        return self._gateway

    @property
    def entry_point(self) -> Any:
        return _CheckedEntryPoint(self, self.gateway.entry_point)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> JavaGateway:
        """Launch the JVM, read its port, connect; returns the connected JavaGateway."""
        from py4j.java_gateway import GatewayParameters, JavaGateway

        if self._proc is not None:
            raise GatewayError("already started")
        classpath = self._classpath or ensure_build()
        token = secrets.token_hex(16)
        fd, log_name = tempfile.mkstemp(prefix="ledgerlog-gateway-", suffix=".log")
        os.close(fd)
        self._log_path = Path(log_name)
        self._log = open(self._log_path, "ab")  # noqa: SIM115 - closed in close()
        cmd = [
            java_executable(),
            f"-Xmx{self.heap}",
            *JVM_BASE_OPTS,
            f"-Dledgerlog.gateway.tcpNoDelay={'true' if self.tcp_nodelay else 'false'}",
            f"-Dledgerlog.log.level={self.log_level}",
            *self.java_opts,
            "-cp",
            classpath,
            GATEWAY_MAIN,
            "0",
            "--exit-on-stdin-eof",
        ]
        env = dict(os.environ, LEDGERLOG_GATEWAY_TOKEN=token)
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            preexec_fn=parent_death_signal(signal.SIGKILL),
        )
        try:
            self.port = self._read_port()
            self._gateway = JavaGateway(
                gateway_parameters=GatewayParameters(
                    address=LOOPBACK,
                    port=self.port,
                    auth_token=token,
                    auto_convert=False,
                    eager_load=True,
                    read_timeout=self.read_timeout,
                )
            )
        except BaseException:
            self.close()
            raise
        return self._gateway

    def _read_port(self) -> int:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        stdout = proc.stdout
        deadline = time.monotonic() + self.start_timeout
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(stdout, selectors.EVENT_READ)
            while True:
                for line in buf.split(b"\n")[:-1]:
                    text = line.decode("utf-8", "replace").strip()
                    if text.startswith("LEDGERLOG_GATEWAY_PORT="):
                        self._drain = threading.Thread(
                            target=self._drain_stdout, args=(stdout,), daemon=True
                        )
                        self._drain.start()
                        return int(text.split("=", 1)[1])
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GatewayError(
                        f"gateway printed no port within {self.start_timeout:.0f} s; "
                        f"log tail:\n{self._log_tail()}"
                    )
                if sel.select(min(remaining, 0.5)):
                    chunk = os.read(stdout.fileno(), 4096)
                    if not chunk:
                        proc.wait(5)
                        raise GatewayError(
                            f"gateway JVM exited with code {proc.returncode} before listening; "
                            f"log tail:\n{self._log_tail()}"
                        )
                    buf += chunk

    def _drain_stdout(self, stdout: IO[bytes]) -> None:
        # Keep the pipe from filling up if a library prints to stdout.
        log = self._log
        with contextlib.suppress(OSError, ValueError):
            while True:
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    return
                if log is not None and not log.closed:
                    log.write(chunk)
                    log.flush()

    def _log_tail(self) -> str:
        if self._log is not None and not self._log.closed:
            self._log.flush()
        return _tail(self._log_path) if self._log_path else ""

    def failure(self, during: str) -> GatewayError:
        """The error to raise when a call through the gateway lost its connection."""
        proc = self._proc
        if proc is None:
            return GatewayError(f"{during}: gateway is not started")
        try:
            rc = proc.wait(1.0)
        except subprocess.TimeoutExpired:
            return GatewayError(
                f"{during}: gateway JVM (pid {proc.pid}) did not answer within "
                f"{self.read_timeout:.0f} s or dropped the connection"
            )
        return GatewayError(
            f"{during}: gateway JVM (pid {proc.pid}) exited with code {rc}; "
            f"log tail:\n{self._log_tail()}"
        )

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Disconnect, end the JVM (asking first, then SIGKILL) and remove its log."""
        proc = self._proc
        if self._gateway is not None:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(Exception):
                    self._gateway.entry_point.exit()
            with contextlib.suppress(Exception):
                self._gateway.close()
            self._gateway = None
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if self._drain is not None:
                self._drain.join(2)
                self._drain = None
            if proc.stdout is not None:
                with contextlib.suppress(OSError):
                    proc.stdout.close()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None
