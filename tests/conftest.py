"""Shared fixtures: a running service on a free port, clients that close themselves,
and a guard for tests that need one of the machine's real servers."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

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


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    """A service on 127.0.0.1 and a free port, with short heartbeats."""
    async with Service(
        "127.0.0.1", 0, data_dir=tmp_path / "data", heartbeat=0.5, heartbeat_timeout=2.0
    ) as running:
        yield running


ClientFactory = Callable[..., Any]


@pytest.fixture
async def make_client(service: Service) -> AsyncIterator[ClientFactory]:
    """``await make_client("name", **options)``: a connected client, closed after the test."""
    clients: list[Client] = []

    async def make(name: str, url: str | None = None, **options: Any) -> Client:
        client = Client(name, url or service.url, **options)
        await client.connect()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()
