"""The Apache Pulsar backend: a ledger is a persistent topic, written by one exclusive
producer at a time.

Topics of a ledger ``L`` in ``tenant/namespace``::

    persistent://tenant/namespace/L            the ledger: one entry = one message
    persistent://tenant/namespace/L-intake     clients' submissions
    non-persistent://tenant/namespace/L-lease  the elected writer's claim and heartbeats

**Positions.** Ledger messages are never batched, so a message id ``(ledger_id,
entry_id)`` names exactly one entry: an entry sits at ``Position(ledger_id, entry_id)``
and its :attr:`Entry.next` is ``Position(ledger_id, entry_id + 1)``. ``reader(Position(L,
N))`` starts a Pulsar reader *exclusively after* message ``(L, N - 1)``, i.e. after the
entry the position came from; that entry exists (or existed), so the broker resumes at
the following entry even when it does not exist yet or lives in the next BookKeeper
ledger after a rollover (both checked against a real broker by the integration tests).
``START`` maps to ``MessageId.earliest``. A message that arrives in a batch (never written
by ledgerlog, so foreign bytes) becomes one empty - hence "malformed" - entry at every
reader alike, keeping replicas deterministic.

**end()** asks the broker for the topic's last message id through a consumer of a shared,
durable ``ledgerlog-end`` subscription with a zero receive queue: one round trip of a few
milliseconds, no data transferred, no admin URL needed. The subscription never
acknowledges anything, which is deliberate: it pins every entry of the ledger against a
finite retention policy (a transaction log must never be trimmed behind readers' backs).
Namespaces holding ledgers must therefore not set a backlog quota.

**Election.** The elected writer holds an ``Exclusive`` producer on the ledger topic.
Standbys retry creating one every ``campaign_interval`` and get ``ProducerFenced`` while
it is held; a writer that closes or whose process dies (the broker sees its connection
drop) is replaced within that interval. A writer that hangs (SIGSTOP, a stalled VM) keeps
its TCP connection, so the broker would keep its producer until its keep-alive gives up;
that is what the lease is for: the writer publishes a heartbeat on the non-persistent
lease topic every ``lease_timeout / 4``, and a standby that has watched the lease topic
for ``lease_timeout`` without hearing one creates its producer with
``ExclusiveWithFencing`` instead: the broker fences the hung producer, whose next send
fails with ``ProducerFenced`` (-> :class:`FencedError`). The lease is judged on the
standby's own monotonic clock (no clock skew), and only over time it was watching,
connected, without a break: neither a broker outage nor a pause of the standby itself
counts as the writer's silence. The lease topic is non-persistent: heartbeats need no
storage, and a lost one can at worst cause a needless takeover, which is safe. Safety
never rests on the lease: the broker's fencing makes a deposed writer unable to append,
and the epoch protocol above the backend makes anything it slipped in before the new
epoch start count and anything after it rejected.

A new writer publishes a *claim* on the lease topic once its producer exists; an old
writer that hears a claim other than its own knows it was deposed, which is how
:meth:`PulsarLogWriter.check` detects fencing without a broker round trip (a fenced
producer looks connected until it next sends).

**Deduplication and reconnects.** The ledger producer never times a message out
(``send_timeout_millis=0``): across a broker restart the client keeps every pending
message and resends them in order with their sequence ids once it reconnects, so entries
are neither lost nor reordered, and the broker's deduplication (on in the project's
``standalone.conf``) drops a resend of a message it had already persisted. Each term's
producer gets a name of its own: deduplication state is kept per producer name, and with
one name shared by successive writers a new writer could start its sequence ids below a
deposed writer's messages still in flight, and then see its own entries acknowledged as
"duplicates" and dropped. Without deduplication a resend becomes a duplicate record whose
first_seq is below next_seq, which every reader rejects: it is an optimisation, not a
safety need. :meth:`PulsarLogWriter.append` bounds its own wait (``append_timeout``) and
then raises :class:`BackendError`; the writer then resigns, which closes the producer and
fails its pending messages, so nothing of that term can land after a later append.

**Pipelined appends.** :meth:`PulsarLogWriter.append_async` sends and returns; up to
``max_pending_appends`` appends (default 8; ``max_in_flight`` bounds their messages) are
in flight at once, so the writer batches the next intake while the broker persists the
previous records. One producer without batching sends them in order and the broker
persists them in order. The first failed send marks the writer fenced or broken at once
(from the client's callback): no append starts after it, and the writer resigns when it
retires the failed append, closing the producer as above. The one case where a later
message can still land after an earlier one failed is the broker rejecting a single
message as corrupt (a checksum error on the wire) while the next ones were already on
their way - as already within one multi-record append before pipelining. The
transactions of the lost record then never get a decision (their clients see
:class:`CommitUnknownError` and may resubmit); nothing reported committed is affected.

**Intake.** Clients publish submissions to the intake topic and wait for the broker's
acknowledgement: the submission is then in the bookie's journal. Messages are never
batched by Pulsar (so message ids are exact too); instead a client's producer keeps at
most ``intake_in_flight`` (default 1) message unacknowledged and holds further
submissions back until one is, then sends everything held as one message of their
transactions (up to 1 MiB): a client's threads share messages, and the broker and writer,
whose work goes by messages more than by bytes, see few large ones instead of many small
ones. Many submits in flight also share the journal's group commit. The elected writer
reads the intake with a plain Pulsar *reader* from the position carried in the ledger:
``meta()`` is the message id of the last submission a record holds, stored in that
record, so it becomes visible exactly with the transactions, and the next writer resumes
right after the newest visible record - no submission is lost or handed over twice (as
with the file backend's offsets).

Why not a Failover subscription that redelivers what was not acknowledged: when the
active consumer's process was SIGSTOPped while messages were flowing to it, Pulsar 4.0.7
was measured to stall the whole subscription - the new writer's consumer included,
although it had become the active one - for about a minute, until the broker's
keep-alive dropped the hung connection (intermittently; it looks like the dispatcher
waiting for its last write to the hung consumer). A reader is private to its writer, so
a hung writer stalls nobody. A durable ``ledgerlog-writer`` subscription still exists, as a
retention anchor only: clients create it (at the earliest message) before they first
publish, and the writer acknowledges it cumulatively after each successful append, so
submissions not yet in the ledger are never trimmed by a finite retention policy, and
consumed ones can be. Nothing is ever dispatched on it (its consumers have a zero
receive queue and never receive).

**The C++ client's log.** By default the client logs through the C++ library's own
logger, errors only, to standard error. pulsar-client calls a Python (stdlib) logger for
every line the C++ client could log, DEBUG included: measured ~9 calls per message sent
and read, each taking the GIL from a client thread, which made GIL waits of the client's
I/O threads a large share of commit latency, and its CPU a quarter of a busy client's.
``client_logger=True`` routes the C++ client's log through the stdlib logger
``ledgerlog.pulsar.client`` instead (WARNING and up, without the refusals every standby's
campaign produces), and a ``logging.Logger`` of the application's own goes through as it
is; both pay that cost. The C++ client's logger is process-wide: the first client a
process creates sets it.

**Restart points.** A new writer must learn the ledger's end state (epoch, next seq,
clock, intake position) by scanning entry headers under the readers' rules; from the
start that ran at ~10k entries a second here, so a takeover of a long ledger took
minutes. Every ledger message instead carries, as the ``ledgerlog-restart`` property, a
position with the sequencer state valid there, and :meth:`PulsarLogWriter.recovery_point`
reads the newest message's: the next writer scans only what follows it (in practice the
last append or two). The writer advances that point only as far as the ledger proves it:
past its own appends that land one right after the other from its epoch start, and
across a BookKeeper ledger rollover once a check started by its lease thread has read
that its own entry is the next one after the last proven (see ``_RestartChain``). A
message without the property (an older writer's, or anything unreadable) means a scan
from the start, as before; a point that is merely old means a longer scan, never a wrong
state.

**Known costs.** Only the last record of an append carries the intake position, so if
an append landed only in part, the next writer resumes from the previous position and
appends a few submissions again; the validator drops the duplicates.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import re
import secrets
import threading
import time
import urllib.parse
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import msgspec
import pulsar
import structlog
from pulsar.exceptions import PulsarException

from ledgerlog.backends.base import (
    Backend,
    CompletedAppend,
    Entry,
    IntakeConsumer,
    IntakeItem,
    IntakeProducer,
    LogReader,
    LogWriter,
    PendingAppend,
)
from ledgerlog.backends.file import check_client_id
from ledgerlog.codec import merge_intake
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
    "PulsarBackend",
    "PulsarIntakeConsumer",
    "PulsarIntakeProducer",
    "PulsarLogReader",
    "PulsarLogWriter",
]

log = structlog.get_logger(__name__)

DEFAULT_LEASE_TIMEOUT: Final = 10.0
DEFAULT_OPERATION_TIMEOUT: Final = 30.0
DEFAULT_APPEND_TIMEOUT: Final = 60.0
DEFAULT_CAMPAIGN_INTERVAL: Final = 0.2
DEFAULT_MAX_IN_FLIGHT: Final = 1000
DEFAULT_MAX_PENDING_APPENDS: Final = 8
DEFAULT_INTAKE_IN_FLIGHT: Final = 1
#: Held-back intake batches merged into one message, up to this many bytes.
_MAX_MERGED: Final = 1 << 20
#: An intake batch on its way, with what to call once it is acknowledged or failed.
_Submission = tuple[bytes, Callable[[BaseException | None], None]]
#: Times an intake message the broker acknowledges as a duplicate is sent again.
_MAX_DEDUP_RESENDS = 3

WRITER_SUBSCRIPTION: Final = "ledgerlog-writer"
END_SUBSCRIPTION: Final = "ledgerlog-end"
#: The message property that carries a writer's restart point (see _RestartChain).
RESTART_PROPERTY: Final = "ledgerlog-restart"
_RESERVED_SUFFIXES: Final = ("-intake", "-lease")
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RECEIVER_QUEUE: Final = 2000

_FENCED_RESULTS: Final = frozenset({pulsar.Result.ProducerFenced, pulsar.Result.AlreadyClosed})
_FENCED_ERRORS: Final = (pulsar.ProducerFenced, pulsar.AlreadyClosed)
_HELD_ERRORS: Final = (pulsar.ProducerFenced, pulsar.ProducerBusy)

_CLIENT_LOGGER: Final = "ledgerlog.pulsar.client"
#: Messages the C++ client logs at WARNING for what is routine here (a standby's attempt
#: to create the ledger's exclusive producer while a writer holds it).
_EXPECTED_NOISE: Final = ("existing exclusive producer", "ProducerFenced")


# -- positions -----------------------------------------------------------------------------


def _next_position(ledger_id: int, entry_id: int) -> Position:
    return Position(ledger_id, entry_id + 1)


def _start_message_id(start: Position) -> Any:
    """Where a Pulsar reader resumes for `start` (always exclusive of the id returned)."""
    if start <= START:
        return pulsar.MessageId.earliest
    return pulsar.MessageId(ledger_id=start.major, entry_id=start.minor - 1)


#: A blocking read that took longer than this (seconds) found the queue empty and
#: waited for the message it returns (see _first_message).
_CAME_ALONE: Final = 0.0005


def _first_message(next_message: Callable[[int], Any], timeout_ms: int) -> tuple[Any, bool]:
    """The first message of a read (None if none came within `timeout_ms`), and whether
    to look for more queued behind it.

    Looking costs a ``read_next(0)``, and on an empty queue that raises Timeout: 40-100
    us here, for every entry a tailing replica or writer reads, since each one arrives
    alone. A message that had to be waited for came alone (nearly always: the broker
    dispatches each entry as it is persisted), so the read ends with it; any that did
    come with it are queued, and the next read takes them without waiting."""
    if timeout_ms <= 0:
        return next_message(0), True
    asked = time.perf_counter()
    msg = next_message(timeout_ms)
    return msg, msg is None or time.perf_counter() - asked <= _CAME_ALONE


def _encode_restart(point: tuple[Position, bytes]) -> str:
    position, state = point
    return f"1:{position.major}:{position.minor}:{base64.b64encode(state).decode()}"


def _decode_restart(text: str) -> tuple[Position, bytes] | None:
    """A restart point from its property, or None if absent or unreadable (any doubt
    about it only costs a longer scan, never a wrong state)."""
    try:
        version, major, minor, state = text.split(":")
        position = Position(int(major), int(minor))
        raw = base64.b64decode(state, validate=True)
        SequencerState.from_bytes(raw)
    except (ValueError, FormatError):
        return None
    if version != "1" or position.major < 0 or position.minor < 0:
        return None
    return position, raw


class _RestartChain:
    """A writer's restart point: a position in the ledger with the sequencer state valid
    there, which the writer attaches to every message it sends, so that the next writer
    reads the ledger's newest message and scans on from that point instead of from the
    start (an election scanned ~10k entries a second: minutes for a long ledger).

    A point is only ever one a scan under the readers' rules would reach too. The first
    comes from the newest message at election (or none), and the next is proven by
    adjacency: the term's first append is its epoch start, which the writer has read
    through under the readers' rules; each later append that lands exactly where the
    previous one ended, its messages one after another, holds only this writer's own
    records, which readers all accept, so the state the writer passed with it is the
    state after it. An append that lands elsewhere (the topic moved to a new BookKeeper
    ledger, or something came in between) leaves a gap, checked by reading what follows
    the last proven point (:meth:`gap`, :meth:`close_gap`, from a thread the lease
    thread starts); until then, or for the rest of the term if something else is there,
    the point stays. A stale point is safe: the next writer scans more. So the ledger's
    own contents, not the broker's fencing alone, decide what a takeover starts from."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._point: tuple[Position, bytes] | None = None
        self._property: dict[str, str] | None = None
        self._anchored = False
        self._end: Position | None = None  # where the next own append must start
        self._gap: tuple[Position, Position] | None = None  # (expected, landed at)
        self._unproven: tuple[Position, bytes] | None = None  # newest point past the gap
        self._unproven_end: Position | None = None

    def start(self, point: tuple[Position, bytes] | None) -> None:
        """The point the ledger's newest message named at election."""
        with self._lock:
            self._set(point)

    def _set(self, point: tuple[Position, bytes] | None) -> None:
        self._point = point
        self._property = None if point is None else {RESTART_PROPERTY: _encode_restart(point)}

    @property
    def point(self) -> tuple[Position, bytes] | None:
        return self._point

    @property
    def properties(self) -> dict[str, str] | None:
        """What to attach to the next message."""
        return self._property

    def landed(self, first: Position, end: Position, adjacent: bool, state: bytes) -> None:
        """An append landed: its first message at `first`, its last ending at `end`,
        each of its messages right after the one before (`adjacent`); `state` is the
        sequencer state after it (b"": unknown). Called in append order."""
        with self._lock:
            if not self._anchored:
                # The term's epoch start: what comes right after it is proven from here.
                self._anchored = True
                self._end = end if adjacent else None
                return
            if self._end is not None:
                if first == self._end and adjacent:
                    self._end = end
                    if state:
                        self._set((end, state))
                elif adjacent:  # (no gap is pending while the chain has an end)
                    self._gap = (self._end, first)
                    self._unproven = (end, state) if state else None
                    self._unproven_end = end
                    self._end = None
                else:
                    self._end = None
                return
            if self._gap is not None:
                if first == self._unproven_end and adjacent:
                    self._unproven_end = end
                    if state:
                        self._unproven = (end, state)
                else:
                    self._gap = None  # a second gap before the first was checked: stop

    def gap(self) -> tuple[Position, Position] | None:
        """(the last proven end, where the next own append landed) while unchecked."""
        return self._gap

    def close_gap(self, first_after: Position | None) -> None:
        """What follows the gap's proven end in the ledger starts at `first_after` (None:
        unknown for now, ask again later)."""
        with self._lock:
            gap = self._gap
            if gap is None or first_after is None:
                return
            self._gap = None
            if first_after != gap[1]:
                return  # something else is there: the point stays for this term
            self._end = self._unproven_end
            if self._unproven is not None:
                self._set(self._unproven)


