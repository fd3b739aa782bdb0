"""The packet API Client and Service share (peer.py): what send, publish, broadcast and
request put in the header, checked without a connection."""

from __future__ import annotations

import math
from collections.abc import Awaitable
from typing import ClassVar

import pytest

from packetstack import Packet, RequestTimeout
from packetstack.peer import Peer, first_packet_id, ttl_ms
from packetstack.protocol import ErrorBody, Flag, PacketHeader, Target


class PeerNote(Packet):
    packet_tag: ClassVar[str] = "tests.peer.Note"
    text: str


class Recorder(Peer):
    """A peer whose packets go nowhere: it keeps the headers it was asked to send."""

    def __init__(self) -> None:
        super().__init__("recorder", request_timeout=0.05)
        self.sent: list[tuple[PacketHeader, bool]] = []

    def _transmit(
        self, header: PacketHeader, body: Packet | ErrorBody, ack: bool
    ) -> Awaitable[None] | None:
        self.sent.append((header, ack))
        return None

    @property
    def last(self) -> PacketHeader:
        return self.sent[-1][0]


# --------------------------------------------------------------------- ttl


@pytest.mark.parametrize(
    ("seconds", "ms"), [(1, 1000), (0.25, 250), (10_800, 10_800_000), (0.0001, 1), (1.0006, 1001)]
)
def test_ttl_in_seconds_goes_in_the_header_in_milliseconds(seconds: float, ms: int) -> None:
    assert ttl_ms(seconds) == ms


def test_no_ttl_is_zero_the_services_default() -> None:
    assert ttl_ms(None) == 0


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, math.nan, -math.inf])
def test_a_ttl_that_is_not_positive_is_a_value_error(bad: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        ttl_ms(bad)


async def test_send_puts_the_ttl_in_the_header_and_returns_the_packet_id() -> None:
    peer = Recorder()
    packet_id = await peer.send("beta", PeerNote("x"), ttl=2.5)
    assert peer.last.ttl == 2500
    assert packet_id == peer.last.id
    await peer.send("beta", PeerNote("x"))
    assert peer.last.ttl == 0


@pytest.mark.parametrize("bad", [0, -1, -0.001])
async def test_send_and_publish_with_a_ttl_that_is_not_positive_raise_value_error(
    bad: float,
) -> None:
    peer = Recorder()
    with pytest.raises(ValueError):
        await peer.send("beta", PeerNote("x"), ttl=bad)
    with pytest.raises(ValueError):
        await peer.publish("room", PeerNote("x"), ttl=bad)
    assert peer.sent == []  # nothing went out


async def test_publish_puts_the_ttl_in_the_header() -> None:
    peer = Recorder()
    packet_id = await peer.publish("room", PeerNote("x"), ttl=60)
    assert (peer.last.target, peer.last.dst, peer.last.ttl) == (Target.GROUP, "room", 60_000)
    assert packet_id == peer.last.id


async def test_a_request_lives_as_long_as_its_timeout() -> None:
    peer = Recorder()
    with pytest.raises(RequestTimeout):
        await peer.request("beta", PeerNote("q"), timeout=0.02)
    assert peer.last.ttl == 20
    assert peer.last.flags == Flag.REQUEST
    with pytest.raises(RequestTimeout):
        await peer.request("beta", PeerNote("q"))  # the peer's request_timeout, 0.05 s
    assert peer.last.ttl == 50


# ------------------------------------------------------------------- flags


async def test_notify_expired_sets_the_notify_flag() -> None:
    peer = Recorder()
    await peer.send("beta", PeerNote("x"), notify_expired=True)
    assert peer.last.flags == Flag.NOTIFY
    await peer.send("beta", PeerNote("x"), ack=True, notify_expired=True)
    assert peer.last.flags == Flag.ACK | Flag.NOTIFY
    assert peer.sent[-1][1] is True
    await peer.publish("room", PeerNote("x"), notify_expired=True)
    assert peer.last.flags == Flag.NOTIFY
    await peer.send("beta", PeerNote("x"))
    assert peer.last.flags == 0


# --------------------------------------------------------------------- ids


async def test_packet_ids_count_up_from_a_random_start() -> None:
    first, second = Recorder(), Recorder()
    for _ in range(3):
        await first.send("beta", PeerNote("x"))
    await second.send("beta", PeerNote("x"))
    ids = [header.id for header, _ in first.sent]
    assert ids == [ids[0], ids[0] + 1, ids[0] + 2]
    assert 0 < ids[0] <= 2**52
    assert second.last.id != ids[0]  # 1 in 2**52 to collide


def test_first_packet_id_is_a_positive_52_bit_number() -> None:
    starts = {first_packet_id() for _ in range(100)}
    assert len(starts) == 100
    assert all(0 < start <= 2**52 for start in starts)
