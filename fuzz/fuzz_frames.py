"""Fuzz the frame parser: bytes fed to a SERVICE-role or a CLIENT-role Connection, fresh or
after a valid handshake, whole and cut into pieces, must parse into events or raise
ProtocolError, nothing else. After ProtocolError the connection is closed and parses
nothing more, and cutting the input into pieces never changes what it parses into.

Input layout: byte 0 picks the receiver (service or client, new or open), byte 1 the size of
the pieces (0: a single piece), the rest is fed to the connection.
"""

from __future__ import annotations

import sys

from _harness import instrumented, main

with instrumented():
    from packetstack.errors import ProtocolError
    from packetstack.protocol import (
        Connection,
        Event,
        Hello,
        Role,
        State,
        Welcome,
    )

# Small limits, so frames over them and chunked packets are within a fuzzer's reach.
MAX_FRAME = 4096
MAX_PAYLOAD = 20_000
CHUNK_SIZE = 1024
WELCOME = Welcome(1, "fuzz", 5.0, 15.0, MAX_FRAME, MAX_PAYLOAD, CHUNK_SIZE)
RECEIVERS = ("service-new", "service-open", "client-new", "client-open")


def receiver(kind: str) -> Connection:
    """A connection of the role ``kind`` names, after a valid handshake if it is open."""
    if kind.startswith("service"):
        conn = Connection(
            Role.SERVICE, max_frame=MAX_FRAME, max_payload=MAX_PAYLOAD, chunk_size=CHUNK_SIZE
        )
        if kind == "service-open":
            conn.receive_data(Connection(Role.CLIENT).hello_frame(Hello(1, "alpha")))
            conn.welcome_frame(WELCOME)
    else:
        conn = Connection(Role.CLIENT)
        if kind == "client-open":
            conn.receive_data(Connection(Role.SERVICE).welcome_frame(WELCOME))
    return conn


def parse(kind: str, pieces: list[bytes]) -> tuple[list[object], str | None]:
    """Feed ``pieces`` to a fresh receiver: every event it gave, and the ProtocolError's
    class name if it raised one (after which it must be closed and parse nothing)."""
    conn = receiver(kind)
    events: list[object] = []
    for i, piece in enumerate(pieces):
        try:
            got = conn.receive_data(piece)
        except ProtocolError as exc:
            parsed = getattr(exc, "events", None)
            assert isinstance(parsed, list), "ProtocolError without .events"
            assert conn.state is State.CLOSED, "still open after ProtocolError"
            assert all(conn.receive_data(rest) == [] for rest in pieces[i + 1 :])
            assert conn.receive_data(b"\x00\x00\x00\x03\x07\x00\x00") == []
            events += parsed
            check_events(events)
            return events, type(exc).__name__
        assert isinstance(got, list)
        events += got
    check_events(events)
    return events, None


def check_events(events: list[object]) -> None:
    for event in events:
        assert isinstance(event, Event), f"not an event: {event!r}"


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    kind = RECEIVERS[data[0] % len(RECEIVERS)]
    step = data[1]
    stream = bytes(data[2:])
    whole = parse(kind, [stream])
    if step:
        pieces = [stream[i : i + step] for i in range(0, len(stream), step)]
        split = parse(kind, pieces)
        assert split == whole, f"{kind}: cut into {step}-byte pieces: {split} != {whole}"


def seeds() -> list[bytes]:
    """Well-formed traffic for each receiver, cut whole and into small pieces."""
    from packetstack.errors import CloseCode
    from packetstack.protocol import PacketHeader, packet_frame

    client = Connection(Role.CLIENT)
    client.apply_limits(max_frame=MAX_FRAME, max_payload=MAX_PAYLOAD, chunk_size=CHUNK_SIZE)
    service = receiver("service-open")
    header = PacketHeader(1, 0, "beta", "alpha", "tag", 8)
    to_service = [
        client.hello_frame(Hello(1, "alpha", "token", ["chunks"])),
        client.ping_frame()
        + client.send_packet(header, b"small")
        + client.send_packet(header, b"L" * 2500)
        + b"".join(client.next_chunks(1 << 16))
        + client.group_frame(2, "room", True)
        + client.ack_frame(3)
        + client.error_frame(4, 1, "oops")
        + client.close_frame(CloseCode.NORMAL, "bye"),
    ]
    deliveries = bytearray()
    service.append_delivery(deliveries, 1, packet_frame(header, b"d"))
    service.append_delivery(deliveries, 2, packet_frame(header, b"D" * 2500))
    while service.has_chunks:
        deliveries += b"".join(service.next_chunks(1 << 16))
    to_client = [
        Connection(Role.SERVICE).welcome_frame(WELCOME),
        bytes(deliveries) + service.ack_frame(1) + service.ping_frame(),
    ]
    streams = [(0, to_service[0]), (1, to_service[1]), (2, to_client[0]), (3, to_client[1])]
    return [bytes([mode, step]) + data for mode, data in streams for step in (0, 3)]


if __name__ == "__main__":
    main(test_one_input, sys.modules[__name__].__doc__, seeds)
