"""Backpressure end to end: an ending that stops reading must hold back its fast sender
through TCP, not make the service buffer without bound; traffic between other endings goes
on meanwhile, and nothing is lost once the slow ending reads again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import msgspec
import pytest
from support import RawPeer, close_raw, open_raw

from packetstack import Client, Context, Packet, Service
from packetstack.errors import ProtocolError
from packetstack.protocol import (
    Hello,
    PacketHeader,
    PacketReceived,
    Target,
    WelcomeReceived,
)

pytestmark = pytest.mark.timeout(90)

FLOOD = 200_000
PAD = "x" * 48
MiB = 1024 * 1024
HIGH_WATER = 1 * MiB
LOW_WATER = 256 * 1024
# Service memory allowed for the slow session: its high water mark plus one read's worth of
# forwarded frames plus slack. Buffering the whole flood would be ~17 MB.
BOUND = HIGH_WATER + 3 * MiB


class BpFlood(Packet):
    packet_tag: ClassVar[str] = "tests.transport.backpressure.Flood"
    seq: int
    pad: str


class BpChat(Packet):
    packet_tag: ClassVar[str] = "tests.transport.backpressure.Chat"
    n: int


class BpAsk(Packet):
    packet_tag: ClassVar[str] = "tests.transport.backpressure.Ask"
    n: int


_flood_decoder = msgspec.msgpack.Decoder(BpFlood)


class FloodPeer(RawPeer):
    """A raw ending that keeps only the sequence numbers of the BpFlood packets it reads."""

    def __init__(self) -> None:
        super().__init__()
        self.flood_seqs: list[int] = []
        self.bytes_read = 0

    def data_received(self, data: bytes) -> None:
        self.bytes_read += len(data)
        try:
            events = self.parser.receive_data(data)
        except ProtocolError as exc:
            self.parse_error = exc
            return
        for event in events:
            if type(event) is PacketReceived and event.header.tag == BpFlood.packet_tag:
                self.flood_seqs.append(_flood_decoder.decode(event.payload).seq)
            else:
                self.events.append(event)
        self.changed.set()


async def raw_ending(port: int, name: str, rcvbuf: int | None = None) -> FloodPeer:
    peer = await open_raw(port, rcvbuf, FloodPeer)
    peer.send(peer.parser.hello_frame(Hello(1, name)))
    await peer.wait_for(lambda: any(type(e) is WelcomeReceived for e in peer.events), timeout=5)
    return peer


def session_buffered(service: Service, name: str) -> int:
    """Bytes the service holds for one session: transport buffer plus link queue."""
    session = service.endings.get(name)
    if session is None:
        return 0
    link = session.link
    size = link.pending_bytes
    if link.transport is not None:
        size += link.transport.get_write_buffer_size()
    return size


@pytest.fixture
async def bp_service(tmp_path: Path) -> AsyncIterator[Service]:
    async with Service(
        "127.0.0.1",
        0,
        data_dir=tmp_path / "data",
        heartbeat=5.0,
        heartbeat_timeout=60.0,
        high_water=HIGH_WATER,
        low_water=LOW_WATER,
    ) as running:
        yield running


async def _stall(progress, timeout: float, quiet: float = 1.0) -> None:  # type: ignore[no-untyped-def]
    """Wait until ``progress()`` has not changed for ``quiet`` seconds."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        last, since = progress(), loop.time()
        while loop.time() - since < quiet:
            await asyncio.sleep(0.05)
            now = progress()
            if now != last:
                last, since = now, loop.time()


async def _pinger(peer: FloodPeer, interval: float) -> None:
    """Keep a non-reading raw ending alive: it still writes PINGs."""
    while True:
        await asyncio.sleep(interval)
        if peer.transport is None or peer.transport.is_closing():
            return
        peer.send(peer.parser.ping_frame())


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
    if task is not None:
        with contextlib.suppress(BaseException):
            await task


async def _flood(client: Client, counter: list[int]) -> None:
    for seq in range(FLOOD):
        await client.send("slow", BpFlood(seq, PAD))
        counter[0] += 1


