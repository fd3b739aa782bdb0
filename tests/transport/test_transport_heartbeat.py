"""Heartbeats and handshake timeouts: peers that go silent, never say HELLO, or whose
process is frozen are dropped in bounded time; live but idle peers are kept."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import ServiceFactory
from support import (
    ServiceProcess,
    clean_env,
    close_raw,
    free_port,
    open_raw,
    spawn_script,
    wait_until,
)

from packetstack import Client, Packet, Service
from packetstack.errors import CloseCode
from packetstack.protocol import (
    CloseReceived,
    Hello,
    PingReceived,
)

pytestmark = pytest.mark.timeout(60)

HEARTBEAT = 0.2
HEARTBEAT_TIMEOUT = 0.6
HANDSHAKE_TIMEOUT = 0.5


class HbWork(Packet):
    packet_tag: ClassVar[str] = "tests.transport.heartbeat.Work"
    n: int


class HbDone(Packet):
    packet_tag: ClassVar[str] = "tests.transport.heartbeat.Done"
    n: int
    pid: int


WORKER = textwrap.dedent(
    """
    import asyncio, os, sys
    from typing import ClassVar
    from packetstack import Client, Context, Packet

    class HbWork(Packet):
        packet_tag: ClassVar[str] = "tests.transport.heartbeat.Work"
        n: int

    class HbDone(Packet):
        packet_tag: ClassVar[str] = "tests.transport.heartbeat.Done"
        n: int
        pid: int

    async def main(url: str, name: str) -> None:
        client = Client(name, url, backoff_max=0.2)

        @client.on(HbWork)
        async def work(packet: HbWork, ctx: Context) -> HbDone:
            return HbDone(packet.n * 2, os.getpid())

        await client.connect()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


# ----------------------------------------------------------------- helpers


@pytest.fixture
async def hb_service(make_service: ServiceFactory) -> Service:
    return await make_service(
        heartbeat=HEARTBEAT,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        handshake_timeout=HANDSHAKE_TIMEOUT,
    )


# -------------------------------------------------- silent after handshake


async def test_silent_raw_ending_is_dropped_with_heartbeat_timeout(hb_service: Service) -> None:
    service = hb_service
    peer = await open_raw(service.port)
    try:
        peer.send(peer.parser.hello_frame(Hello(1, "silent")))
        await peer.welcomed()
        assert "silent" in service.endings
        loop = asyncio.get_running_loop()
        start = loop.time()
        exc = await asyncio.wait_for(asyncio.shield(peer.lost), 3.0)
        elapsed = loop.time() - start
        assert exc is None or isinstance(exc, ConnectionResetError)
        # Silent since its HELLO: dropped no earlier than heartbeat_timeout after that,
        # and well within ~1-2 s.
        assert HEARTBEAT_TIMEOUT - 0.05 <= elapsed <= 2.0, elapsed
        assert "silent" not in service.endings
        assert peer.parse_error is None
        # It was pinged first, and the last thing it read was CLOSE(HEARTBEAT_TIMEOUT).
        assert any(type(e) is PingReceived for e in peer.events)
        assert type(peer.events[-1]) is CloseReceived
        assert [c.code for c in peer.closes()] == [CloseCode.HEARTBEAT_TIMEOUT]
    finally:
        close_raw(peer)


async def test_raw_ending_that_only_pings_is_kept(hb_service: Service) -> None:
    service = hb_service
    peer = await open_raw(service.port)
    try:
        peer.send(peer.parser.hello_frame(Hello(1, "pinger")))
        await peer.welcomed()
        for _ in range(20):  # 2 s, more than three heartbeat timeouts
            peer.send(peer.parser.ping_frame())
            await asyncio.sleep(0.1)
        assert not peer.lost.done()
        assert "pinger" in service.endings
        assert peer.closes() == []
    finally:
        close_raw(peer)


async def test_raw_ending_silent_for_less_than_the_timeout_is_kept(hb_service: Service) -> None:
    """Something arrives every 0.5 s, never 0.6 s (heartbeat_timeout) of silence: kept,
    whatever the phase of the service's heartbeat timer (0.2 s)."""
    service = hb_service
    peer = await open_raw(service.port)
    try:
        peer.send(peer.parser.hello_frame(Hello(1, "sparse")))
        await peer.welcomed()
        for _ in range(8):
            await asyncio.sleep(0.5)
            assert not peer.lost.done(), (
                f"dropped after less than {HEARTBEAT_TIMEOUT} s of silence: {peer.closes()}"
            )
            peer.send(peer.parser.ping_frame())
        assert "sparse" in service.endings
    finally:
        close_raw(peer)


