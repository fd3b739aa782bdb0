"""Property tests for the sans-I/O Connection: whatever bytes arrive, however they are
split, the answer is events or ProtocolError, and valid packets round-trip exactly."""

from __future__ import annotations

import itertools
import random
import struct
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import pair, raw_deliver, service_conn, welcome
from support import raw_frame as frame

from packetstack.errors import CloseCode, ProtocolError
from packetstack.protocol import (
    AckReceived,
    Connection,
    ErrorReceived,
    Event,
    Flag,
    Hello,
    PacketHeader,
    PacketReceived,
    PingReceived,
    Role,
    State,
    Target,
    WelcomeReceived,
    packet_frame,
)

MAX_FRAME = 4096
CHUNK_SIZE = 1024
MAX_PAYLOAD = 20_000


FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

WELCOME = welcome(
    session="s-1", max_frame=MAX_FRAME, max_payload=MAX_PAYLOAD, chunk_size=CHUNK_SIZE
)


# ----------------------------------------------------------------- helpers


def new_service() -> Connection:
    return service_conn(max_frame=MAX_FRAME, max_payload=MAX_PAYLOAD, chunk_size=CHUNK_SIZE)


def handshake() -> tuple[Connection, Connection]:
    return pair(WELCOME, max_frame=MAX_FRAME, max_payload=MAX_PAYLOAD, chunk_size=CHUNK_SIZE)


def receiver(kind: str) -> Connection:
    if kind == "service-new":
        return new_service()
    if kind == "client-new":
        return Connection(Role.CLIENT)
    client, service = handshake()
    return service if kind == "service-open" else client


RECEIVERS = st.sampled_from(["service-new", "service-open", "client-new", "client-open"])


def pieces(data: bytes, cuts: list[int] | int) -> list[bytes]:
    """``data`` split at the given points, or in steps of ``cuts`` bytes."""
    if isinstance(cuts, int):
        return [data[i : i + cuts] for i in range(0, len(data), cuts)] or [b""]
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


def drain_and_receive(
    sender: Connection, recv: Connection, stream: bytes, drain_budget: int, splits: list[int] | int
) -> list[Event]:
    """Append the chunks ``sender`` still holds (``drain_budget`` bytes at a time) and a PING
    to ``stream``, and feed it to ``recv`` cut at ``splits``: the events it gave."""
    while sender.has_chunks:
        stream += b"".join(sender.next_chunks(drain_budget))
    stream += sender.ping_frame()
    events: list[Event] = []
    for piece in pieces(stream, splits):
        events += recv.receive_data(piece)
    return events


SPLITS = st.one_of(
    st.lists(st.integers(0, 1 << 20), max_size=30),
    st.integers(1, 64),
)


def feed_checked(conn: Connection, chunks: list[bytes]) -> list[Event]:
    """Feed every piece; the only exception allowed is ProtocolError (or a subclass), after
    which the connection is CLOSED and parses nothing more."""
    events: list[Event] = []
    for i, chunk in enumerate(chunks):
        try:
            got = conn.receive_data(chunk)
        except ProtocolError as exc:
            assert conn.state is State.CLOSED
            parsed = exc.events  # type: ignore[attr-defined]
            assert isinstance(parsed, list)
            assert all(isinstance(e, Event) for e in parsed)
            for rest in chunks[i + 1 :]:
                assert conn.receive_data(rest) == []
            return events + parsed
        assert isinstance(got, list)
        assert all(isinstance(e, Event) for e in got)
        events += got
    return events


# --------------------------------------------------------------- strategies

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)

small_ints = st.integers(-2, 70)
header_like = st.one_of(
    # Shapes close to the real headers, so the fuzzer reaches past the first type check.
    st.tuples(
        small_ints,
        st.integers(-1, 4),
        st.text(max_size=4),
        st.text(max_size=4),
        st.text(max_size=4),
        st.sampled_from([0, 1, 2, 8, 16, 17, 31, 32, 64, 127]),
        small_ints,
        st.integers(-5, 5000),
        small_ints,
        st.integers(-1, 2**32),  # ttl
    ).map(list),
    st.tuples(small_ints).map(list),  # CHUNK, ACK
    st.tuples(small_ints, small_ints, st.text(max_size=8)).map(list),  # ERROR
    st.tuples(st.integers(0, 2000), st.text(max_size=8)).map(list),  # CLOSE, JOIN/LEAVE
    st.fixed_dictionaries(
        {"v": small_ints, "name": st.text(max_size=5)},
        optional={"token": st.text(max_size=5), "caps": st.lists(st.text(max_size=3))},
    ),
    st.fixed_dictionaries(
        {
            "v": small_ints,
            "session": st.text(max_size=5),
            "heartbeat": st.floats(),
            "timeout": st.floats(),
            "max_frame": st.integers(-1, 100_000),
            "max_payload": st.integers(-1, 100_000),
            "chunk_size": st.integers(1, 5000),
        }
    ),
    msgpack_values,
)


