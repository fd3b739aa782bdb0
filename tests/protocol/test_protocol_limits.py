"""Limits the sans-I/O Connection enforces: an oversized frame refused from the first 4-6
bytes of its prefix, a large frame fed in small reads, WELCOME heartbeat values, and the
64 KiB limit on an outgoing packet header.

Frames are assembled here by the wire layout (``length:u32 | kind:u8 | header_length:u16 |
header | payload``), independently of the library's own frame builder.
"""

from __future__ import annotations

import functools
import struct

import pytest
import support
from support import CHUNK_SIZE, MAX_FRAME, pack, raw_frame, service_conn

from packetstack.errors import CloseCode, FrameTooLarge, ProtocolError
from packetstack.protocol import (
    Connection,
    FrameKind,
    Hello,
    HelloReceived,
    PacketReceived,
    PingReceived,
    Role,
    State,
    WelcomeReceived,
)

# A PACKET prefix announcing a frame of 0x00100000 = 1 MiB bytes, cut after 5 bytes.
OVERSIZED_5 = b"\x00\x10\x00\x00\x03"


# ----------------------------------------------------------------- helpers


def open_service(**limits: int) -> Connection:
    """A SERVICE connection after HELLO (and its WELCOME): state OPEN."""
    service = service_conn(**limits)
    assert service.receive_data(raw_frame(FrameKind.HELLO, pack(Hello(1, "alpha")))) == [
        HelloReceived(Hello(1, "alpha"))
    ]
    service.welcome_frame(welcome(max_frame=service.max_frame))
    assert service.state is State.OPEN
    return service


# This file's WELCOME session and packet tag (header sizes below depend on the tag).
welcome = functools.partial(support.welcome, session="alpha")
header = functools.partial(support.header, tag="lim.blob")


def raw_encode_into(body: object, buffer: bytearray, offset: int) -> None:
    """A body encoder for raw bytes: copies them in as they are."""
    assert isinstance(body, bytes)
    buffer[offset:] = body


def assert_refused(info: pytest.ExceptionInfo[FrameTooLarge], conn: Connection) -> None:
    assert info.value.close_code is CloseCode.FRAME_TOO_LARGE
    assert isinstance(info.value, ProtocolError)
    assert conn.state is State.CLOSED
    # A closed connection parses nothing more, not even the rest of the frame.
    assert conn.receive_data(bytes(64)) == []


# ------------------------------------------- oversized frame from a partial prefix


def test_five_bytes_of_an_oversized_prefix_are_refused_after_the_handshake() -> None:
    conn = open_service()
    with pytest.raises(FrameTooLarge) as info:
        conn.receive_data(OVERSIZED_5)
    assert info.value.events == []  # type: ignore[attr-defined]
    assert "1048576" in str(info.value) and "4096" in str(info.value)
    assert_refused(info, conn)


def test_five_bytes_of_an_oversized_prefix_are_refused_before_the_handshake() -> None:
    conn = service_conn()
    assert conn.state is State.HANDSHAKE
    with pytest.raises(FrameTooLarge) as info:
        conn.receive_data(OVERSIZED_5)
    assert info.value.events == []  # type: ignore[attr-defined]
    assert_refused(info, conn)


@pytest.mark.parametrize("cut", [4, 5, 6])
def test_a_read_ending_inside_an_oversized_prefix_is_refused_at_once(cut: int) -> None:
    conn = open_service()
    prefix = struct.pack(">IBH", MAX_FRAME + 1, FrameKind.PACKET, 20)
    with pytest.raises(FrameTooLarge) as info:
        conn.receive_data(prefix[:cut])
    assert_refused(info, conn)


@pytest.mark.parametrize("cut", [4, 5, 6])
def test_the_refusal_keeps_the_events_parsed_before_it(cut: int) -> None:
    conn = open_service()
    ping = raw_frame(FrameKind.PING)
    packet = raw_frame(FrameKind.PACKET, pack(header()), b"body")
    prefix = struct.pack(">IBH", MAX_FRAME + 1, FrameKind.PACKET, 20)
    with pytest.raises(FrameTooLarge) as info:
        conn.receive_data(ping + packet + prefix[:cut])
    events = info.value.events  # type: ignore[attr-defined]
    assert len(events) == 2
    assert events[0] == PingReceived()
    assert isinstance(events[1], PacketReceived)
    assert events[1].header == header()
    assert bytes(events[1].payload) == b"body"
    assert_refused(info, conn)


