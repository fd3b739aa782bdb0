"""Direct sends, groups, broadcasts and the service's own packets, over real sockets.

"Did not receive" is checked with a barrier instead of a sleep: after the packet under test,
the same sender sends a Marker to every ending involved. Packets from one sender to one
ending travel one path (sender link -> service -> ending link) in order and are handled in
order, so once an ending has handled the marker it has handled everything sent before it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, ClassVar

import pytest
from support import eventually

from packetstack import Client, Context, InvalidName, Packet, RequestTimeout, Service

WAIT = 3.0


class Note(Packet):
    packet_tag: ClassVar[str] = "tcm.note"
    text: str


class Seq(Packet):
    packet_tag: ClassVar[str] = "tcm.seq"
    n: int


class Marker(Packet):
    packet_tag: ClassVar[str] = "tcm.marker"
    token: int


class Ask(Packet):
    packet_tag: ClassVar[str] = "tcm.ask"
    text: str


class Answer(Packet):
    packet_tag: ClassVar[str] = "tcm.answer"
    text: str


_tokens = itertools.count(1)


class Inbox:
    """Records the Notes an ending (or the service) handles, and the Markers it sees."""

    def __init__(self, peer: Client | Service) -> None:
        self.name = peer.name
        self.notes: list[tuple[str, str, str | None, bool]] = []
        self._markers: dict[int, asyncio.Event] = {}
        self._changed = asyncio.Event()
        peer.on(Note)(self._note)
        peer.on(Marker)(self._marker)

    async def _note(self, packet: Note, ctx: Context) -> None:
        self.notes.append((packet.text, ctx.sender, ctx.group, ctx.broadcast))
        self._changed.set()

    async def _marker(self, packet: Marker, ctx: Context) -> None:
        self._event(packet.token).set()

    def _event(self, token: int) -> asyncio.Event:
        return self._markers.setdefault(token, asyncio.Event())

    async def wait_marker(self, token: int) -> None:
        await asyncio.wait_for(self._event(token).wait(), WAIT)

    async def wait_notes(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.notes) < count:
                self._changed.clear()
                await self._changed.wait()


async def barrier(sender: Client | Service, *inboxes: Inbox) -> None:
    """Return once every inbox handled everything ``sender`` sent it before this call."""
    token = next(_tokens)
    for inbox in inboxes:
        await sender.send(inbox.name, Marker(token))
    for inbox in inboxes:
        await inbox.wait_marker(token)


# ------------------------------------------------------------------- direct


async def test_direct_send_carries_sender_and_equal_payload(make_client: Any) -> None:
    a = await make_client("a")
    b = await make_client("b")
    inbox = Inbox(b)

    await a.send("b", Note("hello, b"))
    await inbox.wait_notes(1)

    assert inbox.notes == [("hello, b", "a", None, False)]


async def test_direct_send_preserves_the_order_of_1000_packets(make_client: Any) -> None:
    a = await make_client("a")
    b = await make_client("b")
    received: list[tuple[int, str]] = []
    done = asyncio.Event()

    @b.on(Seq)
    async def seq(packet: Seq, ctx: Context) -> None:
        received.append((packet.n, ctx.sender))
        if len(received) == 1000:
            done.set()

    for n in range(1000):
        await a.send("b", Seq(n))
    await asyncio.wait_for(done.wait(), 5.0)

    assert [n for n, _ in received] == list(range(1000))
    assert {sender for _, sender in received} == {"a"}


async def test_a_plain_send_to_an_unknown_ending_does_not_raise(make_client: Any) -> None:
    a = await make_client("a")
    b = await make_client("b")
    inbox = Inbox(b)

    assert isinstance(await a.send("nobody", Note("waits")), int)  # the packet's id
    await a.send("b", Note("still fine"))
    await inbox.wait_notes(1)

    assert a.connected
    assert inbox.notes == [("still fine", "a", None, False)]


async def test_a_client_can_send_to_itself(make_client: Any) -> None:
    a = await make_client("a")
    inbox = Inbox(a)

    await a.send("a", Note("me"))
    await inbox.wait_notes(1)

    assert inbox.notes == [("me", "a", None, False)]


# ------------------------------------------------------------------- groups


async def test_publish_reaches_members_but_not_the_publisher_or_non_members(
    make_client: Any, service: Service
) -> None:
    clients = {name: await make_client(name) for name in "abcd"}
    inboxes = {name: Inbox(client) for name, client in clients.items()}
    for name in "abc":
        await clients[name].join("room")
    assert service.group_members("room") == ["a", "b", "c"]

    await clients["a"].publish("room", Note("to the room"))
    await barrier(clients["a"], *inboxes.values())

    assert inboxes["b"].notes == [("to the room", "a", "room", False)]
    assert inboxes["c"].notes == [("to the room", "a", "room", False)]
    assert inboxes["a"].notes == []  # the publisher, although a member
    assert inboxes["d"].notes == []  # not a member


async def test_a_non_member_can_publish_and_leave_stops_delivery(
    make_client: Any, service: Service
) -> None:
    a = await make_client("a")
    b = await make_client("b")
    c = await make_client("c")
    inbox_b, inbox_c = Inbox(b), Inbox(c)
    await b.join("room")
    await c.join("room")

    await a.publish("room", Note("first"))
    await barrier(a, inbox_b, inbox_c)
    assert inbox_b.notes == [("first", "a", "room", False)]
    assert inbox_c.notes == [("first", "a", "room", False)]

    await b.leave("room")
    assert service.group_members("room") == ["c"]
    await a.publish("room", Note("second"))
    await barrier(a, inbox_b, inbox_c)

    assert inbox_b.notes == [("first", "a", "room", False)]
    assert inbox_c.notes == [("first", "a", "room", False), ("second", "a", "room", False)]


async def test_publish_to_a_group_without_members_is_accepted(make_client: Any) -> None:
    a = await make_client("a")
    b = await make_client("b")
    inbox = Inbox(b)

    await a.publish("empty-room", Note("nobody hears"), ack=True)
    await barrier(a, inbox)

    assert inbox.notes == []


async def test_the_last_member_leaving_removes_the_group(
    make_client: Any, service: Service
) -> None:
    a = await make_client("a")
    await a.join("solo")
    assert "solo" in service.groups
    await a.leave("solo")
    assert "solo" not in service.groups
    assert service.group_members("solo") == []


# ---------------------------------------------------------------- broadcast


async def test_broadcast_reaches_everyone_except_the_sender(make_client: Any) -> None:
    clients = {name: await make_client(name) for name in "abc"}
    inboxes = {name: Inbox(client) for name, client in clients.items()}

    await clients["a"].broadcast(Note("hear ye"))
    await barrier(clients["a"], *inboxes.values())

    assert inboxes["b"].notes == [("hear ye", "a", None, True)]
    assert inboxes["c"].notes == [("hear ye", "a", None, True)]
    assert inboxes["a"].notes == []


# --------------------------------------------------------- to the service


async def test_send_and_request_to_the_service(make_client: Any, service: Service) -> None:
    a = await make_client("a")
    inbox = Inbox(service)

    @service.on(Ask)
    async def ask(packet: Ask, ctx: Context) -> Answer:
        return Answer(f"{ctx.sender} asked {packet.text} (request={ctx.is_request})")

    await a.send("service", Note("for the hub"))
    await inbox.wait_notes(1)
    assert inbox.notes == [("for the hub", "a", None, False)]

    reply = await a.request("service", Ask("why"), timeout=WAIT)
    assert reply == Answer("a asked why (request=True)")

    await a.send("service", Note("acked"), ack=True)
    await inbox.wait_notes(2)
    assert inbox.notes[1] == ("acked", "a", None, False)


# ------------------------------------------------- the service's own sends


async def test_service_send_reaches_one_ending(make_client: Any, service: Service) -> None:
    a = await make_client("a")
    b = await make_client("b")
    inbox_a, inbox_b = Inbox(a), Inbox(b)

    await service.send("a", Note("just you"))
    await barrier(service, inbox_a, inbox_b)

    assert inbox_a.notes == [("just you", "service", None, False)]
    assert inbox_b.notes == []


async def test_service_send_to_a_name_nobody_holds_waits_for_it_in_its_mailbox(
    make_client: Any, service: Service
) -> None:
    await service.send("nobody", Note("kept"))
    assert service.mailbox_depth("nobody") == 1
    # Only a name no ending can have is refused.
    with pytest.raises(InvalidName):
        await service.send("$nobody", Note("never"))

    nobody = await make_client("nobody", connect=False)
    inbox = Inbox(nobody)
    await nobody.connect()
    await inbox.wait_notes(1)
    await barrier(service, inbox)
    assert inbox.notes == [("kept", "service", None, False)]
    await eventually(lambda: service.mailbox_depth("nobody") == 0)


async def test_service_publish_reaches_group_members_only(
    make_client: Any, service: Service
) -> None:
    clients = {name: await make_client(name) for name in "abc"}
    inboxes = {name: Inbox(client) for name, client in clients.items()}
    await clients["b"].join("news")
    await clients["c"].join("news")

    await service.publish("news", Note("extra"))
    await barrier(service, *inboxes.values())

    assert inboxes["b"].notes == [("extra", "service", "news", False)]
    assert inboxes["c"].notes == [("extra", "service", "news", False)]
    assert inboxes["a"].notes == []


async def test_service_broadcast_reaches_every_ending(make_client: Any, service: Service) -> None:
    clients = {name: await make_client(name) for name in "abc"}
    inboxes = {name: Inbox(client) for name, client in clients.items()}

    await service.broadcast(Note("all hands"))
    await barrier(service, *inboxes.values())

    for inbox in inboxes.values():
        assert inbox.notes == [("all hands", "service", None, True)]


async def test_service_request_to_an_ending(make_client: Any, service: Service) -> None:
    a = await make_client("a")

    @a.on(Ask)
    async def ask(packet: Ask, ctx: Context) -> Answer:
        return Answer(f"{ctx.sender} asked {packet.text}")

    reply = await service.request("a", Ask("status"), timeout=WAIT)
    assert reply == Answer("service asked status")

    # A request to an ending that never connects waits in its mailbox until it times out.
    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        await service.request("nobody", Ask("status"), timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 2.0
