"""Smoke tests of the local Pulsar standalone against the real ``pulsar-client``.

Why: ledgerlog's Pulsar backend relies on exact broker and client behaviours (exclusive
producers, fencing takeover, deduplication, durability across kill -9, token auth). These
tests pin down what the pinned broker and client actually do, on a broker started by
:class:`ledgerlog.devservers.pulsar.LocalPulsar` once per module.
"""

from __future__ import annotations

import logging
import os
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from ledgerlog.devservers.pulsar import LocalPulsar

pulsar = pytest.importorskip("pulsar")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# The C++ client logs every connection at INFO to stdout; route it through logging.
CLIENT_LOG = logging.getLogger("pulsar-client")
CLIENT_LOG.setLevel(logging.WARNING)
OP_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def broker(local_pulsar: LocalPulsar) -> LocalPulsar:
    """The session's broker (integration/conftest.py); these tests leave it healthy."""
    return local_pulsar


@pytest.fixture()
def client(broker: LocalPulsar) -> Iterator[pulsar.Client]:
    c = pulsar.Client(broker.service_url, operation_timeout_seconds=OP_TIMEOUT_S, logger=CLIENT_LOG)
    try:
        yield c
    finally:
        c.close()


def new_topic(prefix: str) -> str:
    return f"persistent://public/default/{prefix}-{uuid.uuid4().hex[:12]}"


def read_all(client: pulsar.Client, topic: str) -> list[bytes]:
    reader = client.create_reader(topic, pulsar.MessageId.earliest)
    try:
        out: list[bytes] = []
        while reader.has_message_available():
            out.append(reader.read_next(timeout_millis=OP_TIMEOUT_S * 1000).data())
        return out
    finally:
        reader.close()


def test_round_trip_on_persistent_topic(broker: LocalPulsar, client: pulsar.Client) -> None:
    topic = new_topic("roundtrip")
    consumer = client.subscribe(topic, "smoke", consumer_type=pulsar.ConsumerType.Exclusive)
    producer = client.create_producer(topic)
    sent_raw = producer.send(b"hello ledgerlog")
    msg = consumer.receive(timeout_millis=OP_TIMEOUT_S * 1000)
    consumer.acknowledge(msg)

    assert msg.data() == b"hello ledgerlog"
    # send() and message_id() hand back the raw _pulsar.MessageId; pulsar.MessageId.wrap
    # gives accessors and ordering. Neither type is hashable (__eq__ without __hash__):
    # key dicts by serialize() or by (ledger_id, entry_id, batch_index, partition).
    sent = pulsar.MessageId.wrap(sent_raw)
    got = pulsar.MessageId.wrap(msg.message_id())
    assert type(sent_raw).__module__ == "_pulsar"
    assert sent == got
    assert sent.serialize() == got.serialize()
    assert (sent.batch_index(), sent.partition()) == (-1, -1)  # batching is off by default
    with pytest.raises(TypeError):
        hash(sent)
    assert broker.log_path.is_file()


def test_second_exclusive_producer_is_refused(client: pulsar.Client) -> None:
    topic = new_topic("exclusive")
    first = client.create_producer(
        topic, producer_name="w1", access_mode=pulsar.ProducerAccessMode.Exclusive
    )
    first.send(b"one")
    started = time.monotonic()
    with pytest.raises(pulsar.ProducerFenced):
        client.create_producer(
            topic, producer_name="w2", access_mode=pulsar.ProducerAccessMode.Exclusive
        )
    assert time.monotonic() - started < OP_TIMEOUT_S  # refused at once, not a timeout
    first.send(b"two")  # the holder is unaffected
    assert read_all(client, topic) == [b"one", b"two"]


def test_exclusive_with_fencing_takeover_fails_old_producer(client: pulsar.Client) -> None:
    topic = new_topic("fencing")
    old = client.create_producer(
        topic, producer_name="old", access_mode=pulsar.ProducerAccessMode.Exclusive
    )
    old.send(b"before")
    new = client.create_producer(
        topic,
        producer_name="new",
        access_mode=pulsar.ProducerAccessMode.ExclusiveWithFencing,
    )
    with pytest.raises(pulsar.ProducerFenced):
        old.send(b"from the fenced writer")
    with pytest.raises(pulsar.ProducerFenced):  # and it stays fenced
        old.send(b"again")
    new.send(b"after")
    assert read_all(client, topic) == [b"before", b"after"]


