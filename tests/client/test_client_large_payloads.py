"""Large packets: chunked transfer, interleaving with small packets, and max_payload."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from typing import Any, ClassVar

import pytest
from conftest import ServiceFactory

from packetstack import (
    Client,
    Context,
    Packet,
    PayloadTooLarge,
    RemoteError,
    Service,
)
from packetstack.codec import encode

WAIT = 3.0
MiB = 1024 * 1024
SMALL_MAX_PAYLOAD = 2 * MiB
SMALL_CHUNK = 64 * 1024


class Blob(Packet):
    packet_tag: ClassVar[str] = "tcl.blob"
    data: bytes


class Note(Packet):
    packet_tag: ClassVar[str] = "tcl.note"
    text: str


class Fetch(Packet):
    packet_tag: ClassVar[str] = "tcl.fetch"
    size: int


def blob_of_encoded_size(size: int) -> Blob:
    """A Blob whose encoded body is exactly ``size`` bytes."""
    data_len = size - len(encode(Blob(b"")))
    # msgpack's bin header grows with the length; adjust until the total is exact.
    for _ in range(8):
        blob = Blob(b"\xab" * data_len)
        diff = len(encode(blob)) - size
        if diff == 0:
            return blob
        data_len -= diff
    raise AssertionError(f"cannot build a blob of exactly {size} encoded bytes")


@pytest.fixture
async def small_service(make_service: ServiceFactory) -> Service:
    """A service that allows payloads up to 2 MiB, sent in 64 KiB chunks."""
    return await make_service(max_payload=SMALL_MAX_PAYLOAD, chunk_size=SMALL_CHUNK)


async def test_a_50_mb_packet_arrives_intact_and_does_not_hold_up_small_ones(
    make_client: Any,
) -> None:
    a = await make_client("a")
    b = await make_client("b")
    data = os.urandom(50 * MiB)
    digest = hashlib.sha256(data).hexdigest()
    order: list[str] = []
    received: dict[str, Any] = {}
    done = asyncio.Event()

    @b.on(Blob)
    async def blob(packet: Blob, ctx: Context) -> None:
        order.append("blob")
        received["blob"] = (len(packet.data), hashlib.sha256(packet.data).hexdigest(), ctx.sender)
        done.set()

    @b.on(Note)
    async def note(packet: Note, ctx: Context) -> None:
        order.append(f"note:{packet.text}")

    started = time.monotonic()
    await a.send("b", Blob(data))
    await a.send("b", Note("right after"))
    await asyncio.wait_for(done.wait(), 15.0)

    assert received["blob"] == (50 * MiB, digest, "a")
    assert order == ["note:right after", "blob"]
    assert time.monotonic() - started < 15.0


async def test_a_large_reply_arrives_intact(make_client: Any) -> None:
    a = await make_client("a")
    b = await make_client("b")
    data = os.urandom(8 * MiB)

    @b.on(Fetch)
    async def fetch(packet: Fetch, ctx: Context) -> Blob:
        return Blob(data[: packet.size])

    reply = await a.request("b", Fetch(8 * MiB), timeout=10.0)
    assert isinstance(reply, Blob)
    assert len(reply.data) == 8 * MiB
    assert hashlib.sha256(reply.data).digest() == hashlib.sha256(data).digest()


async def test_several_large_packets_at_once_to_different_endings(make_client: Any) -> None:
    a = await make_client("a")
    receivers = [await make_client(name) for name in ("b", "c", "d")]
    payloads = {c.name: os.urandom(3 * MiB) for c in receivers}
    got: dict[str, bytes] = {}
    all_in = asyncio.Event()

    for client in receivers:

        @client.on(Blob)
        async def blob(packet: Blob, ctx: Context, name: str = client.name) -> None:
            got[name] = packet.data
            if len(got) == len(receivers):
                all_in.set()

    for name, data in payloads.items():
        await a.send(name, Blob(data))
    await asyncio.wait_for(all_in.wait(), 10.0)

    assert got == payloads


# ---------------------------------------------------------------- max_payload


async def test_a_payload_over_max_payload_is_refused_before_sending(
    small_service: Service,
) -> None:
    async with (
        Client("a", small_service.url) as a,
        Client("b", small_service.url) as b,
    ):
        assert a.welcome is not None and a.welcome.max_payload == SMALL_MAX_PAYLOAD
        got: list[tuple[int, bytes]] = []
        arrived = asyncio.Event()

        @b.on(Blob)
        async def blob(packet: Blob, ctx: Context) -> None:
            got.append((len(packet.data), hashlib.sha256(packet.data).digest()))
            arrived.set()

        packets_in = small_service.packets_in
        too_big = Blob(b"\0" * (3 * MiB))
        with pytest.raises(PayloadTooLarge):
            await a.send("b", too_big)
        with pytest.raises(PayloadTooLarge):
            await a.send("b", too_big, ack=True)
        with pytest.raises(PayloadTooLarge):
            await a.publish("room", too_big)
        with pytest.raises(PayloadTooLarge):
            await a.broadcast(too_big)
        with pytest.raises(PayloadTooLarge):
            await a.request("b", too_big, timeout=WAIT)

        # Nothing reached the service, and the connection is still usable.
        assert a.connected
        fits = os.urandom(1 * MiB)  # chunked into 64 KiB pieces
        await a.send("b", Blob(fits), ack=True)
        await asyncio.wait_for(arrived.wait(), WAIT)
        assert got == [(len(fits), hashlib.sha256(fits).digest())]
        assert small_service.packets_in == packets_in + 1
        assert small_service.stats["payload_too_large"] == 0


async def test_max_payload_is_inclusive(small_service: Service) -> None:
    async with (
        Client("a", small_service.url) as a,
        Client("b", small_service.url) as b,
    ):
        sizes: list[int] = []
        arrived = asyncio.Event()

        @b.on(Blob)
        async def blob(packet: Blob, ctx: Context) -> None:
            sizes.append(len(encode(packet)))
            arrived.set()

        exactly = blob_of_encoded_size(SMALL_MAX_PAYLOAD)
        one_more = blob_of_encoded_size(SMALL_MAX_PAYLOAD + 1)
        with pytest.raises(PayloadTooLarge):
            await a.send("b", one_more)
        await a.send("b", exactly)
        await asyncio.wait_for(arrived.wait(), WAIT)
        assert sizes == [SMALL_MAX_PAYLOAD]


async def test_the_service_refuses_its_own_packets_over_max_payload(
    small_service: Service,
) -> None:
    async with Client("a", small_service.url) as a:
        with pytest.raises(PayloadTooLarge):
            await small_service.send("a", Blob(b"\0" * (3 * MiB)))
        with pytest.raises(PayloadTooLarge):
            await small_service.broadcast(Blob(b"\0" * (3 * MiB)))
        assert a.connected


async def test_a_reply_over_max_payload_does_not_break_the_replier(
    small_service: Service,
) -> None:
    """A handler whose reply cannot be sent must not take its connection's dispatcher down.

    Expected: the requester gets an error reply at once, and later packets are still handled.
    """
    a = Client("a", small_service.url)
    b = Client("b", small_service.url)
    await a.connect()
    await b.connect()
    try:

        @b.on(Fetch)
        async def fetch(packet: Fetch, ctx: Context) -> Blob:
            return Blob(b"\0" * packet.size)

        with pytest.raises(RemoteError):
            await a.request("b", Fetch(3 * MiB), timeout=2.0)
        # The replier must still answer what comes next.
        reply = await a.request("b", Fetch(10), timeout=2.0)
        assert reply == Blob(b"\0" * 10)
    finally:
        await a.close()
        with contextlib.suppress(Exception):
            await b.close()


async def test_a_service_reply_over_max_payload_does_not_break_the_session(
    small_service: Service,
) -> None:
    """The same for a handler of the service: the ending's session must keep working."""

    @small_service.on(Fetch)
    async def fetch(packet: Fetch, ctx: Context) -> Blob:
        return Blob(b"\0" * packet.size)

    async with Client("a", small_service.url) as a:
        with pytest.raises(RemoteError):
            await a.request("service", Fetch(3 * MiB), timeout=2.0)
        reply = await a.request("service", Fetch(10), timeout=2.0)
        assert reply == Blob(b"\0" * 10)
