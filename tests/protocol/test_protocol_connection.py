"""The sans-I/O Connection: a CLIENT and a SERVICE wired together without sockets.

Frames the tests craft by hand are built with :func:`support.raw_frame`, which follows the wire
layout (``length:u32 | kind:u8 | header_length:u16 | header | payload``) independently
of the library's own frame builder.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable

import msgspec
import pytest
from support import (
    CHUNK_SIZE,
    MAX_FRAME,
    MAX_PAYLOAD,
    header,
    pack,
    pair,
    raw_frame,
    service_conn,
    welcome,
)

from packetstack.errors import CloseCode, FrameTooLarge, PayloadTooLarge, ProtocolError
from packetstack.protocol import (
    AckReceived,
    CloseReceived,
    Connection,
    ErrorReceived,
    Event,
    Flag,
    FrameKind,
    GroupChange,
    Hello,
    HelloReceived,
    OversizedPacket,
    PacketHeader,
    PacketReceived,
    PingReceived,
    Role,
    State,
    Target,
    WelcomeReceived,
)
from packetstack.protocol.connection import MAX_OPEN_STREAMS

# ----------------------------------------------------------------- helpers


def open_service(**limits: int) -> Connection:
    return pair(**limits)[1]


def open_client() -> Connection:
    return pair()[0]


def feed_bytewise(conn: Connection, data: bytes) -> list[Event]:
    events: list[Event] = []
    for i in range(len(data)):
        events += conn.receive_data(data[i : i + 1])
    return events


def feed_frames(conn: Connection, frames: Iterable[bytes]) -> list[Event]:
    events: list[Event] = []
    for f in frames:
        events += conn.receive_data(f)
    return events


def packets(events: list[Event]) -> list[PacketReceived]:
    return [e for e in events if isinstance(e, PacketReceived)]


def drain(sender: Connection, receiver: Connection, budget: int = 1 << 30) -> list[Event]:
    events: list[Event] = []
    while sender.has_chunks:
        events += feed_frames(receiver, sender.next_chunks(budget))
    return events


def split_frame(data: bytes) -> tuple[int, int, bytes, bytes]:
    """(kind, length, header, payload) of one frame."""
    length, kind, hlen = struct.unpack_from(">IBH", data)
    assert length == len(data) - 4
    return kind, length, data[7 : 7 + hlen], data[7 + hlen :]


# --------------------------------------------------------------- handshake


def test_handshake_one_chunk_and_bytewise_give_identical_events() -> None:
    hello = Hello(1, "alpha", token="s3cret", caps=["zstd"])
    w = welcome(caps=["zstd"])

    client_a = Connection(Role.CLIENT)
    hello_bytes = client_a.hello_frame(hello)
    assert split_frame(hello_bytes)[0] == FrameKind.HELLO

    service_whole = service_conn()
    service_bytes = service_conn()
    whole = service_whole.receive_data(hello_bytes)
    bytewise = feed_bytewise(service_bytes, hello_bytes)
    assert whole == bytewise == [HelloReceived(hello)]
    assert service_whole.state is service_bytes.state is State.HANDSHAKE

    welcome_bytes = service_whole.welcome_frame(w)
    assert service_whole.state is State.OPEN
    assert split_frame(welcome_bytes)[0] == FrameKind.WELCOME

    client_whole = Connection(Role.CLIENT)
    client_bytes = Connection(Role.CLIENT)
    whole = client_whole.receive_data(welcome_bytes)
    bytewise = feed_bytewise(client_bytes, welcome_bytes)
    assert whole == bytewise == [WelcomeReceived(w)]
    assert client_whole.state is client_bytes.state is State.OPEN


def test_handshake_followed_by_frames_same_events_whole_and_bytewise() -> None:
    sender = Connection(Role.SERVICE)
    stream = (
        sender.welcome_frame(welcome())
        + sender.ping_frame()
        + sender.send_packet(header(5, target=int(Target.ALL)), b"payload")
        + sender.ack_frame(9)
        + sender.error_frame(5, 2, "no such ending")
    )
    whole = Connection(Role.CLIENT).receive_data(stream)
    bytewise = feed_bytewise(Connection(Role.CLIENT), stream)
    assert [type(e) for e in whole] == [
        WelcomeReceived,
        PingReceived,
        PacketReceived,
        AckReceived,
        ErrorReceived,
    ]
    assert len(bytewise) == len(whole)
    for a, b in zip(whole, bytewise, strict=True):
        if isinstance(a, PacketReceived):
            assert isinstance(b, PacketReceived)
            assert (a.header, bytes(a.payload), a.frame) == (b.header, bytes(b.payload), b.frame)
        else:
            assert a == b


def test_welcome_applies_limits_to_client() -> None:
    client = Connection(Role.CLIENT)
    assert (client.max_frame, client.max_payload, client.chunk_size) != (2048, 9000, 512)
    w = welcome(max_frame=2048, max_payload=9000, chunk_size=512)
    client.receive_data(Connection(Role.SERVICE).welcome_frame(w))
    assert (client.max_frame, client.max_payload, client.chunk_size) == (2048, 9000, 512)

    # The new limits are in force: sending and receiving follow them.
    with pytest.raises(PayloadTooLarge):
        client.send_packet(header(), bytes(9001))
    client.send_packet(header(), bytes(600))
    assert client.has_chunks  # 600 > chunk_size 512
    with pytest.raises(FrameTooLarge):
        client.receive_data(struct.pack(">IBH", 2049, FrameKind.PING, 0))


def test_welcome_limits_only_apply_on_receipt_by_client() -> None:
    service = service_conn(max_frame=1000, max_payload=2000, chunk_size=100)
    service.receive_data(Connection(Role.CLIENT).hello_frame(Hello(1, "a")))
    service.welcome_frame(welcome(max_frame=1, max_payload=1, chunk_size=1))
    assert (service.max_frame, service.max_payload, service.chunk_size) == (1000, 2000, 100)


def test_hello_on_client_is_protocol_error() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(ProtocolError):
        client.receive_data(raw_frame(FrameKind.HELLO, pack(Hello(1, "x"))))
    assert client.state is State.CLOSED


def test_welcome_on_service_is_protocol_error() -> None:
    service = service_conn()
    with pytest.raises(ProtocolError):
        service.receive_data(raw_frame(FrameKind.WELCOME, pack(welcome())))


def test_second_welcome_is_protocol_error() -> None:
    client = open_client()
    with pytest.raises(ProtocolError):
        client.receive_data(raw_frame(FrameKind.WELCOME, pack(welcome())))


def test_hello_after_welcome_is_protocol_error() -> None:
    service = open_service()
    with pytest.raises(ProtocolError):
        service.receive_data(raw_frame(FrameKind.HELLO, pack(Hello(1, "again"))))


def test_second_hello_before_welcome_is_protocol_error() -> None:
    """HELLO is only valid as the client's *first* frame, even before the service answers."""
    service = service_conn()
    hello = raw_frame(FrameKind.HELLO, pack(Hello(1, "alpha")))
    with pytest.raises(ProtocolError) as info:
        service.receive_data(hello + hello)
    assert info.value.events == [HelloReceived(Hello(1, "alpha"))]  # type: ignore[attr-defined]