@st.composite
def plausible_frames(draw: st.DrawFn) -> bytes:
    """A frame with a random kind and msgpack header, sometimes with a lying prefix; a
    third of them DELIVER frames (kind 11), laid out with their u64 seq."""
    kind = draw(st.integers(0, 12))
    header = msgspec.msgpack.encode(draw(header_like))
    payload = draw(st.binary(max_size=40))
    if draw(st.integers(0, 2)) == 0:
        data = raw_deliver(draw(st.integers(0, 2**64 - 1)), header, payload)
    else:
        data = frame(kind, header, payload)
    lie = draw(st.sampled_from(["none", "none", "none", "length", "hlen"]))
    if lie == "length":
        data = struct.pack(">I", draw(st.integers(0, 2**32 - 1))) + data[4:]
    elif lie == "hlen":
        data = data[:5] + struct.pack(">H", draw(st.integers(0, 0xFFFF))) + data[7:]
    return data


fuzz_bytes = st.one_of(
    st.binary(max_size=400),
    st.lists(plausible_frames(), min_size=1, max_size=8).map(b"".join),
    st.tuples(st.lists(plausible_frames(), max_size=4).map(b"".join), st.binary(max_size=30)).map(
        b"".join
    ),
)


# ------------------------------------------------------ (1) parse or raise


@FUZZ
@given(
    kind=st.sampled_from(["client-new", "client-open"]),
    frames=st.lists(plausible_frames(), min_size=1, max_size=8),
    tail=st.binary(max_size=30),
    splits=SPLITS,
)
def test_a_client_parses_or_refuses_deliver_frames_and_nothing_else(
    kind: str, frames: list[bytes], tail: bytes, splits: list[int] | int
) -> None:
    """Random frames, a third of them DELIVER (kind 11), fed to a client-role connection."""
    conn = receiver(kind)
    feed_checked(conn, pieces(b"".join(frames) + tail, splits))


@FUZZ
@given(kind=RECEIVERS, data=fuzz_bytes, splits=SPLITS)
def test_arbitrary_bytes_parse_or_raise_protocol_error(
    kind: str, data: bytes, splits: list[int] | int
) -> None:
    conn = receiver(kind)
    feed_checked(conn, pieces(data, splits))


@FUZZ
@given(kind=RECEIVERS, prefix=st.lists(plausible_frames(), max_size=6), splits=SPLITS)
def test_valid_handshake_then_arbitrary_frames(
    kind: str, prefix: list[bytes], splits: list[int] | int
) -> None:
    """The same, behind a valid handshake frame so the open-state paths are reached."""
    conn = receiver(kind)
    if kind == "client-new":
        lead = Connection(Role.SERVICE).welcome_frame(WELCOME)
    elif kind == "service-new":
        lead = Connection(Role.CLIENT).hello_frame(Hello(1, "alpha"))
    else:
        lead = b""
    feed_checked(conn, pieces(lead + b"".join(prefix), splits))


# ------------------------------------------------------- (2) round trip

names = st.text(min_size=1, max_size=24)
flag_values = st.lists(
    st.sampled_from([Flag.REQUEST, Flag.REPLY, Flag.ERROR, Flag.ACK]), max_size=4
).map(lambda flags: int(sum(set(flags), Flag.NONE)))

headers = st.builds(
    PacketHeader,
    id=st.integers(0, 2**64 - 1),
    target=st.sampled_from(list(Target)).map(int),
    dst=names,
    src=names,
    tag=st.text(max_size=40),
    flags=flag_values,
    corr=st.integers(0, 2**64 - 1),
)


def _random_bytes(spec: tuple[int, int]) -> bytes:
    size, seed = spec
    return random.Random(seed).randbytes(size)


