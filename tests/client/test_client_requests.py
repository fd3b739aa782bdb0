"""Request/reply between endings and the service, and every way a request can fail."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, ClassVar

import pytest
from support import eventually

from packetstack import (
    Client,
    Context,
    DeliveryError,
    Packet,
    RemoteError,
    RequestTimeout,
    Service,
    UnknownDestination,
)
from packetstack.errors import ErrorCode
from packetstack.peer import Peer

WAIT = 3.0


class Ask(Packet):
    packet_tag: ClassVar[str] = "tcr.ask"
    text: str


class Answer(Packet):
    packet_tag: ClassVar[str] = "tcr.answer"
    text: str


class Num(Packet):
    packet_tag: ClassVar[str] = "tcr.num"
    n: int


class Stall(Packet):
    packet_tag: ClassVar[str] = "tcr.stall"


class Boom(Packet):
    packet_tag: ClassVar[str] = "tcr.boom"
    text: str


class Orphan(Packet):
    """A packet the receiver knows but has no handler for."""

    packet_tag: ClassVar[str] = "tcr.orphan"
    n: int


class Shaped(Packet):
    packet_tag: ClassVar[str] = "tcr.shaped"
    n: int


class Impostor(Packet):
    """Sent under Shaped's tag with a body that does not validate as Shaped."""

    packet_tag: ClassVar[str] = "tcr.impostor"
    text: str


# Registered under its own tag at class creation; from here on it is *sent* under Shaped's.
Impostor.packet_tag = Shaped.packet_tag


class Ghost(Packet):
    """Sent under a tag that no class is registered under."""

    packet_tag: ClassVar[str] = "tcr.ghost"
    text: str


Ghost.packet_tag = "tcr.ghost-has-no-class"


class Nothing(Packet):
    packet_tag: ClassVar[str] = "tcr.nothing"


# ------------------------------------------------------------------- replies


async def test_request_returns_the_handlers_reply(make_client: Any) -> None:
    a = await make_client("a")
    b = await make_client("b")

    @b.on(Ask)
    async def ask(packet: Ask, ctx: Context) -> Answer:
        assert ctx.is_request
        return Answer(f"{packet.text.upper()} for {ctx.sender}")

    assert await a.request("b", Ask("hi"), timeout=WAIT) == Answer("HI for a")


async def test_a_plain_function_handler_answers_a_request(make_client: Any) -> None:
    a = await make_client("a")
    b = await make_client("b")

    def double(packet: Num, ctx: Context) -> Num:
        return Num(packet.n * 2)

    b.on(Num)(double)

    assert await a.request("b", Num(21), timeout=WAIT) == Num(42)


async def test_100_concurrent_requests_each_get_their_own_answer(make_client: Any) -> None:
    a = await make_client("a")
    b = await make_client("b")
    c = await make_client("c")

    @b.on(Num)
    async def times_two(packet: Num, ctx: Context) -> Num:
        await asyncio.sleep(0)
        return Num(packet.n * 2)

    @c.on(Num)
    async def times_three(packet: Num, ctx: Context) -> Num:
        return Num(packet.n * 3)

    # Alternate between two endings so the replies interleave at the requester.
    targets = ["b" if n % 2 == 0 else "c" for n in range(100)]
    replies = await asyncio.wait_for(
        asyncio.gather(*(a.request(t, Num(n), timeout=WAIT) for n, t in enumerate(targets))),
        WAIT,
    )

    assert replies == [Num(n * (2 if n % 2 == 0 else 3)) for n in range(100)]


def stall_until_released(client: Client) -> asyncio.Event:
    """Make ``client`` answer each Stall request only once the returned event is set."""
    release = asyncio.Event()

    @client.on(Stall)
    async def stall(packet: Stall, ctx: Context) -> Answer:
        await release.wait()
        return Answer("too late")

    return release


async def test_a_request_times_out_when_the_handler_is_slower(make_client: Any) -> None:
    a = await make_client("a")
    b = await make_client("b")
    release = stall_until_released(b)

    @b.on(Ask)
    async def ask(packet: Ask, ctx: Context) -> Answer:
        return Answer(packet.text)

    started = time.monotonic()
    with pytest.raises(RequestTimeout) as caught:
        await a.request("b", Stall(), timeout=0.3)
    elapsed = time.monotonic() - started

    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, DeliveryError)
    assert 0.25 <= elapsed < 1.5
    # The late reply is dropped and the connection keeps working.
    release.set()
    assert await a.request("b", Ask("after"), timeout=WAIT) == Answer("after")


async def test_the_client_default_request_timeout_applies(make_client: Any) -> None:
    a = await make_client("a", request_timeout=0.3)
    b = await make_client("b")
    release = stall_until_released(b)

    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        await a.request("b", Stall())
    assert time.monotonic() - started < 1.5
    release.set()


# ------------------------------------------------ absent and impossible endings


