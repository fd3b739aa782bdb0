"""Fuzz the envelope decoders and the frame builders: bytes decoded as a PacketHeader, a
Hello or a Welcome either decode or raise msgspec's DecodeError (a ValueError), nothing else;
and whatever decodes survives the trip through its frame and back exactly:

* a PacketHeader through ``packet_frame`` into a service-role Connection, through
  ``append_delivery`` into a client-role Connection (with its sequence number), and as a
  chunked packet (``send_packet`` + ``next_chunks``) into a service-role Connection;
* a Hello through ``hello_frame`` into a service-role Connection;
* a Welcome through ``welcome_frame`` into a client-role Connection, which refuses it with
  ProtocolError exactly when its limits make no sense.

Input layout: byte 0 picks the decoder and how the rest is read: as raw msgpack, or (so
that random bytes often make a well-formed envelope) as a recipe of field values that is
encoded to msgpack first. For a PacketHeader byte 1 is the payload's length and the payload
follows.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Sequence
from typing import Any

from _harness import instrument, instrumented, main

with instrumented():
    import msgspec

    from packetstack.errors import ProtocolError
    from packetstack.protocol import (
        Connection,
        Flag,
        Hello,
        HelloReceived,
        PacketHeader,
        PacketReceived,
        Role,
        Welcome,
        WelcomeReceived,
        packet_frame,
    )

CHUNKED = int(Flag.CHUNKED)
CHUNK_SIZE = 64  # small, so payloads of a few dozen bytes go out chunked
WELCOME = Welcome(1, "fuzz", 5.0, 15.0, 4096, 20_000, CHUNK_SIZE)
DECODE_ERRORS = (ValueError, RecursionError)  # msgspec.DecodeError is a ValueError
_headers = msgspec.msgpack.Decoder(PacketHeader)
_hellos = msgspec.msgpack.Decoder(Hello)
_welcomes = msgspec.msgpack.Decoder(Welcome)
_encode = msgspec.msgpack.encode


def open_service() -> Connection:
    conn = Connection(Role.SERVICE, max_frame=4096, max_payload=20_000, chunk_size=CHUNK_SIZE)
    conn.receive_data(Connection(Role.CLIENT).hello_frame(Hello(1, "alpha")))
    conn.welcome_frame(WELCOME)
    return conn


def open_client() -> Connection:
    conn = Connection(Role.CLIENT)
    conn.receive_data(Connection(Role.SERVICE).welcome_frame(WELCOME))
    return conn


def one_packet(events: Sequence[object]) -> PacketReceived:
    assert len(events) == 1 and isinstance(events[0], PacketReceived), events
    return events[0]


def unchunked(header: PacketHeader) -> PacketHeader:
    """The header as a whole PACKET frame carries it: chunking fields cleared."""
    if header.flags & CHUNKED:
        return msgspec.structs.replace(header, flags=header.flags & ~CHUNKED, size=0, stream=0)
    return header


def routed(header: PacketHeader) -> PacketHeader:
    """What survives any path, chunked or not: ``size`` and ``stream`` mean something only
    on a CHUNKED header (a whole frame keeps whatever they held, a chunked one renumbers)."""
    return msgspec.structs.replace(header, flags=header.flags & ~CHUNKED, size=0, stream=0)


@instrument
def check_header(raw: bytes, payload: bytes) -> None:
    try:
        header = _headers.decode(raw)
    except DECODE_ERRORS:
        return
    expected = unchunked(header)

    # A whole PACKET frame into the service.
    frame = packet_frame(header, payload)
    got = one_packet(open_service().receive_data(frame))
    assert got.header == expected, (got.header, expected)
    assert bytes(got.payload) == payload
    assert got.frame == frame

    # The same frame delivered to a client with a sequence number.
    seq = 1 + len(payload)
    out = bytearray()
    sender = open_service()
    sender.append_delivery(out, seq, frame)
    while sender.has_chunks:
        out += b"".join(sender.next_chunks(1 << 16))
    delivered = one_packet(open_client().receive_data(bytes(out)))
    assert delivered.seq == seq
    assert routed(delivered.header) == routed(header), (delivered.header, header)
    assert bytes(delivered.payload) == payload

    # Sent by a client, chunked when over the chunk size, into the service.
    client = open_client()
    stream = client.send_packet(header, payload)
    while client.has_chunks:
        stream += b"".join(client.next_chunks(1 << 16))
    sent = one_packet(open_service().receive_data(stream))
    assert routed(sent.header) == routed(header), (sent.header, header)
    assert bytes(sent.payload) == payload
    assert (sent.frame is None) == (len(payload) > CHUNK_SIZE)


@instrument
def check_hello(raw: bytes) -> None:
    try:
        hello = _hellos.decode(raw)
    except DECODE_ERRORS:
        return
    conn = Connection(Role.SERVICE)
    events = conn.receive_data(Connection(Role.CLIENT).hello_frame(hello))
    assert len(events) == 1 and isinstance(events[0], HelloReceived), events
    assert _encode(events[0].hello) == _encode(hello)


def sensible(welcome: Welcome) -> bool:
    return (
        welcome.chunk_size >= 1
        and welcome.max_frame >= welcome.chunk_size + 64
        and 0 < welcome.heartbeat < 365 * 24 * 3600.0
        and 0 < welcome.timeout < 365 * 24 * 3600.0
        and not math.isnan(welcome.heartbeat + welcome.timeout)
    )


@instrument
def check_welcome(raw: bytes) -> None:
    try:
        welcome = _welcomes.decode(raw)
    except DECODE_ERRORS:
        return
    conn = Connection(Role.CLIENT)
    frame = Connection(Role.SERVICE).welcome_frame(welcome)
    try:
        events = conn.receive_data(frame)
    except ProtocolError:
        assert not sensible(welcome), welcome
        return
    assert sensible(welcome), welcome
    assert len(events) == 1 and isinstance(events[0], WelcomeReceived), events
    assert _encode(events[0].welcome) == _encode(welcome)
    assert (conn.max_frame, conn.max_payload, conn.chunk_size) == (
        welcome.max_frame,
        welcome.max_payload,
        welcome.chunk_size,
    )


class Recipe:
    """Reads values for envelope fields out of fuzzer bytes: each value is a kind byte and
    what that kind needs. Past the end every value is 0."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        piece = self.data[self.pos : self.pos + n]
        self.pos += n
        return piece.ljust(n, b"\0")

    def byte(self) -> int:
        return self.take(1)[0]

    def text(self) -> str:
        return self.take(self.byte() % 40).decode("utf-8", "replace")

    def value(self) -> Any:
        kind = self.byte() % 8
        if kind == 0:
            return self.byte() - 16  # small ints, a few negative
        if kind == 1:
            return struct.unpack(">Q", self.take(8))[0]
        if kind == 2:
            return struct.unpack(">q", self.take(8))[0]
        if kind in (3, 4):
            return self.text()
        if kind == 5:
            return struct.unpack(">d", self.take(8))[0]
        if kind == 6:
            return [self.text() for _ in range(self.byte() % 4)]
        return [None, True, False, b"\xff"][self.byte() % 4]

    def array(self, fields: int) -> bytes:
        """A msgpack array of up to ``fields`` + 2 values (array_like structs)."""
        return _encode([self.value() for _ in range(self.byte() % (fields + 3))])

    def mapping(self, fields: list[str]) -> bytes:
        """A msgpack map with each of ``fields`` present or not (and sometimes a stranger)."""
        present = {name: self.value() for name in fields if self.byte() % 8}
        if self.byte() % 16 == 0:
            present[self.text()] = self.value()
        return _encode(present)