def test_close_before_handshake_is_accepted() -> None:
    """A service refuses a handshake with CLOSE; the client must see why."""
    client = Connection(Role.CLIENT)
    refusal = Connection(Role.SERVICE).close_frame(CloseCode.AUTH_FAILED, "wrong token")
    assert client.receive_data(refusal) == [CloseReceived(CloseCode.AUTH_FAILED, "wrong token")]
    assert client.state is State.CLOSED


@pytest.mark.parametrize(
    ("role", "kind", "hdr"),
    [
        (Role.SERVICE, FrameKind.PACKET, pack(header())),
        (Role.CLIENT, FrameKind.PACKET, pack(header())),
        (Role.SERVICE, FrameKind.CHUNK, pack([1])),
        (Role.SERVICE, FrameKind.ACK, pack([1])),
        (Role.CLIENT, FrameKind.ACK, pack([1])),
        (Role.SERVICE, FrameKind.JOIN, pack([1, "room"])),
        (Role.SERVICE, FrameKind.LEAVE, pack([1, "room"])),
    ],
)
def test_frames_before_handshake_raise(role: Role, kind: FrameKind, hdr: bytes) -> None:
    conn = Connection(role)
    with pytest.raises(ProtocolError):
        conn.receive_data(raw_frame(kind, hdr, b"xyz" if kind == FrameKind.PACKET else b""))
    assert conn.state is State.CLOSED


def test_packet_after_hello_before_welcome_is_refused() -> None:
    service = service_conn()
    data = raw_frame(FrameKind.HELLO, pack(Hello(1, "a"))) + raw_frame(
        FrameKind.PACKET, pack(header()), b"early"
    )
    with pytest.raises(ProtocolError) as info:
        service.receive_data(data)
    assert info.value.events == [HelloReceived(Hello(1, "a"))]  # type: ignore[attr-defined]


# ------------------------------------------------------------------ packets


@pytest.mark.parametrize("direction", ["client->service", "service->client"])
def test_packet_round_trip(direction: str) -> None:
    client, service = pair()
    sender, receiver = (client, service) if direction == "client->service" else (service, client)
    sent_header = PacketHeader(
        id=2**63 + 7,
        target=int(Target.GROUP),
        dst="room-1",
        src="alpha",
        tag="chat.v1",
        flags=int(Flag.REQUEST | Flag.ACK),
        corr=42,
    )
    payload = bytes(range(256)) * 3
    sent = sender.send_packet(sent_header, payload)
    assert not sender.has_chunks
    kind, _, _, frame_payload = split_frame(sent)
    assert kind == FrameKind.PACKET
    assert frame_payload == payload

    events = receiver.receive_data(sent)
    assert len(events) == 1
    (event,) = events
    assert isinstance(event, PacketReceived)
    assert event.header == sent_header
    assert (event.header.id, event.header.target, event.header.dst) == (
        2**63 + 7,
        Target.GROUP,
        "room-1",
    )
    assert (event.header.src, event.header.tag, event.header.flags, event.header.corr) == (
        "alpha",
        "chat.v1",
        Flag.REQUEST | Flag.ACK,
        42,
    )
    assert isinstance(event.payload, memoryview)
    assert bytes(event.payload) == payload
    assert event.frame == sent
    assert isinstance(event.frame, bytes)