async def test_a_request_to_an_ending_that_never_connects_times_out_and_expires(
    make_client: Any, service: Service
) -> None:
    a = await make_client("a")

    started = time.monotonic()
    with pytest.raises(RequestTimeout) as caught:
        await a.request("nobody", Ask("hello?"), timeout=0.3)

    assert 0.25 <= time.monotonic() - started < 2.0  # after its timeout, not at once
    assert "nobody" in str(caught.value)
    # The request's time to live is its timeout: nobody finds it in the mailbox later.
    await eventually(lambda: service.stats["mailbox_expired"] == 1)
    assert service.mailbox_depth("nobody") == 0
    assert service.stats["unknown_destination"] == 0


async def test_a_request_waits_in_the_mailbox_and_is_answered_when_the_ending_connects(
    make_client: Any, service: Service
) -> None:
    a = await make_client("a")
    pending = asyncio.ensure_future(a.request("late", Ask("hello?"), timeout=WAIT))
    await eventually(lambda: service.mailbox_depth("late") == 1)
    assert not pending.done()

    late = await make_client("late", connect=False)
    late.on(Ask)(lambda p, ctx: Answer(f"{p.text} from {ctx.sender}"))
    await late.connect()
    assert await asyncio.wait_for(pending, WAIT) == Answer("hello? from a")


async def test_a_request_to_an_impossible_name_raises_unknown_destination(
    make_client: Any, service: Service
) -> None:
    a = await make_client("a")

    started = time.monotonic()
    with pytest.raises(UnknownDestination) as caught:
        await a.request("$nobody", Ask("hello?"), timeout=WAIT)

    assert time.monotonic() - started < 1.0  # at once, not after the timeout
    assert isinstance(caught.value, LookupError)
    assert "$nobody" in str(caught.value)
    assert service.stats["unknown_destination"] == 1


async def test_an_acknowledged_send_to_an_absent_ending_returns_once_stored(
    make_client: Any, service: Service
) -> None:
    a = await make_client("a")

    sent = await asyncio.wait_for(a.send("nobody", Ask("hello?"), ack=True), WAIT)
    assert isinstance(sent, int)  # the packet's id
    assert service.mailbox_depth("nobody") == 1
    assert service.stats["mailbox_stored"] == 1
    with pytest.raises(UnknownDestination):
        await asyncio.wait_for(a.send("$nobody", Ask("hello?"), ack=True), WAIT)
    assert a.connected

    got = asyncio.Queue[tuple[str, str]]()
    nobody = await make_client("nobody", connect=False)

    @nobody.on(Ask)
    async def ask(packet: Ask, ctx: Context) -> None:
        got.put_nowait((packet.text, ctx.sender))

    await nobody.connect()
    assert await asyncio.wait_for(got.get(), WAIT) == ("hello?", "a")


async def test_an_acknowledged_send_to_a_present_ending_succeeds(make_client: Any) -> None:
    a = await make_client("a")
    b = await make_client("b")
    got = asyncio.Queue[tuple[str, str]]()

    @b.on(Ask)
    async def ask(packet: Ask, ctx: Context) -> None:
        got.put_nowait((packet.text, ctx.sender))

    assert isinstance(await asyncio.wait_for(a.send("b", Ask("acked"), ack=True), WAIT), int)
    assert await asyncio.wait_for(got.get(), WAIT) == ("acked", "a")


# -------------------------------------------------------------- remote errors


async def assert_remote_error(
    request: Awaitable[object], code: ErrorCode, remote_type: str, text: str
) -> None:
    """``request`` fails with a RemoteError of ``code`` and ``remote_type`` that says ``text``."""
    with pytest.raises(RemoteError) as caught:
        await request
    assert caught.value.code == code
    assert caught.value.remote_type == remote_type
    assert text in str(caught.value)


@pytest.mark.parametrize(
    ("asker", "handler", "error", "text"),
    [
        ("a", "b", ValueError, "cannot take item 42"),
        ("a", "service", KeyError, "missing-key"),
        ("service", "a", RuntimeError, "ending failed"),
    ],
    ids=["ending to ending", "ending to the service", "the service to an ending"],
)
async def test_a_raising_handler_gives_remote_error(
    make_client: Any,
    service: Service,
    asker: str,
    handler: str,
    error: type[Exception],
    text: str,
) -> None:
    peers: dict[str, Peer] = {
        "service": service,
        "a": await make_client("a"),
        "b": await make_client("b"),
    }

    @peers[handler].on(Boom)
    async def boom(packet: Boom, ctx: Context) -> Answer:
        raise error(packet.text)

    await assert_remote_error(
        peers[asker].request(handler, Boom(text), timeout=WAIT),
        ErrorCode.HANDLER_FAILED,
        error.__name__,
        text,
    )


async def test_a_request_without_a_handler_gives_no_handler(make_client: Any) -> None:
    a = await make_client("a")
    await make_client("b")

    await assert_remote_error(
        a.request("b", Orphan(1), timeout=WAIT),
        ErrorCode.NO_HANDLER,
        "LookupError",
        Orphan.packet_tag,
    )


