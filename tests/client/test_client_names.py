"""Names a client refuses before sending anything (InvalidName, TypeError), and long but
valid names (over the 63-character fast path) working end to end."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest

from packetstack import (
    Client,
    ConfigError,
    Context,
    InvalidName,
    Packet,
    ProtocolError,
    RequestTimeout,
    Service,
    UnknownDestination,
)

WAIT = 3.0


class Note(Packet):
    packet_tag: ClassVar[str] = "tcn.note"
    text: str


class Ask(Packet):
    packet_tag: ClassVar[str] = "tcn.ask"
    text: str


class Answer(Packet):
    packet_tag: ClassVar[str] = "tcn.answer"
    text: str
    by: str


class HugeTag(Packet):
    """A tag that alone makes the packet header longer than 65535 bytes."""

    packet_tag: ClassVar[str] = "tcn." + "t" * 70_000
    n: int


async def pair(make_client: Any) -> tuple[Client, Client, asyncio.Queue[tuple[str, str]]]:
    """Clients a and b; b queues (text, sender) of every Note it gets."""
    a = await make_client("a")
    b = await make_client("b")
    got: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    b.on(Note)(lambda p, ctx: got.put_nowait((p.text, ctx.sender)))
    return a, b, got


async def assert_still_usable(
    a: Client, got: asyncio.Queue[tuple[str, str]], service: Service
) -> None:
    """Nothing reached the service before, and a normal send still goes through."""
    assert got.empty()
    assert service.packets_in == 0
    await a.send("b", Note("after"), ack=True)
    assert await asyncio.wait_for(got.get(), WAIT) == ("after", "a")
    assert service.packets_in == 1
    assert a.connected
    assert got.empty()


# ----------------------------------------------------- destinations refused locally


@pytest.mark.parametrize(
    "to",
    ["x" * 300, "", "x" * 256, "é" * 128, "\t" + "x" * 70, "$" + "x" * 70],
    ids=["300 chars", "empty", "256 bytes", "256 bytes of é", "tab, long", "$, long"],
)
async def test_send_to_an_impossible_name_raises_invalid_name_and_sends_nothing(
    make_client: Any, service: Service, to: str
) -> None:
    a, _, got = await pair(make_client)
    with pytest.raises(InvalidName) as caught:
        await a.send(to, Note("never"))
    assert isinstance(caught.value, ConfigError)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(InvalidName):
        await a.send(to, Note("never"), ack=True)
    await assert_still_usable(a, got, service)


@pytest.mark.parametrize("to", ["x" * 300, ""], ids=["300 chars", "empty"])
async def test_request_to_an_impossible_name_raises_invalid_name_and_sends_nothing(
    make_client: Any, service: Service, to: str
) -> None:
    a, b, got = await pair(make_client)
    b.on(Ask)(lambda p, ctx: Answer(p.text, "b"))
    with pytest.raises(InvalidName):
        await a.request(to, Ask("never"), timeout=WAIT)
    await assert_still_usable(a, got, service)
    assert await a.request("b", Ask("q"), timeout=WAIT) == Answer("q", "b")


@pytest.mark.parametrize(
    "group",
    ["", "g" * 300, "*", "service", "$g", "tab\there"],
    ids=["empty", "300 chars", "star", "service", "$", "tab"],
)
async def test_publish_to_an_impossible_group_raises_invalid_name_and_sends_nothing(
    make_client: Any, service: Service, group: str
) -> None:
    a, b, got = await pair(make_client)
    await b.join("room")
    with pytest.raises(InvalidName):
        await a.publish(group, Note("never"))
    with pytest.raises(InvalidName):
        await a.publish(group, Note("never"), ack=True)
    await assert_still_usable(a, got, service)
    await a.publish("room", Note("published"), ack=True)
    assert await asyncio.wait_for(got.get(), WAIT) == ("published", "a")


@pytest.mark.parametrize("to", ["$x", "*", "tab\there"], ids=["$", "star", "tab"])
async def test_short_names_are_left_to_the_service(
    make_client: Any, service: Service, to: str
) -> None:
    """Up to 63 characters a destination is not checked locally (the fast path): no ending
    can hold such a name, so the service answers that it is unknown."""
    a, _, got = await pair(make_client)
    with pytest.raises(UnknownDestination):
        await a.send(to, Note("nobody"), ack=True)
    assert service.stats["unknown_destination"] == 1
    assert got.empty()
    assert a.connected


@pytest.mark.parametrize("to", [123, None, b"b", 1.5, ["b"]])
async def test_a_destination_that_is_not_a_str_raises_type_error(
    make_client: Any, service: Service, to: Any
) -> None:
    a, _, got = await pair(make_client)
    with pytest.raises(TypeError):
        await a.send(to, Note("never"))
    with pytest.raises(TypeError):
        await a.request(to, Ask("never"), timeout=WAIT)
    await assert_still_usable(a, got, service)


async def test_a_packet_header_over_64_kib_is_refused_before_anything_is_sent(
    make_client: Any, service: Service
) -> None:
    a, _, got = await pair(make_client)
    with pytest.raises(ProtocolError, match="65535"):
        await a.send("b", HugeTag(1))
    with pytest.raises(ProtocolError):
        await a.send("b", HugeTag(1), ack=True)
    with pytest.raises(ProtocolError):
        await a.request("b", HugeTag(1), timeout=WAIT)
    with pytest.raises(ProtocolError):
        await a.publish("room", HugeTag(1))
    with pytest.raises(ProtocolError):
        await a.broadcast(HugeTag(1))
    await assert_still_usable(a, got, service)


# ------------------------------------------------------------- own and group names


@pytest.mark.parametrize("name", ["service", "", "*", "$x", "x" * 256, "a\nb"])
def test_a_client_with_an_impossible_name_raises_invalid_name(name: str) -> None:
    with pytest.raises(InvalidName) as caught:
        Client(name, "ps://127.0.0.1:1")
    assert isinstance(caught.value, ConfigError)


@pytest.mark.parametrize("group", ["", "service", "*", "g" * 256])
async def test_join_and_leave_an_impossible_group_raise_invalid_name(
    make_client: Any, service: Service, group: str
) -> None:
    a, _, got = await pair(make_client)
    with pytest.raises(InvalidName):
        await a.join(group)
    with pytest.raises(InvalidName):
        await a.leave(group)
    assert service.group_members(group) == []
    await assert_still_usable(a, got, service)


# ------------------------------------------------------------ long, valid names


LONG_NAMES = [
    ("a" * 200, "b" * 200),
    ("a" * 63, "b" * 64),  # either side of the fast path
    ("é" * 127 + "a", "€" * 85),  # 255 bytes each, 128 and 85 characters
]


@pytest.mark.parametrize("a_name, b_name", LONG_NAMES, ids=["200 ascii", "63 and 64", "255 bytes"])
async def test_long_valid_names_work_end_to_end(
    make_client: Any, service: Service, a_name: str, b_name: str
) -> None:
    a = await make_client(a_name)
    b = await make_client(b_name)
    assert sorted(service.endings) == sorted([a_name, b_name])
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    b.on(Note)(lambda p, ctx: heard.put_nowait((p.text, ctx.sender)))

    @b.on(Ask)
    async def ask(packet: Ask, ctx: Context) -> Answer:
        return Answer(packet.text + "!", ctx.sender)

    await a.send(b_name, Note("hello"))
    assert await asyncio.wait_for(heard.get(), WAIT) == ("hello", a_name)
    await a.send(b_name, Note("acked"), ack=True)
    assert await asyncio.wait_for(heard.get(), WAIT) == ("acked", a_name)
    assert await a.request(b_name, Ask("q"), timeout=WAIT) == Answer("q!", a_name)

    # And back, replies addressed to the long name included.
    a.on(Ask)(lambda p, ctx: Answer(p.text, ctx.sender))
    assert await b.request(a_name, Ask("r"), timeout=WAIT) == Answer("r", b_name)

    # A long, valid name nobody holds is not a name error: packets wait in its mailbox
    # (an acknowledged send returns once stored), a request times out, and the ending
    # gets what waited when it connects under that name.
    absent = "z" * 200
    await a.send(absent, Note("waiting"), ack=True)
    assert service.mailbox_depth(absent) == 1
    with pytest.raises(RequestTimeout):
        await a.request(absent, Ask("nobody"), timeout=0.2)

    late = await make_client(absent, connect=False)
    late.on(Note)(lambda p, ctx: heard.put_nowait((p.text, ctx.sender)))
    await late.connect()
    assert await asyncio.wait_for(heard.get(), WAIT) == ("waiting", a_name)


async def test_a_long_valid_group_name_works(make_client: Any, service: Service) -> None:
    a, b, got = await pair(make_client)
    group = "g" * 255
    await b.join(group)
    assert service.group_members(group) == ["b"]
    await a.publish(group, Note("to the group"), ack=True)
    assert await asyncio.wait_for(got.get(), WAIT) == ("to the group", "a")
