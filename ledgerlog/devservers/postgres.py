"""Run a real PostgreSQL server from the Debian package's binaries, for tests and development.

:class:`LocalPostgres` runs ``initdb`` into a fresh temporary directory and starts
``postgres`` on it: listening on 127.0.0.1 only, on a free port, with its unix socket in
the same temporary directory, ``trust`` authentication for loopback and the socket, and
``fsync=on`` (the crash tests rely on a commit being durable). It never touches the
package's own cluster or its service (``/var/lib/postgresql``, ``pg_ctlcluster``).

PostgreSQL refuses to run as root: when this process is root, the server runs as the
system user ``postgres`` (created with ``useradd --system`` if missing), which owns the
temporary directory. :meth:`LocalPostgres.stop` shuts the server down (fast shutdown,
then immediate, then SIGKILL) and removes the directory. The server gets SIGQUIT if the
Python thread that started it dies (Linux ``PR_SET_PDEATHSIG``).

Only the standard library is used here; the binaries come from ``apt-get install
postgresql`` (found under ``/usr/lib/postgresql/<version>/bin``, newest first, or in
``LEDGERLOG_PG_BIN``).

Command line::

    python -m ledgerlog.devservers.postgres     # run in the foreground, print the DSN
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from ledgerlog.devservers._common import free_loopback_ports, parent_death_signal

__all__ = ["LocalPostgres", "PostgresStartError", "find_bin_dir", "main"]

LOOPBACK = "127.0.0.1"
SUPERUSER = "postgres"
DEFAULT_RUN_AS = "postgres"
_BIN_GLOB = "/usr/lib/postgresql/*/bin"


class PostgresStartError(RuntimeError):
    """The server binaries are missing, or the server did not start."""


def find_bin_dir() -> Path:
    """The directory with ``initdb`` and ``postgres``: ``LEDGERLOG_PG_BIN``, else the
    newest ``/usr/lib/postgresql/<version>/bin``, else wherever ``postgres`` is on PATH."""
    env = os.environ.get("LEDGERLOG_PG_BIN", "").strip()
    candidates: list[Path] = []
    if env:
        candidates.append(Path(env))

    def version(p: str) -> tuple[int, ...]:
        m = re.search(r"/postgresql/([0-9.]+)/bin", p)
        return tuple(int(x) for x in m.group(1).split(".") if x) if m else ()

    candidates.extend(Path(p) for p in sorted(glob.glob(_BIN_GLOB), key=version, reverse=True))
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).parent)
    for c in candidates:
        if (c / "postgres").is_file() and (c / "initdb").is_file():
            return c
    raise PostgresStartError(
        "no PostgreSQL server binaries found (looked in "
        f"{env or '$LEDGERLOG_PG_BIN (unset)'}, {_BIN_GLOB}, PATH); on Debian: "
        "apt-get install -y postgresql"
    )


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    proc = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--shell", "/bin/false", name],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return pwd.getpwnam(name)  # created now, or by a concurrent caller
    except KeyError:
        raise PostgresStartError(
            f"PostgreSQL cannot run as root and user {name!r} could not be created: "
            f"{proc.stderr.strip() or proc.returncode}"
        ) from None


class LocalPostgres:
    """A throwaway PostgreSQL server on 127.0.0.1; use as a context manager.

    >>> with LocalPostgres() as pg:          # doctest: +SKIP
    ...     conn = psycopg.connect(pg.dsn)
    """

    def __init__(
        self,
        *,
        bin_dir: str | os.PathLike[str] | None = None,
        run_as: str = DEFAULT_RUN_AS,
        port: int | None = None,
        start_timeout: float = 60.0,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.bin_dir = Path(bin_dir) if bin_dir is not None else find_bin_dir()
        self.run_as = run_as
        self.start_timeout = start_timeout
        self.settings = dict(settings or {})
        self._fixed_port = port
        self.port = 0
        self.base_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._uid: int | None = None
        self._gid: int | None = None

    # -- paths and addresses ---------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._base() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base() / "socket"

    @property
    def log_path(self) -> Path:
        return self._base() / "postgres.log"

    def _base(self) -> Path:
        if self.base_dir is None:
            raise PostgresStartError("LocalPostgres is not started")
        return self.base_dir

    @property
    def dsn(self) -> str:
        """A libpq URI for the ``postgres`` database as the superuser (no password)."""
        return self.dsn_for("postgres")

    def dsn_for(self, dbname: str) -> str:
        if not self.port:
            raise PostgresStartError("LocalPostgres is not started")
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/{dbname}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, PostgresStartError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle -------------------------------------------------------------------------

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
        if self._proc is not None:
            raise PostgresStartError("LocalPostgres already started")
        try:
            self._prepare()
            self._initdb()
            for attempt in range(5):
                self.port = self._fixed_port or free_loopback_ports(1)[0]
                self._launch()
                if self._wait_ready():
                    return self
                # Lost a race for the port (or failed): try another one.
                if self._fixed_port or "could not bind" not in self.log_tail(200) or attempt == 4:
                    raise PostgresStartError(
                        f"PostgreSQL did not start within {self.start_timeout}s "
                        f"(port {self.port}):\n{self.log_tail()}"
                    )
                self._terminate()
            raise AssertionError("unreachable")
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL; remove the data."""
        self._terminate(timeout)
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None
        self.port = 0

    def _terminate(self, timeout: float = 30.0) -> None:
        proc = self._proc
        if proc is not None:
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 10.0)):
                if proc.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- steps -----------------------------------------------------------------------------

    def _prepare(self) -> None:
        if os.geteuid() == 0:
            user = _ensure_system_user(self.run_as)
            self._uid, self._gid = user.pw_uid, user.pw_gid
        base = Path(tempfile.mkdtemp(prefix="ledgerlog-pg-"))
        self.base_dir = base
        for d in (self.data_dir, self.socket_dir):
            d.mkdir(mode=0o700)
        if self._uid is not None and self._gid is not None:
            for p in (base, self.data_dir, self.socket_dir):
                os.chown(p, self._uid, self._gid)

    def _extra_groups(self) -> list[int] | None:
        # Running as another user: drop root's supplementary groups too.
        return None if self._uid is None else []

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update({"LC_ALL": "C", "LANG": "C", "HOME": str(self._base()), "TZ": "UTC"})
        return env

    def _initdb(self) -> None:
        cmd = [
            str(self.bin_dir / "initdb"),
            "--pgdata",
            str(self.data_dir),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            # C collation: text orders by UTF-8 bytes, i.e. by code point, like Python str.
            "--locale",
            "C",
            "--no-instructions",
        ]
        proc = subprocess.run(
            cmd,
            cwd=self._base(),
            env=self._env(),
            capture_output=True,
            text=True,
            check=False,
            user=self._uid,
            group=self._gid,
            extra_groups=self._extra_groups(),
        )
        if proc.returncode != 0:
            raise PostgresStartError(
                f"initdb failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        # Loopback and the private socket only, no password: a test server.
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(
            "# written by ledgerlog.devservers.postgres\n"
            "local all all trust\n"
            f"host all all {LOOPBACK}/32 trust\n"
        )
        if self._uid is not None and self._gid is not None:
            os.chown(hba, self._uid, self._gid)

    def _launch(self) -> None:
        settings = {
            "listen_addresses": LOOPBACK,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "logging_collector": "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
        }
        settings.update(self.settings)
        cmd = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        for k, v in settings.items():
            cmd += ["-c", f"{k}={v}"]
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - kept while running
        self._proc = subprocess.Popen(
            cmd,
            cwd=self._base(),
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Its own process group (for killpg), not its own session: see LocalPulsar's
            # launch on the kernel's autogroup scheduling.
            process_group=0,
            # After the uid change (which would clear it): the postmaster gets SIGQUIT
            # (immediate shutdown, children included) if the launcher dies.
            preexec_fn=parent_death_signal(signal.SIGQUIT),
            user=self._uid,
            group=self._gid,
            extra_groups=self._extra_groups(),
        )

    def _wait_ready(self) -> bool:
        proc = self._proc
        assert proc is not None
        isready = self.bin_dir / "pg_isready"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if isready.is_file():
                r = subprocess.run(
                    [str(isready), "-q", "-h", LOOPBACK, "-p", str(self.port), "-U", SUPERUSER],
                    env=self._env(),
                    capture_output=True,
                    check=False,
                )
                if r.returncode == 0:
                    return True
            elif "ready to accept connections" in self.log_tail(200):
                return True
            time.sleep(0.1)
        return False

    # -- helpers ---------------------------------------------------------------------------

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run `sql` with the package's ``psql`` (no Python driver needed); its stdout."""
        psql = self.bin_dir / "psql"
        exe = str(psql) if psql.is_file() else (shutil.which("psql") or "psql")
        proc = subprocess.run(
            [exe, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.dsn_for(dbname)],
            input=sql,
            env=self._env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise PostgresStartError(f"psql failed: {proc.stderr.strip()}")
        return proc.stdout

    def create_database(self, name: str) -> str:
        """Create database `name` (an identifier) and return its DSN."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"database name must be an identifier, not {name!r}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ledgerlog.devservers.postgres",
        description="Run a throwaway PostgreSQL server on 127.0.0.1 until interrupted.",
    )
    ap.add_argument("--port", type=int, default=None)
    a = ap.parse_args(argv)
    with LocalPostgres(port=a.port) as pg:
        print(pg.dsn, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            while pg.running:
                time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