def test_a_client_refuses_an_oversized_prefix_before_welcome() -> None:
    """Before WELCOME a client holds the default max_frame of 1 MiB."""
    conn = Connection(Role.CLIENT)
    assert conn.max_frame == 1024 * 1024
    with pytest.raises(FrameTooLarge) as info:
        conn.receive_data(struct.pack(">I", 1024 * 1024 + 1))
    assert_refused(info, conn)


@pytest.mark.parametrize("cut", [4, 5, 6])
def test_a_partial_prefix_of_exactly_max_frame_is_buffered(cut: int) -> None:
    conn = open_service()
    hdr = pack(header())
    frame = raw_frame(FrameKind.PACKET, hdr, bytes(MAX_FRAME - 3 - len(hdr)))
    assert len(frame) == 4 + MAX_FRAME
    assert conn.receive_data(frame[:cut]) == []
    assert conn.state is State.OPEN
    (event,) = conn.receive_data(frame[cut:])
    assert isinstance(event, PacketReceived)
    assert bytes(event.payload) == bytes(MAX_FRAME - 3 - len(hdr))


@pytest.mark.parametrize(
    "before, first, cut",
    [(b"", 1, 4), (b"", 3, 5), (raw_frame(FrameKind.PING), 2, 6)],
    ids=["1+3", "3+2", "ping+2, then 4"],
)
def test_an_oversized_prefix_split_over_reads_is_refused_once_its_length_is_in(
    before: bytes, first: int, cut: int
) -> None:
    """The read that completes the 4-byte length (and ends 4-6 bytes into the prefix) is
    refused, even when the prefix's first bytes came in an earlier, shorter read."""
    conn = open_service()
    prefix = struct.pack(">IBH", MAX_FRAME + 1, FrameKind.PACKET, 20)
    assert conn.receive_data(before + prefix[:first]) == ([PingReceived()] if before else [])
    with pytest.raises(FrameTooLarge) as info:
        conn.receive_data(prefix[first:cut])
    assert_refused(info, conn)


# --------------------------------------------------- a large frame in small reads


def test_a_one_mib_frame_fed_in_4_kib_reads_is_parsed_once_complete() -> None:
    max_frame = 2 * 1024 * 1024
    conn = open_service(max_frame=max_frame, max_payload=4 * 1024 * 1024, chunk_size=1024)
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    hdr = pack(header(7, tag="lim.big"))
    big = raw_frame(FrameKind.PACKET, hdr, payload)
    after = raw_frame(FrameKind.PACKET, pack(header(8)), b"next")
    stream = big + after + raw_frame(FrameKind.PING)

    events = []
    step = 4096
    for at in range(0, len(stream), step):
        got = conn.receive_data(stream[at : at + step])
        if at + step < len(big):
            assert got == [], f"events before the frame was complete (at {at})"
        events += got

    assert conn.state is State.OPEN
    assert len(events) == 3
    first, second, ping = events
    assert isinstance(first, PacketReceived) and isinstance(second, PacketReceived)
    assert first.header == header(7, tag="lim.big")
    assert bytes(first.payload) == payload
    assert second.header == header(8)
    assert bytes(second.payload) == b"next"
    assert ping == PingReceived()


def test_a_large_frame_fed_in_odd_sized_reads_of_every_input_type() -> None:
    conn = open_service(max_frame=512 * 1024, max_payload=1024 * 1024, chunk_size=1024)
    payload = bytes(i * 7 % 251 for i in range(300_000))
    big = raw_frame(FrameKind.PACKET, pack(header(3)), payload)
    events = []
    at = 0
    for n, size in enumerate([1, 2, 3, 4, 5, 6, 7, 4093, 65536, 1] * 100):
        piece = big[at : at + size]
        if not piece:
            break
        data: bytes | bytearray | memoryview = (
            piece if n % 3 == 0 else bytearray(piece) if n % 3 == 1 else memoryview(piece)
        )
        events += conn.receive_data(data)
        at += size
    events += conn.receive_data(big[at:])
    (event,) = events
    assert isinstance(event, PacketReceived)
    assert event.header == header(3)
    assert bytes(event.payload) == payload


# ------------------------------------------------------------------ WELCOME


