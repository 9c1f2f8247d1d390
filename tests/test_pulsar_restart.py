"""The Pulsar writer's restart chain (ledgerlog.backends.pulsar._RestartChain) on its own:
which appends prove a new restart point, and what a gap does. The end-to-end behaviour
against a real broker is in integration/test_pulsar_backend.py."""

from __future__ import annotations

import pytest

pytest.importorskip("pulsar")

from ledgerlog.backends.pulsar import (
    RESTART_PROPERTY,
    _decode_restart,
    _encode_restart,
    _RestartChain,
)
from ledgerlog.model import Position
from ledgerlog.validator import SequencerState


def state(next_seq: int) -> bytes:
    return SequencerState(epoch=3, next_seq=next_seq, hlc=7, meta=b"m").to_bytes()


def P(major: int, minor: int) -> Position:
    return Position(major, minor)


def anchored() -> _RestartChain:
    """A chain whose term's epoch start ended at (5, 10)."""
    chain = _RestartChain()
    chain.start((P(5, 0), state(1)))
    chain.landed(P(5, 9), P(5, 10), True, b"")
    return chain


def test_the_point_of_the_newest_message_is_carried_until_an_append_proves_a_newer() -> None:
    chain = _RestartChain()
    assert chain.point is None and chain.properties is None
    chain.start((P(5, 0), state(1)))
    assert chain.properties == {RESTART_PROPERTY: _encode_restart((P(5, 0), state(1)))}
    # The epoch start proves nothing by itself (its state is not passed).
    chain.landed(P(5, 9), P(5, 10), True, b"")
    assert chain.point == (P(5, 0), state(1))
    chain.landed(P(5, 10), P(5, 13), True, state(40))
    assert chain.point == (P(5, 13), state(40))
    assert _decode_restart(chain.properties[RESTART_PROPERTY]) == (P(5, 13), state(40))  # type: ignore[index]
    # An append passed without a state moves the proven end, not the point.
    chain.landed(P(5, 13), P(5, 14), True, b"")
    chain.landed(P(5, 14), P(5, 15), True, state(41))
    assert chain.point == (P(5, 15), state(41))


def test_an_append_that_lands_elsewhere_stops_the_chain_until_the_gap_is_checked() -> None:
    chain = anchored()
    chain.landed(P(5, 10), P(5, 12), True, state(3))
    # The topic moved to a new BookKeeper ledger (or something came in between).
    chain.landed(P(8, 0), P(8, 2), True, state(5))
    chain.landed(P(8, 2), P(8, 3), True, state(6))
    assert chain.point == (P(5, 12), state(3))
    assert chain.gap() == (P(5, 12), P(8, 0))
    chain.close_gap(None)  # could not look: still pending
    assert chain.gap() == (P(5, 12), P(8, 0))
    chain.close_gap(P(8, 0))  # the first entry after (5, 12) is our own append
    assert chain.gap() is None
    assert chain.point == (P(8, 3), state(6))
    chain.landed(P(8, 3), P(8, 4), True, state(7))
    assert chain.point == (P(8, 4), state(7))


def test_something_else_in_the_gap_keeps_the_point_for_the_rest_of_the_term() -> None:
    chain = anchored()
    chain.landed(P(5, 10), P(5, 12), True, state(3))
    chain.landed(P(5, 13), P(5, 14), True, state(5))  # (5, 12) is someone else's
    assert chain.gap() == (P(5, 12), P(5, 13))
    chain.close_gap(P(5, 12))
    assert chain.gap() is None
    for i in range(14, 20):
        chain.landed(P(5, i), P(5, i + 1), True, state(i))
    assert chain.point == (P(5, 12), state(3))


@pytest.mark.parametrize("how", ["messages apart", "second gap", "apart after a gap"])
def test_what_cannot_be_proven_never_moves_the_point(how: str) -> None:
    chain = anchored()
    chain.landed(P(5, 10), P(5, 11), True, state(2))
    if how == "messages apart":
        chain.landed(P(5, 11), P(5, 14), False, state(5))
    elif how == "second gap":
        chain.landed(P(6, 0), P(6, 1), True, state(3))
        chain.landed(P(7, 0), P(7, 1), True, state(4))
        assert chain.gap() is None
    else:
        chain.landed(P(6, 0), P(6, 1), True, state(3))
        chain.landed(P(6, 1), P(6, 4), False, state(6))
        chain.close_gap(P(6, 0))
    for i in range(20, 25):
        chain.landed(P(9, i), P(9, i + 1), True, state(i))
    assert chain.point == (P(5, 11), state(2))


def test_an_epoch_start_whose_messages_are_apart_anchors_nothing() -> None:
    chain = _RestartChain()
    chain.landed(P(5, 9), P(5, 11), False, b"")
    chain.landed(P(5, 11), P(5, 12), True, state(2))
    assert chain.point is None and chain.properties is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "2:1:2:" + _encode_restart((P(1, 2), state(1))).split(":")[3],
        "1:-1:2:" + _encode_restart((P(1, 2), state(1))).split(":")[3],
        "1:1:2:not base64!",
        "1:1:2:" + "AAAA",  # base64, but not a sequencer state
        "1:x:2:" + _encode_restart((P(1, 2), state(1))).split(":")[3],
    ],
)
def test_unreadable_restart_properties_read_as_none(text: str) -> None:
    assert _decode_restart(text) is None


def test_restart_properties_round_trip() -> None:
    point = (P(123, 456), state(789))
    assert _decode_restart(_encode_restart(point)) == point