payloads = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE]).flatmap(
        lambda n: st.tuples(st.just(n), st.integers(0, 1000)).map(_random_bytes)
    ),
    st.tuples(st.integers(0, 5 * CHUNK_SIZE), st.integers(0, 1000)).map(_random_bytes),
)


@FUZZ
@given(
    direction=st.sampled_from(["client->service", "service->client"]),
    items=st.lists(
        st.tuples(headers, payloads), min_size=1, max_size=5, unique_by=lambda t: t[0].id
    ),
    budgets=st.lists(st.integers(0, 3 * CHUNK_SIZE), max_size=6),
    drain_budget=st.integers(1, 4 * CHUNK_SIZE),
    splits=SPLITS,
)
def test_packets_round_trip_for_any_split(
    direction: str,
    items: list[tuple[PacketHeader, bytes]],
    budgets: list[int],
    drain_budget: int,
    splits: list[int] | int,
) -> None:
    if direction == "client->service":
        sender, recv = handshake()
        stream = b""
    else:
        sender, recv = new_service(), Connection(Role.CLIENT)
        stream = sender.welcome_frame(WELCOME)  # the client adopts the limits in-stream

    sent_frames: dict[int, bytes] = {}
    for i, (hdr, payload) in enumerate(items):
        out = sender.send_packet(hdr, payload)
        if len(payload) > CHUNK_SIZE:
            assert sender.has_chunks
        sent_frames[hdr.id] = out
        stream += out
        if i < len(budgets):
            stream += b"".join(sender.next_chunks(budgets[i]))
    events = drain_and_receive(sender, recv, stream, drain_budget, splits)

    if direction == "service->client":
        assert events[0] == WelcomeReceived(WELCOME)
        events = events[1:]
    assert events[-1] == PingReceived()  # nothing left half-parsed
    received = events[:-1]
    assert all(isinstance(e, PacketReceived) for e in received)
    assert len(received) == len(items)

    by_id = {e.header.id: e for e in received if isinstance(e, PacketReceived)}
    for hdr, payload in items:
        got = by_id[hdr.id]
        assert bytes(got.payload) == payload
        if len(payload) > CHUNK_SIZE:
            assert got.frame is None
            assert got.header.flags == hdr.flags | Flag.CHUNKED
            assert got.header.size == len(payload)
            assert (got.header.target, got.header.dst, got.header.src, got.header.tag) == (
                hdr.target,
                hdr.dst,
                hdr.src,
                hdr.tag,
            )
            assert got.header.corr == hdr.corr
        else:
            assert got.header == hdr
            assert got.frame == sent_frames[hdr.id]

    # Single-frame packets keep their send order.
    small = [hdr.id for hdr, payload in items if len(payload) <= CHUNK_SIZE]
    assert [e.header.id for e in received if e.frame is not None] == small  # type: ignore[union-attr]


@FUZZ
@given(
    items=st.lists(st.tuples(headers, payloads), min_size=1, max_size=6),
    first_seq=st.integers(1, 2**63),
    budgets=st.lists(st.integers(0, 3 * CHUNK_SIZE), max_size=6),
    drain_budget=st.integers(1, 4 * CHUNK_SIZE),
    splits=SPLITS,
)
def test_deliveries_arrive_whole_and_in_seq_order_for_any_split(
    items: list[tuple[PacketHeader, bytes]],
    first_seq: int,
    budgets: list[int],
    drain_budget: int,
    splits: list[int] | int,
) -> None:
    """The service delivers packets with rising seqs, large ones chunked and interleaved
    with small ones: the client hands every one up once, in seq order, with its seq."""
    sender, recv = new_service(), Connection(Role.CLIENT)
    stream = bytearray(sender.welcome_frame(WELCOME))
    for i, (hdr, payload) in enumerate(items):
        sender.append_delivery(stream, first_seq + i, packet_frame(hdr, payload))
        if i < len(budgets):
            stream += b"".join(sender.next_chunks(budgets[i]))
    events = drain_and_receive(sender, recv, bytes(stream), drain_budget, splits)

    assert events[0] == WelcomeReceived(WELCOME)
    assert events[-1] == PingReceived()
    received = events[1:-1]
    assert all(isinstance(e, PacketReceived) for e in received)
    assert [e.seq for e in received] == [  # type: ignore[union-attr]
        first_seq + i for i in range(len(items))
    ]
    for got, (hdr, payload) in zip(received, items, strict=True):
        assert isinstance(got, PacketReceived)
        assert bytes(got.payload) == payload
        assert (got.header.id, got.header.dst, got.header.tag, got.header.corr) == (
            hdr.id,
            hdr.dst,
            hdr.tag,
            hdr.corr,
        )
        assert got.header.flags & ~Flag.CHUNKED == hdr.flags


