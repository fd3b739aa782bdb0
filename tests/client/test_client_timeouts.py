"""Request timeouts on the shared timer (each request still expires at its own time, answered
ones never do, the deadline heap stays bounded), and pending requests when a reconnect is
refused for good."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from support import eventually

from packetstack import (
    Client,
    ConnectionClosed,
    Context,
    Packet,
    RequestTimeout,
    Service,
)
from packetstack.errors import CloseCode

WAIT = 3.0


class Stall(Packet):
    packet_tag: ClassVar[str] = "tct.stall"
    n: int


class Echo(Packet):
    packet_tag: ClassVar[str] = "tct.echo"
    n: int


class Stalling:
    """Makes ``client`` hold every Stall request until ``release`` is set."""

    def __init__(self, client: Client) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()

        @client.on(Stall)
        async def stall(packet: Stall, ctx: Context) -> Echo:
            self.started.set()
            await self.release.wait()
            return Echo(packet.n)


def catch_loop_errors() -> list[dict[str, Any]]:
    """Whatever reaches the event loop's exception handler from here on."""
    seen: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: seen.append(context))
    return seen


# ------------------------------------------------------- each at its own time


async def test_requests_expire_in_deadline_order_at_their_own_timeouts(
    make_client: Any,
) -> None:
    a = await make_client("a")
    b = await make_client("b")
    stalling = Stalling(b)
    expired: list[tuple[float, float, BaseException]] = []
    started = time.monotonic()

    async def ask(timeout: float) -> None:
        try:
            await a.request("b", Stall(int(timeout * 10)), timeout=timeout)
        except RequestTimeout as exc:
            expired.append((timeout, time.monotonic() - started, exc))

    try:
        tasks = [asyncio.ensure_future(ask(t)) for t in (0.3, 0.1, 0.2)]
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
    finally:
        stalling.release.set()

    assert [timeout for timeout, _, _ in expired] == [0.1, 0.2, 0.3]
    for timeout, elapsed, exc in expired:
        assert elapsed >= timeout - 0.05, (timeout, elapsed)
        assert elapsed < timeout + 1.0, (timeout, elapsed)
        assert isinstance(exc, TimeoutError)
        message = str(exc)
        assert "'tct.stall'" in message and "'b'" in message, message
        assert f"within {timeout:g} s" in message, message
    # Only the 0.1 s one had expired when the 0.2 s one did, and so on.
    assert expired[0][1] < expired[1][1] < expired[2][1]


async def test_a_later_shorter_request_expires_before_an_earlier_longer_one(
    make_client: Any,
) -> None:
    """Re-arming the shared timer for an earlier deadline, then back for the later one."""
    a = await make_client("a")
    b = await make_client("b")
    stalling = Stalling(b)
    try:
        slow = asyncio.ensure_future(a.request("b", Stall(1), timeout=0.6))
        await asyncio.wait_for(stalling.started.wait(), WAIT)
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            await a.request("b", Stall(2), timeout=0.1)
        assert not slow.done()
        with pytest.raises(RequestTimeout):
            await asyncio.wait_for(slow, WAIT)
        assert time.monotonic() - started >= 0.6 - 0.1 - 0.05
    finally:
        stalling.release.set()


async def test_acks_and_requests_share_the_timer(make_client: Any, service: Service) -> None:
    """A request and an acked send with different timeouts; the ack's never comes."""
    a = await make_client("a", request_timeout=0.2)
    b = await make_client("b")
    stalling = Stalling(b)
    service.endings["a"].link.pause_reading()  # no ACK (nor request) gets through now
    try:
        request = asyncio.ensure_future(a.request("b", Stall(1), timeout=0.5))
        acked = asyncio.ensure_future(a.send("b", Echo(1), ack=True))
        with pytest.raises(RequestTimeout) as ack_error:
            await asyncio.wait_for(acked, WAIT)
        assert not request.done()
        assert "acknowledgement" in str(ack_error.value)
        with pytest.raises(RequestTimeout) as request_error:
            await asyncio.wait_for(request, WAIT)
        assert "'tct.stall'" in str(request_error.value)
    finally:
        service.endings["a"].link.resume_reading()
        stalling.release.set()


# ------------------------------------------------ answered requests stay answered


async def test_answered_requests_never_time_out_later(make_client: Any) -> None:
    errors = catch_loop_errors()
    a = await make_client("a")
    b = await make_client("b")
    b.on(Echo)(lambda p, ctx: Echo(p.n * 2))
    unhandled: list[BaseException] = []
    a.on_unhandled = lambda exc, ctx: unhandled.append(exc)

    futures: list[asyncio.Future[Any]] = []
    for start in range(0, 2000, 100):  # batches of 100 in flight
        batch = [
            asyncio.ensure_future(a.request("b", Echo(n), timeout=0.5))
            for n in range(start, start + 100)
        ]
        await asyncio.wait_for(asyncio.gather(*batch), WAIT)
        futures += batch
    await asyncio.sleep(0.8)  # past every one of their deadlines

    assert len(futures) == 2000
    for n, future in enumerate(futures):
        assert future.done() and not future.cancelled()
        assert future.exception() is None
        assert future.result() == Echo(n * 2)
    assert errors == []
    assert unhandled == []
    assert a.connected

    # The timer still works for the next one.
    stalling = Stalling(b)
    try:
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            await a.request("b", Stall(0), timeout=0.2)
        assert time.monotonic() - started >= 0.2 - 0.05
    finally:
        stalling.release.set()


