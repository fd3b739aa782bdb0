"""Handshake, tokens, ending names and the replacement of a session under a taken name."""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

import pytest
from conftest import ServiceFactory
from support import eventually

from packetstack import (
    AuthenticationFailed,
    Client,
    ConfigError,
    ConnectionClosed,
    Context,
    HandshakeRefused,
    Packet,
    Service,
)
from packetstack.errors import CloseCode

WAIT = 3.0


class Ping(Packet):
    packet_tag: ClassVar[str] = "tsh.ping"
    n: int


class Pong(Packet):
    packet_tag: ClassVar[str] = "tsh.pong"
    n: int
    by: str


@pytest.fixture
async def secured(make_service: ServiceFactory) -> Service:
    running = await make_service(tokens=["s3cret"])

    @running.on(Ping)
    async def ping(packet: Ping, ctx: Context) -> Pong:
        return Pong(packet.n, ctx.sender)

    return running


# -------------------------------------------------------------------- tokens


async def test_the_right_token_connects(secured: Service) -> None:
    async with Client("worker", secured.url, token="s3cret") as client:
        assert client.connected
        assert client.welcome is not None and client.welcome.session == "worker"
        assert list(secured.endings) == ["worker"]
        assert await client.request("service", Ping(1), timeout=WAIT) == Pong(1, "worker")
    assert secured.stats["auth_failures"] == 0


@pytest.mark.parametrize("token", ["wrong", None, "", "s3cret "])
async def test_a_wrong_or_missing_token_is_refused_at_once(
    secured: Service, token: str | None
) -> None:
    client = Client("intruder", secured.url, token=token, connect_timeout=5.0)
    started = time.monotonic()
    with pytest.raises(AuthenticationFailed) as caught:
        await client.connect()
    elapsed = time.monotonic() - started

    assert isinstance(caught.value, HandshakeRefused)
    assert caught.value.code == CloseCode.AUTH_FAILED
    assert elapsed < 1.0  # refused on the first attempt, not after retrying for 5 s
    assert not client.connected
    assert secured.stats["auth_failures"] == 1
    assert "intruder" not in secured.endings
    await client.close()


async def test_auth_failures_are_counted(secured: Service) -> None:
    for token in ("nope", None, "also-nope"):
        with pytest.raises(AuthenticationFailed):
            await Client("intruder", secured.url, token=token).connect()
    assert secured.stats["auth_failures"] == 3
    assert secured.stats["connections"] == 0

    async with Client("friend", secured.url, token="s3cret") as friend:
        assert friend.connected
    assert secured.stats["auth_failures"] == 3
    assert secured.stats["connections"] == 1


async def test_a_token_is_ignored_by_a_service_without_tokens(make_client: Any) -> None:
    client = await make_client("anyone", token="whatever")
    assert client.connected


# --------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["service", "", "*", "$system", "tab\there", "x" * 256, "é" * 128])
def test_an_invalid_ending_name_is_refused_at_construction(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Client(name, "ps://127.0.0.1:1")
    assert isinstance(caught.value, ValueError)


def test_a_name_of_255_bytes_is_accepted() -> None:
    assert Client("x" * 255, "ps://127.0.0.1:1").name == "x" * 255


@pytest.mark.parametrize("group", ["", "service", "*", "$g"])
async def test_an_invalid_group_name_is_refused(make_client: Any, group: str) -> None:
    client = await make_client("a")
    with pytest.raises(ConfigError):
        await client.join(group)
    assert client.connected


# --------------------------------------------------------------- replacement


async def test_a_second_connection_under_a_name_replaces_the_first_and_keeps_its_groups(
    service: Service, make_client: Any
) -> None:
    old = await make_client("x", backoff_initial=0.01, backoff_max=0.05)
    await old.join("room")
    old_session = service.endings["x"]
    close_codes: list[int | None] = []
    original_link_lost = old.link_lost

    def spy(link: Any, error: BaseException | None) -> None:
        close_codes.append(link.close_code)
        original_link_lost(link, error)

    old.link_lost = spy  # instrument the callback the Link reports to

    new = await make_client("x")
    await eventually(lambda: not old.connected)

    assert new.connected
    assert close_codes == [CloseCode.REPLACED]
    assert service.stats["replaced"] == 1
    assert service.stats["connections"] == 2
    assert service.endings["x"] is not old_session
    assert service.endings["x"].link is not old_session.link
    assert old_session.link.closed
    # Group membership belongs to the name, not the session: the new session has it.
    assert service.group_members("room") == ["x"]

    # The new session is the one that works: packets to "x", and to its groups, reach it.
    other = await make_client("other")
    new.on(Ping)(lambda p, ctx: Pong(p.n, "new"))
    old.on(Ping)(lambda p, ctx: Pong(p.n, "old"))
    reply = await other.request("x", Ping(5), timeout=WAIT)
    assert reply == Pong(5, "new")
    published: list[tuple[str, int, str | None]] = []
    new.on(Pong)(lambda p, ctx: published.append(("new", p.n, ctx.group)))
    old.on(Pong)(lambda p, ctx: published.append(("old", p.n, ctx.group)))
    await other.publish("room", Pong(6, "other"), ack=True)
    await eventually(lambda: bool(published))
    assert published == [("new", 6, "room")]

    # The old one does not reconnect (it would replace the new one in turn).
    await asyncio.sleep(0.5)
    assert not old.connected
    assert old.reconnects == 0
    assert service.stats["replaced"] == 1
    assert service.stats["connections"] == 3  # old, new, other
    with pytest.raises(ConnectionClosed):
        await old.send("other", Ping(1))
    assert new.connected