def _ids(msg_id: Any) -> tuple[int, int, int]:
    return int(msg_id.ledger_id()), int(msg_id.entry_id()), int(msg_id.batch_index())


def _encode_meta(ids: tuple[int, int, int]) -> bytes:
    return msgspec.msgpack.encode(list(ids))


def _decode_meta(meta: bytes) -> tuple[int, int, int] | None:
    """The intake message id a record's meta names, or None (none, or not ours)."""
    if not meta:
        return None
    try:
        ledger_id, entry_id, batch_index = msgspec.msgpack.decode(meta)
        return int(ledger_id), int(entry_id), int(batch_index)
    except (msgspec.DecodeError, ValueError, TypeError):
        return None


# -- configuration helpers -----------------------------------------------------------------


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        text = record.getMessage()
        return not any(s in text for s in _EXPECTED_NOISE)


def _native_client_logger() -> Any:
    """The default: the C++ client's own logger, errors only, to standard error.

    Not a stdlib logger, because pulsar-client asks a Python logger about every line the
    C++ client could log, DEBUG included (its wrapper's ``isEnabled`` is always true):
    measured ~9 calls per message sent and read, each taking the GIL from a client I/O
    thread. Errors only, because the client's warnings include the routine refusals
    every standby writer's campaign produces several times a second."""
    return pulsar.FileLogger(pulsar.LoggerLevel.Error, "/dev/stderr")


