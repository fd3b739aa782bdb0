"""The service's handshake timeout counts from connection_made: for TLS, from the end of
the TLS handshake. Failed TLS handshakes are neither counted nor waited for."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from pathlib import Path

import pytest
import trustme
from conftest import ServiceFactory

from packetstack import Client, ConnectionFailed
from packetstack.errors import CloseCode
from packetstack.protocol import (
    CloseReceived,
    Connection,
    Event,
    Hello,
    Role,
    WelcomeReceived,
)

WAIT = 3.0


@pytest.fixture
def other_cafile(tmp_path: Path) -> str:
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


class RawPeer:
    """A hand-driven client: a stream pair and a sans-I/O CLIENT connection to parse."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = Connection(Role.CLIENT)

    @classmethod
    async def open(cls, port: int) -> RawPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def start_tls(self, context: ssl.SSLContext) -> None:
        await self.writer.start_tls(context, server_hostname="127.0.0.1")

    def hello(self, name: str) -> None:
        self.writer.write(self.parser.hello_frame(Hello(1, name)))

    async def next_event(self) -> Event:
        """The next frame's event (EOFError when the service closed without one)."""
        while True:
            head = await self.reader.readexactly(4)
            body = await self.reader.readexactly(int.from_bytes(head, "big"))
            events = self.parser.receive_data(head + body)
            if events:
                return events[0]

    async def at_eof(self) -> bool:
        return await self.reader.read(1) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


# ------------------------------------------------ counted from the TLS handshake


async def test_a_slow_tls_handshake_still_gets_its_full_handshake_timeout(
    make_service: ServiceFactory,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    """TLS done 0.6 s after accept(), HELLO 0.6 s after that: 1.2 s after accept() but
    within the 1 s handshake timeout counted from the completed TLS handshake."""
    service = await make_service(handshake_timeout=1.0, ssl_context=server_context)

    peer = await RawPeer.open(service.port)
    try:
        await asyncio.sleep(0.6)
        await peer.start_tls(client_context)
        await asyncio.sleep(0.6)
        peer.hello("late")
        event = await asyncio.wait_for(peer.next_event(), WAIT)
        assert isinstance(event, WelcomeReceived), event
        assert event.welcome.session == "late"
        assert "late" in service.endings
        assert service.stats["handshake_timeouts"] == 0
        assert service.stats["connections"] == 1
    finally:
        await peer.close()


async def test_a_silent_tls_connection_is_timed_out_from_its_tls_handshake(
    make_service: ServiceFactory,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    service = await make_service(handshake_timeout=1.0, ssl_context=server_context)

    peer = await RawPeer.open(service.port)
    try:
        await asyncio.sleep(0.6)
        await peer.start_tls(client_context)
        tls_done = time.monotonic()
        event = await asyncio.wait_for(peer.next_event(), WAIT)
        elapsed = time.monotonic() - tls_done
        assert isinstance(event, CloseReceived), event
        assert event.code == CloseCode.HANDSHAKE_TIMEOUT
        assert event.reason == "no HELLO within the handshake timeout"
        # Not 1 s after accept() (0.4 s after the TLS handshake): 1 s after the handshake.
        assert elapsed >= 1.0 - 0.1, elapsed
        assert service.stats["handshake_timeouts"] == 1
    finally:
        await peer.close()


# ------------------------------------------------------ TLS clients, good and bad


async def test_a_tls_client_that_connects_is_not_counted_as_a_handshake_timeout(
    make_service: ServiceFactory, server_context: ssl.SSLContext, cafile: str
) -> None:
    service = await make_service(handshake_timeout=0.3, ssl_context=server_context)

    async with Client("tls", service.url, cafile=cafile, reconnect=False) as client:
        await asyncio.sleep(0.6)  # twice the handshake timeout
        assert client.connected
        assert "tls" in service.endings
    assert service.stats["handshake_timeouts"] == 0
    assert service.stats["connections"] == 1


@pytest.mark.parametrize("wait", [0.0, 0.6], ids=["close at once", "close after the timeout"])
async def test_a_failed_tls_handshake_is_not_counted_and_close_is_prompt(
    make_service: ServiceFactory,
    server_context: ssl.SSLContext,
    other_cafile: str,
    cafile: str,
    wait: float,
) -> None:
    service = await make_service(handshake_timeout=0.3, ssl_context=server_context)
    try:
        client = Client("bad", service.url, cafile=other_cafile, connect_timeout=1.0)
        with pytest.raises(ConnectionFailed) as caught:
            await client.connect()
        assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
        await client.close()
        await asyncio.sleep(wait)
        assert service.stats["handshake_timeouts"] == 0
        assert "bad" not in service.endings
        # The service still takes good clients.
        async with Client("good", service.url, cafile=cafile, reconnect=False) as good:
            assert good.connected
    finally:
        started = time.monotonic()
        await service.close()
        elapsed = time.monotonic() - started
    assert elapsed < 1.5, f"service.close() took {elapsed:.2f} s"
    assert service.stats["handshake_timeouts"] == 0


# ------------------------------------------------------------------ plain TCP


async def test_a_plain_connection_that_sends_nothing_gets_handshake_timeout(
    make_service: ServiceFactory,
) -> None:
    service = await make_service(handshake_timeout=0.3)

    started = time.monotonic()
    peer = await RawPeer.open(service.port)
    try:
        event = await asyncio.wait_for(peer.next_event(), WAIT)
        elapsed = time.monotonic() - started
        assert isinstance(event, CloseReceived), event
        assert event.code == CloseCode.HANDSHAKE_TIMEOUT
        assert elapsed >= 0.3 - 0.05, elapsed
        assert await asyncio.wait_for(peer.at_eof(), WAIT)
        assert service.stats["handshake_timeouts"] == 1
        assert service.stats["connections"] == 0
    finally:
        await peer.close()


async def test_a_plain_hello_within_the_timeout_is_welcomed(make_service: ServiceFactory) -> None:
    service = await make_service(handshake_timeout=0.5)

    peer = await RawPeer.open(service.port)
    try:
        await asyncio.sleep(0.3)
        peer.hello("prompt")
        event = await asyncio.wait_for(peer.next_event(), WAIT)
        assert isinstance(event, WelcomeReceived), event
        await asyncio.sleep(0.5)  # past the handshake timeout: still there
        assert "prompt" in service.endings
        assert service.stats["handshake_timeouts"] == 0
    finally:
        await peer.close()
