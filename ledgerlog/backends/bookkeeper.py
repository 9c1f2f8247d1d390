"""The Apache BookKeeper backend: a ledger is a chain of BookKeeper ledgers whose metadata
lives in ZooKeeper, driven through the project's py4j gateway (``io.ledgerlog.bk.Gateway``).

ZooKeeper nodes of a ledger ``L`` (under ``root``, default ``/ledgerlog``)::

    /ledgerlog/L/chain            msgpack list of BookKeeper ledger ids, oldest first
    /ledgerlog/L/writer           ephemeral: the elected writer's claim (id, token); its
                                  data version is the writer's lease heartbeat
    /ledgerlog/L/intake/<client>  one node per intake producer: its own BookKeeper ledger id
    /ledgerlog/L/alive/<client>   ephemeral, per intake producer: it is still there

**The chain and fencing.** Each writer term appends to a BookKeeper ledger of its own. A
new writer (1) opens the chain's last BookKeeper ledger *with recovery*, which fences it -
the previous writer's adds then fail with ``BKLedgerFencedException`` - and closes it at
its final last-add-confirmed; (2) scans it to compute the sequencer state at its end; (3)
creates a new BookKeeper ledger whose entry 0 is a header holding that state; (4)
compare-and-sets the chain node (``zkSetIfVersion``) to append the new ledger id. That CAS
is the election's linearization point: of two writers racing, only one extends the chain,
and the loser deletes its ledger. A ledger in the chain with a successor is therefore
closed for good, so readers see the same entries of it whatever the timing.

**Rollover.** Within a term the writer moves to a new BookKeeper ledger once its ledger
holds ``roll_entries`` entries or ``roll_bytes`` bytes (URL parameters; defaults 10,000
and 16 MiB), before its next append: it creates the ledger with a header holding the
sequencer state at the full ledger's end (the state the Writer passed with its last
append), closes the full ledger (sealing it at its last entry, before any reader can see a
successor), and compare-and-sets the chain from the version its own last CAS produced. So a
takeover fences and scans one ledger of at most about that size, whatever the ledger's
length. A deposed writer cannot roll: its seal fails on the fenced ledger or its CAS on
the moved chain (FencedError), and a ledger it created but never chained is deleted. If
the CAS's outcome is unknown (ZooKeeper lost), the writer stops appending and resigns; the
next term finds the chain either way.

**Positions** are ``Position(index in chain, entry id)``; entry 0 of every chain ledger is
the header and never an entry, so ``Position(i, 0)`` reads from ``(i, 1)`` and ``START``
is the first entry of the first ledger. An entry at ``(i, e)`` has ``next = (i, e + 1)``;
a reader that has read a closed ledger to its end moves on to ``(i + 1, 1)``.

**Reading** uses handles opened without recovery: they read up to the last-add-confirmed
and ask the bookies for a newer one when tailing. A BookKeeper writer piggybacks the LAC
on its next add, so the client is configured with ``explicitLacInterval`` (default 10 ms):
an idle writer's last entries become readable within that interval. :meth:`end` allows for
it (it waits about two intervals before asking the bookies for the LAC), unless this very
backend object holds the tail ledger's writer, whose own last entry id is exact.

**Election and lease.** Candidates race to create the ephemeral ``writer`` node. The
writer renews its lease by bumping the node's version every ``lease_timeout / 4``
(compare-and-set on the version it last wrote, so a writer whose node was replaced learns
it lost the ledger). A standby that has watched the version stay the same for
``lease_timeout`` on its own monotonic clock (a hung or SIGSTOPped writer: its gateway JVM
and ZooKeeper session may well be alive, since the JVM is another process) deletes the node
by version and campaigns. A writer whose process died loses its node with its gateway's
ZooKeeper session too. Safety never rests on the lease: the recovery-open fences the old
writer's BookKeeper ledger before the new one is chained, and the epoch protocol above the
backend does the rest.

**Intake.** Every intake producer writes its own BookKeeper ledger (same quorums) and
registers it under ``intake/``; a submission is acknowledged once the add is acknowledged
by the ack quorum (many concurrent submits share one batched ``addEntries`` call). The
writer reads all intake ledgers in one ``readEntriesMulti`` call per poll; the next entry
id of each intake ledger it has consumed travels inside the ledger record (its ``meta``),
so it becomes durable and visible exactly with the transactions, and a new writer resumes
from the last *visible* record (as with the file backend's intake offsets).

**Intake garbage collection.** A producer also holds an ephemeral ``alive`` node (created
before its intake node, deleted by :meth:`BookKeeperIntakeProducer.close`, gone with its
process's ZooKeeper session; a backend whose gateway got a new session restores its
producers' nodes within about a second). The writer treats a producer whose node has been
missing for ``lease_timeout`` (at least 5 s) as gone: it fences
its intake ledger (recovery-open, which also makes its last acknowledged entries readable)
to learn the final length, and once a record whose offsets cover that length is durable
(acknowledged by the ack quorum) it deletes the intake node, then the BookKeeper ledger,
and drops the producer from the offsets of later records. Any writer resumes from offsets
at least that high, so none needs a collected ledger. A producer whose session expired
while its process lives finds its ledger fenced: its next submit fails with a BackendError
saying so (open a new producer; a retried transaction commits at most once). That only
happens if its node stayed missing for ``lease_timeout`` (ZooKeeper unreachable from it).

**ZooKeeper sessions.** When ZooKeeper expires the gateway's session (or it cannot be
reached), calls raise :class:`ZooKeeperError` (connection loss within about 2/3 of the
session timeout, never a hang) and the next call opens a new session. The elected writer
learns from its lease renewal or its checks that its ephemeral claim went with the old
session, resigns and campaigns again; readers and producers just go on. The session
timeout is the client property ``ledgerlog.zkSessionTimeoutMs`` (default 10 s).

**Bookies.** Creating a BookKeeper ledger needs ``ensemble`` writable bookies, and every
election, rollover and new intake producer creates one. Run at least ``ensemble + 1``
bookies to keep electing writers, rolling and accepting new producers while one bookie is
down; with exactly ``ensemble`` bookies, open ledgers still take adds with the ack quorum
(``delayEnsembleChange``), but nothing new starts until the bookie is back.

**The gateway JVM.** Backends of one process share one gateway per (ZooKeeper, client
settings), reference-counted: the first starts it (:class:`GatewayProcess`), the last
:meth:`close` stops it. A gateway passed in explicitly is never stopped by the backend.
Every Python->Java call carries a whole batch (entries packed into one ``byte[]``). A dead
or stuck JVM surfaces as :class:`GatewayFailedError` (a :class:`BackendError`), never a
hang (py4j read timeout). :meth:`BookKeeperBackend.bridge_stats` counts calls and bytes.

**Known limits.** The chain node lists every BookKeeper ledger of the ledger (about 9
bytes each; ZooKeeper's 1 MB node limit allows about 100,000 rollovers) and nothing
trims old ledgers yet. A writer that crashes between deleting a gone producer's intake
node and its ledger leaks that BookKeeper ledger.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any, Final

import attrs
import msgspec
import structlog

from ledgerlog import metrics
from ledgerlog.backends.base import (
    Backend,
    Backoff,
    Entry,
    GroupCommit,
    IntakeConsumer,
    IntakeItem,
    IntakeProducer,
    LogReader,
    LogWriter,
)
from ledgerlog.backends.file import check_client_id
from ledgerlog.devservers.bookkeeper import (
    GatewayError,
    GatewayProcess,
    pack_entries,
    unpack_entries,
)
from ledgerlog.errors import (
    BackendError,
    ClosedError,
    ConfigError,
    FencedError,
    FormatError,
    NotElectedError,
)
from ledgerlog.model import START, Position
from ledgerlog.validator import SequencerState

__all__ = [
    "BookKeeperBackend",
    "BookKeeperIntakeConsumer",
    "BookKeeperIntakeProducer",
    "BookKeeperLogReader",
    "BookKeeperLogWriter",
    "BridgeStats",
    "GatewayFailedError",
    "ZooKeeperError",
]

log = structlog.get_logger(__name__)

PASSWORD: Final = b"ledgerlog"
HEADER_MAGIC: Final = b"LLBKH1"
DEFAULT_LEASE_TIMEOUT: Final = 10.0
DEFAULT_EXPLICIT_LAC_MS: Final = 10
DEFAULT_CAMPAIGN_INTERVAL: Final = 0.1
DEFAULT_ROOT: Final = "/ledgerlog"
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_READ_BYTES: Final = 4 * 1024 * 1024
_POLL_MIN: Final = 0.001
_POLL_MAX: Final = 0.01
_CHAIN_REFRESH: Final = 0.05
_INTAKE_RESCAN: Final = 0.05
_FENCED_MARKERS: Final = ("BKLedgerFencedException", "BKLedgerClosedException")
_ZK_MARKERS: Final = (
    "SessionExpired",
    "ConnectionLoss",
    "ZooKeeperUnavailable",
    "OperationTimeout",
    "SessionMoved",
)
_NO_LEDGER_MARKERS: Final = ("BKNoSuchLedgerExistsException", "NoSuchLedgerExists")
DEFAULT_ROLL_ENTRIES: Final = 10_000
DEFAULT_ROLL_BYTES: Final = 16 * 1024 * 1024
_INTAKE_GC_INTERVAL: Final = 1.0
_KEEPALIVE_INTERVAL: Final = 1.0
_GONE_GRACE_MIN: Final = 5.0


class GatewayFailedError(BackendError):
    """The gateway JVM died or did not answer in time."""


class ZooKeeperError(BackendError):
    """ZooKeeper did not answer (connection loss) or expired the gateway's session. The
    gateway opens a new session on the next call; ephemeral nodes of the old one (a
    writer's claim, producers' liveness) are gone, so their owners learn they lost them."""


class _JavaCallError(BackendError):
    """A Java exception from a gateway call (the message is the Java one)."""

    @property
    def fenced(self) -> bool:
        return any(m in str(self) for m in _FENCED_MARKERS)


# -- the bridge ---------------------------------------------------------------------------


@attrs.define
class BridgeStats:
    """What crossed the py4j bridge: calls, bytes each way and time spent in calls."""

    calls: int = 0
    bytes_to_java: int = 0
    bytes_from_java: int = 0
    seconds: float = 0.0
    by_method: dict[str, int] = attrs.field(factory=dict)

    def copy(self) -> BridgeStats:
        return BridgeStats(
            self.calls, self.bytes_to_java, self.bytes_from_java, self.seconds, dict(self.by_method)
        )


class _Bridge:
    """One gateway JVM (shared, reference-counted) and the calls made through it."""

    def __init__(self, process: GatewayProcess, owned: bool) -> None:
        self.process = process
        self.owned = owned
        self.refs = 0
        self.stats = BridgeStats()
        self._stats_lock = threading.Lock()

    def call(self, method: str, *args: Any) -> Any:
        from py4j.protocol import Py4JError, Py4JJavaError

        out_bytes = sum(len(a) for a in args if isinstance(a, bytes | bytearray))
        t0 = time.perf_counter()
        try:
            result = getattr(self.process.entry_point, method)(*args)
        except GatewayError as exc:
            raise GatewayFailedError(f"BookKeeper gateway: {exc}") from exc
        except Py4JJavaError as exc:
            text = str(exc.java_exception) if exc.java_exception is not None else str(exc)
            if any(m in text for m in _ZK_MARKERS):
                raise ZooKeeperError(f"{method}: ZooKeeper: {text}") from exc
            raise _JavaCallError(f"{method}: {text}") from exc
        except Py4JError as exc:
            raise GatewayFailedError(f"BookKeeper gateway call {method} failed: {exc}") from exc
        finally:
            dt = time.perf_counter() - t0
        in_bytes = len(result) if isinstance(result, bytes | bytearray) else 0
        metrics.BK_GATEWAY_CALLS.labels(method).inc()
        metrics.BK_GATEWAY_SECONDS.inc(dt)
        if out_bytes:
            _TO_JAVA.inc(out_bytes)
        if in_bytes:
            _FROM_JAVA.inc(in_bytes)
        with self._stats_lock:
            s = self.stats
            s.calls += 1
            s.bytes_to_java += out_bytes
            s.bytes_from_java += in_bytes
            s.seconds += dt
            s.by_method[method] = s.by_method.get(method, 0) + 1
        return result


_TO_JAVA = metrics.BK_GATEWAY_BYTES.labels("to_java")
_FROM_JAVA = metrics.BK_GATEWAY_BYTES.labels("from_java")
_SHARED: dict[tuple[str, str], _Bridge] = {}
_SHARED_LOCK = threading.Lock()


def _client_properties(explicit_lac_ms: int, extra: str) -> str:
    props = f"delayEnsembleChange=true\nexplicitLacInterval={explicit_lac_ms}\n"
    return props + (extra.strip() + "\n" if extra.strip() else "")


def _acquire_bridge(
    zk_connect: str, props: str, classpath: str | None, read_timeout: float
) -> _Bridge:
    key = (zk_connect, props)
    with _SHARED_LOCK:
        bridge = _SHARED.get(key)
        if bridge is None or not bridge.process.is_alive():
            process = GatewayProcess(classpath, read_timeout=read_timeout)
            try:
                process.start()
                process.entry_point.connect(zk_connect, props)
            except GatewayError as exc:
                process.close()
                raise GatewayFailedError(f"could not start the BookKeeper gateway: {exc}") from exc
            except Exception as exc:
                process.close()
                raise BackendError(
                    f"could not connect to BookKeeper at {zk_connect}: {exc}"
                ) from exc
            bridge = _Bridge(process, owned=True)
            _SHARED[key] = bridge
        bridge.refs += 1
        return bridge


def _release_bridge(bridge: _Bridge) -> None:
    with _SHARED_LOCK:
        bridge.refs -= 1
        if bridge.refs > 0 or not bridge.owned:
            return
        for key, value in list(_SHARED.items()):
            if value is bridge:
                del _SHARED[key]
    bridge.process.close()


# -- helpers ------------------------------------------------------------------------------


def _check_name(value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigError(
            f"ledger {value!r} must be 1-128 characters of letters, digits, '.', '_', '-' "
            "starting with a letter or digit"
        )
    return value


def _decode_chain(data: bytes) -> list[int]:
    if not data:
        return []
    try:
        return [int(x) for x in msgspec.msgpack.decode(data)]
    except (msgspec.DecodeError, TypeError, ValueError) as exc:
        raise BackendError(f"unreadable ledger chain in ZooKeeper: {exc}") from exc


def _split_stat(raw: bytes | None) -> tuple[int, bytes] | None:
    if raw is None:
        return None
    return int.from_bytes(raw[:4], "big", signed=True), bytes(raw[4:])


def _header(state: SequencerState) -> bytes:
    return HEADER_MAGIC + state.to_bytes()


def _parse_header(data: bytes) -> SequencerState:
    if not data.startswith(HEADER_MAGIC):
        raise BackendError("a chain ledger does not start with a ledgerlog header")
    return SequencerState.from_bytes(data[len(HEADER_MAGIC) :])


# -- backend ------------------------------------------------------------------------------


class BookKeeperBackend(Backend):
    """One ledger on a BookKeeper cluster (ZooKeeper at `zk_connect`)."""

    def __init__(
        self,
        zk_connect: str,
        ledger: str,
        *,
        ensemble: int = 3,
        write_quorum: int = 3,
        ack_quorum: int = 2,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        explicit_lac_ms: int = DEFAULT_EXPLICIT_LAC_MS,
        campaign_interval: float = DEFAULT_CAMPAIGN_INTERVAL,
        root: str = DEFAULT_ROOT,
        gateway: GatewayProcess | None = None,
        classpath: str | None = None,
        client_properties: str = "",
        read_timeout: float = 60.0,
        roll_entries: int = DEFAULT_ROLL_ENTRIES,
        roll_bytes: int = DEFAULT_ROLL_BYTES,
    ) -> None:
        if not isinstance(zk_connect, str) or not zk_connect:
            raise ConfigError("zk_connect must be 'host:port[,host:port...]'")
        self.ledger = _check_name(ledger)
        if not (1 <= ack_quorum <= write_quorum <= ensemble):
            raise ConfigError(
                f"need 1 <= ack ({ack_quorum}) <= write ({write_quorum}) <= ensemble ({ensemble})"
            )
        for name, value in (
            ("lease_timeout", lease_timeout),
            ("campaign_interval", campaign_interval),
            ("read_timeout", read_timeout),
        ):
            if not isinstance(value, int | float) or not value > 0 or math.isinf(value):
                raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
        if not isinstance(explicit_lac_ms, int) or explicit_lac_ms < 1:
            raise ConfigError("explicit_lac_ms must be a positive integer")
        for name, value in (("roll_entries", roll_entries), ("roll_bytes", roll_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, not {value!r}")
        self.roll_entries, self.roll_bytes = roll_entries, roll_bytes
        if not root.startswith("/") or root.endswith("/"):
            raise ConfigError(f"root {root!r} must start with '/' and not end with it")
        self.zk_connect = zk_connect
        self.ensemble, self.write_quorum, self.ack_quorum = ensemble, write_quorum, ack_quorum
        self.lease_timeout = float(lease_timeout)
        self.explicit_lac_ms = explicit_lac_ms
        self.campaign_interval = float(campaign_interval)
        self.url = (
            f"bookkeeper://{zk_connect}/{ledger}?ensemble={ensemble}&write={write_quorum}"
            f"&ack={ack_quorum}"
        )
        self.base = f"{root}/{ledger}"
        self.chain_path = f"{self.base}/chain"
        self.writer_path = f"{self.base}/writer"
        self.intake_path = f"{self.base}/intake"
        self.alive_path = f"{self.base}/alive"
        if gateway is not None:
            self._bridge = _Bridge(gateway, owned=False)
            self._bridge.refs = 1
        else:
            props = _client_properties(explicit_lac_ms, client_properties)
            self._bridge = _acquire_bridge(zk_connect, props, classpath, read_timeout)
        self._closed = False
        self._lock = threading.Lock()
        self._end_handle: tuple[int, int] | None = None  # (ledger id, gateway handle)
        self.active_writers: list[BookKeeperLogWriter] = []
        self._watch: tuple[int | None, float, float] = (None, 0.0, 0.0)
        self._producers: list[BookKeeperIntakeProducer] = []
        self._keepalive: threading.Thread | None = None
        self._keepalive_stop = threading.Event()
        try:
            self.call("zkEnsurePath", self.intake_path)
            self.call("zkEnsurePath", self.alive_path)
            self.call("zkTryCreate", self.chain_path, msgspec.msgpack.encode([]), False)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_url(cls, url: str, **options: Any) -> BookKeeperBackend:
        """``bookkeeper://host:port[,host:port]/ledger?ensemble=3&write=3&ack=2``.

        Further query parameters: ``lease_timeout``, ``explicit_lac_ms``,
        ``campaign_interval``, ``root``, ``read_timeout``, ``roll_entries``, ``roll_bytes``
        (a writer rolls to a new BookKeeper ledger after that many entries or bytes).
        Keyword `options` override them."""
        if not isinstance(url, str):
            raise ConfigError(f"a BookKeeper ledger URL must be a string, not {type(url).__name__}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "bookkeeper" or not parts.netloc:
            raise ConfigError(f"not a bookkeeper://host:port/ledger URL: {url!r}")
        ledger = parts.path.strip("/")
        if not ledger or "/" in ledger:
            raise ConfigError(f"the URL must name exactly one ledger: {url!r}")
        kwargs: dict[str, Any] = {}
        ints = {"ensemble": "ensemble", "write": "write_quorum", "ack": "ack_quorum"}
        for key in ("explicit_lac_ms", "roll_entries", "roll_bytes"):
            ints[key] = key
        floats = ("lease_timeout", "campaign_interval", "read_timeout")
        for key, values in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items():
            value = values[-1]
            try:
                if key in ints:
                    kwargs[ints[key]] = int(value)
                elif key in floats:
                    kwargs[key] = float(value)
                elif key == "root":
                    kwargs["root"] = value
                else:
                    raise ConfigError(f"unknown parameter {key!r} in {url!r}")
            except ValueError:
                raise ConfigError(f"{key}={value!r} is not a number") from None
        kwargs.update(options)
        return cls(parts.netloc, ledger, **kwargs)

    # plumbing ----------------------------------------------------------------------------

    def call(self, method: str, *args: Any) -> Any:
        """One call through the gateway (errors become BackendError subclasses)."""
        return self._bridge.call(method, *args)

    @property
    def gateway(self) -> GatewayProcess:
        return self._bridge.process

    def bridge_stats(self) -> BridgeStats:
        """Calls and bytes through this backend's gateway (shared by the process's backends
        on the same cluster) so far."""
        return self._bridge.stats.copy()

    def read_chain(self) -> tuple[list[int], int]:
        """The chain's BookKeeper ledger ids and the chain node's version."""
        stat = _split_stat(self.call("zkGetStat", self.chain_path))
        if stat is None:
            raise BackendError(f"ledger chain node {self.chain_path} is missing")
        version, data = stat
        return _decode_chain(data), version

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"backend {self.url} is closed")

    # Backend -----------------------------------------------------------------------------

    def reader(self, start: Position = START) -> BookKeeperLogReader:
        self._check_open()
        return BookKeeperLogReader(self, start)

    def end(self) -> Position:
        self._check_open()
        chain, _ = self.read_chain()
        if not chain:
            return START
        idx, tail = len(chain) - 1, chain[-1]
        with self._lock:
            for w in self.active_writers:
                if w.ledger_id == tail and not w.fenced:
                    return Position(idx, w.last_entry + 1)
        with self._lock:
            if self._end_handle is not None and self._end_handle[0] != tail:
                with contextlib.suppress(BackendError):
                    self.call("closeLedger", self._end_handle[1])
                self._end_handle = None
            if self._end_handle is None:
                self._end_handle = (tail, self.call("openLedgerNoRecovery", tail, PASSWORD))
            handle = self._end_handle[1]
        if not self.call("isLedgerClosed", handle):
            # An add acknowledged before this call reaches the bookies' LAC within one
            # explicit-LAC interval of its acknowledgement.
            time.sleep((2 * self.explicit_lac_ms + 5) / 1000)
        lac = int(self.call("lastAddConfirmed", handle))
        return Position(idx, max(lac + 1, 1))

    def campaign(self, writer_id: str, timeout: float | None = None) -> BookKeeperLogWriter:
        self._check_open()
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        token = secrets.token_hex(8)
        claim = msgspec.msgpack.encode({"writer": writer_id, "token": token, "pid": os.getpid()})
        # What this backend watched of the holder's heartbeat survives across calls: the
        # Writer campaigns in short calls, and the lease is judged over all of them.
        seen_version, seen_since, last_look = self._watch
        while True:
            if self.call("zkTryCreate", self.writer_path, claim, True):
                break
            stat = _split_stat(self.call("zkGetStat", self.writer_path))
            now = time.monotonic()
            if stat is None:
                continue
            version = stat[0]
            if version != seen_version or now - last_look > self.lease_timeout / 2:
                # A changed heartbeat, or we were not watching (paused): start over.
                seen_version, seen_since = version, now
            elif now - seen_since > self.lease_timeout:
                if self.call("zkDelete", self.writer_path, version):
                    log.warning(
                        "writer lease expired; taking over",
                        ledger=self.ledger,
                        candidate=writer_id,
                        holder=_claim_writer(stat[1]),
                    )
                seen_version = None
                self._watch = (None, 0.0, 0.0)
                continue
            last_look = now
            self._watch = (seen_version, seen_since, last_look)
            if now >= deadline:
                raise NotElectedError(f"{writer_id}: not elected within {timeout}s")
            time.sleep(max(0.0, min(self.campaign_interval, deadline - now)))
        try:
            writer = BookKeeperLogWriter(self, writer_id, token, claim)
        except FencedError as exc:
            # Deposed during the takeover (e.g. our lease lapsed): just not elected.
            _delete_claim(self, token)
            raise NotElectedError(f"{writer_id}: {exc}") from exc
        except BaseException:
            _delete_claim(self, token)
            raise
        with self._lock:
            self.active_writers.append(writer)
        return writer

    def intake_producer(self, client_id: str) -> BookKeeperIntakeProducer:
        self._check_open()
        with self._lock:
            if self._keepalive is None:
                sessions = int(self.call("zkSessionCount"))
                self._keepalive = threading.Thread(
                    target=self._keep_alive,
                    args=(sessions,),
                    name=f"ledgerlog-bk-alive-{self.ledger}",
                    daemon=True,
                )
                self._keepalive.start()
        producer = BookKeeperIntakeProducer(self, check_client_id(client_id))
        with self._lock:
            self._producers.append(producer)
        return producer

    def _keep_alive(self, sessions: int) -> None:
        """Give this backend's producers their liveness nodes back after the gateway's
        ZooKeeper session was replaced (the nodes died with the old one). A writer waits
        ``lease_timeout`` (at least 5 s) after a node disappears before it judges the
        producer gone."""
        while not self._keepalive_stop.wait(_KEEPALIVE_INTERVAL):
            try:
                now = int(self.call("zkSessionCount"))
                if now == sessions:
                    continue
                with self._lock:
                    producers = list(self._producers)
                for p in producers:
                    self.call("zkTryCreate", f"{self.alive_path}/{p.name}", b"", True)
                sessions = now
                log.info("restored intake liveness nodes", ledger=self.ledger, n=len(producers))
            except BackendError as exc:
                log.warning("could not check the ZooKeeper session", error=str(exc))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._keepalive_stop.set()
        if self._keepalive is not None and self._keepalive is not threading.current_thread():
            self._keepalive.join(10)
        for w in list(self.active_writers):
            with contextlib.suppress(Exception):
                w.close()
        if self._end_handle is not None:
            with contextlib.suppress(Exception):
                self.call("closeLedger", self._end_handle[1])
            self._end_handle = None
        _release_bridge(self._bridge)


def _claim_writer(data: bytes) -> str:
    try:
        return str(msgspec.msgpack.decode(data).get("writer", "?"))
    except (msgspec.DecodeError, AttributeError):
        return "?"


def _claim_token(data: bytes) -> str | None:
    try:
        token = msgspec.msgpack.decode(data).get("token")
    except (msgspec.DecodeError, AttributeError):
        return None
    return token if isinstance(token, str) else None


def _delete_claim(backend: BookKeeperBackend, token: str) -> None:
    """Delete the writer node if it is still ours."""
    with contextlib.suppress(BackendError):
        stat = _split_stat(backend.call("zkGetStat", backend.writer_path))
        if stat is not None and _claim_token(stat[1]) == token:
            backend.call("zkDelete", backend.writer_path, stat[0])


# -- reader -------------------------------------------------------------------------------


class BookKeeperLogReader(LogReader):
    """Reads the chain ledger by ledger, up to each one's last-add-confirmed, tailing."""

    def __init__(self, backend: BookKeeperBackend, start: Position) -> None:
        self.backend = backend
        self._idx = max(start.major, 0)
        self._next = max(start.minor, 1) if start.major >= 0 else 1
        self._chain: list[int] = []
        self._chain_at = 0.0
        self._handle: int | None = None
        self._reopened = False
        self._closed = False

    @property
    def position(self) -> Position:
        return Position(self._idx, self._next)

    def _refresh_chain(self) -> None:
        self._chain, _ = self.backend.read_chain()
        self._chain_at = time.monotonic()

    def _drop_handle(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(BackendError):
                self.backend.call("closeLedger", self._handle)
            self._handle = None

    def _read_now(self, max_entries: int) -> list[Entry]:
        call = self.backend.call
        while True:
            if self._idx >= len(self._chain):
                self._refresh_chain()
                if self._idx >= len(self._chain):
                    return []
            if self._handle is None:
                self._handle = call("openLedgerNoRecovery", self._chain[self._idx], PASSWORD)
            raw = call("readEntries", self._handle, self._next, max_entries, _READ_BYTES)
            if raw:
                idx = self._idx
                out = [
                    Entry(Position(idx, eid), Position(idx, eid + 1), data)
                    for eid, data in unpack_entries(raw)
                ]
                self._next = out[-1].next.minor
                return out
            # Nothing readable: is this ledger finished (a successor exists only once the
            # ledger was closed by a recovery-open)?
            if (
                len(self._chain) <= self._idx + 1
                and time.monotonic() - self._chain_at > _CHAIN_REFRESH
            ):
                self._refresh_chain()
            if len(self._chain) <= self._idx + 1:
                return []
            if not self._reopened:
                # Our handle may predate the close: a fresh one knows the final end.
                self._drop_handle()
                self._reopened = True
                continue
            self._drop_handle()
            self._reopened = False
            self._idx += 1
            self._next = 1

    def read(self, max_entries: int = 1024, timeout: float = 0.0) -> list[Entry]:
        if self._closed:
            raise ClosedError("reader is closed")
        deadline = time.monotonic() + timeout
        backoff = Backoff(_POLL_MIN, _POLL_MAX)
        while True:
            out = self._read_now(max(1, max_entries))
            if out or not backoff.sleep(deadline):
                return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_handle()


# -- writer -------------------------------------------------------------------------------


class BookKeeperLogWriter(LogWriter):
    """The elected writer: owns the chain's newest BookKeeper ledger."""

    def __init__(
        self, backend: BookKeeperBackend, writer_id: str, token: str, claim: bytes
    ) -> None:
        self.backend = backend
        self.writer_id = writer_id
        self._token = token
        self._claim = claim
        self._log = log.bind(ledger=backend.ledger, writer=writer_id)
        self.fenced = False
        self._closed = False
        self._stop = threading.Event()
        stat = _split_stat(backend.call("zkGetStat", backend.writer_path))
        if stat is None or _claim_token(stat[1]) != token:
            raise NotElectedError(f"{writer_id}: lost the writer node right after creating it")
        self._version = stat[0]
        self._heartbeat = threading.Thread(
            target=self._beat, name=f"ledgerlog-bk-lease-{writer_id}", daemon=True
        )
        self._heartbeat.start()
        self.scanned: tuple[int, int] | None = None
        """(BookKeeper ledger id, entries) the takeover read to learn the ledger's end."""
        self.rollovers = 0
        try:
            self.index, self.ledger_id, self._handle, self._start_state = self._take_over()
        except BaseException:
            self._stop.set()
            raise
        self.last_entry = 0  # the header
        self._ledger_entries = 0
        self._ledger_bytes = 0
        # The sequencer state at the end of our current ledger, when known: a rollover
        # writes it as the next ledger's header (unknown right after our epoch start).
        self._end_state: bytes | None = self._start_state.to_bytes()
        self._log = self._log.bind(bk_ledger=self.ledger_id, index=self.index)
        self._log.info("elected")

    # lease -------------------------------------------------------------------------------

    def _beat(self) -> None:
        interval = self.backend.lease_timeout / 4
        while not self._stop.wait(interval):
            try:
                version = int(
                    self.backend.call(
                        "zkSetIfVersion", self.backend.writer_path, self._claim, self._version
                    )
                )
            except _JavaCallError as exc:
                if "NoNode" in str(exc):
                    version = -1
                else:
                    self._log.warning("lease renewal failed", error=str(exc))
                    continue
            except BackendError as exc:
                self._log.warning("lease renewal failed", error=str(exc))
                continue
            if version < 0:
                self._log.warning("lost the writer lease")
                self.fenced = True
                return
            self._version = version

    def stop_heartbeat(self) -> None:
        """Stop renewing the lease, as a hung writer would (for tests)."""
        self._stop.set()
        if self._heartbeat is not threading.current_thread():
            self._heartbeat.join(5)

    # takeover ----------------------------------------------------------------------------

    def _take_over(self) -> tuple[int, int, int, SequencerState]:
        b = self.backend
        chain, version = b.read_chain()
        state = SequencerState()
        if chain:
            state = self._final_state(chain[-1])
        self._chain, self._chain_version = chain, version
        ledger_id, handle = self._extend_chain(state, check_claim=True)
        return len(chain), ledger_id, handle, state

    def _extend_chain(
        self, state: SequencerState | bytes, *, check_claim: bool = False, sealing: int = -1
    ) -> tuple[int, int]:
        """Create a BookKeeper ledger headed by `state` and compare-and-set it onto the
        chain version this writer last saw; returns (ledger id, handle). `sealing` is our
        full ledger's handle: closed (sealed at our last entry) before the CAS, because a
        reader that sees a successor takes its predecessor's end as final."""
        b = self.backend
        header = _header(state) if isinstance(state, SequencerState) else HEADER_MAGIC + state
        handle = int(b.call("createLedger", b.ensemble, b.write_quorum, b.ack_quorum, PASSWORD))
        ledger_id = int(b.call("ledgerId", handle))
        chained: bool | None = False  # None: the CAS's outcome is unknown
        try:
            b.call("addEntries", handle, pack_entries([header]))
            if check_claim:
                self._check_claim()
            if sealing >= 0:
                try:
                    b.call("closeLedger", sealing)
                except _JavaCallError as exc:
                    if exc.fenced or "MetadataVersion" in str(exc):
                        self.fenced = True
                        raise FencedError(
                            f"writer {self.writer_id}: fenced while rolling over ({exc})"
                        ) from exc
                    raise
            chain = [*self._chain, ledger_id]
            chained = None
            new_version = int(
                b.call(
                    "zkSetIfVersion",
                    b.chain_path,
                    msgspec.msgpack.encode(chain),
                    self._chain_version,
                )
            )
            if new_version < 0:
                chained = False
                self.fenced = True
                raise FencedError(f"writer {self.writer_id}: another writer extended the chain")
            chained = True
        finally:
            if not chained:
                with contextlib.suppress(BackendError):
                    b.call("closeLedger", handle)
                if chained is False:
                    # Never chained: nobody can ever read it.
                    with contextlib.suppress(BackendError):
                        b.call("deleteLedger", ledger_id)
        self._chain, self._chain_version = chain, new_version
        return ledger_id, handle

    def _final_state(self, ledger_id: int) -> SequencerState:
        """Fence `ledger_id` (recovery-open closes it at its final LAC) and compute the
        sequencer state at its end from its header and entries."""
        b = self.backend
        handle = b.call("openLedgerRecover", ledger_id, PASSWORD)
        try:
            head = unpack_entries(b.call("readEntries", handle, 0, 1, _READ_BYTES))
            if not head:
                raise BackendError(f"chain ledger {ledger_id} has no header entry")
            state = _parse_header(head[0][1])
            nxt = 1
            while True:
                got = unpack_entries(b.call("readEntries", handle, nxt, 100_000, _READ_BYTES))
                if not got:
                    self.scanned = (ledger_id, nxt - 1)
                    return state
                for _eid, data in got:
                    state.advance(data)
                nxt = got[-1][0] + 1
        finally:
            with contextlib.suppress(BackendError):
                b.call("closeLedger", handle)

    def _check_claim(self) -> None:
        stat = _split_stat(self.backend.call("zkGetStat", self.backend.writer_path))
        if stat is None or _claim_token(stat[1]) != self._token:
            self.fenced = True
            raise FencedError(f"writer {self.writer_id}: another writer holds the ledger")

    # LogWriter ---------------------------------------------------------------------------

    def recovery_point(self) -> tuple[Position, bytes | None]:
        return Position(self.index, 1), self._start_state.to_bytes()

    def append(self, entries: Sequence[bytes], state: bytes) -> Position:
        if self._closed:
            raise ClosedError(f"writer {self.writer_id} is closed")
        if self.fenced:
            raise FencedError(f"writer {self.writer_id} lost the ledger")
        if not entries:
            return Position(self.index, self.last_entry + 1)
        if self._handle < 0:
            raise BackendError(f"writer {self.writer_id}: a rollover failed; it cannot append")
        b = self.backend
        if self._end_state is not None and (
            self._ledger_entries >= b.roll_entries or self._ledger_bytes >= b.roll_bytes
        ):
            try:
                SequencerState.from_bytes(self._end_state)
            except FormatError:
                # A header a takeover could not read would wedge the ledger: keep going in
                # this ledger instead.
                self._log.error(
                    "not rolling over: the state passed with the last append is unreadable"
                )
                self._end_state = None
            else:
                self._roll(self._end_state)
        packed = pack_entries(entries)
        try:
            last = int(b.call("addEntries", self._handle, packed))
        except _JavaCallError as exc:
            if exc.fenced:
                self.fenced = True
                raise FencedError(
                    f"writer {self.writer_id}: fenced by a newer writer ({exc})"
                ) from exc
            raise
        self.last_entry = last
        self._ledger_entries += len(entries)
        self._ledger_bytes += len(packed)
        self._end_state = bytes(state) if state else None
        return Position(self.index, last + 1)

    def _roll(self, state: bytes) -> None:
        """Continue in a new BookKeeper ledger headed by `state` (the sequencer state at the
        end of the full one), so that a takeover scans at most one ledger's worth."""
        old_handle = self._handle
        # Whatever happens next, the old handle is closed or unusable: never add to it again.
        self._handle = -1
        ledger_id, handle = self._extend_chain(state, sealing=old_handle)
        with self.backend._lock:
            self.index += 1
            self.ledger_id, self._handle = ledger_id, handle
            self.last_entry = 0
        self._ledger_entries = self._ledger_bytes = 0
        self.rollovers += 1
        self._log = self._log.bind(bk_ledger=ledger_id, index=self.index)
        self._log.debug("rolled over to a new BookKeeper ledger")

    def check(self) -> None:
        if self.fenced:
            raise FencedError(f"writer {self.writer_id} lost the ledger")
        self._check_claim()
        chain, _ = self.backend.read_chain()
        if not chain or chain[-1] != self.ledger_id:
            self.fenced = True
            raise FencedError(f"writer {self.writer_id}: a newer writer extended the chain")

    def intake(self, meta: bytes) -> BookKeeperIntakeConsumer:
        self.check()
        return BookKeeperIntakeConsumer(self.backend, meta)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._heartbeat is not threading.current_thread():
            self._heartbeat.join(5)
        b = self.backend
        if self._handle >= 0:
            with contextlib.suppress(BackendError):
                b.call("closeLedger", self._handle)  # seals it: readers see its end at once
        if not self.fenced:
            _delete_claim(b, self._token)
        with b._lock:
            if self in b.active_writers:
                b.active_writers.remove(self)
        self._log.info("resigned")


# -- intake -------------------------------------------------------------------------------


class BookKeeperIntakeProducer(IntakeProducer):
    """A client's own intake ledger; concurrent submits share one addEntries call."""

    def __init__(self, backend: BookKeeperBackend, client_id: str) -> None:
        self.backend = backend
        b = backend
        self._handle = int(
            b.call("createLedger", b.ensemble, b.write_quorum, b.ack_quorum, PASSWORD)
        )
        self.ledger_id = int(b.call("ledgerId", self._handle))
        data = msgspec.msgpack.encode(self.ledger_id)
        while True:
            self.name = f"{client_id}.{secrets.token_hex(4)}"
            # The liveness node first: a writer that lists the intake node then finds no
            # liveness node knows the producer is gone, never merely not registered yet.
            if not b.call("zkTryCreate", f"{b.alive_path}/{self.name}", b"", True):
                continue
            if b.call("zkTryCreate", f"{b.intake_path}/{self.name}", data, False):
                break
            b.call("zkDelete", f"{b.alive_path}/{self.name}", -1)
        self._commit = GroupCommit(self._add)

    def _add(self, batch: list[bytes]) -> None:
        try:
            self.backend.call("addEntries", self._handle, pack_entries(batch))
        except _JavaCallError as exc:
            if exc.fenced:
                raise BackendError(
                    f"intake producer {self.name}: its ledger was fenced by the writer, which "
                    f"judged the producer gone (its ZooKeeper session ended); open a new "
                    f"producer ({exc})"
                ) from exc
            raise
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"intake write failed: {exc}") from exc

    def submit(self, data: bytes, timeout: float | None = None) -> None:
        self._commit.submit(bytes(data), timeout)

    def close(self) -> None:
        if not self._commit.close():
            return
        with self.backend._lock:
            if self in self.backend._producers:
                self.backend._producers.remove(self)
        with contextlib.suppress(BackendError):
            self.backend.call("closeLedger", self._handle)
        with contextlib.suppress(BackendError):
            self.backend.call("zkDelete", f"{self.backend.alive_path}/{self.name}", -1)


