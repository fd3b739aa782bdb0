"""The client's outbox and resends: while the service is unreachable (``kill -9`` of a
``packetstack serve`` process) sends queue in a bounded outbox and go out after the
reconnect, in order, once; ack=True sends whose acknowledgement never came are resent and
acknowledged, and never delivered twice."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path
from typing import ClassVar

import pytest
from support import (
    ServiceProcess,
    TcpProxy,
    assert_exactly_once_in_order,
    free_port,
    send_acked,
    wait_until,
)

from packetstack import Client, Context, Packet, Service
from packetstack.errors import OutboxFull

pytestmark = pytest.mark.timeout(60)


class ObItem(Packet):
    packet_tag: ClassVar[str] = "tests.client.outbox.Item"
    n: int


def recording_client(name: str, url: str, got: list[tuple[int, int]]) -> Client:
    """A client that appends ``(ctx.seq, n)`` for each ObItem it handles to ``got``."""
    client = Client(name, url, backoff_max=0.2, connect_timeout=20)

    @client.on(ObItem)
    async def on_item(packet: ObItem, ctx: Context) -> None:
        got.append((ctx.seq, packet.n))

    return client


async def test_sends_while_the_service_is_down_queue_and_arrive_in_order_once(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    service = ServiceProcess(free_port(), tmp_path)
    processes.append(service.start())
    await service.wait_listening()
    assert service.proc is not None
    got: list[tuple[int, int]] = []
    sink = recording_client("sink", service.url, got)
    sender = Client("sender", service.url, backoff_max=0.2, outbox_limit=300, request_timeout=30)
    try:
        await sink.connect()
        await sender.connect()
        await send_acked(sender, "sink", ObItem, range(100))
        assert sender.outbox_size == 0

        # ack=True sends in the air when the service dies: written, never acknowledged.
        service.proc.send_signal(signal.SIGSTOP)
        pending = [
            asyncio.ensure_future(sender.send("sink", ObItem(n), ack=True)) for n in range(100, 150)
        ]
        await asyncio.sleep(0.3)
        assert not any(f.done() for f in pending)
        service.kill9()
        await wait_until(lambda: not sender.connected, 5, "the sender to notice the kill")

        # Down: plain sends queue, one outbox place each, up to the limit.
        for n in range(150, 450):
            await sender.send("sink", ObItem(n))
            assert sender.outbox_size == n - 149
        with pytest.raises(OutboxFull) as raised:
            await sender.send("sink", ObItem(450))
        assert type(raised.value) is OutboxFull
        with pytest.raises(OutboxFull):
            await sender.send("sink", ObItem(450), ack=True)
        assert sender.outbox_size == 300
        assert not any(f.done() for f in pending)

        processes.append(service.start())
        await service.wait_listening()
        await asyncio.wait_for(asyncio.gather(*pending), 20)  # resent and acknowledged
        await sender.send("sink", ObItem(450), ack=True)  # room again once connected
        assert sender.outbox_size == 0
        await wait_until(lambda: len(got) >= 451, 20, "every packet at the sink")
        await asyncio.sleep(0.5)
        assert_exactly_once_in_order(got, 451)
        assert sender.reconnects == 1
    finally:
        await sender.close()
        await sink.close()


async def test_unacknowledged_sends_are_resent_acknowledged_and_never_delivered_twice(
    service: Service,
) -> None:
    """The sender's acks are lost on the way back (a proxy swallows them) while the
    service stores and delivers its ack=True packets; then the connection breaks. After
    the reconnect the sender resends them (RESENT): the service drops every one as a
    duplicate and acknowledges it; receivers, live or offline, get each once."""
    proxy = TcpProxy(service.port)
    await proxy.start()
    got: list[tuple[int, int]] = []
    sink = recording_client("sink", service.url, got)
    sender = Client("sender", proxy.url, backoff_max=0.1, request_timeout=30)
    try:
        await sink.connect()
        await sender.connect()
        await send_acked(sender, "sink", ObItem, range(100))

        proxy.swallow_replies = True
        live = asyncio.ensure_future(send_acked(sender, "sink", ObItem, range(100, 300), 50))
        stored = asyncio.ensure_future(
            send_acked(sender, "offline", ObItem, range(100), window=100)
        )
        await wait_until(
            lambda: len(got) >= 150 and service.mailbox_depth("offline") == 100,
            10,
            "the service to take the first sends",
        )
        await asyncio.sleep(0.3)
        assert not live.done() and not stored.done()  # their acks were swallowed
        proxy.cut()
        proxy.swallow_replies = False

        await asyncio.wait_for(asyncio.gather(live, stored), 20)
        assert proxy.connections == 2
        assert sender.reconnects == 1
        assert service.stats["duplicates_dropped"] >= 150
        await wait_until(lambda: len(got) >= 300, 10, "every packet at the sink")
        await asyncio.sleep(0.5)
        assert_exactly_once_in_order(got, 300)
        assert service.mailbox_depth("offline") == 100

        offline_got: list[tuple[int, int]] = []
        offline = recording_client("offline", service.url, offline_got)
        await offline.connect()
        try:
            await wait_until(lambda: len(offline_got) >= 100, 10, "the stored packets")
            await asyncio.sleep(0.3)
            assert_exactly_once_in_order(offline_got, 100)
        finally:
            await offline.close()
    finally:
        await sender.close()
        await sink.close()
        await proxy.close()
