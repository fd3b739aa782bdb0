"""The service process dies (kill -9) under connected clients and comes back on the same
port: clients notice, keep sends in their outbox meanwhile, reconnect by themselves, send
what waited, find their groups again and exchange packets again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from support import ServiceProcess, free_port, wait_until

from packetstack import Client, ConnectionClosed, Context, Packet

pytestmark = pytest.mark.timeout(90)


class SkMsg(Packet):
    packet_tag: ClassVar[str] = "tests.transport.service_kill.Msg"
    n: int
    phase: str


class SkAsk(Packet):
    packet_tag: ClassVar[str] = "tests.transport.service_kill.Ask"
    n: int


class SkSlowAsk(Packet):
    packet_tag: ClassVar[str] = "tests.transport.service_kill.SlowAsk"
    n: int


@pytest.fixture
def service_process(tmp_path: Path) -> Iterator[ServiceProcess]:
    process = ServiceProcess(free_port(), tmp_path)
    try:
        yield process
    finally:
        process.stop()


async def exchange(a: Client, b: Client, inbox: dict[str, list[SkMsg]], phase: str) -> None:
    """a and b each send 100 direct packets to the other; each receives exactly those."""
    before_a, before_b = len(inbox["alice"]), len(inbox["bob"])
    for n in range(100):
        await a.send("bob", SkMsg(n, phase))
        await b.send("alice", SkMsg(n, phase))
    await wait_until(
        lambda: len(inbox["alice"]) >= before_a + 100 and len(inbox["bob"]) >= before_b + 100,
        10,
        f"the {phase} exchange",
    )
    await asyncio.sleep(0.1)  # nothing extra arrives
    assert inbox["bob"][before_b:] == [SkMsg(n, phase) for n in range(100)]
    assert inbox["alice"][before_a:] == [SkMsg(n, phase) for n in range(100)]


async def test_clients_reconnect_after_service_kill9_and_restart(
    service_process: ServiceProcess,
) -> None:
    service_process.start()
    await service_process.wait_listening()
    url = service_process.url
    alice = Client("alice", url, backoff_max=0.5, connect_timeout=10)
    bob = Client("bob", url, backoff_max=0.5, connect_timeout=10)
    inbox: dict[str, list[SkMsg]] = {"alice": [], "bob": []}
    room: list[SkMsg] = []

    @alice.on(SkMsg)
    async def alice_got(packet: SkMsg, ctx: Context) -> None:
        assert ctx.sender == "bob"
        inbox["alice"].append(packet)

    @bob.on(SkMsg)
    async def bob_got(packet: SkMsg, ctx: Context) -> None:
        assert ctx.sender == "alice"
        (room if ctx.group == "room" else inbox["bob"]).append(packet)

    @bob.on(SkAsk)
    async def bob_answers(packet: SkAsk, ctx: Context) -> SkAsk:
        return SkAsk(packet.n + 1)

    try:
        await alice.connect()
        await bob.connect()
        await bob.join("room")
        await exchange(alice, bob, inbox, "before")
        await alice.publish("room", SkMsg(1, "room-before"))
        assert await alice.request("bob", SkAsk(1), timeout=5) == SkAsk(2)
        await wait_until(lambda: len(room) == 1, 5, "the group packet")
        assert room == [SkMsg(1, "room-before")]

        service_process.kill9()

        await wait_until(
            lambda: not alice.connected and not bob.connected, 5, "clients to notice the kill"
        )
        # Sends wait in the outbox while the service is away; group changes still fail.
        await alice.send("bob", SkMsg(0, "down"))  # returns at once: queued
        await alice.publish("room", SkMsg(0, "room-down"))
        asked = asyncio.ensure_future(alice.request("bob", SkAsk(5), timeout=10))
        await asyncio.sleep(0)
        assert alice.outbox_size == 3
        with pytest.raises(ConnectionClosed):
            await bob.join("other")
        # Still down: they keep trying but cannot connect.
        await asyncio.sleep(0.7)
        assert not alice.connected and not bob.connected
        assert alice.reconnects == 0 and bob.reconnects == 0
        assert not asked.done()

        service_process.start()
        await service_process.wait_listening()
        await alice.wait_connected(timeout=15)
        await bob.wait_connected(timeout=15)
        assert alice.connected and bob.connected
        assert alice.reconnects == 1 and bob.reconnects == 1

        # What was sent while down arrives once, after the restart; the request is answered.
        assert await asyncio.wait_for(asked, 10) == SkAsk(6)
        assert alice.outbox_size == 0
        await wait_until(
            lambda: len(inbox["bob"]) == 101 and len(room) == 2, 5, "the outbox to arrive"
        )
        assert inbox["bob"][-1] == SkMsg(0, "down")
        assert room == [SkMsg(1, "room-before"), SkMsg(0, "room-down")]
        await exchange(alice, bob, inbox, "after")
        assert [p.phase for p in inbox["bob"]].count("down") == 1
        assert await alice.request("bob", SkAsk(10), timeout=5) == SkAsk(11)

        # bob's membership of "room" survived the kill (it is in the store), and bob's JOIN
        # was re-sent on reconnect besides.
        await alice.publish("room", SkMsg(2, "room-after"), ack=True)
        await wait_until(lambda: len(room) == 3, 5, "the group packet after the restart")
        await asyncio.sleep(0.1)
        assert room == [SkMsg(1, "room-before"), SkMsg(0, "room-down"), SkMsg(2, "room-after")]
    finally:
        await alice.close()
        await bob.close()


async def test_handler_running_across_service_kill_keeps_handling_after_reconnect(
    service_process: ServiceProcess,
) -> None:
    """bob is inside a request handler when the service dies; the reply cannot be sent.
    After the restart bob must still handle packets (its dispatcher must survive)."""
    service_process.start()
    await service_process.wait_listening()
    url = service_process.url
    alice = Client("alice", url, backoff_max=0.5)
    bob = Client("bob", url, backoff_max=0.5)
    started = asyncio.Event()
    release = asyncio.Event()
    handled: list[int] = []

    @bob.on(SkSlowAsk)
    async def slow(packet: SkSlowAsk, ctx: Context) -> SkSlowAsk:
        started.set()
        await release.wait()
        return SkSlowAsk(packet.n)

    @bob.on(SkAsk)
    async def quick(packet: SkAsk, ctx: Context) -> SkAsk:
        handled.append(packet.n)
        return SkAsk(packet.n * 10)

    try:
        await alice.connect()
        await bob.connect()
        pending = asyncio.create_task(alice.request("bob", SkSlowAsk(1), timeout=3))
        await asyncio.wait_for(started.wait(), 5)
        service_process.kill9()
        await wait_until(lambda: not bob.connected, 5, "bob to notice the kill")
        release.set()  # the handler returns while bob is disconnected
        await asyncio.sleep(0.2)
        with pytest.raises((ConnectionClosed, TimeoutError)):
            await asyncio.wait_for(pending, 10)

        service_process.start()
        await service_process.wait_listening()
        await alice.wait_connected(timeout=15)
        await bob.wait_connected(timeout=15)
        reply = await alice.request("bob", SkAsk(7), timeout=5)
        assert reply == SkAsk(70)
        assert handled == [7]
        await bob.close()  # closing must not raise either
    finally:
        with contextlib.suppress(Exception):
            await alice.close()
        with contextlib.suppress(Exception):
            await bob.close()