# ------------------------------------------------------ (3) corruption


def valid_stream(direction: str, rng: random.Random) -> tuple[Connection, bytes]:
    """A receiver and a stream of well-formed frames of every kind it may receive."""
    deliveries = bytearray()
    if direction == "service->client":
        sender, recv = new_service(), Connection(Role.CLIENT)
        parts = [sender.welcome_frame(WELCOME)]
        # DELIVER frames: a small one, and a large one announced here, chunked below.
        for seq, size in ((1, rng.randrange(0, 200)), (2, rng.randrange(CHUNK_SIZE + 1, 3000))):
            packet = PacketHeader(10 + seq, int(Target.ENDING), "alpha", "beta", "d", ttl=seq)
            sender.append_delivery(deliveries, seq, packet_frame(packet, rng.randbytes(size)))
    else:
        sender, recv = handshake()
        parts = [sender.group_frame(1, "room", True), sender.group_frame(2, "room", False)]
    parts += [
        sender.ping_frame(),
        sender.ack_frame(rng.randrange(2**32)),
        sender.error_frame(3, 2, "nope"),
        sender.send_packet(
            PacketHeader(5, int(Target.ENDING), "beta", "alpha", "t", int(Flag.REQUEST), 0),
            rng.randbytes(rng.randrange(0, 200)),
        ),
        sender.send_packet(
            PacketHeader(6, int(Target.GROUP), "room", "alpha", "big"),
            rng.randbytes(rng.randrange(CHUNK_SIZE + 1, 3 * CHUNK_SIZE)),
        ),
        bytes(deliveries),
    ]
    while sender.has_chunks:
        parts += sender.next_chunks(CHUNK_SIZE)
    if rng.random() < 0.3:
        parts.append(sender.close_frame(CloseCode.NORMAL, "bye"))
    return recv, b"".join(parts)


@st.composite
def corruptions(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    ops = st.tuples(
        st.sampled_from(["set", "set", "xor", "insert", "delete", "truncate"]),
        st.integers(0, 1 << 16),
        st.integers(0, 255),
    )
    result: list[tuple[str, int, int]] = draw(st.lists(ops, min_size=1, max_size=6))
    return result


def corrupt(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, where, value in ops:
        if not buf:
            break
        i = where % len(buf)
        if op == "set":
            buf[i] = value
        elif op == "xor":
            buf[i] ^= value or 1
        elif op == "insert":
            buf.insert(i, value)
        elif op == "delete":
            del buf[i]
        else:
            del buf[i:]
    return bytes(buf)


@settings(FUZZ, report_multiple_bugs=False)  # shrink one failure, not every distinct one
@given(
    direction=st.sampled_from(["client->service", "service->client"]),
    seed=st.integers(0, 2**32),
    ops=corruptions(),
    splits=SPLITS,
)
def test_corrupted_valid_frames_parse_or_raise(
    direction: str, seed: int, ops: list[tuple[str, int, int]], splits: list[int] | int
) -> None:
    recv, stream = valid_stream(direction, random.Random(seed))
    # Aim most corruption at the first frames, where the headers are.
    ops = [(op, where % 256 if where & 1 else where, value) for op, where, value in ops]
    feed_checked(recv, pieces(corrupt(stream, ops), splits))


def test_uncorrupted_valid_stream_parses_cleanly() -> None:
    """The corruption property's baseline: without corruption every stream parses."""
    for direction in ("client->service", "service->client"):
        for seed in range(20):
            recv, stream = valid_stream(direction, random.Random(seed))
            events: list[Any] = recv.receive_data(stream)
            kinds = {type(e) for e in events}
            assert {PingReceived, AckReceived, ErrorReceived, PacketReceived} <= kinds
            delivered = [e.seq for e in events if isinstance(e, PacketReceived) and e.seq]
            assert delivered == ([1, 2] if direction == "service->client" else [])
            assert sum(isinstance(e, PacketReceived) for e in events) == 2 + len(delivered)
