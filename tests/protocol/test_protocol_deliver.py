"""DELIVER frames (kind 11): a packet with the service's per-ending sequence number, sent by
the service only, handed up by the client in sequence order.

Expected frames are assembled with :func:`support.raw_deliver` / :func:`support.raw_frame`,
which follow the wire layout independently of the library's own frame builders.
"""

from __future__ import annotations

import random
import struct

import msgspec
import pytest
from support import CHUNK_SIZE, header, pack, pair, raw_deliver, raw_frame

from packetstack.errors import ProtocolError
from packetstack.protocol import (
    Connection,
    Event,
    Flag,
    FrameKind,
    Hello,
    PacketHeader,
    PacketReceived,
    PingReceived,
    Role,
    State,
    packet_frame,
)
from packetstack.protocol.connection import MAX_OPEN_STREAMS

# ----------------------------------------------------------------- helpers


def payload_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def deliveries(service: Connection, *items: tuple[int, PacketHeader, bytes]) -> bytes:
    """The DELIVER frames for ``(seq, header, payload)`` items, as the service writes them
    (a large one only announced: its chunks come from ``next_chunks``)."""
    out = bytearray()
    for seq, hdr, payload in items:
        service.append_delivery(out, seq, packet_frame(hdr, payload))
    return bytes(out)


def feed_bytewise(conn: Connection, data: bytes) -> list[Event]:
    events: list[Event] = []
    for i in range(len(data)):
        events += conn.receive_data(data[i : i + 1])
    return events


def handed_up(events: list[Event]) -> list[tuple[int, int, bytes]]:
    """(seq, packet id, payload) of every packet handed up, in order."""
    return [(e.seq, e.header.id, bytes(e.payload)) for e in events if isinstance(e, PacketReceived)]


def split_deliver(data: bytes) -> tuple[int, int, int, bytes, bytes]:
    """(kind, length, seq, header, payload) of one DELIVER frame."""
    length, kind, hlen, seq = struct.unpack_from(">IBHQ", data)
    assert length == len(data) - 4
    return kind, length, seq, data[15 : 15 + hlen], data[15 + hlen :]


# ------------------------------------------------------------------- layout


def test_a_small_delivery_is_one_frame_with_the_wire_layout() -> None:
    _, service = pair()
    hdr = header(7, flags=int(Flag.REQUEST), ttl=1500)
    data = deliveries(service, (2**64 - 1, hdr, b"body"))
    assert data == raw_deliver(2**64 - 1, pack(hdr), b"body")
    kind, length, seq, hdr_bytes, payload = split_deliver(data)
    assert kind == FrameKind.DELIVER == 11
    assert length == 1 + 2 + 8 + len(hdr_bytes) + len(payload)
    assert seq == 2**64 - 1
    assert msgspec.msgpack.decode(hdr_bytes, type=PacketHeader) == hdr
    assert payload == b"body"
    assert not service.has_chunks


def test_append_delivery_reuses_the_senders_header_and_payload_bytes() -> None:
    """A stored PACKET frame is re-prefixed, not re-encoded."""
    _, service = pair()
    stored = raw_frame(int(FrameKind.PACKET), pack(header(3)), b"payload")
    out = bytearray(b"before")
    service.append_delivery(out, 42, stored)
    assert bytes(out) == b"before" + raw_deliver(42, pack(header(3)), b"payload")


# ---------------------------------------------------------- client receives


def test_client_parses_deliveries_whole_and_bytewise_alike() -> None:
    client, service = pair()
    items = [
        (1, header(10), b""),
        (2, header(11, ttl=250, flags=int(Flag.NOTIFY)), b"two"),
        (3, header(12), payload_of(CHUNK_SIZE, seed=3)),  # the largest inline payload
    ]
    stream = deliveries(service, *items) + service.ping_frame()
    whole = client.receive_data(stream)
    bytewise = feed_bytewise(pair()[0], stream)
    assert whole == bytewise
    assert whole[-1] == PingReceived()
    packets = whole[:-1]
    assert handed_up(packets) == [(seq, h.id, p) for seq, h, p in items]
    for event, (seq, hdr, payload) in zip(packets, items, strict=True):
        assert isinstance(event, PacketReceived)
        assert event.header == hdr
        assert event.seq == seq
        assert event.frame == raw_deliver(seq, pack(hdr), payload)  # the frame as received
        assert event.offset == 15 + len(pack(hdr))
    assert whole[1].header.ttl == 250  # type: ignore[union-attr]


def test_a_plain_packet_to_a_client_has_seq_zero() -> None:
    client, service = pair()
    (event,) = client.receive_data(service.send_packet(header(5, flags=int(Flag.REPLY)), b"r"))
    assert isinstance(event, PacketReceived)
    assert event.seq == 0
    assert bytes(event.payload) == b"r"


def test_a_service_connection_refuses_deliver_frames() -> None:
    _, service = pair()
    with pytest.raises(ProtocolError, match="DELIVER"):
        service.receive_data(raw_deliver(1, pack(header()), b"x"))
    assert service.state is State.CLOSED