def test_packet_with_memoryview_and_empty_payload() -> None:
    client, service = pair()
    data = bytearray(b"0123456789")
    a = client.send_packet(header(1), memoryview(data)[2:5])
    b = client.send_packet(header(2), b"")
    events = service.receive_data(a + b)
    got = [(e.header.id, bytes(e.payload), e.frame) for e in packets(events)]
    assert got == [(1, b"234", a), (2, b"", b)]


def test_receive_accepts_bytearray_and_memoryview_without_aliasing() -> None:
    client, service = pair()
    sent = client.send_packet(header(), b"hello world")
    buf = bytearray(sent)
    half = len(buf) // 2
    first = service.receive_data(memoryview(buf)[:half])
    assert first == []
    buf[:half] = bytes(half)  # the transport reuses its buffer
    rest = bytearray(sent[half:])
    (event,) = service.receive_data(rest)
    rest[:] = bytes(len(rest))  # and again
    assert isinstance(event, PacketReceived)
    assert bytes(event.payload) == b"hello world"
    assert event.frame == sent


def test_many_packets_in_one_read_and_across_reads() -> None:
    client, service = pair()
    frames = [client.send_packet(header(i), f"p{i}".encode() * i) for i in range(1, 30)]
    stream = b"".join(frames)
    rng = random.Random(3)
    cuts = sorted(rng.sample(range(1, len(stream)), 25))
    events: list[Event] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        events += service.receive_data(stream[a:b])
    got = [(e.header.id, bytes(e.payload), e.frame) for e in packets(events)]
    assert got == [(i, f"p{i}".encode() * i, frames[i - 1]) for i in range(1, 30)]


def test_ack() -> None:
    client, service = pair()
    assert client.receive_data(service.ack_frame(77)) == [AckReceived(77)]
    assert service.receive_data(client.ack_frame(2**64 - 1)) == [AckReceived(2**64 - 1)]


def test_error() -> None:
    client, service = pair(max_frame=20_000)
    events = client.receive_data(service.error_frame(12, 2, "no ending named 'x'"))
    assert events == [ErrorReceived(12, 2, "no ending named 'x'")]
    long = client.receive_data(service.error_frame(1, 3, "m" * 10_000))
    assert long == [ErrorReceived(1, 3, "m" * 4096)]


def test_ping_both_ways() -> None:
    client, service = pair()
    assert client.receive_data(service.ping_frame()) == [PingReceived()]
    assert service.receive_data(client.ping_frame()) == [PingReceived()]
    assert service.receive_data(client.ping_frame() * 3) == [PingReceived()] * 3


def test_close() -> None:
    client, service = pair()
    data = service.close_frame(CloseCode.GOING_AWAY, "shutting down")
    assert service.state is State.CLOSED
    assert client.receive_data(data) == [CloseReceived(CloseCode.GOING_AWAY, "shutting down")]
    assert client.state is State.CLOSED
    # Nothing is parsed any more, valid or not.
    assert client.receive_data(raw_frame(FrameKind.PING)) == []
    assert client.receive_data(b"\xff" * 64) == []


def test_close_reason_is_truncated() -> None:
    client, service = pair()
    (event,) = client.receive_data(service.close_frame(CloseCode.NORMAL, "r" * 5000))
    assert event == CloseReceived(CloseCode.NORMAL, "r" * 1024)


def test_packet_header_trailing_defaults_may_be_omitted() -> None:
    service = open_service()
    (event,) = service.receive_data(raw_frame(FrameKind.PACKET, pack([8, 3, "", "a", "t"]), b"!"))
    assert isinstance(event, PacketReceived)
    assert event.header == PacketHeader(8, int(Target.SERVICE), "", "a", "t", 0, 0, 0, 0)
    assert bytes(event.payload) == b"!"


def test_map_headers_ignore_unknown_keys() -> None:
    hello = {"v": 1, "name": "alpha", "future": [1, {"x": 2}]}
    events = Connection(Role.SERVICE).receive_data(raw_frame(FrameKind.HELLO, pack(hello)))
    assert events == [HelloReceived(Hello(1, "alpha"))]
    w = {**msgspec.to_builtins(welcome()), "compression": "zstd"}
    events = Connection(Role.CLIENT).receive_data(raw_frame(FrameKind.WELCOME, pack(w)))
    assert events == [WelcomeReceived(welcome())]