HEADER_FIELDS = len(msgspec.structs.fields(PacketHeader))
HELLO_FIELDS = [f.name for f in msgspec.structs.fields(Hello)]
WELCOME_FIELDS = [f.name for f in msgspec.structs.fields(Welcome)]


@instrument
def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    which, structured = data[0] % 3, data[0] & 0x80
    rest = bytes(data[1:])
    if which == 0:
        size = rest[0]
        payload, rest = rest[1 : 1 + size], rest[1 + size :]
        check_header(Recipe(rest).array(HEADER_FIELDS) if structured else rest, payload)
    elif which == 1:
        check_hello(Recipe(rest).mapping(HELLO_FIELDS) if structured else rest)
    else:
        check_welcome(Recipe(rest).mapping(WELCOME_FIELDS) if structured else rest)


def seeds() -> list[bytes]:
    """A valid header (with small and chunk-sized payloads), Hello and Welcome."""
    header = _encode(PacketHeader(1, 0, "beta", "alpha", "tag", 9, 0, 0, 0, 1000))
    return [
        bytes([0, 0]) + header,
        bytes([0, 200]) + b"p" * 200 + header,
        bytes([1]) + _encode(Hello(1, "alpha", "token", ["chunks"])),
        bytes([2]) + _encode(WELCOME),
        bytes([0x80, 4]) + b"pppp" + bytes(range(64)),
        bytes([0x81]) + bytes(range(64)),
        bytes([0x82]) + bytes(range(64)),
    ]


if __name__ == "__main__":
    main(test_one_input, sys.modules[__name__].__doc__, seeds)