def test_deliver_before_the_handshake_is_a_protocol_error() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(ProtocolError):
        client.receive_data(raw_deliver(1, pack(header()), b"x"))
    service = Connection(Role.SERVICE)
    service.receive_data(client.hello_frame(Hello(1, "alpha")))
    with pytest.raises(ProtocolError):
        service.receive_data(raw_deliver(1, pack(header()), b"x"))


def test_events_parsed_before_a_refused_deliver_frame_come_with_the_error() -> None:
    client, service = pair()
    with pytest.raises(ProtocolError) as caught:
        service.receive_data(client.ping_frame() + raw_deliver(1, pack(header())))
    assert caught.value.events == [PingReceived()]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "hlen_over",
    [1, 8, 9],
    ids=["one byte over", "header runs into where the seq was", "past even the prefix"],
)
def test_deliver_header_length_running_past_the_frame_is_a_protocol_error(
    hlen_over: int,
) -> None:
    client, _ = pair()
    hdr = pack(header())
    good = raw_deliver(1, hdr, b"pay")
    # Room for header and payload after the seq: hlen may claim up to len(hdr) + 3.
    bad = good[:5] + struct.pack(">H", len(hdr) + 3 + hlen_over) + good[7:]
    with pytest.raises(ProtocolError, match="runs past"):
        client.receive_data(bad)
    assert client.state is State.CLOSED


@pytest.mark.parametrize("body", [0, 7], ids=["no seq", "seven of eight seq bytes"])
def test_a_deliver_frame_too_short_for_its_seq_is_a_protocol_error(body: int) -> None:
    client, _ = pair()
    data = struct.pack(">IBH", 3 + body, 11, 0) + bytes(body)
    with pytest.raises(ProtocolError):
        client.receive_data(data)


def test_a_malformed_deliver_header_is_a_protocol_error() -> None:
    client, _ = pair()
    with pytest.raises(ProtocolError, match="DELIVER"):
        client.receive_data(raw_deliver(1, b"\xc1", b""))  # 0xc1: never valid msgpack


# ------------------------------------------------------------ large ones


def test_a_large_delivery_is_announced_chunked_and_completes_with_its_seq() -> None:
    client, service = pair()
    data = payload_of(3 * CHUNK_SIZE + 17, seed=1)
    sent = header(9, flags=int(Flag.ACK), ttl=60_000)
    announce = deliveries(service, (77, sent, data))
    kind, _, seq, hdr_bytes, body = split_deliver(announce)
    assert kind == FrameKind.DELIVER
    assert seq == 77
    assert body == b""
    announced = msgspec.msgpack.decode(hdr_bytes, type=PacketHeader)
    assert announced.flags == Flag.ACK | Flag.CHUNKED
    assert announced.size == len(data)
    assert announced.stream != 0
    assert announced.ttl == 60_000
    assert service.has_chunks

    assert client.receive_data(announce) == []  # nothing until the last chunk
    chunks = service.next_chunks(1 << 20)
    assert [c[4] for c in chunks] == [FrameKind.CHUNK] * 4
    events: list[Event] = []
    for chunk in chunks:
        events += client.receive_data(chunk)
    (event,) = events
    assert isinstance(event, PacketReceived)
    assert event.seq == 77
    assert bytes(event.payload) == data
    assert event.frame is None
    assert event.header.id == 9
    assert event.header.flags & Flag.CHUNKED


def test_a_large_delivery_bytewise_equals_whole() -> None:
    client, service = pair()
    data = payload_of(2 * CHUNK_SIZE + 1, seed=2)
    stream = deliveries(service, (5, header(1), data)) + b"".join(service.next_chunks(1 << 20))
    whole = client.receive_data(stream)
    bytewise = feed_bytewise(pair()[0], stream)
    assert handed_up(whole) == handed_up(bytewise) == [(5, 1, data)]


def test_whole_deliveries_wait_for_a_lower_seq_chunked_one() -> None:
    client, service = pair()
    big = payload_of(3 * CHUNK_SIZE, seed=3)
    stream = deliveries(
        service, (1, header(1), big), (2, header(2), b"two"), (3, header(3), b"three")
    )
    # Both small ones arrive before any chunk of the large one: they are held.
    assert client.receive_data(stream) == []
    chunks = service.next_chunks(1 << 20)
    events: list[Event] = []
    for chunk in chunks[:-1]:
        events += client.receive_data(chunk)
    assert events == []
    events += client.receive_data(chunks[-1])
    assert handed_up(events) == [(1, 1, big), (2, 2, b"two"), (3, 3, b"three")]


def test_a_chunked_delivery_finishing_first_waits_for_a_lower_seq_one() -> None:
    """Round robin: the shorter, later stream completes first but is handed up second."""
    client, service = pair()
    long = payload_of(4 * CHUNK_SIZE, seed=4)
    short = payload_of(CHUNK_SIZE + 1, seed=5)
    stream = deliveries(
        service, (1, header(1), long), (2, header(2), short), (3, header(3), b"small")
    )
    stream += b"".join(service.next_chunks(1 << 20))
    expected = [(1, 1, long), (2, 2, short), (3, 3, b"small")]
    assert handed_up(client.receive_data(stream)) == expected
    client2, service2 = pair()
    stream2 = deliveries(
        service2, (1, header(1), long), (2, header(2), short), (3, header(3), b"small")
    )
    stream2 += b"".join(service2.next_chunks(1 << 20))
    assert handed_up(feed_bytewise(client2, stream2)) == expected