def test_close_default_reason() -> None:
    client = open_client()
    assert client.receive_data(raw_frame(FrameKind.CLOSE, pack([1000]))) == [
        CloseReceived(1000, "")
    ]


def test_frames_after_close_in_the_same_read_are_not_parsed() -> None:
    """CLOSE ends the conversation: what follows it is ignored, however the bytes were split.

    Fed byte by byte, the frames after CLOSE give no events (receive_data returns [] once
    CLOSED); fed in one read they must not give different events or an error."""
    client, service = pair()
    tail = service.close_frame(CloseCode.NORMAL, "bye")
    stream = tail + raw_frame(FrameKind.PING) + raw_frame(FrameKind.PACKET, pack(header()), b"x")

    bytewise = feed_bytewise(open_client(), stream)
    assert bytewise == [CloseReceived(CloseCode.NORMAL, "bye")]

    whole = client.receive_data(stream)  # must not raise either
    assert whole == bytewise
    assert client.state is State.CLOSED


def test_receive_data_after_local_close_returns_nothing() -> None:
    client, service = pair()
    client.close_frame(CloseCode.NORMAL)
    assert client.state is State.CLOSED
    assert client.receive_data(service.ping_frame()) == []


def test_join_and_leave() -> None:
    client, service = pair()
    assert service.receive_data(client.group_frame(3, "room", True)) == [
        GroupChange(3, "room", True)
    ]
    data = client.group_frame(4, "room", False)
    assert split_frame(data)[0] == FrameKind.LEAVE
    assert service.receive_data(data) == [GroupChange(4, "room", False)]


@pytest.mark.parametrize("join", [True, False])
def test_client_receiving_join_or_leave_is_protocol_error(join: bool) -> None:
    client, service = pair()
    with pytest.raises(ProtocolError):
        client.receive_data(service.group_frame(1, "room", join))
    assert client.state is State.CLOSED


# ----------------------------------------------------------- malformed input


@pytest.mark.parametrize("kind", [0, 11, 12, 99, 255])
def test_unknown_frame_kind(kind: int) -> None:
    for conn in (open_service(), open_client(), Connection(Role.SERVICE)):
        with pytest.raises(ProtocolError) as info:
            conn.receive_data(raw_frame(kind))
        assert type(info.value) is ProtocolError
        assert conn.state is State.CLOSED


def test_frame_too_large_as_soon_as_the_length_prefix_arrives() -> None:
    """Checked on the prefix alone (docs/PROTOCOL.md: once the 4-byte length is in), never
    waiting for a body that may be gigabytes long."""
    service = open_service(max_frame=1000, chunk_size=500)
    prefix = struct.pack(">IBH", 1001, FrameKind.PACKET, 10)
    with pytest.raises(FrameTooLarge) as info:
        for i in range(len(prefix)):  # byte by byte, and never any of the body
            service.receive_data(prefix[i : i + 1])
    assert info.value.close_code is CloseCode.FRAME_TOO_LARGE
    assert isinstance(info.value, ProtocolError)


def test_frame_too_large_without_the_body() -> None:
    service = open_service(max_frame=1000, chunk_size=500)
    with pytest.raises(FrameTooLarge):
        service.receive_data(struct.pack(">IBH", 1001, FrameKind.PACKET, 10))
    assert service.state is State.CLOSED


def test_frame_too_large_after_partial_reads() -> None:
    service = open_service(max_frame=1000, chunk_size=500)
    ping = raw_frame(FrameKind.PING)
    assert service.receive_data(ping + b"\x00") == [PingReceived()]
    with pytest.raises(FrameTooLarge) as info:
        service.receive_data(b"\x00\xff\xff\x01\x00\x00\x00\x00")
    assert info.value.events == []  # type: ignore[attr-defined]


def test_frame_of_exactly_max_frame_is_accepted() -> None:
    service = open_service(max_frame=1000, chunk_size=900, max_payload=10_000)
    hdr = pack(header())
    payload = bytes(1000 - 3 - len(hdr))
    data = raw_frame(FrameKind.PACKET, hdr, payload)
    assert len(data) == 4 + 1000
    (event,) = service.receive_data(data)
    assert isinstance(event, PacketReceived)
    assert bytes(event.payload) == payload
    with pytest.raises(FrameTooLarge):
        service.receive_data(raw_frame(FrameKind.PACKET, hdr, payload + b"!"))


@pytest.mark.parametrize("length", [0, 1, 2])
def test_length_shorter_than_prefix(length: int) -> None:
    service = open_service()
    with pytest.raises(ProtocolError) as info:
        service.receive_data(struct.pack(">I", length) + b"\x07\x00\x00\x00\x00\x00\x00")
    assert not isinstance(info.value, FrameTooLarge)


def test_minimal_frame_length_three() -> None:
    service = open_service()
    assert service.receive_data(struct.pack(">IBH", 3, FrameKind.PING, 0)) == [PingReceived()]


