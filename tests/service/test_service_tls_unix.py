"""TLS (pss://) with a test CA from trustme, and Unix domain sockets (unix://)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import trustme
from conftest import ServiceFactory

from packetstack import (
    Client,
    ConfigError,
    ConnectionFailed,
    Context,
    HandshakeRefused,
    Packet,
    Service,
)

WAIT = 3.0


class Ping(Packet):
    packet_tag: ClassVar[str] = "tst.ping"
    n: int


class Pong(Packet):
    packet_tag: ClassVar[str] = "tst.pong"
    n: int
    by: str
    via: str


def answer_pings(client: Client, via: str) -> None:
    @client.on(Ping)
    async def ping(packet: Ping, ctx: Context) -> Pong:
        return Pong(packet.n, f"{client.name}<-{ctx.sender}", via)


@pytest.fixture
async def tls_service(make_service: ServiceFactory, server_context: ssl.SSLContext) -> Service:
    return await make_service(ssl_context=server_context)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for socket files (sun_path is limited to ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ps-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------- TLS


async def test_tls_with_an_ssl_context(tls_service: Service, cafile: str) -> None:
    assert tls_service.url == f"pss://127.0.0.1:{tls_service.port}"
    async with (
        Client("a", tls_service.url, cafile=cafile) as a,
        Client("b", tls_service.url, cafile=cafile) as b,
    ):
        answer_pings(b, "tls")
        assert a.connected and b.connected
        assert await a.request("b", Ping(1), timeout=WAIT) == Pong(1, "b<-a", "tls")
        answer_pings(a, "tls")
        assert await b.request("a", Ping(2), timeout=WAIT) == Pong(2, "a<-b", "tls")
    assert tls_service.stats["connections"] == 2


async def test_tls_client_with_its_own_ssl_context(tls_service: Service, ca: trustme.CA) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with (
        Client("a", tls_service.url, ssl_context=context) as a,
        Client("b", tls_service.url, ssl_context=context) as b,
    ):
        answer_pings(b, "tls")
        assert await a.request("b", Ping(3), timeout=WAIT) == Pong(3, "b<-a", "tls")


async def test_tls_with_certificate_and_key_files(
    tmp_path: Path, server_cert: trustme.LeafCert, cafile: str
) -> None:
    cert_path = tmp_path / "server.pem"
    key_path = tmp_path / "server.key"
    cert_path.write_bytes(b"".join(pem.bytes() for pem in server_cert.cert_chain_pems))
    server_cert.private_key_pem.write_to_path(str(key_path))

    async with (
        Service(
            "127.0.0.1",
            0,
            data_dir=tmp_path / "data",
            tls_cert=str(cert_path),
            tls_key=str(key_path),
        ) as service,
        Client("a", service.url, cafile=cafile) as a,
        Client("b", service.url, cafile=cafile) as b,
    ):
        assert service.url.startswith("pss://")
        answer_pings(b, "files")
        assert await a.request("b", Ping(4), timeout=WAIT) == Pong(4, "b<-a", "files")


def test_a_tls_key_without_a_certificate_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Service("127.0.0.1", 0, data_dir=tmp_path / "data", tls_key=str(tmp_path / "k.pem"))


def test_an_unreadable_certificate_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Service(
            "127.0.0.1",
            0,
            data_dir=tmp_path / "data",
            tls_cert=str(tmp_path / "missing.pem"),
            tls_key=str(tmp_path / "missing.key"),
        )


async def test_a_client_trusting_another_ca_cannot_connect(
    tls_service: Service, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    client = Client("a", tls_service.url, cafile=str(other), connect_timeout=1.0)

    started = time.monotonic()
    with pytest.raises(ConnectionFailed) as caught:
        await client.connect()

    assert time.monotonic() - started < 3.0
    assert not isinstance(caught.value, HandshakeRefused)
    assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
    assert not client.connected
    assert "a" not in tls_service.endings
    await client.close()


async def test_a_plain_client_cannot_talk_to_a_tls_service(tls_service: Service) -> None:
    plain_url = tls_service.url.replace("pss://", "ps://")
    client = Client("a", plain_url, connect_timeout=1.0)
    with pytest.raises(ConnectionFailed):
        await client.connect()
    assert "a" not in tls_service.endings
    await client.close()


async def test_the_service_closes_promptly_after_a_failed_tls_handshake(
    tmp_path: Path, server_context: ssl.SSLContext
) -> None:
    """A client that fails TLS verification must not leave the service waiting on it.

    Expected: service.close() returns at once. Observed before a fix: each failed TLS
    handshake leaves a Link in the service's set of links whose connection_made /
    connection_lost never run, so close() waits its full 2 s timeout for them.
    """
    service = Service("127.0.0.1", 0, data_dir=tmp_path / "data", ssl_context=server_context)
    await service.start()
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    try:
        client = Client("a", service.url, cafile=str(other), connect_timeout=0.3)
        with pytest.raises(ConnectionFailed):
            await client.connect()
        await client.close()
        await asyncio.sleep(0.1)
    finally:
        started = time.monotonic()
        await service.close()
        elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"service.close() took {elapsed:.2f} s"


# --------------------------------------------------------------- Unix sockets


async def test_unix_socket_clients_exchange_packets(tmp_path: Path, short_dir: Path) -> None:
    sock = short_dir / "ps.sock"
    async with Service("127.0.0.1", 0, data_dir=tmp_path / "data", unix_path=str(sock)) as service:
        assert sock.is_socket()
        async with (
            Client("a", f"unix://{sock}") as a,
            Client("b", f"unix://{sock}") as b,
            Client("c", service.url) as c,  # the TCP listener still works alongside
        ):
            answer_pings(b, "unix")
            answer_pings(c, "tcp")
            assert a.endpoint.scheme == "unix" and a.endpoint.path == str(sock)
            assert await a.request("b", Ping(5), timeout=WAIT) == Pong(5, "b<-a", "unix")
            # unix -> tcp and tcp -> unix across the same service
            assert await a.request("c", Ping(6), timeout=WAIT) == Pong(6, "c<-a", "tcp")
            assert await c.request("b", Ping(7), timeout=WAIT) == Pong(7, "b<-c", "unix")
            got: asyncio.Queue[str] = asyncio.Queue()
            b.on(Pong)(lambda p, ctx: got.put_nowait(f"{p.n} from {ctx.sender}"))
            await c.send("b", Pong(8, "c", "tcp"))
            assert await asyncio.wait_for(got.get(), WAIT) == "8 from c"
            assert sorted(service.endings) == ["a", "b", "c"]


async def test_a_unix_client_without_a_listener_fails(short_dir: Path) -> None:
    client = Client("a", f"unix://{short_dir / 'nothing.sock'}", connect_timeout=0.3)
    with pytest.raises(ConnectionFailed):
        await client.connect()
    await client.close()


def test_a_unix_url_needs_a_path() -> None:
    with pytest.raises(ConfigError):
        Client("a", "unix://")
