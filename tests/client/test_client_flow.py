"""Slow handlers hold the connection's reading: the queue of packets waiting for them stays
bounded and nothing is lost or reordered. A stalled ending's packets spill into its mailbox
(the sender goes on); a stalled service handler slows its own sender through TCP only."""

from __future__ import annotations

import asyncio

import pytest

import packetstack.dispatch as dispatch
from packetstack import Context, Packet, Service

HIGH = 200
LOW = 50
FLOOD = 30_000
# One read can bring some hundreds of small packets past the mark before reading stops.
QUEUE_BOUND = HIGH + 3_000


class Tick(Packet):
    seq: int
    pad: bytes


@pytest.fixture(autouse=True)
def small_queue_marks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "QUEUE_HIGH", HIGH)
    monkeypatch.setattr(dispatch, "QUEUE_LOW", LOW)


async def _flood(sender_send, to: str) -> None:  # type: ignore[no-untyped-def]
    pad = b"p" * 1024  # 30 MB in all: more than every socket buffer on the way holds
    for seq in range(FLOOD):
        await sender_send(to, Tick(seq, pad))


async def test_a_stalled_handler_holds_reading_spills_to_the_mailbox_and_loses_nothing(
    service: Service,
    make_client,  # type: ignore[no-untyped-def]
) -> None:
    fast = await make_client("fast")
    slow = await make_client("slow")
    gate = asyncio.Event()
    seen: list[int] = []

    @slow.on(Tick)
    async def handle(tick: Tick, ctx: Context) -> None:
        await gate.wait()
        seen.append(tick.seq)

    flood = asyncio.create_task(_flood(fast.send, "slow"))
    try:
        dispatcher = slow._dispatcher
        async with asyncio.timeout(10):
            while not dispatcher.held:
                await asyncio.sleep(0.01)
        # The sender is not slowed down: the whole flood goes out while the handler is
        # stalled, and what "slow" does not read waits in its mailbox.
        longest = 0
        async with asyncio.timeout(30):
            while not flood.done():
                longest = max(longest, len(dispatcher.queue))
                await asyncio.sleep(0.01)
        await flood
        assert longest <= QUEUE_BOUND, f"{longest} packets queued behind a stalled handler"
        assert dispatcher.held
        assert not seen
        assert service.stats["mailbox_spills"] >= 1
        async with asyncio.timeout(10):  # read by the service, sent or stored, none handled
            while service.mailbox_depth("slow") < FLOOD:
                await asyncio.sleep(0.01)
        assert service.mailbox_depth("slow") == FLOOD
        gate.set()
        async with asyncio.timeout(30):
            while len(seen) < FLOOD:
                await asyncio.sleep(0.01)
        assert seen == list(range(FLOOD))
        assert not dispatcher.held
        async with asyncio.timeout(5):  # every delivery acknowledged, the mailbox empty
            while service.mailbox_depth("slow"):
                await asyncio.sleep(0.01)
    finally:
        gate.set()
        flood.cancel()


async def test_a_stalled_service_handler_holds_only_that_session(
    service: Service,
    make_client,  # type: ignore[no-untyped-def]
) -> None:
    fast = await make_client("fast")
    bystander = await make_client("bystander")
    gate = asyncio.Event()
    seen: list[int] = []

    @service.on(Tick)
    async def handle(tick: Tick, ctx: Context) -> None:
        await gate.wait()
        seen.append(tick.seq)

    flood = asyncio.create_task(_flood(fast.send, "service"))
    try:
        dispatcher = service.endings["fast"].dispatcher
        async with asyncio.timeout(10):
            while not dispatcher.held:
                await asyncio.sleep(0.01)
        longest = 0
        for _ in range(50):
            longest = max(longest, len(dispatcher.queue))
            await asyncio.sleep(0.01)
        assert longest <= QUEUE_BOUND
        assert not flood.done()

        got: list[int] = []

        @fast.on(Tick)
        async def fast_got(tick: Tick, ctx: Context) -> None:
            got.append(tick.seq)

        # The held session still receives, and other endings are served as usual. Its
        # acknowledgement of the packet waits behind the held reading (docs/CONCEPTS.md,
        # "Slow handlers"), so the acknowledged send completes once the service reads again.
        acked = asyncio.create_task(bystander.send("fast", Tick(-1, b""), ack=True))
        async with asyncio.timeout(5):
            while not got:
                await asyncio.sleep(0.01)
        assert got == [-1]
        assert not acked.done()

        gate.set()
        async with asyncio.timeout(30):
            await acked
            await flood
            while len(seen) < FLOOD:
                await asyncio.sleep(0.01)
        assert seen == list(range(FLOOD))
    finally:
        gate.set()
        flood.cancel()