@pytest.mark.parametrize("kind", [FrameKind.PING, FrameKind.PACKET, FrameKind.ACK])
def test_header_length_past_end_of_frame(kind: FrameKind) -> None:
    service = open_service()
    data = struct.pack(">IBH", 3 + 2, kind, 10) + b"\x90\x90"
    with pytest.raises(ProtocolError, match="header length"):
        service.receive_data(data)


@pytest.mark.parametrize(
    ("role", "kind"),
    [
        (Role.SERVICE, FrameKind.PACKET),
        (Role.CLIENT, FrameKind.PACKET),
        (Role.SERVICE, FrameKind.CHUNK),
        (Role.SERVICE, FrameKind.ACK),
        (Role.SERVICE, FrameKind.ERROR),
        (Role.SERVICE, FrameKind.CLOSE),
        (Role.SERVICE, FrameKind.JOIN),
        (Role.SERVICE, FrameKind.LEAVE),
    ],
)
@pytest.mark.parametrize(
    "bad_header",
    [b"", b"\xc1", b"\x93\x01", b"\x90\x90", pack({"a": 1}), pack(["x", "y", "z"]), b"\xdd"],
)
def test_malformed_header(role: Role, kind: FrameKind, bad_header: bytes) -> None:
    conn = open_service() if role is Role.SERVICE else open_client()
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(raw_frame(kind, bad_header))
    assert type(info.value) is ProtocolError
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("bad_header", [b"", b"\xc1", pack([1, 2]), pack({"v": "one"})])
def test_malformed_handshake_header(bad_header: bytes) -> None:
    with pytest.raises(ProtocolError):
        Connection(Role.SERVICE).receive_data(raw_frame(FrameKind.HELLO, bad_header))
    with pytest.raises(ProtocolError):
        Connection(Role.CLIENT).receive_data(raw_frame(FrameKind.WELCOME, bad_header))


@pytest.mark.parametrize(
    ("role", "kind", "prefix"),
    [
        # An unknown field whose value is nested deeper than the interpreter's recursion limit.
        pytest.param(Role.SERVICE, FrameKind.HELLO, b"\x83\xa1v\x01\xa4name\xa1a\xa1x", id="hello"),
        pytest.param(Role.CLIENT, FrameKind.WELCOME, b"\x81\xa1x", id="welcome"),
        # A deeply nested extra element after the fields of an array-like header.
        pytest.param(
            "open-service",
            FrameKind.PACKET,
            b"\x9a\x01\x00\xa1a\xa1b\xa1t\x00\x00\x00\x00",
            id="packet",
        ),
        pytest.param("open-service", FrameKind.CLOSE, b"\x93\xcd\x03\xe8\xa0", id="close"),
    ],
)
def test_deeply_nested_header_is_protocol_error(
    role: Role | str, kind: FrameKind, prefix: bytes
) -> None:
    """Header bytes come from the peer: however deep the nesting, the answer is
    ProtocolError (never RecursionError, which would escape the transport's handler)."""
    conn = open_service() if role == "open-service" else Connection(role)  # type: ignore[arg-type]
    deep = prefix + b"\x91" * 3000 + b"\x00"
    with pytest.raises(ProtocolError):
        conn.receive_data(raw_frame(kind, deep))
    assert conn.state is State.CLOSED


BAD_UTF8 = b"\xa2\x80\xff"  # a msgpack str of two bytes that are not UTF-8


@pytest.mark.parametrize(
    ("role", "kind", "hdr"),
    [
        pytest.param(
            Role.SERVICE, FrameKind.HELLO, b"\x82\xa1v\x01\xa4name" + BAD_UTF8, id="hello"
        ),
        pytest.param(
            Role.CLIENT,
            FrameKind.WELCOME,
            pack(welcome()).replace(b"\xa6sess-1", b"\xa6sess-\xff"),
            id="welcome",
        ),
        pytest.param(
            "open-service",
            FrameKind.PACKET,
            pack(header()).replace(b"\xa4beta", b"\xa4bet\xff"),
            id="packet",
        ),
        pytest.param("open-service", FrameKind.ERROR, b"\x93\x01\x02" + BAD_UTF8, id="error"),
        pytest.param("open-service", FrameKind.CLOSE, b"\x92\x01" + BAD_UTF8, id="close"),
        pytest.param("open-service", FrameKind.JOIN, b"\x92\x01" + BAD_UTF8, id="join"),
    ],
)
def test_invalid_utf8_in_header_is_protocol_error(
    role: Role | str, kind: FrameKind, hdr: bytes
) -> None:
    """A string field that is not UTF-8 is a malformed header: ProtocolError, not the
    UnicodeDecodeError the msgpack decoder raises."""
    conn = open_service() if role == "open-service" else Connection(role)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(raw_frame(kind, hdr))
    assert info.value.events == []  # type: ignore[attr-defined]
    assert conn.state is State.CLOSED