def _default_client_logger() -> logging.Logger:
    """The stdlib logger the C++ client logs through when the application asks for one
    (``client_logger=True`` or a logger of its own): WARNING unless the application set
    a level for it, without the routine refusals every standby's campaign produces."""
    logger = logging.getLogger(_CLIENT_LOGGER)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropExpected) for f in logger.filters):
        logger.addFilter(_DropExpected())
    return logger


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigError(
            f"{kind} {value!r} must be 1-128 characters of letters, digits, '.', '_', '-' "
            "starting with a letter or digit"
        )
    return value


def _positive(name: str, value: float) -> float:
    if not isinstance(value, int | float) or not value > 0 or math.isinf(value):
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


def _as_bool(name: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={text!r} is not a boolean")


def _as_float(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number") from None


def _as_int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not an integer") from None


#: Query parameters of a ``pulsar://`` URL: name -> (constructor keyword, converter).
_URL_PARAMS: Final[Mapping[str, tuple[str, Callable[[str, str], Any]]]] = {
    "token": ("auth_token", lambda _n, v: v),
    "operation_timeout": ("operation_timeout", _as_float),
    "lease_timeout": ("lease_timeout", _as_float),
    "append_timeout": ("append_timeout", _as_float),
    "campaign_interval": ("campaign_interval", _as_float),
    "max_in_flight": ("max_in_flight", _as_int),
    "max_pending_appends": ("max_pending_appends", _as_int),
    "intake_in_flight": ("intake_in_flight", _as_int),
    "use_tls": ("use_tls", _as_bool),
    "tls_trust_certs_file_path": ("tls_trust_certs_file_path", lambda _n, v: v),
    "tls_allow_insecure_connection": ("tls_allow_insecure_connection", _as_bool),
    "tls_validate_hostname": ("tls_validate_hostname", _as_bool),
    "tls_certificate_file_path": ("tls_certificate_file_path", lambda _n, v: v),
    "tls_private_key_file_path": ("tls_private_key_file_path", lambda _n, v: v),
}


# -- the backend ---------------------------------------------------------------------------


class PulsarBackend(Backend):
    """One ledger on a Pulsar cluster. Each instance owns one ``pulsar.Client`` (its
    connections and threads); any number of processes may open the same ledger."""

    def __init__(
        self,
        service_url: str,
        ledger: str,
        *,
        tenant: str = "public",
        namespace: str = "default",
        auth_token: str | None = None,
        operation_timeout: float = DEFAULT_OPERATION_TIMEOUT,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        append_timeout: float = DEFAULT_APPEND_TIMEOUT,
        campaign_interval: float = DEFAULT_CAMPAIGN_INTERVAL,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_pending_appends: int = DEFAULT_MAX_PENDING_APPENDS,
        intake_in_flight: int = DEFAULT_INTAKE_IN_FLIGHT,
        use_tls: bool | None = None,
        tls_trust_certs_file_path: str | None = None,
        tls_allow_insecure_connection: bool = False,
        tls_validate_hostname: bool = False,
        tls_certificate_file_path: str | None = None,
        tls_private_key_file_path: str | None = None,
        client_logger: logging.Logger | bool | None = None,
    ) -> None:
        if not isinstance(service_url, str) or not service_url.startswith(
            ("pulsar://", "pulsar+ssl://")
        ):
            raise ConfigError(
                f"service_url must be pulsar:// or pulsar+ssl://, not {service_url!r}"
            )
        self.ledger = _check_name("ledger", ledger)
        if ledger.endswith(_RESERVED_SUFFIXES):
            raise ConfigError(f"ledger names may not end with {' or '.join(_RESERVED_SUFFIXES)}")
        self.tenant = _check_name("tenant", tenant)
        self.namespace = _check_name("namespace", namespace)
        self.operation_timeout = _positive("operation_timeout", operation_timeout)
        self.lease_timeout = _positive("lease_timeout", lease_timeout)
        self.append_timeout = _positive("append_timeout", append_timeout)
        self.campaign_interval = _positive("campaign_interval", campaign_interval)
        if not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ConfigError("max_in_flight must be a positive integer")
        self.max_in_flight = max_in_flight
        if not isinstance(max_pending_appends, int) or max_pending_appends < 1:
            raise ConfigError("max_pending_appends must be a positive integer")
        self.max_pending_appends = max_pending_appends
        if not isinstance(intake_in_flight, int) or intake_in_flight < 1:
            raise ConfigError("intake_in_flight must be a positive integer")
        self.intake_in_flight = intake_in_flight
        self.service_url = service_url.rstrip("/")
        base = f"persistent://{tenant}/{namespace}/{ledger}"
        self.topic = base
        self.intake_topic = f"{base}-intake"
        self.lease_topic = f"non-persistent://{tenant}/{namespace}/{ledger}-lease"
        self.url = f"{self.service_url}/{tenant}/{namespace}/{ledger}"
        self._log = log.bind(ledger=ledger, url=self.url)
        if auth_token is not None and (not isinstance(auth_token, str) or not auth_token.strip()):
            raise ConfigError("auth_token (?token=...) must be a non-empty string when given")
        #: Whether the client authenticates with a token (the token itself is not kept).
        self.has_auth_token = auth_token is not None
        tls = service_url.startswith("pulsar+ssl://") if use_tls is None else use_tls
        self._client_options: dict[str, Any] = {
            "authentication": pulsar.AuthenticationToken(auth_token) if auth_token else None,
            "operation_timeout_seconds": max(1, math.ceil(self.operation_timeout)),
            "connection_timeout_ms": int(min(self.operation_timeout, 10.0) * 1000),
            "use_tls": tls,
            "tls_trust_certs_file_path": tls_trust_certs_file_path,
            "tls_allow_insecure_connection": tls_allow_insecure_connection,
            "tls_validate_hostname": tls_validate_hostname,
            "tls_certificate_file_path": tls_certificate_file_path,
            "tls_private_key_file_path": tls_private_key_file_path,
            "logger": (
                client_logger
                if isinstance(client_logger, logging.Logger)
                else _default_client_logger()
                if client_logger is True
                else _native_client_logger()
            ),
        }
        self._client = self._new_client()
        self._lock = threading.Lock()
        self._end_consumer: Any = None
        # The furthest end this process has seen (from end() or read back): end() never
        # answers less (see end()).
        self._end_floor = START
        self._lease_watch: _LeaseWatch | None = None
        self._lease_producer: Any = None
        self._writers: weakref.WeakSet[PulsarLogWriter] = weakref.WeakSet()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PulsarBackend:
        """``pulsar://host:port/[tenant/namespace/]ledger?token=...&lease_timeout=...``.

        Query parameters: ``token`` and the constructor's keyword options of simple type
        (timeouts, ``max_in_flight``, ``use_tls`` and the
        ``tls_*`` paths/flags). Keyword `options` override the query."""
        if not isinstance(url, str):
            raise ConfigError(f"a Pulsar ledger URL must be a string, not {type(url).__name__}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("pulsar", "pulsar+ssl") or not parts.netloc:
            raise ConfigError(f"not a pulsar:// ledger URL: {url!r}")
        if "@" in parts.netloc:
            raise ConfigError("put credentials in ?token=..., not in the URL's host part")
        segments = [s for s in parts.path.split("/") if s]
        if len(segments) == 1:
            tenant, namespace, ledger = "public", "default", segments[0]
        elif len(segments) == 3:
            tenant, namespace, ledger = segments
        else:
            raise ConfigError(
                f"{url!r}: the path must be /ledger or /tenant/namespace/ledger, not {parts.path!r}"
            )
        kwargs: dict[str, Any] = {}
        try:
            query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
        except ValueError as exc:
            raise ConfigError(f"{url!r}: bad query: {exc}") from exc
        for name, values in query.items():
            if name not in _URL_PARAMS:
                raise ConfigError(
                    f"unknown parameter {name!r} in a pulsar:// URL; known: "
                    + ", ".join(sorted(_URL_PARAMS))
                )
            if len(values) != 1:
                raise ConfigError(f"parameter {name!r} given more than once")
            keyword, convert = _URL_PARAMS[name]
            kwargs[keyword] = convert(name, values[0])
        kwargs.update(options)
        return cls(
            f"{parts.scheme}://{parts.netloc}",
            ledger,
            tenant=tenant,
            namespace=namespace,
            **kwargs,
        )

    # Backend ------------------------------------------------------------------------------

    def reader(self, start: Position = START) -> PulsarLogReader:
        self._check_open()
        return PulsarLogReader(self, start)

    def end(self) -> Position:
        """The ledger topic's end, never before one this process has already seen.

        Around a broker restart, ``get_last_message_id`` was seen answering "empty"
        (ledger id -1, what an empty topic gets) for a ledger this process had read
        hundreds of entries of; ``sync()`` then returned at once and a read after it
        missed a commit made seconds before (``ledgerlog check``, seed 981386). An answer
        before what was seen is asked again until the operation timeout, then refused."""
        self._check_open()
        deadline = time.monotonic() + self.operation_timeout
        delay = 0.05
        while True:
            end = self._ask_end()
            with self._lock:
                floor = self._end_floor
                if end >= floor:
                    self._end_floor = end
                    return end
            if time.monotonic() + delay > deadline:
                raise BackendError(
                    f"end of {self.topic}: the broker answered {end}, before {floor} "
                    "already read here"
                )
            self._log.warning("end of the ledger went backwards; asking again", end=str(end))
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _ask_end(self) -> Position:
        ledger_id, entry_id, _ = _ids(self._last_message_id())
        if ledger_id < 0:
            return START
        return _next_position(ledger_id, entry_id)

    def _last_message_id(self) -> Any:
        """The broker's id of the ledger topic's newest message (ledger id -1: none)."""
        try:
            with self._lock:
                if self._end_consumer is None:
                    self._end_consumer = self._client.subscribe(
                        self.topic,
                        END_SUBSCRIPTION,
                        consumer_type=pulsar.ConsumerType.Shared,
                        receiver_queue_size=0,
                        initial_position=pulsar.InitialPosition.Earliest,
                    )
                consumer = self._end_consumer
            return consumer.get_last_message_id()
        except PulsarException as exc:
            raise _broker_error(self, f"end of {self.topic}", exc) from exc

    def _newest_restart_point(self) -> tuple[Position, bytes] | None:
        """The restart point the ledger's newest message carries (see _RestartChain), or
        None: an empty ledger, a message without one (written by an older version or by
        hand), or one that cannot be read now; the writer then scans from the start."""
        last = self._last_message_id()
        ledger_id, entry_id, _ = _ids(last)
        if ledger_id < 0:
            return None
        reader = None
        try:
            reader = self._client.create_reader(
                self.topic, last, start_message_id_inclusive=True, receiver_queue_size=1
            )
            msg = reader.read_next(int(self.operation_timeout * 1000))
            found = _decode_restart(msg.properties().get(RESTART_PROPERTY, ""))
        except PulsarException as exc:
            self._log.warning("newest message unreadable; scanning from the start", error=repr(exc))
            return None
        finally:
            if reader is not None:
                with contextlib.suppress(Exception):
                    reader.close()
        if found is None:
            self._log.info("no restart point on the newest message; scanning from the start")
            return None
        if found[0] > _next_position(ledger_id, entry_id):
            self._log.error("restart point past the ledger's end; scanning from the start")
            return None
        return found

    def _saw(self, position: Position) -> None:
        """A reader of this process read up to `position`: the end is at least there."""
        if position > self._end_floor:
            with self._lock:
                if position > self._end_floor:
                    self._end_floor = position

    def campaign(self, writer_id: str, timeout: float | None = None) -> PulsarLogWriter:
        """Stand by until this process holds the ledger's exclusive producer.

        Retries ``Exclusive`` every ``campaign_interval``; once the lease topic has been
        silent for ``lease_timeout`` (the holder hangs), takes over with
        ``ExclusiveWithFencing``. Only NotElectedError (or ClosedError) comes out: a
        broker that cannot be reached is just another reason not to be elected yet."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        clog = self._log.bind(writer=writer_id)
        # Longer between two looks at the lease than this, and we were not watching.
        max_gap = max(self.lease_timeout / 2, 3 * self.campaign_interval)
        while True:
            watch = self._watch()
            # Called at every round, so that time the lease reader spends disconnected
            # never counts as the writer's silence.
            silent = watch.silent_for(max_gap) if watch is not None else 0.0
            listening = watch is not None and watch.connected()
            # A lease reader that lost its connection means the broker is away: wait for
            # it rather than block in create_producer. Without a lease reader at all
            # (the lease topic cannot be opened), campaign without fencing.
            if watch is None or listening:
                fence = listening and silent >= self.lease_timeout
                mode = (
                    pulsar.ProducerAccessMode.ExclusiveWithFencing
                    if fence
                    else pulsar.ProducerAccessMode.Exclusive
                )
                term = secrets.token_hex(8)
                try:
                    producer = self._client.create_producer(
                        self.topic,
                        producer_name=f"ledgerlog.{self.ledger}.{term}",
                        access_mode=mode,
                        send_timeout_millis=0,
                        max_pending_messages=self.max_in_flight,
                        block_if_queue_full=True,
                        batching_enabled=False,
                    )
                except _HELD_ERRORS:
                    pass  # another writer holds it; stand by
                except PulsarException as exc:
                    clog.debug("campaign attempt failed", error=repr(exc))
                else:
                    if fence:
                        clog.warning("took the ledger over from a silent writer")
                    try:
                        return PulsarLogWriter(self, writer_id, producer, watch, term)
                    except BaseException:
                        with contextlib.suppress(Exception):
                            producer.close()
                        raise
            self._check_open()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise NotElectedError(f"{writer_id} was not elected writer of {self.ledger}")
            pause = self.campaign_interval
            if deadline is not None:
                pause = min(pause, deadline - now)
            time.sleep(max(pause, 0.0))

    def intake_producer(self, client_id: str) -> PulsarIntakeProducer:
        self._check_open()
        return PulsarIntakeProducer(self, check_client_id(client_id))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watch, self._lease_watch = self._lease_watch, None
            lease_producer, self._lease_producer = self._lease_producer, None
            end_consumer, self._end_consumer = self._end_consumer, None
        for w in list(self._writers):
            w._stop_heartbeat()
        if watch is not None:
            watch.close()
        for handle in (lease_producer, end_consumer):
            if handle is not None:
                with contextlib.suppress(Exception):
                    handle.close()
        try:
            self._client.close()
        except Exception as exc:
            self._log.warning("closing the Pulsar client failed", error=repr(exc))

    # Internals ----------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The underlying ``pulsar.Client`` (shared by everything this backend opens)."""
        return self._client

    @property
    def active_writers(self) -> tuple[PulsarLogWriter, ...]:
        """Writers elected through this handle and not closed yet (for tests and tools)."""
        return tuple(w for w in list(self._writers) if not w.closed)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"backend {self.url} is closed")

    def _new_client(self) -> Any:
        """A ``pulsar.Client`` with this backend's settings (its own connections)."""
        return pulsar.Client(self.service_url, **self._client_options)

    def _watch(self) -> _LeaseWatch | None:
        """The lease topic's watcher, created on first use; None while unreachable."""
        with self._lock:
            if self._lease_watch is None and not self._closed:
                try:
                    self._lease_watch = _LeaseWatch(self._client, self.lease_topic)
                except PulsarException as exc:
                    self._log.debug("lease topic unreachable", error=repr(exc))
            return self._lease_watch

    def _publish_lease(self, kind: str, token: str, writer_id: str, *, wait: bool) -> None:
        """Send a claim or heartbeat; best effort (the lease is for liveness only)."""
        data = msgspec.msgpack.encode([kind, token, writer_id])
        try:
            with self._lock:
                if self._closed:
                    return
                if self._lease_producer is None:
                    self._lease_producer = self._client.create_producer(
                        self.lease_topic,
                        send_timeout_millis=int(self.lease_timeout * 1000),
                        block_if_queue_full=False,
                        batching_enabled=False,
                    )
                producer = self._lease_producer
            if wait:
                producer.send(data)
            else:
                producer.send_async(data, _ignore_result)
        except PulsarException as exc:
            self._log.debug("lease message not sent", kind=kind, error=repr(exc))


def _ignore_result(_result: Any, _msg_id: Any) -> None:
    """A send callback that must not raise (an exception there aborts the process)."""


#: What the C++ client raises when the broker refuses a connection (a missing or bad
#: token makes the broker drop the CONNECT, which the client retries until it times out).
_UNREACHABLE_ERRORS: Final = (
    pulsar.Timeout,
    pulsar.ConnectError,
    pulsar.AuthenticationError,
    pulsar.AuthorizationError,
)


def _broker_error(backend: PulsarBackend, what: str, exc: Exception) -> BackendError:
    """A BackendError for `exc`; says so plainly when the broker refused the connection or
    never answered (the usual face of a missing or rejected token)."""
    if not isinstance(exc, _UNREACHABLE_ERRORS):
        return BackendError(f"{what}: {exc}")
    token = "a token was given" if backend.has_auth_token else "no token was given (?token=...)"
    return BackendError(
        f"{what}: {exc}: the broker at {backend.service_url} refused the connection or did "
        f"not answer within {backend.operation_timeout:g}s - authentication refused or "
        f"broker unreachable ({token})"
    )


# -- the lease -----------------------------------------------------------------------------


class _LeaseWatch:
    """Tails the non-persistent lease topic: when it last heard anything, and which
    writers claimed the ledger, in arrival order. Its listener runs on the client's
    listener thread and only records."""

    _KEEP_CLAIMS: Final = 64

    def __init__(self, client: Any, topic: str) -> None:
        self._mutex = threading.Lock()
        self._heard = self._observed = time.monotonic()
        self._claims: deque[tuple[int, str, str]] = deque(maxlen=self._KEEP_CLAIMS)
        self._count = 0
        self._reader = client.create_reader(
            topic, pulsar.MessageId.latest, reader_listener=self._on_message
        )

    def _on_message(self, _reader: Any, msg: Any) -> None:
        try:
            kind, token, writer_id = msgspec.msgpack.decode(msg.data())
            with self._mutex:
                self._heard = time.monotonic()
                if kind == "claim":
                    self._count += 1
                    self._claims.append((self._count, str(token), str(writer_id)))
        except Exception:  # foreign bytes on the lease topic: not a heartbeat
            return

    def connected(self) -> bool:
        try:
            return bool(self._reader.is_connected())
        except Exception:
            return False

    def silent_for(self, max_gap: float) -> float:
        """Seconds the lease topic has been silent while we were listening without a
        break. Observation counts only between calls less than `max_gap` apart and while
        connected: a broker outage is not the writer's silence, and neither is time this
        process itself spent stopped or doing something else."""
        now = time.monotonic()
        with self._mutex:
            if not self.connected() or now - self._observed > max_gap:
                self._heard = now
            self._observed = now
            return now - self._heard

    def claim_count(self) -> int:
        with self._mutex:
            return self._count

    def foreign_claim(self, since: int, token: str) -> str | None:
        """The writer id of a claim other than `token` heard after claim number `since`."""
        with self._mutex:
            for n, tok, writer_id in self._claims:
                if n > since and tok != token:
                    return writer_id
        return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._reader.close()


# -- reading -------------------------------------------------------------------------------


class PulsarLogReader(LogReader):
    """A Pulsar reader on the ledger topic (a non-durable subscription).

    The client resubscribes after a reconnect from the last message it handed out; the
    reader also drops anything at or before its position, so neither a reconnect nor a
    broker restart can make it return an entry twice. Transient broker errors read as
    "nothing yet": a replica's reading thread must survive a broker restart."""

    def __init__(self, backend: PulsarBackend, start: Position) -> None:
        self.backend = backend
        self._position = start
        self._op_ms = int(backend.operation_timeout * 1000)
        self._closed = False
        try:
            self._reader = backend.client.create_reader(
                backend.topic,
                _start_message_id(start),
                start_message_id_inclusive=False,
                receiver_queue_size=_RECEIVER_QUEUE,
            )
        except PulsarException as exc:
            raise _broker_error(backend, f"reader on {backend.topic} at {start}", exc) from exc

    @property
    def position(self) -> Position:
        return self._position

    def _next(self, timeout_ms: int) -> Any:
        # read_next, not read_next_async: the C++ consumer's receiveAsync races with a
        # message arriving (ConsumerImpl::executeNotifyCallback finds no pending receive,
        # unlocks, then queues the message; a receiveAsync in between registers behind
        # it), so that message waits for the next arrival and is delivered after it: a
        # hang when none comes, entries out of order otherwise. A full benchmark run with
        # read_next_async hung once, as this predicts.
        try:
            return self._reader.read_next(timeout_ms)
        except pulsar.Timeout:
            return None
        except pulsar.AlreadyClosed as exc:
            if self._closed or self.backend._closed:
                raise ClosedError("reader is closed") from exc
            return None
        except PulsarException as exc:
            log.warning("ledger read failed; retrying", ledger=self.backend.ledger, error=repr(exc))
            return None

    def _more_on_broker(self) -> bool:
        try:
            return bool(self._reader.has_message_available())
        except PulsarException:
            return False

    def read(self, max_entries: int = 1024, timeout: float = 0.0) -> list[Entry]:
        if self._closed:
            raise ClosedError("reader is closed")
        out: list[Entry] = []
        # With a timeout, one blocking call takes a queued message or waits for one (an
        # empty queue's read_next(0) raises Timeout: see _first_message).
        waited = timeout > 0
        msg, more = _first_message(self._next, max(1, int(timeout * 1000)) if waited else 0)
        if not more:
            max_entries = 1
        while len(out) < max_entries:
            if msg is None:
                if out or waited:
                    break
                # Nothing has arrived locally: entries the broker holds may still be on
                # their way, and "timeout=0" must still return what exists now.
                if self._more_on_broker():
                    msg = self._next(self._op_ms)
                waited = True  # one such wait per call
                if msg is None:
                    break
            ledger_id, entry_id, batch_index = _ids(msg.message_id())
            nxt = _next_position(ledger_id, entry_id)
            if ledger_id >= 0 and nxt > self._position:
                # A batched message was not written by ledgerlog; its entry counts once,
                # as malformed bytes, the same at every reader.
                data = msg.data() if batch_index < 0 else b""
                out.append(Entry(Position(ledger_id, entry_id), nxt, data))
                self._position = nxt
            msg = self._next(0) if len(out) < max_entries else None
        if out:
            self.backend._saw(self._position)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._reader.close()


# -- writing -------------------------------------------------------------------------------


class _PendingSends(PendingAppend):
    """One append's sends, completed by the client's callbacks (in send order: one
    producer, no batching)."""

    def __init__(
        self, writer: PulsarLogWriter, count: int, deadline: float, state: bytes = b""
    ) -> None:
        self.pending = count
        self.error: Any = None
        self.last: tuple[int, int] | None = None
        # For the restart chain: where the first message landed, whether each landed
        # right after the one before, and the sequencer state after the append.
        self.first: tuple[int, int] | None = None
        self._prev: tuple[int, int] | None = None
        self.adjacent = True
        self.state = state
        self._writer = writer
        self._deadline = deadline
        self._done = threading.Event()
        self._mutex = threading.Lock()
        self._hooks: list[Callable[[], None]] | None = []
        if count <= 0:
            self._done.set()

    def callback(self, result: Any, msg_id: Any) -> None:
        # Runs on the client's I/O thread; an exception here would abort the process.
        try:
            self._writer._slots.release()
            landed = False
            with self._mutex:
                self.pending -= 1
                if result == pulsar.Result.Ok:
                    ledger_id, entry_id, _ = _ids(msg_id)
                    # ledger id -1: a resend the broker deduplicated.
                    if ledger_id >= 0 and (self.last is None or (ledger_id, entry_id) > self.last):
                        self.last = (ledger_id, entry_id)
                    prev = self._prev
                    if prev is None:
                        self.first = (ledger_id, entry_id)
                    elif ledger_id < 0 or (ledger_id, entry_id) != (prev[0], prev[1] + 1):
                        self.adjacent = False
                    self._prev = (ledger_id, entry_id)
                    landed = self.pending <= 0 and self.error is None
                elif self.error is None:
                    self.error = result
                    # No later append may start (the writer resigns at its next look).
                    if result in _FENCED_RESULTS:
                        self._writer._fenced = True
                    else:
                        self._writer._broken = self._writer._broken or str(result)
                if self.pending <= 0 or self.error is not None:
                    self._done.set()
            if landed:
                self._writer._landed(self)
            self._run_hooks()
        except BaseException:
            self._done.set()
            self._run_hooks()

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        with self._mutex:
            if self._hooks is not None and not self._done.is_set():
                self._hooks.append(fn)
                return
        fn()

    def _run_hooks(self) -> None:
        if not self._done.is_set():
            return
        with self._mutex:
            hooks, self._hooks = self._hooks, None
        for fn in hooks or ():
            try:
                fn()
            except Exception:  # on the client's I/O thread: must not escape
                log.exception("append completion hook failed")

    def fail(self, error: Any) -> None:
        with self._mutex:
            if self.error is None:
                self.error = error
            self._done.set()
        self._run_hooks()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Position:
        wait = self._deadline - time.monotonic()
        if timeout is not None and timeout < wait:
            if not self._done.wait(max(timeout, 0.0)):
                raise TimeoutError("append still pending")
        elif not self._done.wait(max(wait, 0.0)):
            self.fail(f"not acknowledged within {self._writer.backend.append_timeout}s")
        return self._writer._finish(self)


class PulsarLogWriter(LogWriter):
    """The elected writer: holds the ledger topic's exclusive producer and the lease."""

    def __init__(
        self,
        backend: PulsarBackend,
        writer_id: str,
        producer: Any,
        watch: _LeaseWatch | None,
        term: str,
    ) -> None:
        self.backend = backend
        self.writer_id = writer_id
        self.max_pending_appends = backend.max_pending_appends
        self._producer = producer
        self._watch = watch
        self._token = term
        self._log = log.bind(ledger=backend.ledger, writer=writer_id, term=self._token)
        self._slots = threading.BoundedSemaphore(backend.max_in_flight)
        self._append_lock = threading.Lock()
        self._fenced = False
        self._broken: str | None = None
        self._closed = False
        self._end: Position | None = None
        self._restart = _RestartChain()
        self._checking_gap = threading.Event()
        self._stop = threading.Event()
        self._claims_before = watch.claim_count() if watch is not None else 0
        backend._publish_lease("claim", self._token, writer_id, wait=True)
        backend._writers.add(self)
        self._heartbeat = threading.Thread(
            target=self._beat, name=f"ledgerlog-lease-{writer_id}", daemon=True
        )
        self._heartbeat.start()
        self._log.info("elected", producer=producer.producer_name())

    @property
    def closed(self) -> bool:
        return self._closed

    # Lease ---------------------------------------------------------------------------------

    def _beat(self) -> None:
        interval = max(self.backend.lease_timeout / 4, 0.05)
        while not self._stop.wait(interval):
            if self._deposed() or self._stop.is_set():
                return
            self.backend._publish_lease("beat", self._token, self.writer_id, wait=False)
            gap = self._restart.gap()
            if gap is not None and not self._checking_gap.is_set():
                # In a thread of its own: opening a reader can take up to the operation
                # timeout while the broker is away, and the heartbeat must not wait.
                self._checking_gap.set()
                threading.Thread(
                    target=self._check_gap,
                    args=(gap[0],),
                    name=f"ledgerlog-restart-{self.writer_id}",
                    daemon=True,
                ).start()

    def _check_gap(self, end: Position) -> None:
        """Close the restart chain's gap after `end` if the ledger's first entry at or
        after it is this writer's own (see _RestartChain.close_gap)."""
        try:
            first: Position | None = None
            with self.backend.reader(end) as reader:
                entries = reader.read(1, timeout=min(self.backend.operation_timeout, 5.0))
            if entries:
                first = entries[0].position
            self._restart.close_gap(first)
        except (BackendError, ClosedError):
            pass  # asked again at the next heartbeat
        except Exception:  # a daemon thread: say so, and let the next heartbeat retry
            self._log.exception("restart point check failed")
        finally:
            self._checking_gap.clear()

    def _landed(self, sends: _PendingSends) -> None:
        # On the client's I/O thread, in append order (one producer, no batching).
        if sends.first is None or sends.last is None:
            return
        self._restart.landed(
            Position(*sends.first), _next_position(*sends.last), sends.adjacent, sends.state
        )

    def _stop_heartbeat(self) -> None:
        self._stop.set()

    def stop_heartbeat(self) -> None:
        """Fault injection: stop renewing the lease, exactly as a hung writer would (the
        producer stays attached). A standby then fences this writer after
        ``lease_timeout``."""
        self._log.warning("heartbeat stopped on request (simulated hang)")
        self._stop_heartbeat()

    def _deposed(self) -> bool:
        if self._fenced:
            return True
        if self._watch is None:
            return False
        other = self._watch.foreign_claim(self._claims_before, self._token)
        if other is not None:
            self._log.warning("another writer claimed the ledger", by=other)
            self._fenced = True
        return self._fenced

    # LogWriter -----------------------------------------------------------------------------

    def recovery_point(self) -> tuple[Position, bytes | None]:
        # Where the scan starts is logged by the writer, with what it cost.
        point = self.backend._newest_restart_point()
        self._restart.start(point)
        return (START, None) if point is None else point

    def check(self) -> None:
        if self._closed:
            raise ClosedError(f"writer {self.writer_id} is closed")
        if self._deposed():
            raise FencedError(f"writer {self.writer_id} lost {self.backend.ledger}")

    def append(self, entries: Sequence[bytes], state: bytes) -> Position:
        return self.append_async(entries, state).result()

    def append_async(self, entries: Sequence[bytes], state: bytes) -> PendingAppend:
        self.check()
        if self._broken is not None:
            raise BackendError(f"writer {self.writer_id} cannot append: {self._broken}")
        with self._append_lock:
            if not entries:
                return CompletedAppend(self._end if self._end is not None else self.backend.end())
            deadline = time.monotonic() + self.backend.append_timeout
            sends = _PendingSends(self, len(entries), deadline, state)
            properties = self._restart.properties
            for data in entries:
                if not self._slots.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
                    sends.fail("timed out waiting for in-flight sends")
                    break
                try:
                    self._producer.send_async(bytes(data), sends.callback, properties=properties)
                except PulsarException as exc:
                    self._slots.release()
                    sends.fail(exc)
                    break
            return sends

    def _finish(self, sends: _PendingSends) -> Position:
        """The outcome of a completed append, as :meth:`append` reports it."""
        error = sends.error
        if error is not None:
            fenced = error in _FENCED_RESULTS or isinstance(error, _FENCED_ERRORS)
            if fenced:
                self._fenced = True
                self._log.warning("fenced on append", error=str(error))
                raise FencedError(f"writer {self.writer_id} was fenced: {error}")
            # Sends may still be pending: this term must not append again (a later
            # append could land while an earlier one never does). The writer resigns.
            self._broken = self._broken or str(error)
            self._log.error("append failed", error=str(error))
            raise BackendError(f"append to {self.backend.topic} failed: {error}")
        if sends.last is None:  # every send was a deduplicated resend
            return self._end if self._end is not None else self.backend.end()
        end = _next_position(*sends.last)
        if self._end is None or end > self._end:
            self._end = end
        return end

    def intake(self, meta: bytes) -> PulsarIntakeConsumer:
        self.check()
        return PulsarIntakeConsumer(self, meta)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._heartbeat.is_alive() and threading.current_thread() is not self._heartbeat:
            self._heartbeat.join(timeout=1)
        try:
            self._producer.close()  # a standby takes over at its next attempt
        except PulsarException as exc:
            self._log.debug("closing the ledger producer", error=repr(exc))
        self._log.info("resigned")


# -- intake --------------------------------------------------------------------------------


class PulsarIntakeProducer(IntakeProducer):
    """A client's producer on the intake topic. ``submit`` returns once the broker has the
    message durably; concurrent submits are pipelined on one connection and share the
    bookie journal's group commit."""

    def __init__(self, backend: PulsarBackend, client_id: str) -> None:
        self.backend = backend
        self.client_id = client_id
        self._closed = False
        self._mutex = threading.Lock()
        self._in_flight = 0
        self._max_in_flight = backend.intake_in_flight
        self._held: deque[_Submission] = deque()
        client = backend.client
        try:
            # The retention anchor must exist before anything is published (see the
            # module docstring); creating an existing subscription changes nothing.
            client.subscribe(
                backend.intake_topic,
                WRITER_SUBSCRIPTION,
                consumer_type=pulsar.ConsumerType.Failover,
                receiver_queue_size=0,
                initial_position=pulsar.InitialPosition.Earliest,
            ).close()
            self._producer = client.create_producer(
                backend.intake_topic,
                send_timeout_millis=0,  # never dropped across a reconnect; submit bounds the wait
                max_pending_messages=10_000,
                block_if_queue_full=False,
                batching_enabled=False,
                properties={"ledgerlog-client": client_id},
            )
        except PulsarException as exc:
            raise _broker_error(backend, f"intake producer on {backend.intake_topic}", exc) from exc

    def submit(self, data: bytes, timeout: float | None = None) -> None:
        done = threading.Event()
        box: list[BaseException | None] = []

        def finished(error: BaseException | None) -> None:
            box.append(error)
            done.set()

        self.submit_async(data, finished)
        if not done.wait(timeout):
            raise BackendError(
                f"intake submit not acknowledged within {timeout}s (it may still arrive)"
            )
        if box[0] is not None:
            raise box[0]

    def submit_async(self, data: bytes, on_done: Callable[[BaseException | None], None]) -> None:
        """Sends at once while fewer than ``intake_in_flight`` intake messages of this
        producer are unacknowledged; otherwise holds the batch back, and the next
        acknowledgement sends everything held as one message. Concurrent submitters (a
        client's threads) then share messages: each message costs the broker and the
        writer about as much as its bytes, so many small ones were most of their work."""
        item = (bytes(data), on_done)
        with self._mutex:
            # Checked under the lock close() takes the held batches with: a batch held
            # after that would never be sent nor failed.
            if self._closed:
                raise ClosedError("intake producer is closed")
            if self._in_flight >= self._max_in_flight:
                self._held.append(item)
                return
            self._in_flight += 1
        self._send([item])

    def _send(self, group: list[_Submission]) -> None:
        """Send `group` as one message (the caller holds one in-flight slot for it);
        anything in it that is not an intake batch (foreign bytes) goes as it is, in a
        message of its own."""
        messages: list[tuple[bytes, list[_Submission]]]
        if len(group) == 1:
            messages = [(group[0][0], group)]
        else:
            merged, foreign = merge_intake([d for d, _cb in group])
            messages = [(group[i][0], [group[i]]) for i in foreign]
            if merged is not None:
                alone = set(foreign)
                messages.insert(0, (merged, [g for i, g in enumerate(group) if i not in alone]))
            with self._mutex:
                self._in_flight += len(messages) - 1
        for i, (data, members) in enumerate(messages):
            try:
                self._send_one(data, members)
            except BaseException:
                with self._mutex:  # the slots of the messages not sent after this one
                    self._in_flight -= len(messages) - 1 - i
                raise

    def _send_one(self, data: bytes, group: list[_Submission], resends: int = 0) -> None:
        def on_ack(result: Any, msg_id: Any) -> None:
            # Runs on the client's I/O thread: an exception escaping it aborts the process.
            error: BaseException | None = (
                None
                if result == pulsar.Result.Ok
                else BackendError(f"intake submit failed: {result}")
            )
            if error is None and _ids(msg_id)[0] < 0:
                # The broker dropped it as a duplicate of an earlier sequence id: seen
                # for a held batch sent while a deposed writer's client resubmitted its
                # own, and the message was not on the topic. Nothing says it was stored,
                # so it goes again (on this slot); a copy that did land is decided once.
                if resends < _MAX_DEDUP_RESENDS:
                    log.warning(
                        "intake message deduplicated by the broker; sending it again",
                        client=self.client_id,
                        txn_batches=len(group),
                    )
                    try:
                        self._send_one(data, group, resends + 1)
                        return
                    except BaseException as exc:
                        error = exc
                else:
                    error = BackendError(
                        f"intake message deduplicated by the broker {resends + 1} times"
                    )
            for _data, callback in group:
                try:
                    callback(error)
                except BaseException:
                    log.exception("intake submit callback failed", client=self.client_id)
            try:
                self._next_held()
            except BaseException:
                log.exception("sending held intake batches failed", client=self.client_id)

        try:
            self._producer.send_async(data, on_ack)
        except PulsarException as exc:
            with self._mutex:
                self._in_flight -= 1
            raise BackendError(f"intake submit failed: {exc}") from exc

    def _take_held(self) -> list[_Submission]:
        """The oldest held batches, up to ``_MAX_MERGED`` bytes but at least one (call
        with the mutex held)."""
        group: list[_Submission] = []
        size = 0
        while self._held and (not group or size + len(self._held[0][0]) <= _MAX_MERGED):
            item = self._held.popleft()
            group.append(item)
            size += len(item[0])
        return group

    def _next_held(self) -> None:
        """An intake message was acknowledged: its slot sends what was held back."""
        with self._mutex:
            if not self._held:
                self._in_flight -= 1
                return
            group = self._take_held()
        try:
            self._send(group)
        except BaseException as exc:
            # The producer refuses to send (closed, queue full): these and everything
            # still held fail now rather than wait for an acknowledgement that never comes.
            with self._mutex:
                rest = list(self._held)
                self._held.clear()
            for _data, callback in [*group, *rest]:
                callback(exc)

    def close(self) -> None:
        """Sends what is held back and waits for every message to be acknowledged, so a
        submission made before close still reaches the ledger (as it did when submits
        waited for their acknowledgement)."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            groups: list[list[_Submission]] = []
            while self._held:
                groups.append(self._take_held())
            self._in_flight += len(groups)
        for group in groups:
            try:
                self._send(group)
            except Exception as exc:
                for _data, callback in group:
                    with contextlib.suppress(Exception):
                        callback(exc)
        try:
            self._producer.flush()
        except PulsarException as exc:
            log.debug("flushing an intake producer", client=self.client_id, error=repr(exc))
        try:
            self._producer.close()
        except PulsarException as exc:
            log.debug("closing an intake producer", client=self.client_id, error=repr(exc))


class PulsarIntakeConsumer(IntakeConsumer):
    """The elected writer's reader on the intake topic, from the submission after the
    one the newest visible record's meta names (the topic's start if none does)."""

    def __init__(self, writer: PulsarLogWriter, meta: bytes) -> None:
        self.writer = writer
        backend = writer.backend
        self._closed = False
        self._meta = meta
        after = _decode_meta(meta)
        self._last: tuple[int, int, int] = after if after is not None else (-1, -1, -1)
        self._log = writer._log.bind(intake_after=str(after))
        if meta and after is None:
            self._log.error("unreadable intake position in the ledger; rereading the intake")
        elif after is None:
            self._log.info("no intake position in the ledger; reading the intake from its start")
        start = (
            pulsar.MessageId(ledger_id=after[0], entry_id=after[1], batch_index=after[2])
            if after is not None
            else pulsar.MessageId.earliest
        )
        try:
            self._reader = backend.client.create_reader(
                backend.intake_topic,
                start,
                start_message_id_inclusive=False,
                receiver_queue_size=_RECEIVER_QUEUE,
            )
            self._anchor = backend.client.subscribe(
                backend.intake_topic,
                WRITER_SUBSCRIPTION,
                consumer_type=pulsar.ConsumerType.Failover,
                consumer_name=f"{writer.writer_id}.{writer._token}",
                receiver_queue_size=0,
                initial_position=pulsar.InitialPosition.Earliest,
            )
        except PulsarException as exc:
            self.close()
            raise BackendError(f"intake reader on {backend.intake_topic}: {exc}") from exc

    def _next(self, timeout_ms: int) -> Any:
        try:
            return self._reader.read_next(timeout_ms)
        except pulsar.Timeout:
            return None
        except PulsarException as exc:
            if self._closed:
                raise ClosedError("intake consumer is closed") from exc
            self._log.warning("intake read failed", error=repr(exc))
            return None

    def poll(self, max_items: int = 1024, timeout: float = 0.0) -> list[IntakeItem]:
        if self._closed:
            raise ClosedError("intake consumer is closed")
        items: list[IntakeItem] = []
        msg, more = _first_message(self._next, max(int(timeout * 1000), 0))
        while msg is not None:
            msg_id = msg.message_id()
            ids = _ids(msg_id)
            if ids > self._last:  # never hand out a submission twice, whatever reconnects do
                self._last = ids
                items.append(IntakeItem(msg.data(), msg_id))
                if len(items) >= max_items:
                    break
            msg = self._next(0) if more else None
        return items

    def meta(self, items: Sequence[IntakeItem]) -> bytes:
        if items:
            self._meta = _encode_meta(max(_ids(it.token) for it in items))
        return self._meta

    def ack(self, items: Sequence[IntakeItem]) -> None:
        # Only moves the retention anchor; best effort (a lost acknowledgement keeps a
        # few consumed submissions around a little longer).
        if not items:
            return
        last = max(items, key=lambda it: _ids(it.token))
        try:
            self._anchor.acknowledge_cumulative(last.token)
        except PulsarException as exc:
            self._log.debug("intake anchor acknowledgement failed", error=repr(exc))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for name in ("_reader", "_anchor"):
            handle = getattr(self, name, None)
            if handle is not None:
                with contextlib.suppress(Exception):
                    handle.close()  # the anchor's close flushes grouped acknowledgements