async def test_idle_client_is_kept_alive_by_its_own_heartbeat(hb_service: Service) -> None:
    service = hb_service
    client = Client("idle", service.url, reconnect=False)
    await client.connect()
    try:
        session = service.endings["idle"]
        await asyncio.sleep(5 * HEARTBEAT_TIMEOUT)
        assert client.connected
        assert service.endings.get("idle") is session
        assert client.reconnects == 0
    finally:
        await client.close()


# --------------------------------------------------------- never says HELLO


async def test_connection_without_hello_is_closed_after_handshake_timeout(
    hb_service: Service,
) -> None:
    service = hb_service
    loop = asyncio.get_running_loop()
    start = loop.time()
    mute = await open_raw(service.port)
    # A second one that starts a HELLO and never finishes it.
    partial = await open_raw(service.port)
    hello = partial.parser.hello_frame(Hello(1, "partial"))
    partial.send(hello[: len(hello) // 2])
    try:
        await asyncio.wait_for(asyncio.shield(mute.lost), 3.0)
        await asyncio.wait_for(asyncio.shield(partial.lost), 3.0)
        elapsed = loop.time() - start
        assert HANDSHAKE_TIMEOUT - 0.05 <= elapsed <= 2.5, elapsed
        for peer in (mute, partial):
            assert [c.code for c in peer.closes()] == [CloseCode.HANDSHAKE_TIMEOUT]
        assert service.stats["handshake_timeouts"] == 2
        assert "partial" not in service.endings
    finally:
        close_raw(mute)
        close_raw(partial)


async def test_handshake_timeout_spares_completed_handshakes(hb_service: Service) -> None:
    service = hb_service
    client = Client("prompt", service.url, reconnect=False)
    await client.connect()
    try:
        await asyncio.sleep(HANDSHAKE_TIMEOUT * 3)
        assert client.connected
        assert "prompt" in service.endings
        assert service.stats["handshake_timeouts"] == 0
    finally:
        await client.close()


# ------------------------------------------------------- frozen processes


def spawn_worker(
    tmp_path: Path, url: str, name: str, processes: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    return spawn_script(tmp_path, WORKER, [url, name], processes)


async def test_frozen_client_process_is_declared_gone_then_rejoins_and_gets_its_mailbox(
    hb_service: Service, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    service = hb_service
    boss = Client("boss", service.url, reconnect=False)
    await boss.connect()
    try:
        worker = spawn_worker(tmp_path, service.url, "worker", processes)
        await wait_until(lambda: "worker" in service.endings, 20, "the worker to connect")
        assert await boss.request("worker", HbWork(2), timeout=5) == HbDone(4, worker.pid)

        os.kill(worker.pid, signal.SIGSTOP)
        took = await wait_until(
            lambda: "worker" not in service.endings, 3.0, "the frozen worker to be dropped"
        )
        assert took <= HEARTBEAT_TIMEOUT + 1.0, took
        # Declared gone, it still has a mailbox: a request waits there meanwhile.
        before = service.mailbox_depth("worker")
        waiting = asyncio.ensure_future(boss.request("worker", HbWork(3), timeout=10))
        await wait_until(
            lambda: service.mailbox_depth("worker") == before + 1, 5, "the request to be stored"
        )
        assert not waiting.done()

        # Thawed, it reads the CLOSE, reconnects by itself, answers the request that waited
        # for it and answers again.
        os.kill(worker.pid, signal.SIGCONT)
        await wait_until(lambda: "worker" in service.endings, 10, "the thawed worker")
        assert await asyncio.wait_for(waiting, 10) == HbDone(6, worker.pid)
        assert await boss.request("worker", HbWork(5), timeout=5) == HbDone(10, worker.pid)
    finally:
        await boss.close()


# --------------------------------------------- client side: frozen service


async def test_client_detects_frozen_service_and_reconnects_after_it_resumes(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    env = clean_env(
        PACKETSTACK_HEARTBEAT=str(HEARTBEAT), PACKETSTACK_HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT)
    )
    server = ServiceProcess(free_port(), tmp_path, env)
    processes.append(server.start())
    await server.wait_listening()
    client = Client("watcher", f"ps://127.0.0.1:{server.port}", backoff_max=0.3)
    try:
        await client.connect()
        assert client.welcome is not None
        assert client.welcome.heartbeat == HEARTBEAT
        assert client.welcome.timeout == HEARTBEAT_TIMEOUT

        os.kill(server.proc.pid, signal.SIGSTOP)
        took = await wait_until(
            lambda: not client.connected, 3.0, "the client to notice the frozen service"
        )
        assert took <= HEARTBEAT_TIMEOUT + 1.0, took

        os.kill(server.proc.pid, signal.SIGCONT)
        await client.wait_connected(timeout=10)
        assert client.connected
        assert client.reconnects >= 1
    finally:
        await client.close()