def test_protocol_error_carries_events_parsed_before_the_fault() -> None:
    client, service = pair()
    good = [
        client.ping_frame(),
        client.send_packet(header(1), b"one"),
        client.group_frame(2, "g", True),
        client.send_packet(header(3), b"three"),
    ]
    with pytest.raises(ProtocolError) as info:
        service.receive_data(b"".join(good) + raw_frame(99) + client.ping_frame())
    events = info.value.events  # type: ignore[attr-defined]
    assert [type(e) for e in events] == [PingReceived, PacketReceived, GroupChange, PacketReceived]
    assert [bytes(e.payload) for e in packets(events)] == [b"one", b"three"]
    assert service.state is State.CLOSED
    assert service.receive_data(client.ping_frame()) == []


def test_protocol_error_events_with_a_malformed_packet_header() -> None:
    client, service = pair()
    data = client.send_packet(header(1), b"ok") + raw_frame(FrameKind.PACKET, b"\xc1", b"x")
    with pytest.raises(ProtocolError) as info:
        service.receive_data(data)
    (event,) = info.value.events  # type: ignore[attr-defined]
    assert isinstance(event, PacketReceived)
    assert bytes(event.payload) == b"ok"


def test_protocol_error_events_empty_when_first_frame_is_bad() -> None:
    service = open_service()
    with pytest.raises(ProtocolError) as info:
        service.receive_data(raw_frame(99))
    assert info.value.events == []  # type: ignore[attr-defined]


def test_protocol_error_events_only_from_the_failing_call() -> None:
    client, service = pair()
    assert service.receive_data(client.ping_frame()) == [PingReceived()]
    with pytest.raises(ProtocolError) as info:
        service.receive_data(client.ping_frame() + raw_frame(0))
    assert info.value.events == [PingReceived()]  # type: ignore[attr-defined]


def test_receive_after_protocol_error_returns_nothing() -> None:
    service = open_service()
    with pytest.raises(ProtocolError):
        service.receive_data(raw_frame(99))
    assert service.state is State.CLOSED
    assert service.receive_data(raw_frame(FrameKind.PING)) == []
    assert service.receive_data(raw_frame(99)) == []


# ----------------------------------------------------------------- chunking


def payload_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def test_payload_at_chunk_size_is_one_frame() -> None:
    client, service = pair()
    data = payload_of(CHUNK_SIZE)
    sent = client.send_packet(header(), data)
    assert not client.has_chunks
    assert client.next_chunks(1 << 20) == []
    (event,) = service.receive_data(sent)
    assert isinstance(event, PacketReceived)
    assert bytes(event.payload) == data
    assert not event.header.flags & Flag.CHUNKED


def test_large_payload_is_announced_chunked() -> None:
    client, service = pair()
    data = payload_of(CHUNK_SIZE + 1)
    sent_header = header(9, flags=int(Flag.REQUEST), corr=3)
    announce = client.send_packet(sent_header, data)
    kind, _, hdr, body = split_frame(announce)
    assert kind == FrameKind.PACKET
    assert body == b""
    announced = msgspec.msgpack.decode(hdr, type=PacketHeader)
    assert announced.flags == Flag.REQUEST | Flag.CHUNKED
    assert announced.size == CHUNK_SIZE + 1
    assert announced.stream != 0
    assert (announced.id, announced.corr, announced.dst, announced.tag) == (
        9,
        3,
        "beta",
        "demo.move",
    )
    assert client.has_chunks
    assert service.receive_data(announce) == []  # nothing until the last chunk


def test_chunks_reassemble_byte_for_byte() -> None:
    client, service = pair()
    data = payload_of(10 * CHUNK_SIZE + 17, seed=1)
    events = service.receive_data(client.send_packet(header(4), data))
    chunks: list[bytes] = []
    while client.has_chunks:
        chunks += client.next_chunks(CHUNK_SIZE)
    assert len(chunks) == 11
    for c in chunks:
        kind, _, _, body = split_frame(c)
        assert kind == FrameKind.CHUNK
        assert len(body) <= CHUNK_SIZE
    for c in chunks[:-1]:
        assert service.receive_data(c) == []
    events += service.receive_data(chunks[-1])
    (event,) = events
    assert isinstance(event, PacketReceived)
    assert bytes(event.payload) == data
    assert event.frame is None
    assert event.header.id == 4
    assert event.header.size == len(data)
    assert event.header.flags & Flag.CHUNKED
    assert not client.has_chunks
    assert client.next_chunks(1 << 20) == []


def test_chunked_packet_bytewise_equals_whole() -> None:
    client, service = pair()
    data = payload_of(3 * CHUNK_SIZE + 5, seed=2)
    stream = client.send_packet(header(), data) + b"".join(client.next_chunks(1 << 20))
    (whole,) = service.receive_data(stream)
    (bytewise,) = feed_bytewise(open_service(), stream)
    assert isinstance(whole, PacketReceived)
    assert isinstance(bytewise, PacketReceived)
    assert bytes(whole.payload) == bytes(bytewise.payload) == data
    assert whole.header == bytewise.header