@pytest.mark.parametrize(
    "overrides",
    [
        {"heartbeat": 0.0},
        {"heartbeat": -1.0},
        {"timeout": 0.0},
        {"timeout": -15.0},
        {"heartbeat": 0.0, "timeout": 0.0},
    ],
)
def test_a_welcome_without_a_positive_heartbeat_and_timeout_is_refused(
    overrides: dict[str, float],
) -> None:
    client = Connection(Role.CLIENT)
    client.receive_data(b"")  # nothing yet
    with pytest.raises(ProtocolError) as info:
        client.receive_data(raw_frame(FrameKind.WELCOME, pack(welcome(**overrides))))
    assert not isinstance(info.value, FrameTooLarge)
    assert info.value.close_code is CloseCode.PROTOCOL_ERROR
    assert "WELCOME limits make no sense" in str(info.value)
    assert info.value.events == []  # type: ignore[attr-defined]
    assert client.state is State.CLOSED
    # The limits of the refused WELCOME were not adopted.
    assert client.max_frame == 1024 * 1024


@pytest.mark.parametrize("heartbeat, timeout", [(0.001, 0.002), (5.0, 15.0), (1, 3)])
def test_a_welcome_with_a_positive_heartbeat_and_timeout_is_accepted(
    heartbeat: float, timeout: float
) -> None:
    client = Connection(Role.CLIENT)
    w = welcome(heartbeat=heartbeat, timeout=timeout)
    assert client.receive_data(raw_frame(FrameKind.WELCOME, pack(w))) == [WelcomeReceived(w)]
    assert client.state is State.OPEN
    assert client.max_frame == MAX_FRAME


# ------------------------------------------------------ outgoing header limit


def dst_for_header_size(size: int) -> str:
    """A dst that makes ``header(dst=...)`` encode to exactly ``size`` bytes."""
    base = len(pack(header(dst="")))
    n = size - base
    for _ in range(8):  # the str length prefix grows with the string
        got = len(pack(header(dst="d" * n)))
        if got == size:
            return "d" * n
        n += size - got
    raise AssertionError(f"no dst gives a header of {size} bytes")


@pytest.mark.parametrize("body", [b"small", bytes(CHUNK_SIZE * 3)], ids=["inline", "chunked"])
def test_append_packet_refuses_a_header_over_65535_bytes_and_leaves_out_alone(
    body: bytes,
) -> None:
    conn = open_service()
    out = bytearray(b"frames queued before")
    big = header(dst="d" * 70_000)
    with pytest.raises(ProtocolError) as info:
        conn.append_packet(out, big, body, raw_encode_into)
    assert "65535" in str(info.value)
    assert out == bytearray(b"frames queued before")
    # Nothing half-started either: the connection still sends and is still open.
    assert conn.state is State.OPEN
    assert not conn.has_chunks
    conn.append_packet(out, header(), b"ok", raw_encode_into)
    sent = bytes(out[len(b"frames queued before") :])
    assert sent == raw_frame(FrameKind.PACKET, pack(header()), b"ok")


def test_append_packet_refuses_a_header_of_65536_and_accepts_65535_bytes() -> None:
    conn = open_service()
    receiver = open_service(max_frame=256 * 1024, chunk_size=1024, max_payload=1024 * 1024)

    too_big = header(dst=dst_for_header_size(65536))
    out = bytearray()
    with pytest.raises(ProtocolError):
        conn.append_packet(out, too_big, b"x", raw_encode_into)
    assert out == bytearray()

    at_limit = header(dst=dst_for_header_size(65535))
    conn.append_packet(out, at_limit, b"x", raw_encode_into)
    (event,) = receiver.receive_data(bytes(out))
    assert isinstance(event, PacketReceived)
    assert event.header == at_limit
    assert bytes(event.payload) == b"x"


@pytest.mark.parametrize("payload", [b"small", bytes(CHUNK_SIZE * 3)], ids=["inline", "chunked"])
def test_send_packet_refuses_a_header_over_65535_bytes_and_queues_nothing(
    payload: bytes,
) -> None:
    """The service's own sends build frames with send_packet: the same limit, and no
    outgoing stream may be left behind (its CHUNKs would follow without an announce)."""
    conn = open_service()
    with pytest.raises(ProtocolError):
        conn.send_packet(header(dst="d" * 70_000), payload)
    assert not conn.has_chunks
    assert conn.next_chunks(1 << 20) == []
    # The next packet is announced as stream 1, as if nothing had happened.
    announce = conn.send_packet(header(2), bytes(CHUNK_SIZE * 2))
    receiver = open_service()
    events = receiver.receive_data(announce)
    for chunk in conn.next_chunks(1 << 20):
        events += receiver.receive_data(chunk)
    (event,) = events
    assert isinstance(event, PacketReceived)
    assert event.header.id == 2
    assert bytes(event.payload) == bytes(CHUNK_SIZE * 2)