def test_later_deliveries_behind_a_finished_chunked_one_are_released_at_once() -> None:
    client, service = pair()
    big = payload_of(2 * CHUNK_SIZE, seed=6)
    events = client.receive_data(deliveries(service, (10, header(1), big)))
    events += client.receive_data(b"".join(service.next_chunks(1 << 20)))
    events += client.receive_data(deliveries(service, (11, header(2), b"next")))
    assert handed_up(events) == [(10, 1, big), (11, 2, b"next")]


def test_an_oversized_chunked_delivery_is_discarded_and_releases_what_waited() -> None:
    client, service = pair(max_payload=10 * CHUNK_SIZE)
    client.apply_limits(max_frame=client.max_frame, max_payload=CHUNK_SIZE * 2, chunk_size=1024)
    big = payload_of(3 * CHUNK_SIZE, seed=7)
    events = client.receive_data(deliveries(service, (1, header(1), big), (2, header(2), b"after")))
    events += client.receive_data(b"".join(service.next_chunks(1 << 20)))
    assert [type(e).__name__ for e in events] == ["OversizedPacket", "PacketReceived"]
    assert handed_up(events) == [(2, 2, b"after")]


def test_a_large_delivery_queued_behind_open_streams_keeps_its_place() -> None:
    """A large delivery waiting for a free stream (MAX_OPEN_STREAMS large replies, plain
    packets without a seq, are open) must still be handed up before a later small one: a
    Client drops a delivery whose seq is below one it already took."""
    client, service = pair()
    out = bytearray()
    for i in range(MAX_OPEN_STREAMS):  # large replies: plain PACKET streams, no seq
        out += service.send_packet(header(100 + i, flags=int(Flag.REPLY), corr=i), bytes(3000))
    big = payload_of(3000, seed=8)
    service.append_delivery(out, 1, packet_frame(header(1), big))  # queued: no stream free
    service.append_delivery(out, 2, packet_frame(header(2), b"small"))
    events = client.receive_data(bytes(out))
    while service.has_chunks:
        events += client.receive_data(b"".join(service.next_chunks(1 << 20)))
    assert [seq for seq, _, _ in handed_up(events) if seq] == [1, 2]


# -------------------------------------------------------------- packet_frame


def test_packet_frame_of_a_reassembled_header_clears_the_chunk_fields() -> None:
    client, service = pair()
    data = payload_of(2 * CHUNK_SIZE, seed=9)
    sent = header(4, flags=int(Flag.REQUEST | Flag.NOTIFY), corr=8, ttl=123)
    events = service.receive_data(client.send_packet(sent, data))
    events += service.receive_data(b"".join(client.next_chunks(1 << 20)))
    (reassembled,) = events
    assert isinstance(reassembled, PacketReceived)
    assert reassembled.header.flags & Flag.CHUNKED and reassembled.header.size

    stored = packet_frame(reassembled.header, reassembled.payload)
    assert stored == raw_frame(int(FrameKind.PACKET), pack(sent), data)  # one whole frame
    # Its header is the sender's again: no CHUNKED flag, no size, no stream.
    _, kind, hlen = struct.unpack_from(">IBH", stored)
    restored = msgspec.msgpack.decode(stored[7 : 7 + hlen], type=PacketHeader)
    assert (kind, restored) == (FrameKind.PACKET, sent)
    assert (restored.size, restored.stream) == (0, 0)


def test_packet_frame_keeps_a_plain_header_as_it_is() -> None:
    hdr = header(2, flags=int(Flag.ACK), ttl=9)
    assert packet_frame(hdr, b"x") == raw_frame(int(FrameKind.PACKET), pack(hdr), b"x")


def test_a_stored_large_packet_is_delivered_chunked_again() -> None:
    """A reassembled large packet, stored whole with packet_frame, goes out to the client
    as DELIVER+CHUNKED and arrives with its seq and the sender's header fields."""
    sender, service = pair()
    data = payload_of(3 * CHUNK_SIZE + 3, seed=10)
    sent = header(6, ttl=77)
    events = service.receive_data(sender.send_packet(sent, data))
    events += service.receive_data(b"".join(sender.next_chunks(1 << 20)))
    (reassembled,) = events
    assert isinstance(reassembled, PacketReceived)
    stored = packet_frame(reassembled.header, reassembled.payload)

    receiver, _ = pair()
    out = bytearray()
    service.append_delivery(out, 31, stored)
    got = receiver.receive_data(bytes(out))
    got += receiver.receive_data(b"".join(service.next_chunks(1 << 20)))
    (event,) = got
    assert isinstance(event, PacketReceived)
    assert (event.seq, bytes(event.payload)) == (31, data)
    assert (event.header.id, event.header.ttl, event.header.size) == (6, 77, len(data))