def test_next_chunks_budget() -> None:
    client, _ = pair()
    client.send_packet(header(), payload_of(5 * CHUNK_SIZE))
    assert client.next_chunks(0) == []
    assert len(client.next_chunks(1)) == 1  # at least one chunk for any positive budget
    assert len(client.next_chunks(2 * CHUNK_SIZE)) == 2
    assert len(client.next_chunks(1 << 20)) == 2
    assert not client.has_chunks


def test_two_large_payloads_interleave_round_robin() -> None:
    client, service = pair()
    a = payload_of(3 * CHUNK_SIZE, seed=10)
    b = payload_of(3 * CHUNK_SIZE - 100, seed=11)
    events = service.receive_data(client.send_packet(header(1), a))
    events += service.receive_data(client.send_packet(header(2), b))
    frames = client.next_chunks(1 << 30)
    assert not client.has_chunks
    streams = [msgspec.msgpack.decode(split_frame(f)[2])[0] for f in frames]
    first, second = streams[0], streams[1]
    assert first != second
    assert streams == [first, second] * 3
    events += feed_frames(service, frames)
    got = [(e.header.id, bytes(e.payload)) for e in packets(events)]
    assert got == [(1, a), (2, b)]


def test_small_frames_between_chunks_arrive_first() -> None:
    """No head-of-line blocking: a small packet sent after a 50 MB one arrives first."""
    client = Connection(Role.CLIENT)
    service = Connection(Role.SERVICE)  # default limits: 256 KiB chunks, 64 MiB payloads
    service.receive_data(client.hello_frame(Hello(1, "alpha")))
    client.receive_data(
        service.welcome_frame(
            welcome(
                max_frame=service.max_frame,
                max_payload=service.max_payload,
                chunk_size=service.chunk_size,
            )
        )
    )
    big = payload_of(50 * 1024 * 1024, seed=5)
    events = service.receive_data(client.send_packet(header(1, tag="big"), big))
    for _ in range(3):
        events += feed_frames(service, client.next_chunks(client.chunk_size))
    events += service.receive_data(client.send_packet(header(2, tag="small"), b"tiny"))
    events += service.receive_data(client.ping_frame())
    events += drain(client, service, budget=client.chunk_size)

    order = [(type(e).__name__, getattr(getattr(e, "header", None), "tag", None)) for e in events]
    assert order == [
        ("PacketReceived", "small"),
        ("PingReceived", None),
        ("PacketReceived", "big"),
    ]
    small, _, large = events
    assert isinstance(small, PacketReceived)
    assert isinstance(large, PacketReceived)
    assert bytes(small.payload) == b"tiny"
    assert len(large.payload) == len(big)
    assert large.payload == memoryview(big)


def test_payload_over_max_payload_raises_and_queues_nothing() -> None:
    client, service = pair(max_payload=5000)
    with pytest.raises(PayloadTooLarge):
        client.send_packet(header(), bytes(5001))
    assert not client.has_chunks
    assert client.next_chunks(1 << 20) == []
    # Exactly max_payload is fine, and the connection is still usable.
    data = payload_of(5000)
    events = service.receive_data(client.send_packet(header(2), data))
    events += drain(client, service)
    assert [bytes(e.payload) for e in packets(events)] == [data]


def test_receiver_with_smaller_max_payload_discards_the_oversized_stream() -> None:
    client, service = pair(max_payload=2000)
    client.apply_limits(max_frame=MAX_FRAME, max_payload=MAX_PAYLOAD, chunk_size=CHUNK_SIZE)
    big = payload_of(5000)
    announce = client.send_packet(header(7, tag="big"), big)
    (event,) = service.receive_data(announce)
    assert isinstance(event, OversizedPacket)
    assert event.header.id == 7
    assert event.header.size == 5000
    assert event.header.flags & Flag.CHUNKED

    chunks = client.next_chunks(1 << 20)
    assert len(chunks) == 5
    small = client.send_packet(header(8, tag="small"), b"after")
    events = feed_frames(service, chunks[:2])
    events += service.receive_data(small)
    events += feed_frames(service, chunks[2:])
    assert len(events) == 1
    assert isinstance(events[0], PacketReceived)
    assert events[0].header.tag == "small"
    assert bytes(events[0].payload) == b"after"

    # Later chunked packets within the limit parse, and the discarded stream is finished:
    # its id is no longer open.
    ok = payload_of(1500, seed=9)
    events = service.receive_data(client.send_packet(header(9), ok)) + drain(client, service)
    assert [bytes(e.payload) for e in packets(events)] == [ok]
    with pytest.raises(ProtocolError, match="not open"):
        service.receive_data(raw_frame(FrameKind.CHUNK, pack([event.header.stream]), b"x"))


def test_oversized_discarded_stream_still_rejects_overflow() -> None:
    service = open_service(max_payload=10)
    announce = header(1, flags=int(Flag.CHUNKED), size=20, stream=3)
    assert service.receive_data(raw_frame(FrameKind.PACKET, pack(announce))) == [
        OversizedPacket(announce)
    ]
    assert service.receive_data(raw_frame(FrameKind.CHUNK, pack([3]), bytes(15))) == []
    with pytest.raises(ProtocolError):
        service.receive_data(raw_frame(FrameKind.CHUNK, pack([3]), bytes(6)))