async def test_the_deadline_heap_follows_what_is_outstanding(make_client: Any) -> None:
    """5,000 answered requests one after another: the heap of deadlines is rebuilt from
    the outstanding requests instead of growing by one entry per request. Reads the
    private ``_pending._deadlines`` on purpose."""
    a = await make_client("a")
    b = await make_client("b")
    b.on(Echo)(lambda p, ctx: Echo(p.n))
    # c holds its requests back (a handler runs one packet at a time, so not on b).
    stalling = Stalling(await make_client("c"))
    try:
        # A few requests stay outstanding all along.
        held = [asyncio.ensure_future(a.request("c", Stall(n), timeout=60.0)) for n in range(10)]
        await asyncio.wait_for(stalling.started.wait(), WAIT)
        pending = a._pending
        largest = 0
        for n in range(5000):
            assert await a.request("b", Echo(n), timeout=60.0) == Echo(n)
            outstanding = len(pending)
            size = len(pending._deadlines)
            largest = max(largest, size)
            assert size < 2 * outstanding + 1100, (n, size, outstanding)
        assert len(pending) == 10
        assert largest > 1000  # it did grow before being rebuilt: the check above bites
        # The rebuilds kept the outstanding requests: they still complete when answered.
        assert not any(f.done() for f in held)
        stalling.release.set()
        results = await asyncio.wait_for(asyncio.gather(*held), WAIT)
        assert results == [Echo(n) for n in range(10)]
    finally:
        stalling.release.set()


async def test_outstanding_requests_still_time_out_after_the_heap_is_rebuilt(
    make_client: Any,
) -> None:
    a = await make_client("a")
    b = await make_client("b")
    b.on(Echo)(lambda p, ctx: Echo(p.n))
    # c holds its requests back (a handler runs one packet at a time, so not on b).
    stalling = Stalling(await make_client("c"))
    try:
        started = time.monotonic()
        held = asyncio.ensure_future(a.request("c", Stall(1), timeout=2.0))
        await asyncio.wait_for(stalling.started.wait(), WAIT)
        for n in range(1500):  # past the first rebuild (over 1024 answered entries)
            await a.request("b", Echo(n), timeout=60.0)
        with pytest.raises(RequestTimeout) as caught:
            await asyncio.wait_for(held, 2.0 + WAIT)
        assert time.monotonic() - started >= 2.0 - 0.05
        assert "'tct.stall'" in str(caught.value)
    finally:
        stalling.release.set()


# ------------------------------------------------- reconnect refused for good


@pytest.fixture
async def closing_services() -> AsyncIterator[list[Service]]:
    services: list[Service] = []
    yield services
    for service in services:
        await service.close()


async def test_a_pending_request_fails_when_the_reconnect_is_refused_for_good(
    tmp_path: Path, closing_services: list[Service]
) -> None:
    first = Service("127.0.0.1", 0, data_dir=tmp_path / "a", heartbeat=0.5, heartbeat_timeout=2.0)
    await first.start()
    closing_services.append(first)
    port = first.port
    options: dict[str, Any] = {"reconnect": True, "backoff_initial": 0.02, "backoff_max": 0.2}
    a = Client("a", first.url, **options)
    b = Client("b", first.url, **options)
    await a.connect()
    await b.connect()
    stalling = Stalling(b)
    try:
        started = time.monotonic()
        pending = asyncio.ensure_future(a.request("b", Stall(1), timeout=30.0))
        await asyncio.wait_for(stalling.started.wait(), WAIT)

        await first.close()
        await eventually(lambda: not a.connected)
        assert not pending.done()  # a lost connection alone does not fail it

        second = Service(
            "127.0.0.1",
            port,
            data_dir=tmp_path / "b",
            tokens=["t"],
            heartbeat=0.5,
            heartbeat_timeout=2.0,
        )
        await second.start()
        closing_services.append(second)

        with pytest.raises(ConnectionClosed) as caught:
            await asyncio.wait_for(pending, 10.0)
        assert time.monotonic() - started < 15.0  # not the 30 s timeout
        assert caught.value.code == CloseCode.AUTH_FAILED
        assert not a.connected
        assert second.stats["auth_failures"] >= 1
        assert second.stats["connections"] == 0

        # It stays down: no further attempts, calls fail at once.
        await asyncio.sleep(0.3)
        assert not a.connected
        assert a.reconnects == 0
        with pytest.raises(ConnectionClosed):
            await a.request("b", Echo(1), timeout=WAIT)
    finally:
        stalling.release.set()
        await a.close()
        await b.close()
