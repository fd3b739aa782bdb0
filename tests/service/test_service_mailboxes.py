"""Mailboxes at an in-process service: expiry (TTL) with Expired notices, overflow policies
and limits, offline group members, links dropped by the service, and a graceful restart on
the same data directory. Every test checks what reaches the handlers: which packets, in
which order, how many times."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from support import assert_exactly_once_in_order, send_acked, wait_until

from packetstack import Client, Context, Packet, Service
from packetstack.errors import MailboxFull
from packetstack.notices import Expired

pytestmark = pytest.mark.timeout(60)


class MbItem(Packet):
    packet_tag: ClassVar[str] = "tests.service.mailboxes.Item"
    n: int


class MbBlob(Packet):
    packet_tag: ClassVar[str] = "tests.service.mailboxes.Blob"
    n: int
    blob: bytes


class Services:
    """Started services on free ports, data under tmp_path, closed after the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list[Service] = []

    async def start(self, data: str = "data", port: int = 0, **settings: Any) -> Service:
        service = Service("127.0.0.1", port, data_dir=self.tmp_path / data, **settings)
        await service.start()
        self.running.append(service)
        return service

    async def close(self, service: Service) -> None:
        self.running.remove(service)
        await service.close()


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    started = Services(tmp_path)
    yield started
    for service in started.running:
        await service.close()


class Recorder:
    """A client whose handlers record ``(ctx.seq, n)`` of MbItem/MbBlob and Expired notices."""

    def __init__(self, name: str, url: str, delay: float = 0.0, **options: Any) -> None:
        self.client = Client(name, url, **options)
        self.delay = delay  # seconds each MbItem/MbBlob handler takes
        self.got: list[tuple[int, int]] = []
        self.expired: list[Expired] = []
        self.client.on(MbItem)(self._item)
        self.client.on(MbBlob)(self._item)
        self.client.on(Expired)(self._expired)

    async def _item(self, packet: MbItem | MbBlob, ctx: Context) -> None:
        self.got.append((ctx.seq, packet.n))
        if self.delay:
            await asyncio.sleep(self.delay)

    async def _expired(self, packet: Expired, ctx: Context) -> None:
        assert ctx.sender == "service"
        self.expired.append(packet)

    async def __aenter__(self) -> Recorder:
        await self.client.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()


async def next_id(service: Service, sender: Client) -> int:
    """The id ``sender`` will give its next packet: one past the id of a probe packet, as a
    receiver sees it (packet ids count up by one per packet)."""
    seen: list[int] = []
    async with Recorder("id-probe", service.url) as probe:
        probe.client.on(MbItem)(lambda packet, ctx: seen.append(ctx.id))
        await sender.send("id-probe", MbItem(-1), ack=True)
    assert len(seen) == 1
    return seen[0] + 1


# ------------------------------------------------------------------ expiry


async def test_packets_expire_when_due_without_a_connect_and_the_sender_is_notified(
    services: Services,
) -> None:
    service = await services.start()
    async with Recorder("sender", service.url) as sender:
        first_id = await next_id(service, sender.client)
        sent_at = time.monotonic()
        for n in range(20):
            await sender.client.send("offline", MbItem(n), ack=True, ttl=1, notify_expired=True)
        for n in range(20, 25):  # the default TTL (3 h): these stay
            await sender.client.send("offline", MbItem(n), ack=True)
        assert service.mailbox_depth("offline") == 25

        # Removed when they expire, by the service on its own: nobody connects meanwhile.
        await wait_until(lambda: service.stats["mailbox_expired"] >= 20, 5, "the expiry")
        assert time.monotonic() - sent_at >= 0.9
        assert service.stats["mailbox_expired"] == 20
        assert service.mailbox_depth("offline") == 5
        assert "offline" not in service.endings

        await wait_until(lambda: len(sender.expired) >= 20, 5, "20 Expired notices")
        await asyncio.sleep(0.2)
        assert sender.expired == [
            Expired(first_id + n, "offline", MbItem.packet_tag, "expired") for n in range(20)
        ]

        async with Recorder("offline", service.url) as ending:
            await wait_until(lambda: len(ending.got) >= 5, 5, "the packets that did not expire")
            await asyncio.sleep(0.3)
            assert [n for _, n in ending.got] == [20, 21, 22, 23, 24]
        await wait_until(lambda: service.mailbox_depth("offline") == 0, 5, "an empty mailbox")


async def test_all_expired_leaves_an_empty_mailbox_and_the_ending_gets_nothing(
    services: Services,
) -> None:
    service = await services.start()
    async with Recorder("sender", service.url) as sender:
        for n in range(50):
            await sender.client.send("offline", MbItem(n), ack=True, ttl=1)
        assert service.mailbox_depth("offline") == 50
        await wait_until(lambda: service.mailbox_depth("offline") == 0, 5, "the expiry")
        assert service.stats["mailbox_expired"] == 50
        async with Recorder("offline", service.url) as ending:
            await asyncio.sleep(0.5)
            assert ending.got == []
        assert sender.expired == []  # nobody asked to be told


