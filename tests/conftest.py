"""Shared fixtures: a running service on a free port, clients that close themselves,
child processes that are cleaned up, a test CA with a server certificate, a guard for
tests that need one of the machine's real servers, and the SQL databases and bridged
services of the bridge tests. Plain helpers are in support.py."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from support import BridgedServices, DatabaseProxy, ServiceProcess, SqlDatabase, sql_database

from packetstack import Client, Service

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_server(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (under CI=true) when a real server is not listening."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        message = f"{name} is not reachable on {host}:{port} ({exc}); start it to run this test"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


ServiceFactory = Callable[..., Awaitable[Service]]


@pytest.fixture
async def make_service(tmp_path: Path) -> AsyncIterator[ServiceFactory]:
    """``await make_service(**options)``: a started service on 127.0.0.1 and a free port,
    its data in tmp_path/"data", with short heartbeats (0.5 s, timeout 2 s) unless
    ``options`` say otherwise; closed after the test (a test may close it itself first)."""
    services: list[Service] = []

    async def make(**options: Any) -> Service:
        options = {
            "data_dir": tmp_path / "data",
            "heartbeat": 0.5,
            "heartbeat_timeout": 2.0,
            **options,
        }
        running = Service("127.0.0.1", 0, **options)
        await running.start()
        services.append(running)
        return running

    yield make
    for running in services:
        await running.close()


@pytest.fixture
async def service(make_service: ServiceFactory) -> Service:
    """A service on 127.0.0.1 and a free port, with short heartbeats."""
    return await make_service()


ClientFactory = Callable[..., Any]


@pytest.fixture
async def make_client(service: Service) -> AsyncIterator[ClientFactory]:
    """``await make_client("name", **options)``: a connected client, closed after the test.
    With ``connect=False`` it is not connected yet: register handlers first (packets waiting
    in its mailbox are delivered as soon as it connects), then ``await client.connect()``."""
    clients: list[Client] = []

    async def make(
        name: str, url: str | None = None, *, connect: bool = True, **options: Any
    ) -> Client:
        client = Client(name, url or service.url, **options)
        clients.append(client)
        if connect:
            await client.connect()
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Child processes to clean up: resumed if stopped, then killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A test CA (one per test module)."""
    return trustme.CA()


@pytest.fixture(scope="module")
def server_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("127.0.0.1")


@pytest.fixture
def cafile(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def server_context(server_cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(context)
    return context


@pytest.fixture
def services() -> Iterator[list[ServiceProcess]]:
    """``packetstack serve`` children (support.serve_config adds them), stopped after the
    test."""
    started: list[ServiceProcess] = []
    yield started
    for service in started:
        service.stop()


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    """Clients the test makes itself, closed after it."""
    made: list[Client] = []
    yield made
    for client in made:
        await client.close()


# ------------------------------------------------------------ database bridges


@pytest.fixture(params=["postgresql", "mariadb", "sqlite"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlDatabase]:
    """The SQL database of a bridge test, each in turn (parametrize ``db`` indirectly for
    fewer); the tables it named are dropped at the end. Storage tests have their own."""
    database = sql_database(request.param, tmp_path)
    try:
        yield database
    finally:
        await database.drop()


@pytest.fixture
async def bridged(db: SqlDatabase, tmp_path: Path) -> AsyncIterator[BridgedServices]:
    """In-process services bridged to ``db``; those still running are closed after the
    test, before its tables are dropped."""
    started = BridgedServices(db, tmp_path)
    yield started
    for service in list(started.running):
        await started.close(service)


@pytest.fixture
async def proxy(db: SqlDatabase) -> AsyncIterator[DatabaseProxy]:
    """A TCP proxy in front of ``db``'s server (not for SQLite), to cut and restore it."""
    assert db.port is not None
    started = DatabaseProxy(db.port)
    await started.start()
    yield started
    await started.close()