def test_deduplication_drops_resend_of_same_sequence_id(client: pulsar.Client) -> None:
    topic = new_topic("dedup")
    producer = client.create_producer(topic, producer_name="dedup-writer")
    for seq in range(3):
        producer.send(f"m{seq}".encode(), sequence_id=seq)
    producer.close()

    again = client.create_producer(topic, producer_name="dedup-writer")
    assert again.last_sequence_id() == 2  # where a restarted writer resumes
    dup = pulsar.MessageId.wrap(again.send(b"m1-resent", sequence_id=1))
    # The broker acknowledges a duplicate without storing it, with an id of -1:-1.
    assert (dup.ledger_id(), dup.entry_id()) == (-1, -1)
    again.send(b"m3", sequence_id=3)
    assert read_all(client, topic) == [b"m0", b"m1", b"m2", b"m3"]


def test_acknowledged_messages_survive_kill_and_restart(broker: LocalPulsar) -> None:
    topic = new_topic("crash")
    c = pulsar.Client(broker.service_url, operation_timeout_seconds=OP_TIMEOUT_S, logger=CLIENT_LOG)
    try:
        producer = c.create_producer(topic, producer_name="durable")
        for i in range(20):
            producer.send(f"d{i}".encode())
    finally:
        c.close()
    old_pid, old_url = broker.pid, broker.service_url
    broker.kill()  # SIGKILL: no shutdown hook; the bookie must replay its fsynced journal
    broker.restart()
    assert broker.pid != old_pid and broker.service_url == old_url
    c = pulsar.Client(broker.service_url, operation_timeout_seconds=OP_TIMEOUT_S, logger=CLIENT_LOG)
    try:
        assert read_all(c, topic) == [f"d{i}".encode() for i in range(20)]
    finally:
        c.close()


def test_pause_and_resume(broker: LocalPulsar) -> None:
    assert broker.is_healthy()
    broker.pause()  # SIGSTOP: the kernel still accepts connections, nothing answers
    try:
        assert not broker.is_healthy(timeout=3)
    finally:
        broker.resume()
    broker.wait_ready(60)
    assert broker.is_healthy()


def test_broker_shares_the_launching_session(broker: LocalPulsar) -> None:
    """A process group of its own (a terminal's Ctrl-C stays with the launcher) in the
    launcher's session: a session of its own is a CPU group of its own under the kernel's
    autogroup scheduling, which cost the clients a core at each burst of the JVM."""
    assert os.getpgid(broker.pid) == broker.pid != os.getpgid(0)
    assert os.getsid(broker.pid) == os.getsid(0)


def test_broker_collects_garbage_with_zgc(broker: LocalPulsar) -> None:
    """Upstream's collector, not the JVM's default G1, whose 20-55 ms stop-the-world
    pauses under load were commit-latency outliers: the broker's own JVM metrics name
    ZGC's collectors and none of G1's."""
    with urllib.request.urlopen(f"{broker.admin_url}/metrics/", timeout=30) as resp:
        text = resp.read().decode()
    collectors = set(re.findall(r'jvm_gc_collection_seconds_count\{[^}]*gc="([^"]+)"', text))
    assert collectors, "no GC metrics on /metrics/"
    assert all(name.startswith("ZGC") for name in collectors), collectors


def test_token_auth_minted_token_produces_and_anonymous_is_refused() -> None:
    with LocalPulsar(token_auth=True) as secured:
        topic = new_topic("auth")
        authed = pulsar.Client(
            secured.service_url,
            authentication=pulsar.AuthenticationToken(secured.mint_token("alice")),
            operation_timeout_seconds=OP_TIMEOUT_S,
            logger=CLIENT_LOG,
        )
        try:
            authed.create_producer(topic).send(b"signed")
        finally:
            authed.close()

        # No token: the broker rejects the CONNECT and drops the connection; the C++
        # client retries until operation_timeout_seconds and raises pulsar.Timeout (not
        # AuthenticationError). A token signed with another key behaves the same.
        for auth in (None, pulsar.AuthenticationToken(secured.mint_token("x")[:-4] + "AAAA")):
            anon = pulsar.Client(
                secured.service_url,
                authentication=auth,
                operation_timeout_seconds=3,
                logger=CLIENT_LOG,
            )
            try:
                with pytest.raises(pulsar.Timeout):
                    anon.create_producer(topic)
            finally:
                anon.close()

        log = secured.log_path.read_text(encoding="utf-8", errors="replace")
        assert "Failed to authenticate: operation=connect" in log

        admin = pulsar.Client(
            secured.service_url,
            authentication=pulsar.AuthenticationToken(secured.admin_token),
            operation_timeout_seconds=OP_TIMEOUT_S,
            logger=CLIENT_LOG,
        )
        try:
            assert read_all(admin, topic) == [b"signed"]
        finally:
            admin.close()