def test_chunk_for_unknown_stream() -> None:
    service = open_service()
    with pytest.raises(ProtocolError):
        service.receive_data(raw_frame(FrameKind.CHUNK, pack([42]), b"data"))


def test_stream_sending_more_than_its_size() -> None:
    service = open_service()
    announce = header(1, flags=int(Flag.CHUNKED), size=10, stream=1)
    assert service.receive_data(raw_frame(FrameKind.PACKET, pack(announce))) == []
    assert service.receive_data(raw_frame(FrameKind.CHUNK, pack([1]), bytes(6))) == []
    with pytest.raises(ProtocolError):
        service.receive_data(raw_frame(FrameKind.CHUNK, pack([1]), bytes(6)))


def test_stream_in_one_oversized_chunk() -> None:
    service = open_service()
    announce = header(1, flags=int(Flag.CHUNKED), size=10, stream=1)
    with pytest.raises(ProtocolError):
        service.receive_data(
            raw_frame(FrameKind.PACKET, pack(announce))
            + raw_frame(FrameKind.CHUNK, pack([1]), bytes(11))
        )


def test_chunk_after_stream_completed() -> None:
    service = open_service()
    announce = header(1, flags=int(Flag.CHUNKED), size=4, stream=1)
    data = raw_frame(FrameKind.PACKET, pack(announce)) + raw_frame(
        FrameKind.CHUNK, pack([1]), b"abcd"
    )
    (event,) = service.receive_data(data)
    assert isinstance(event, PacketReceived)
    assert bytes(event.payload) == b"abcd"
    with pytest.raises(ProtocolError):
        service.receive_data(raw_frame(FrameKind.CHUNK, pack([1]), b"e"))


def test_too_many_open_streams() -> None:
    service = open_service()
    opening = b"".join(
        raw_frame(FrameKind.PACKET, pack(header(i, flags=int(Flag.CHUNKED), size=10, stream=i)))
        for i in range(1, MAX_OPEN_STREAMS + 1)
    )
    assert service.receive_data(opening) == []
    one_more = header(999, flags=int(Flag.CHUNKED), size=10, stream=MAX_OPEN_STREAMS + 1)
    with pytest.raises(ProtocolError):
        service.receive_data(raw_frame(FrameKind.PACKET, pack(one_more)))


def test_closing_a_stream_frees_its_slot() -> None:
    service = open_service()
    opening = b"".join(
        raw_frame(FrameKind.PACKET, pack(header(i, flags=int(Flag.CHUNKED), size=1, stream=i)))
        for i in range(1, MAX_OPEN_STREAMS + 1)
    )
    service.receive_data(opening)
    (done,) = service.receive_data(raw_frame(FrameKind.CHUNK, pack([1]), b"z"))
    assert isinstance(done, PacketReceived)
    another = header(500, flags=int(Flag.CHUNKED), size=1, stream=500)
    assert service.receive_data(raw_frame(FrameKind.PACKET, pack(another))) == []


def test_duplicate_stream_id() -> None:
    service = open_service()
    announce = raw_frame(
        FrameKind.PACKET, pack(header(1, flags=int(Flag.CHUNKED), size=9, stream=4))
    )
    service.receive_data(announce)
    with pytest.raises(ProtocolError):
        service.receive_data(announce)


def test_chunked_announce_carrying_payload() -> None:
    service = open_service()
    announce = header(1, flags=int(Flag.CHUNKED), size=9, stream=4)
    with pytest.raises(ProtocolError):
        service.receive_data(raw_frame(FrameKind.PACKET, pack(announce), b"payload"))


def test_chunked_packet_with_size_zero() -> None:
    service = open_service()
    announce = header(1, flags=int(Flag.CHUNKED), size=0, stream=6)
    (event,) = service.receive_data(raw_frame(FrameKind.PACKET, pack(announce)))
    assert isinstance(event, PacketReceived)
    assert event.header == announce
    assert bytes(event.payload) == b""
    assert event.frame is None
    # The packet is complete: no stream stays open for it.
    with pytest.raises(ProtocolError):
        service.receive_data(raw_frame(FrameKind.CHUNK, pack([6]), b""))


def test_chunks_from_service_to_client() -> None:
    client, service = pair()
    data = payload_of(4 * CHUNK_SIZE + 1, seed=8)
    events = client.receive_data(service.send_packet(header(1, src="service"), data))
    events += drain(service, client, budget=100)
    (event,) = events
    assert isinstance(event, PacketReceived)
    assert bytes(event.payload) == data
    assert event.header.src == "service"


def test_outgoing_stream_ids_are_distinct() -> None:
    client, _ = pair()
    ids = set()
    for i in range(5):
        announce = client.send_packet(header(i), bytes(CHUNK_SIZE + 1))
        ids.add(msgspec.msgpack.decode(split_frame(announce)[2], type=PacketHeader).stream)
    assert len(ids) == 5
