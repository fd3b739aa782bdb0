"""Errors on a closed connection, what pending requests and acks do when the service goes,
and reconnecting to a restarted service on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from support import eventually

from packetstack import (
    Client,
    ConnectionClosed,
    Context,
    Packet,
    RequestTimeout,
    Service,
)
from packetstack.errors import CloseCode

WAIT = 3.0


class Note(Packet):
    packet_tag: ClassVar[str] = "tcc.note"
    text: str


class Ask(Packet):
    packet_tag: ClassVar[str] = "tcc.ask"
    text: str


class Answer(Packet):
    packet_tag: ClassVar[str] = "tcc.answer"
    text: str


def new_service(tmp_path: Path, port: int = 0) -> Service:
    return Service(
        "127.0.0.1", port, data_dir=tmp_path / "data", heartbeat=0.5, heartbeat_timeout=2.0
    )


def new_client(name: str, url: str, **options: Any) -> Client:
    options.setdefault("backoff_initial", 0.02)
    options.setdefault("backoff_max", 0.2)
    return Client(name, url, **options)


async def start_with_a_and_b(tmp_path: Path) -> tuple[Service, Client, Client]:
    """A started service and the clients "a" and "b", connected to it."""
    service = new_service(tmp_path)
    await service.start()
    a = new_client("a", service.url)
    b = new_client("b", service.url)
    await a.connect()
    await b.connect()
    return service, a, b


async def restart(service: Service, *clients: Client) -> None:
    """Start ``service`` and wait until each of ``clients`` has reconnected to it."""
    await service.start()
    for client in clients:
        await client.wait_connected(WAIT)


def hold_asks(
    client: Client, answer: str, only: str | None = None
) -> tuple[asyncio.Event, asyncio.Event]:
    """Make ``client`` answer each Ask with ``answer`` + its text, holding every Ask (or only
    one whose text is ``only``) until the second event returned is set; the first is set
    once an Ask is held."""
    started = asyncio.Event()
    release = asyncio.Event()

    @client.on(Ask)
    async def ask(packet: Ask, ctx: Context) -> Answer:
        if only is None or packet.text == only:
            started.set()
            await release.wait()
        return Answer(answer + packet.text)

    return started, release


@contextlib.asynccontextmanager
async def closing(*clients: Client) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for client in clients:
            await client.close()


# ------------------------------------------------------- a closed client


async def test_every_call_on_a_closed_client_raises_connection_closed(
    make_client: Any,
) -> None:
    a = await make_client("a")
    await make_client("b")
    await a.close()

    assert not a.connected
    with pytest.raises(ConnectionClosed):
        await a.send("b", Note("x"))
    with pytest.raises(ConnectionClosed):
        await a.send("b", Note("x"), ack=True)
    with pytest.raises(ConnectionClosed):
        await a.request("b", Ask("x"), timeout=WAIT)
    with pytest.raises(ConnectionClosed):
        await a.publish("room", Note("x"))
    with pytest.raises(ConnectionClosed):
        await a.broadcast(Note("x"))
    with pytest.raises(ConnectionClosed):
        await a.join("room")


async def test_close_fails_pending_requests_with_connection_closed(make_client: Any) -> None:
    a = await make_client("a")
    b = await make_client("b")
    _, release = hold_asks(b, "never seen: ")

    pending = asyncio.ensure_future(a.request("b", Ask("wait"), timeout=10.0))
    await asyncio.sleep(0.1)
    assert not pending.done()
    started = time.monotonic()
    await a.close()

    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(pending, 1.0)
    assert time.monotonic() - started < 1.0
    release.set()


async def test_a_closed_client_can_connect_again(make_client: Any, service: Service) -> None:
    a = await make_client("a")
    b = await make_client("b")
    b.on(Ask)(lambda p, ctx: Answer(p.text + "!"))
    await a.close()
    await eventually(lambda: "a" not in service.endings)

    await a.connect()
    assert a.connected
    assert await a.request("b", Ask("back"), timeout=WAIT) == Answer("back!")


async def test_a_client_without_reconnect_stays_down_when_the_service_closes(
    tmp_path: Path,
) -> None:
    service = new_service(tmp_path)
    await service.start()
    a = new_client("a", service.url, reconnect=False)
    await a.connect()
    async with closing(a):
        await service.close()
        await eventually(lambda: not a.connected)
        with pytest.raises(ConnectionClosed):
            await a.send("b", Note("x"))
        await asyncio.sleep(0.3)
        assert not a.connected  # reconnect=False: it stays down
        assert a.reconnects == 0


# ------------------------------------------- pending work when the service goes


async def test_a_pending_ack_survives_the_service_closing_and_completes_after_its_restart(
    tmp_path: Path,
) -> None:
    """Documented: an ack=True send not yet acknowledged when the link breaks is kept and
    resent (RESENT) after the reconnect, its ack future waiting meanwhile; a pending group
    change still fails with ConnectionClosed (it is redone on reconnect instead)."""
    first, a, b = await start_with_a_and_b(tmp_path)
    port = first.port
    heard: list[str] = []
    b.on(Note)(lambda p, ctx: heard.append(p.text))
    second = new_service(tmp_path, port)
    try:
        async with closing(a, b):
            # The service stops reading a's connection, so the ack cannot come.
            first.endings["a"].link.pause_reading()
            acked = asyncio.ensure_future(a.send("b", Note("held"), ack=True))
            joined = asyncio.ensure_future(a.join("room"))
            await asyncio.sleep(0.2)
            assert not acked.done() and not joined.done()

            await first.close()

            with pytest.raises(ConnectionClosed) as caught:
                await asyncio.wait_for(joined, WAIT)
            assert caught.value.code == CloseCode.GOING_AWAY
            await eventually(lambda: not a.connected)
            await asyncio.sleep(0.2)
            assert not acked.done()  # kept for the next connection, not failed

            await second.start()
            await asyncio.wait_for(acked, WAIT)
            assert isinstance(acked.result(), int)  # the packet's id
            await eventually(lambda: heard == ["held"])
            await asyncio.sleep(0.1)
            assert heard == ["held"]  # resent once, delivered once
    finally:
        await second.close()


async def test_a_pending_request_waits_for_its_timeout_when_the_service_closes(
    tmp_path: Path,
) -> None:
    """Documented: acks fail at once with ConnectionClosed, but requests keep waiting for
    their reply (which may still arrive after a reconnect) until their timeout."""
    service, a, b = await start_with_a_and_b(tmp_path)
    started_handling, _ = hold_asks(b, "never seen: ")

    async with closing(a, b):
        started = time.monotonic()
        pending = asyncio.ensure_future(a.request("b", Ask("wait"), timeout=1.0))
        await asyncio.wait_for(started_handling.wait(), WAIT)
        await service.close()
        await eventually(lambda: not a.connected)

        await asyncio.sleep(0.2)
        assert not pending.done()  # not failed by the lost connection
        with pytest.raises(RequestTimeout):
            await asyncio.wait_for(pending, WAIT)
        assert 0.95 <= time.monotonic() - started < 2.0


# ------------------------------------------------------------------ reconnect


async def test_a_client_reconnects_to_a_restarted_service_and_rejoins_its_groups(
    tmp_path: Path,
) -> None:
    first, a, b = await start_with_a_and_b(tmp_path)
    port = first.port
    heard: asyncio.Queue[tuple[str, str, str | None]] = asyncio.Queue()
    a.on(Note)(lambda p, ctx: heard.put_nowait((p.text, ctx.sender, ctx.group)))
    await a.join("room")
    await b.publish("room", Note("before"))
    assert await asyncio.wait_for(heard.get(), WAIT) == ("before", "b", "room")

    second = new_service(tmp_path, port)
    try:
        async with closing(a, b):
            await first.close()
            await eventually(lambda: not a.connected and not b.connected)
            assert a.reconnects == 0

            await restart(second, a, b)
            assert second.port == port

            assert a.connected and b.connected
            assert a.reconnects == 1
            assert b.reconnects == 1
            await eventually(lambda: second.group_members("room") == ["a"])
            await b.publish("room", Note("after"))
            assert await asyncio.wait_for(heard.get(), WAIT) == ("after", "b", "room")
            assert second.stats["connections"] == 2
            assert heard.empty()
    finally:
        await second.close()


async def test_a_reply_still_arrives_after_both_sides_reconnect(tmp_path: Path) -> None:
    """A request's reply may arrive after a reconnect under the same name."""
    first, a, b = await start_with_a_and_b(tmp_path)
    port = first.port
    started_handling, release = hold_asks(b, "late answer to ")

    second = new_service(tmp_path, port)
    try:
        async with closing(a, b):
            pending = asyncio.ensure_future(a.request("b", Ask("q"), timeout=5.0))
            await asyncio.wait_for(started_handling.wait(), WAIT)
            await first.close()
            await eventually(lambda: not a.connected and not b.connected)
            await restart(second, a, b)

            release.set()
            assert await asyncio.wait_for(pending, WAIT) == Answer("late answer to q")
    finally:
        await second.close()


async def test_a_handler_finishing_while_disconnected_does_not_stop_later_handling(
    tmp_path: Path,
) -> None:
    """A request handler that returns while its client is between connections must not
    take the client's dispatcher down: after the reconnect, packets are handled again.

    Expected: the late reply is dropped (or sent after the reconnect), later packets are
    handled, close() does not raise."""
    first, a, b = await start_with_a_and_b(tmp_path)
    port = first.port
    started_handling, release = hold_asks(b, "answer to ", only="slow")

    second = new_service(tmp_path, port)
    try:
        slow = asyncio.ensure_future(a.request("b", Ask("slow"), timeout=1.0))
        await asyncio.wait_for(started_handling.wait(), WAIT)
        await first.close()
        await eventually(lambda: not b.connected)
        release.set()  # the handler returns while b is disconnected
        await asyncio.sleep(0.1)

        await restart(second, a, b)
        with contextlib.suppress(RequestTimeout):
            await slow
        assert await a.request("b", Ask("next"), timeout=1.0) == Answer("answer to next")
    finally:
        await a.close()
        with contextlib.suppress(Exception):
            await b.close()
        await second.close()