async def test_an_offline_sender_gets_its_expired_notice_after_it_reconnects(
    services: Services,
) -> None:
    service = await services.start()
    async with Recorder("sender", service.url) as sender:
        packet_id = await next_id(service, sender.client)
        await sender.client.send("offline", MbItem(7), ack=True, ttl=1, notify_expired=True)
    assert "sender" not in service.endings
    await wait_until(lambda: service.stats["mailbox_expired"] == 1, 5, "the expiry")
    await wait_until(lambda: service.mailbox_depth("sender") == 1, 2, "the notice to be stored")
    async with Recorder("sender", service.url) as again:
        await wait_until(lambda: len(again.expired) >= 1, 5, "the notice")
        await asyncio.sleep(0.2)
        assert again.expired == [Expired(packet_id, "offline", MbItem.packet_tag, "expired")]
    async with Recorder("offline", service.url) as ending:
        await asyncio.sleep(0.3)
        assert ending.got == []


# ---------------------------------------------------------------- overflow


async def test_reject_policy_raises_mailbox_full_and_keeps_the_first_packets(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    service = await services.start(mailbox_max_packets=100, mailbox_overflow="reject")
    async with Recorder("sender", service.url) as sender:
        await send_acked(sender.client, "offline", MbItem, range(100))
        with pytest.raises(MailboxFull) as raised:
            await sender.client.send("offline", MbItem(100), ack=True)
        assert type(raised.value) is MailboxFull
        assert service.stats["mailbox_full"] == 1
        # A plain send past the limit: refused too, counted, warned about at the client.
        await sender.client.send("offline", MbItem(101))
        await wait_until(lambda: service.stats["mailbox_full"] == 2, 5, "the second refusal")
        await wait_until(
            lambda: any("full" in r.getMessage() for r in caplog.records), 5, "a warning"
        )
        assert service.mailbox_depth("offline") == 100

        async with Recorder("offline", service.url) as ending:
            await wait_until(lambda: len(ending.got) >= 100, 10, "the first 100")
            await asyncio.sleep(0.3)
            assert_exactly_once_in_order(ending.got, 100)
            # Room again: a new packet is taken and arrives after them.
            await sender.client.send("offline", MbItem(100), ack=True)
            await wait_until(lambda: len(ending.got) >= 101, 5, "the packet after")
            assert_exactly_once_in_order(ending.got, 101)


async def test_drop_oldest_policy_counts_drops_notifies_and_keeps_the_newest(
    services: Services,
) -> None:
    service = await services.start(mailbox_max_packets=100, mailbox_overflow="drop-oldest")
    async with Recorder("sender", service.url) as sender:
        first_id = await next_id(service, sender.client)
        for n in range(150):  # one at a time: no MailboxFull, ever
            await sender.client.send("offline", MbItem(n), ack=True, notify_expired=True)
        await wait_until(lambda: service.stats["mailbox_dropped"] >= 50, 5, "50 drops")
        await wait_until(lambda: len(sender.expired) >= 50, 5, "50 notices")
        await asyncio.sleep(0.2)
        assert service.stats["mailbox_dropped"] == 50
        assert service.stats["mailbox_full"] == 0
        assert service.mailbox_depth("offline") == 100
        assert sender.expired == [
            Expired(first_id + n, "offline", MbItem.packet_tag, "dropped") for n in range(50)
        ]
        async with Recorder("offline", service.url) as ending:
            await wait_until(lambda: len(ending.got) >= 100, 10, "the newest 100")
            await asyncio.sleep(0.3)
            assert [n for _, n in ending.got] == list(range(50, 150))
            assert_exactly_once_in_order([(s, n - 50) for s, n in ending.got], 100)


async def test_mailbox_max_bytes_limits_by_size_under_both_policies(
    services: Services,
) -> None:
    """10,000 bytes of mailbox, packets of a bit over 1000 bytes: at most 9 fit (8 at least
    while a frame's overhead stays under 250 bytes)."""
    blob = b"x" * 1000
    service = await services.start(mailbox_max_bytes=10_000, mailbox_overflow="reject")
    async with Recorder("sender", service.url) as sender:
        accepted = 0
        with pytest.raises(MailboxFull) as raised:
            for n in range(20):
                await sender.client.send("small", MbBlob(n, blob), ack=True)
                accepted += 1
        assert type(raised.value) is MailboxFull
        assert 8 <= accepted <= 9, accepted
        assert service.stats["mailbox_full"] == 1
        async with Recorder("small", service.url) as ending:
            await wait_until(lambda: len(ending.got) >= accepted, 5, "the stored blobs")
            await asyncio.sleep(0.3)
            assert_exactly_once_in_order(ending.got, accepted)

    service = await services.start(
        "data2", mailbox_max_bytes=10_000, mailbox_overflow="drop-oldest"
    )
    async with Recorder("sender", service.url) as sender:
        for n in range(30):
            await sender.client.send("small2", MbBlob(n, blob), ack=True, notify_expired=True)
        await wait_until(lambda: service.stats["mailbox_dropped"] >= 30 - accepted, 5, "the drops")
        dropped = service.stats["mailbox_dropped"]
        assert dropped == 30 - accepted
        await wait_until(lambda: len(sender.expired) >= dropped, 5, "the drop notices")
        assert {e.reason for e in sender.expired} == {"dropped"}
        async with Recorder("small2", service.url) as ending:
            await wait_until(lambda: len(ending.got) >= accepted, 5, "the newest blobs")
            await asyncio.sleep(0.3)
            assert [n for _, n in ending.got] == list(range(dropped, 30))


# ------------------------------------------------------------------ groups


async def test_an_offline_group_member_finds_published_packets_in_its_mailbox(
    service: Service,
) -> None:
    async with Recorder("member", service.url) as member:
        await member.client.join("room")
    assert "member" not in service.endings
    assert service.group_members("room") == ["member"]
    async with Recorder("publisher", service.url) as publisher:
        await publisher.client.join("room")
        for n in range(20):
            await publisher.client.publish("room", MbItem(n), ack=True)
        assert service.mailbox_depth("member") == 20
        assert service.group_members("room") == ["member", "publisher"]
        async with Recorder("member", service.url) as member:  # no join: it is a member
            await wait_until(lambda: len(member.got) >= 20, 5, "the group's packets")
            await asyncio.sleep(0.3)
            assert_exactly_once_in_order(member.got, 20)
        assert publisher.got == []  # not to the sender itself


# ----------------------------------------------- links dropped by the service


async def test_a_receiver_whose_link_the_service_drops_handles_nothing_twice(
    service: Service,
) -> None:
    """The receiver's process lives; the service drops its link five times (abort and
    close) while plain sends flow to it: nothing lost, nothing handled twice, in order."""
    total = 5000
    async with (
        Recorder("sender", service.url) as sender,
        Recorder("reader", service.url, delay=0.0002, backoff_max=0.1) as reader,
    ):

        async def send_all() -> None:
            for n in range(total):
                await sender.client.send("reader", MbItem(n))
                if n % 100 == 0:
                    await asyncio.sleep(0.005)

        sending = asyncio.create_task(send_all())
        try:
            session = service.endings["reader"]
            for drop in range(5):
                await asyncio.sleep(0.05)
                if drop % 2:
                    session.link.abort()
                else:
                    session.link.close()
                await wait_until(
                    lambda dropped=session: service.endings.get("reader") not in (None, dropped),
                    5,
                    "the reader to be back",
                )
                session = service.endings["reader"]
            await asyncio.wait_for(sending, 30)
        finally:
            sending.cancel()
        await wait_until(lambda: len(reader.got) >= total, 15, "every packet")
        await asyncio.sleep(0.3)
        assert_exactly_once_in_order(reader.got, total)
        assert reader.client.reconnects == 5
        # The drops caught packets in flight: they were kept, redelivered and deduped.
        assert service.stats["mailbox_redelivery_kept"] > 0
        assert reader.client.repeats_dropped > 0
        await wait_until(lambda: service.mailbox_depth("reader") == 0, 5, "all acknowledged")


# ------------------------------------------------------- graceful restart


async def test_graceful_restart_keeps_mailboxes_and_redelivers_in_flight_once(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """Packets stored for an offline ending and a slow connected ending mid-stream; the
    service closes gracefully and a new one opens the same data directory on the same port:
    depths are intact, the stored packets arrive, and what the connected ending had in
    flight comes again but its handler sees each packet once."""
    total = 2000
    service = await services.start()
    port = service.port
    async with Recorder("sender", service.url) as sender:
        for n in range(total):
            await sender.client.send("offline", MbItem(n))
        await sender.client.send("offline", MbItem(total), ack=True)  # all stored now
    slow = Recorder("slow", service.url, backoff_max=0.1, connect_timeout=10)

    async def crawl(packet: MbItem, ctx: Context) -> None:
        slow.got.append((ctx.seq, packet.n))
        await asyncio.sleep(0.001)

    slow.client.on(MbItem)(crawl)
    async with slow, Recorder("sender2", service.url) as sender2:
        await send_acked(sender2.client, "slow", MbItem, range(0, 100))
        for n in range(100, total):
            await sender2.client.send("slow", MbItem(n))
        await wait_until(lambda: len(slow.got) >= 500, 10, "500 handled")
        await services.close(service)
        assert len(slow.got) < total

        reopened = await services.start(port=port)
        assert reopened.mailbox_depth("offline") == total + 1
        await wait_until(lambda: len(slow.got) >= total, 20, "the rest after the restart")
        await asyncio.sleep(0.3)
        assert_exactly_once_in_order(slow.got, total)

        async with Recorder("offline", reopened.url) as ending:
            await wait_until(lambda: len(ending.got) > total, 10, "every stored packet")
            await asyncio.sleep(0.3)
            assert_exactly_once_in_order(ending.got, total + 1)
        await wait_until(lambda: reopened.mailbox_depth("offline") == 0, 5, "an empty mailbox")