async def test_slow_reader_blocks_fast_sender_with_bounded_service_memory(
    bp_service: Service,
) -> None:
    service = bp_service
    slow = await raw_ending(service.port, "slow", rcvbuf=4096)
    assert slow.transport is not None
    slow.transport.pause_reading()  # from now on "slow" never reads
    pinger = asyncio.create_task(_pinger(slow, 0.5))

    fast = Client("fast", service.url, reconnect=False)
    c1 = Client("c1", service.url, reconnect=False)
    c2 = Client("c2", service.url, reconnect=False)
    sent = [0]
    peak = 0
    flood_task: asyncio.Task[None] | None = None
    try:
        await fast.connect()
        await c1.connect()
        await c2.connect()

        chats: list[int] = []

        @c2.on(BpChat)
        async def chat(packet: BpChat, ctx: Context) -> None:
            chats.append(packet.n)

        @c2.on(BpAsk)
        async def ask(packet: BpAsk, ctx: Context) -> BpAsk:
            return BpAsk(packet.n * 2)

        flood_task = asyncio.create_task(_flood(fast, sent))

        stop_sampling = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop_sampling.is_set():
                peak = max(peak, session_buffered(service, "slow"))
                await asyncio.sleep(0.002)

        sampler = asyncio.create_task(sample())
        try:
            # The flood makes progress, then stops: the sender is held back.
            await _stall(lambda: sent[0], timeout=30, quiet=1.5)
        finally:
            stop_sampling.set()
            await sampler

        assert not flood_task.done(), (
            f"the flood of {FLOOD} packets completed while 'slow' read nothing: the service "
            f"buffered it (peak {peak} bytes for the slow session)"
        )
        assert 0 < sent[0] < FLOOD
        assert peak <= BOUND, f"service held {peak} bytes for 'slow', bound is {BOUND}"
        assert session_buffered(service, "slow") <= BOUND
        assert service.stats["backpressure_pauses"] >= 1
        # The fast sender is blocked in send(), still connected, not disconnected.
        assert fast.connected
        assert "fast" in service.endings and "slow" in service.endings

        # Unrelated endings still talk while the flood is blocked.
        for n in range(200):
            await c1.send("c2", BpChat(n))
        async with asyncio.timeout(5):
            while len(chats) < 200:
                await asyncio.sleep(0.01)
        assert chats == list(range(200))
        assert await c1.request("c2", BpAsk(21), timeout=5) == BpAsk(42)
        assert not flood_task.done(), "the flood finished although 'slow' still reads nothing"

        # Now "slow" reads: everything arrives, in order, and the flood completes.
        slow.transport.resume_reading()
        await asyncio.wait_for(flood_task, 60)
        await slow.wait_for(lambda: len(slow.flood_seqs) >= FLOOD, timeout=30)
        assert slow.parse_error is None
        assert len(slow.flood_seqs) == FLOOD
        assert slow.flood_seqs == list(range(FLOOD))
        assert sent[0] == FLOOD
        assert fast.connected and not slow.lost.done()
    finally:
        await _cancel(flood_task)
        await _cancel(pinger)
        for client in (fast, c1, c2):
            await client.close()
        close_raw(slow)


async def test_fast_sender_is_not_disconnected_while_held_longer_than_heartbeat_timeout(
    tmp_path: Path,
) -> None:
    """The service pauses reading from the fast sender itself (backpressure). That pause
    must not count as the sender going silent: a consumer that stalls for longer than the
    heartbeat timeout must not get its producer disconnected with HEARTBEAT_TIMEOUT."""
    async with Service(
        "127.0.0.1",
        0,
        data_dir=tmp_path / "data",
        heartbeat=0.25,
        heartbeat_timeout=1.0,
        high_water=256 * 1024,
        low_water=64 * 1024,
    ) as service:
        slow = await raw_ending(service.port, "slow", rcvbuf=4096)
        assert slow.transport is not None
        slow.transport.pause_reading()
        pinger = asyncio.create_task(_pinger(slow, 0.1))  # "slow" itself stays alive
        fast = Client("fast", service.url, reconnect=False)
        sent = [0]
        flood_task: asyncio.Task[None] | None = None
        try:
            await fast.connect()
            flood_task = asyncio.create_task(_flood(fast, sent))
            await _stall(lambda: sent[0], timeout=30, quiet=0.5)
            assert not flood_task.done()
            # Held for three heartbeat timeouts.
            await asyncio.sleep(3.0)
            assert "slow" in service.endings, "'slow' kept pinging but was dropped"
            assert fast.connected, (
                "the fast sender was disconnected while the service itself had paused "
                f"reading from it (stats: {dict(service.stats)})"
            )
            slow.transport.resume_reading()
            await asyncio.wait_for(flood_task, 60)
            await slow.wait_for(lambda: len(slow.flood_seqs) >= FLOOD, timeout=30)
            assert slow.flood_seqs == list(range(FLOOD))
        finally:
            await _cancel(flood_task)
            await _cancel(pinger)
            await fast.close()
            close_raw(slow)


async def test_held_sender_that_dies_is_still_dropped(tmp_path: Path) -> None:
    """While the service holds reading from a sender, it cannot see that sender's EOF; a
    sender that dies meanwhile must still be dropped in bounded time (not leak until the
    slow ending drains)."""
    async with Service(
        "127.0.0.1",
        0,
        data_dir=tmp_path / "data",
        heartbeat=0.25,
        heartbeat_timeout=1.0,
        high_water=256 * 1024,
        low_water=64 * 1024,
    ) as service:
        slow = await raw_ending(service.port, "slow", rcvbuf=4096)
        assert slow.transport is not None
        slow.transport.pause_reading()
        pinger = asyncio.create_task(_pinger(slow, 0.1))
        fast = await raw_ending(service.port, "fast")
        assert fast.transport is not None
        try:
            payload = msgspec.msgpack.encode(BpFlood(0, PAD))
            seq = 0
            # Flood until the service stops reading us and our own buffer backs up.
            async with asyncio.timeout(30):
                while fast.transport.get_write_buffer_size() < 2 * MiB:
                    for _ in range(500):
                        seq += 1
                        header = PacketHeader(
                            seq, int(Target.ENDING), "slow", "fast", BpFlood.packet_tag
                        )
                        fast.send(fast.parser.send_packet(header, payload))
                    await asyncio.sleep(0)
            assert service.stats["backpressure_pauses"] >= 1
            assert "fast" in service.endings

            fast.transport.abort()  # the sender dies while held
            loop = asyncio.get_running_loop()
            start = loop.time()
            async with asyncio.timeout(10):
                while "fast" in service.endings:
                    await asyncio.sleep(0.02)
            assert loop.time() - start < 5.0
            assert "slow" in service.endings
        finally:
            await _cancel(pinger)
            for peer in (slow, fast):
                close_raw(peer)