async def test_a_request_with_an_unknown_tag_gives_unknown_packet_type(make_client: Any) -> None:
    a = await make_client("a")
    await make_client("b")

    await assert_remote_error(
        a.request("b", Ghost("boo"), timeout=WAIT),
        ErrorCode.UNKNOWN_PACKET_TYPE,
        "UnknownPacketType",
        "tcr.ghost-has-no-class",
    )


async def test_a_request_whose_body_does_not_validate_gives_decode_failed(
    make_client: Any,
) -> None:
    a = await make_client("a")
    b = await make_client("b")
    called: list[Shaped] = []

    @b.on(Shaped)
    async def shaped(packet: Shaped, ctx: Context) -> Shaped:
        called.append(packet)
        return packet

    with pytest.raises(RemoteError) as caught:
        await a.request("b", Impostor("not a number"), timeout=WAIT)

    assert caught.value.code == ErrorCode.DECODE_FAILED
    assert caught.value.remote_type == "PacketDecodeError"
    assert called == []
    # A well-formed one still goes through.
    assert await a.request("b", Shaped(7), timeout=WAIT) == Shaped(7)


async def test_a_request_handler_returning_none_gives_remote_error(make_client: Any) -> None:
    a = await make_client("a")
    b = await make_client("b")

    @b.on(Nothing)
    async def nothing(packet: Nothing, ctx: Context) -> None:
        return None

    await assert_remote_error(
        a.request("b", Nothing(), timeout=WAIT), ErrorCode.HANDLER_FAILED, "TypeError", "NoneType"
    )


# --------------------------------------------- failing handlers, plain sends


async def test_a_failing_handler_for_a_send_keeps_the_connection_and_calls_on_unhandled(
    make_client: Any,
) -> None:
    a = await make_client("a")
    b = await make_client("b")
    unhandled: list[tuple[type[BaseException], str, str, bool, str]] = []
    handled: list[str] = []
    done = asyncio.Event()

    def hook(exc: BaseException, ctx: Context) -> None:
        unhandled.append((type(exc), str(exc), ctx.sender, ctx.is_request, ctx.header.tag))

    b.on_unhandled = hook
    assert b.on_unhandled is hook

    @b.on(Boom)
    async def boom(packet: Boom, ctx: Context) -> None:
        if packet.text == "bad":
            raise ValueError("bad packet")
        handled.append(packet.text)
        done.set()

    await a.send("b", Boom("bad"))
    await a.send("b", Orphan(3))  # known class, no handler
    await a.send("b", Boom("good"))
    await asyncio.wait_for(done.wait(), WAIT)

    assert handled == ["good"]
    assert unhandled == [
        (ValueError, "bad packet", "a", False, Boom.packet_tag),
        (LookupError, f"no handler for packet {Orphan.packet_tag!r}", "a", False, "tcr.orphan"),
    ]
    assert b.connected and a.connected


async def test_on_unhandled_also_sees_failed_requests(make_client: Any) -> None:
    a = await make_client("a")
    b = await make_client("b")
    unhandled: list[tuple[str, bool]] = []
    b.on_unhandled = lambda exc, ctx: unhandled.append((type(exc).__name__, ctx.is_request))

    @b.on(Boom)
    async def boom(packet: Boom, ctx: Context) -> None:
        raise ValueError(packet.text)

    with pytest.raises(RemoteError):
        await a.request("b", Boom("x"), timeout=WAIT)
    assert unhandled == [("ValueError", True)]


# ----------------------------------------------------------- nested requests


async def test_a_handler_that_awaits_requests_of_its_own_does_not_deadlock(
    make_client: Any,
) -> None:
    a = await make_client("a")
    b = await make_client("b")
    c = await make_client("c")

    @c.on(Num)
    async def c_num(packet: Num, ctx: Context) -> Num:
        return Num(packet.n + 100)

    @a.on(Num)
    async def a_num(packet: Num, ctx: Context) -> Num:
        return Num(packet.n + 1000)

    @b.on(Ask)
    async def ask(packet: Ask, ctx: Context) -> Answer:
        # One request to a third ending and one back to the requester itself.
        from_c = await b.request("c", Num(1), timeout=WAIT)
        from_a = await b.request(ctx.sender, Num(2), timeout=WAIT)
        return Answer(f"{packet.text}: {from_c.n} {from_a.n}")

    reply = await asyncio.wait_for(a.request("b", Ask("sum"), timeout=WAIT), WAIT)
    assert reply == Answer("sum: 101 1002")


async def test_a_service_handler_that_requests_an_ending_does_not_deadlock(
    make_client: Any, service: Service
) -> None:
    a = await make_client("a")
    c = await make_client("c")

    @c.on(Num)
    async def c_num(packet: Num, ctx: Context) -> Num:
        assert ctx.sender == "service"
        return Num(packet.n * 10)

    @service.on(Ask)
    async def ask(packet: Ask, ctx: Context) -> Answer:
        got = await service.request("c", Num(4), timeout=WAIT)
        return Answer(f"{ctx.sender} {packet.text} {got.n}")

    reply = await asyncio.wait_for(a.request("service", Ask("via"), timeout=WAIT), WAIT)
    assert reply == Answer("a via 40")
