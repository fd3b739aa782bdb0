"""A slow reader end to end: an ending that stops reading does not hold back its fast
sender; what it cannot take spills into its mailbox, so the service's memory stays bounded,
traffic between other endings goes on meanwhile, and every packet arrives, in order, once
the slow ending reads again."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import ClassVar

import msgspec
import pytest
from conftest import ServiceFactory
from support import RawPeer, close_raw, open_raw, wait_until

from packetstack import Client, Context, Packet, Service
from packetstack.errors import ProtocolError
from packetstack.protocol import (
    PacketHeader,
    PacketReceived,
    Target,
)

pytestmark = pytest.mark.timeout(90)

FLOOD = 200_000
PAD = "x" * 48
MiB = 1024 * 1024
HIGH_WATER = 1 * MiB
LOW_WATER = 256 * 1024
# Service memory allowed for the slow session (link buffers and in-flight window): its high
# water mark plus one read's worth of forwarded frames plus slack. Buffering the whole flood
# would be ~17 MB (twice that with the in-flight window).
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
    """A raw ending that keeps only the sequence numbers of the BpFlood packets it reads,
    and acknowledges every delivery it read (as a client does once its handlers ran)."""

    def __init__(self) -> None:
        super().__init__()
        self.flood_seqs: list[int] = []
        self.bytes_read = 0
        self.delivered = 0  # the highest delivery sequence number read

    def data_received(self, data: bytes) -> None:
        self.bytes_read += len(data)
        try:
            events = self.parser.receive_data(data)
        except ProtocolError as exc:
            self.parse_error = exc
            return
        delivered = self.delivered
        for event in events:
            if type(event) is PacketReceived and event.header.tag == BpFlood.packet_tag:
                self.flood_seqs.append(_flood_decoder.decode(event.payload).seq)
            else:
                self.events.append(event)
            if type(event) is PacketReceived and event.seq:
                assert event.seq > self.delivered, "deliveries out of sequence"
                self.delivered = event.seq
        if self.delivered > delivered:
            self.send(self.parser.ack_frame(self.delivered))
        self.changed.set()


async def raw_ending(port: int, name: str, rcvbuf: int | None = None) -> FloodPeer:
    peer = await open_raw(port, rcvbuf, FloodPeer)
    await peer.handshake(name)
    return peer


async def stalled_reader(port: int, ping_every: float) -> tuple[FloodPeer, asyncio.Task[None]]:
    """The raw ending "slow", with a small receive buffer, reading nothing until its
    transport resumes reading; the task keeps it alive with a PING every ``ping_every`` s."""
    slow = await raw_ending(port, "slow", rcvbuf=4096)
    assert slow.transport is not None
    slow.transport.pause_reading()
    return slow, asyncio.create_task(_pinger(slow, ping_every))


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


def inflight_bytes(service: Service, name: str) -> int:
    """Bytes of the packets sent to ``name`` and not yet acknowledged, which the service
    keeps in memory to redeliver: what the link buffers hold and what the socket took."""
    ending = service.mailboxes.endings.get(name)
    return 0 if ending is None else sum(len(frame) for _, frame, _, _ in ending.inflight)


def send_buffer(service: Service, name: str) -> int:
    """The kernel's send buffer size of ``name``'s socket at the service."""
    transport = service.endings[name].link.transport
    assert transport is not None
    return int(transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))


@pytest.fixture
async def bp_service(make_service: ServiceFactory) -> Service:
    return await make_service(
        heartbeat=5.0, heartbeat_timeout=60.0, high_water=HIGH_WATER, low_water=LOW_WATER
    )


@pytest.fixture
async def stall_service(make_service: ServiceFactory) -> Service:
    """Short heartbeats (0.25 s, timeout 1 s) and low water marks (256 KiB / 64 KiB)."""
    return await make_service(
        heartbeat=0.25, heartbeat_timeout=1.0, high_water=256 * 1024, low_water=64 * 1024
    )


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


async def test_a_slow_reader_spills_to_its_mailbox_and_never_holds_back_its_sender(
    bp_service: Service,
) -> None:
    service = bp_service
    slow, pinger = await stalled_reader(service.port, 0.5)
    assert slow.transport is not None

    fast = Client("fast", service.url, reconnect=False)
    c1 = Client("c1", service.url, reconnect=False)
    c2 = Client("c2", service.url, reconnect=False)
    sent = [0]
    peak = peak_inflight = 0
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
            nonlocal peak, peak_inflight
            while not stop_sampling.is_set():
                peak = max(peak, session_buffered(service, "slow"))
                peak_inflight = max(peak_inflight, inflight_bytes(service, "slow"))
                await asyncio.sleep(0.002)

        sampler = asyncio.create_task(sample())
        try:
            # The whole flood goes out although "slow" reads nothing: the sender is not
            # held back, and the service stores what "slow" cannot take.
            await wait_until(lambda: service.mailbox_depth("slow") == FLOOD, 60, "the flood")
        finally:
            stop_sampling.set()
            await sampler
        await asyncio.wait_for(flood_task, 5)

        assert sent[0] == FLOOD
        assert not slow.flood_seqs
        assert peak <= BOUND, f"service held {peak} bytes for 'slow', bound is {BOUND}"
        assert session_buffered(service, "slow") <= BOUND
        # The in-flight window is what the link and the socket took: the rest was stored.
        window = BOUND + send_buffer(service, "slow")
        assert peak_inflight <= window, f"{peak_inflight} bytes in flight, bound is {window}"
        assert service.stats["mailbox_spills"] >= 1
        assert service.stats["mailbox_stored"] >= FLOOD // 2
        # Both ends are still connected.
        assert fast.connected
        assert "fast" in service.endings and "slow" in service.endings

        # Unrelated endings still talk while "slow" reads nothing.
        for n in range(200):
            await c1.send("c2", BpChat(n))
        await wait_until(lambda: len(chats) >= 200, 5, "the chat")
        assert chats == list(range(200))
        assert await c1.request("c2", BpAsk(21), timeout=5) == BpAsk(42)

        # Now "slow" reads: everything arrives, once and in order, and is acknowledged.
        slow.transport.resume_reading()
        await slow.wait_for(lambda: len(slow.flood_seqs) >= FLOOD, timeout=60)
        assert slow.parse_error is None
        assert slow.flood_seqs == list(range(FLOOD))
        await wait_until(lambda: service.mailbox_depth("slow") == 0, 10, "the acknowledgements")
        assert fast.connected and not slow.lost.done()
    finally:
        await _cancel(flood_task)
        await _cancel(pinger)
        for client in (fast, c1, c2):
            await client.close()
        close_raw(slow)


async def test_a_reader_stalled_longer_than_the_heartbeat_timeout_costs_nobody_the_link(
    stall_service: Service,
) -> None:
    """A consumer that stalls for longer than the heartbeat timeout (but keeps pinging) is
    kept, its producer is never held and stays connected, and the consumer gets the whole
    flood once it reads again."""
    service = stall_service
    slow, pinger = await stalled_reader(service.port, 0.1)  # "slow" itself stays alive
    assert slow.transport is not None
    fast = Client("fast", service.url, reconnect=False)
    sent = [0]
    flood_task: asyncio.Task[None] | None = None
    try:
        await fast.connect()
        flood_task = asyncio.create_task(_flood(fast, sent))
        await asyncio.wait_for(flood_task, 60)  # never held back
        assert sent[0] == FLOOD
        # Stalled for three heartbeat timeouts.
        await asyncio.sleep(3.0)
        assert "slow" in service.endings, "'slow' kept pinging but was dropped"
        assert fast.connected, f"the fast sender was disconnected (stats: {dict(service.stats)})"
        assert service.stats["mailbox_spills"] >= 1
        slow.transport.resume_reading()
        await slow.wait_for(lambda: len(slow.flood_seqs) >= FLOOD, timeout=60)
        assert slow.flood_seqs == list(range(FLOOD))
        assert fast.connected
    finally:
        await _cancel(flood_task)
        await _cancel(pinger)
        await fast.close()
        close_raw(slow)


RAW_FLOOD = 50_000


async def test_a_sender_flooding_a_stalled_reader_is_read_on_and_dropped_at_once_when_it_dies(
    stall_service: Service,
) -> None:
    """The service keeps reading a sender whose destination stalls (what it cannot pass on
    goes to the mailbox), so it sees at once when that sender dies; the packets it took
    before are delivered, in order, when the reader resumes."""
    service = stall_service
    slow, pinger = await stalled_reader(service.port, 0.1)
    assert slow.transport is not None
    fast = await raw_ending(service.port, "fast")
    assert fast.transport is not None
    try:
        seq = 0
        async with asyncio.timeout(30):
            while seq < RAW_FLOOD:
                for _ in range(500):
                    payload = msgspec.msgpack.encode(BpFlood(seq, PAD))
                    seq += 1
                    header = PacketHeader(
                        seq, int(Target.ENDING), "slow", "fast", BpFlood.packet_tag
                    )
                    fast.send(fast.parser.send_packet(header, payload))
                await asyncio.sleep(0)
        # The service read the whole flood: nothing waits in our socket buffer.
        await wait_until(lambda: service.mailbox_depth("slow") == RAW_FLOOD, 30, "the raw flood")
        await wait_until(
            lambda: fast.transport is not None and fast.transport.get_write_buffer_size() == 0,
            5,
            "the sender's buffer to drain",
        )
        assert service.stats["mailbox_spills"] >= 1
        assert "fast" in service.endings

        fast.transport.abort()  # the sender dies
        took = await wait_until(lambda: "fast" not in service.endings, 5, "'fast' to go")
        assert took < 1.0, took
        assert "slow" in service.endings

        slow.transport.resume_reading()
        await slow.wait_for(lambda: len(slow.flood_seqs) >= RAW_FLOOD, timeout=30)
        assert slow.flood_seqs == list(range(RAW_FLOOD))
    finally:
        await _cancel(pinger)
        for peer in (slow, fast):
            close_raw(peer)