class BookKeeperIntakeConsumer(IntakeConsumer):
    """Reads every client's intake ledger from the entry ids the ledger says are consumed."""

    def __init__(self, backend: BookKeeperBackend, meta: bytes) -> None:
        self.backend = backend
        self._offsets: dict[str, int] = {}
        if meta:
            try:
                self._offsets = {str(k): int(v) for k, v in msgspec.msgpack.decode(meta).items()}
            except (msgspec.DecodeError, AttributeError, ValueError, TypeError):
                log.error("unreadable intake offsets in the ledger; rereading all intake ledgers")
        self._handed = dict(self._offsets)
        # Offsets known to be in a durable record of the ledger: the resumed ones, then
        # those of acknowledged items. Only these may decide that an intake ledger is spent.
        self._durable = dict(self._offsets)
        self._handles: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._ledgers: dict[str, int] = {}
        self._final: dict[str, int] = {}  # gone producers: their fenced ledger's length
        self._absent_since: dict[str, float] = {}
        self._listed: set[str] = set()
        self._last_scan = 0.0
        self._last_gc = time.monotonic()
        self.collected: list[str] = []
        """Intake producers whose ledgers this consumer deleted (oldest first)."""

    def _scan(self) -> None:
        self._last_scan = time.monotonic()
        b = self.backend
        listing = b.call("zkChildren", b.intake_path)
        self._listed = {n for n in (listing or "").split("/") if n}
        for name in sorted(self._listed):
            if name in self._handles:
                continue
            raw = b.call("zkGet", f"{b.intake_path}/{name}")
            if raw is None:
                continue
            try:
                ledger_id = int(msgspec.msgpack.decode(raw))
            except (msgspec.DecodeError, TypeError, ValueError):
                log.error("skipping unreadable intake node", node=name)
                self._handles[name] = -1
                continue
            handle = int(b.call("openLedgerNoRecovery", ledger_id, PASSWORD))
            self._handles[name] = handle
            self._names[handle] = name
            self._ledgers[name] = ledger_id
            self._handed.setdefault(name, 0)

    def _collect(self) -> None:
        """Garbage-collect the intake ledgers of producers that are gone.

        A producer is gone when its ephemeral liveness node is (it closed, or its process
        and ZooKeeper session ended). Its ledger is then fenced by a recovery-open, which
        also makes its last entries readable, so its final length is known; it is deleted
        once a durable record's offsets cover that length. A new writer resumes from the
        newest visible record's offsets, which cover it too, so no writer ever needs it.
        The ZooKeeper node goes first (a crash before the ledger is deleted leaks a
        ledger, never breaks a scan), and the name leaves the offsets only after that."""
        self._last_gc = time.monotonic()
        b = self.backend
        alive = set((b.call("zkChildren", b.alive_path) or "").split("/"))
        now = time.monotonic()
        for name in sorted(self._ledgers):
            if name in alive:
                self._absent_since.pop(name, None)
                continue
            # A producer whose ZooKeeper session was replaced restores its node within a
            # second or so: judge it gone only after a lease's worth of absence.
            since = self._absent_since.setdefault(name, now)
            if name not in self._final and now - since < max(b.lease_timeout, _GONE_GRACE_MIN):
                continue
            if name not in self._final and not self._fence_gone(name):
                continue
            if self._durable.get(name, 0) < self._final[name]:
                continue
            if b.call("zkGet", f"{b.intake_path}/{name}") is not None:
                b.call("zkDelete", f"{b.intake_path}/{name}", -1)
            try:
                b.call("deleteLedger", self._ledgers[name])
            except _JavaCallError as exc:
                if not any(m in str(exc) for m in _NO_LEDGER_MARKERS):
                    raise
            self._forget(name)
            self.collected.append(name)
            log.info("collected a gone producer's intake ledger", producer=name)
        # Offsets of producers collected before (by us or a deposed writer): their nodes
        # are gone for good, so their offsets need not travel any more.
        for name in [n for n in self._offsets if n not in self._listed and n not in alive]:
            if name not in self._handles:
                self._forget(name)

    def _fence_gone(self, name: str) -> bool:
        b = self.backend
        try:
            handle = int(b.call("openLedgerRecover", self._ledgers[name], PASSWORD))
        except _JavaCallError as exc:
            if any(m in str(exc) for m in _NO_LEDGER_MARKERS):
                # Deleted by a writer deposed since: its offsets were durable already.
                self._final[name] = 0
                return True
            raise
        self._final[name] = int(b.call("lastAddConfirmed", handle)) + 1
        # Read the rest through the recovered handle: it knows the final end, where a
        # handle opened without recovery may never learn the last entry's confirmation.
        old = self._handles.get(name, -1)
        self._handles[name] = handle
        self._names[handle] = name
        if old >= 0:
            self._names.pop(old, None)
            with contextlib.suppress(BackendError):
                b.call("closeLedger", old)
        return True

    def _forget(self, name: str) -> None:
        handle = self._handles.pop(name, -1)
        if handle >= 0:
            self._names.pop(handle, None)
            with contextlib.suppress(BackendError):
                self.backend.call("closeLedger", handle)
        for table in (self._offsets, self._handed, self._durable, self._final, self._ledgers):
            table.pop(name, None)
        self._absent_since.pop(name, None)

    def poll(self, max_items: int = 1024, timeout: float = 0.0) -> list[IntakeItem]:
        deadline = time.monotonic() + timeout
        backoff = Backoff(_POLL_MIN, _POLL_MAX)
        while True:
            if time.monotonic() - self._last_scan > _INTAKE_RESCAN:
                self._scan()
            if time.monotonic() - self._last_gc > _INTAKE_GC_INTERVAL:
                try:
                    self._collect()
                except BackendError as exc:
                    # Collecting is housekeeping: retry later rather than lose the term.
                    log.warning("intake garbage collection failed", error=str(exc))
            names = sorted(n for n, h in self._handles.items() if h >= 0)
            items: list[IntakeItem] = []
            if names:
                req = b"".join(
                    self._handles[n].to_bytes(8, "big") + self._handed[n].to_bytes(8, "big")
                    for n in names
                )
                raw = self.backend.call("readEntriesMulti", req, max(1, max_items), _READ_BYTES)
                items = self._unpack(raw, max_items)
            if items:
                return items
            if not backoff.sleep(deadline):
                return []

    def _unpack(self, raw: bytes, max_items: int) -> list[IntakeItem]:
        items: list[IntakeItem] = []
        view = memoryview(raw)
        pos = 0
        while pos + 20 <= len(view) and len(items) < max_items:
            handle = int.from_bytes(view[pos : pos + 8], "big", signed=True)
            entry_id = int.from_bytes(view[pos + 8 : pos + 16], "big", signed=True)
            length = int.from_bytes(view[pos + 16 : pos + 20], "big")
            data = bytes(view[pos + 20 : pos + 20 + length])
            pos += 20 + length
            name = self._names.get(handle)
            if name is None or entry_id != self._handed[name]:
                continue  # a read raced with a rescan: never skip or repeat an entry
            self._handed[name] = entry_id + 1
            items.append(IntakeItem(data, (name, entry_id + 1)))
        return items

    def meta(self, items: Sequence[IntakeItem]) -> bytes:
        for it in items:
            name, nxt = it.token
            if nxt > self._offsets.get(name, 0):
                self._offsets[name] = nxt
        return msgspec.msgpack.encode(dict(sorted(self._offsets.items())))

    def ack(self, items: Sequence[IntakeItem]) -> None:
        for it in items:
            name, nxt = it.token
            if name in self._ledgers and nxt > self._durable.get(name, 0):
                self._durable[name] = nxt

    def close(self) -> None:
        for handle in self._handles.values():
            if handle >= 0:
                with contextlib.suppress(BackendError):
                    self.backend.call("closeLedger", handle)
        self._handles.clear()
        self._names.clear()
