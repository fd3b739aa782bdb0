"""The service process dies (kill -9) under connected clients and comes back on the same
port: clients notice, refuse sends meanwhile, reconnect by themselves, rejoin their groups
and exchange packets again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from packetstack import Client, ConnectionClosed, Context, Packet

pytestmark = pytest.mark.timeout(90)


class SkMsg(Packet):
    packet_tag: ClassVar[str] = "tests.transport.service_kill.Msg"
    n: int
    phase: str


class SkAsk(Packet):
    packet_tag: ClassVar[str] = "tests.transport.service_kill.Ask"
    n: int


class SkSlowAsk(Packet):
    packet_tag: ClassVar[str] = "tests.transport.service_kill.SlowAsk"
    n: int


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_command(*args: str) -> list[str]:
    exe = shutil.which("packetstack")
    if exe is not None:
        return [exe, *args]
    return [sys.executable, "-m", "packetstack.cli", *args]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PACKETSTACK_")}


class ServiceProcess:
    """``packetstack serve`` in a child process, its log in a file."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "service-0.log"

    @property
    def url(self) -> str:
        return f"ps://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        self.log_path = self.workdir / f"service-{self.starts}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cli_command("serve", "--port", str(self.port), "--data-dir", str(self.data_dir)),
                stdout=log,
                stderr=log,
                cwd=self.workdir,
                env=clean_env(),
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_listening(self, timeout: float = 20.0) -> None:
        marker = f"listening on ps://127.0.0.1:{self.port}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        assert self.proc is not None
        while marker not in self.log():
            if self.proc.poll() is not None:
                pytest.fail(f"service exited with {self.proc.returncode}:\n{self.log()}")
            if loop.time() > deadline:
                pytest.fail(f"service did not log {marker!r} within {timeout} s:\n{self.log()}")
            await asyncio.sleep(0.05)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def service_process(tmp_path: Path) -> Iterator[ServiceProcess]:
    process = ServiceProcess(free_port(), tmp_path)
    try:
        yield process
    finally:
        process.stop()


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


async def exchange(a: Client, b: Client, inbox: dict[str, list[SkMsg]], phase: str) -> None:
    """a and b each send 100 direct packets to the other; each receives exactly those."""
    before_a, before_b = len(inbox["alice"]), len(inbox["bob"])
    for n in range(100):
        await a.send("bob", SkMsg(n, phase))
        await b.send("alice", SkMsg(n, phase))
    await wait_until(
        lambda: len(inbox["alice"]) >= before_a + 100 and len(inbox["bob"]) >= before_b + 100,
        10,
        f"the {phase} exchange",
    )
    await asyncio.sleep(0.1)  # nothing extra arrives
    assert inbox["bob"][before_b:] == [SkMsg(n, phase) for n in range(100)]
    assert inbox["alice"][before_a:] == [SkMsg(n, phase) for n in range(100)]


async def test_clients_reconnect_after_service_kill9_and_restart(
    service_process: ServiceProcess,
) -> None:
    service_process.start()
    await service_process.wait_listening()
    url = service_process.url
    alice = Client("alice", url, backoff_max=0.5, connect_timeout=10)
    bob = Client("bob", url, backoff_max=0.5, connect_timeout=10)
    inbox: dict[str, list[SkMsg]] = {"alice": [], "bob": []}
    room: list[SkMsg] = []

    @alice.on(SkMsg)
    async def alice_got(packet: SkMsg, ctx: Context) -> None:
        assert ctx.sender == "bob"
        inbox["alice"].append(packet)

    @bob.on(SkMsg)
    async def bob_got(packet: SkMsg, ctx: Context) -> None:
        assert ctx.sender == "alice"
        (room if ctx.group == "room" else inbox["bob"]).append(packet)

    @bob.on(SkAsk)
    async def bob_answers(packet: SkAsk, ctx: Context) -> SkAsk:
        return SkAsk(packet.n + 1)

    try:
        await alice.connect()
        await bob.connect()
        await bob.join("room")
        await exchange(alice, bob, inbox, "before")
        await alice.publish("room", SkMsg(1, "room-before"))
        assert await alice.request("bob", SkAsk(1), timeout=5) == SkAsk(2)
        await wait_until(lambda: len(room) == 1, 5, "the group packet")
        assert room == [SkMsg(1, "room-before")]

        service_process.kill9()

        await wait_until(
            lambda: not alice.connected and not bob.connected, 5, "clients to notice the kill"
        )
        with pytest.raises(ConnectionClosed):
            await alice.send("bob", SkMsg(0, "down"))
        with pytest.raises(ConnectionClosed):
            await bob.publish("room", SkMsg(0, "down"))
        with pytest.raises(ConnectionClosed):
            await alice.request("bob", SkAsk(5), timeout=2)
        with pytest.raises(ConnectionClosed):
            await bob.join("other")
        # Still down: they keep trying but cannot connect.
        await asyncio.sleep(0.7)
        assert not alice.connected and not bob.connected
        assert alice.reconnects == 0 and bob.reconnects == 0

        service_process.start()
        await service_process.wait_listening()
        await alice.wait_connected(timeout=15)
        await bob.wait_connected(timeout=15)
        assert alice.connected and bob.connected
        assert alice.reconnects == 1 and bob.reconnects == 1

        # Nothing sent while down arrives later.
        await exchange(alice, bob, inbox, "after")
        assert all(p.phase != "down" for p in inbox["alice"] + inbox["bob"] + room)
        assert await alice.request("bob", SkAsk(10), timeout=5) == SkAsk(11)

        # bob's JOIN was re-sent on reconnect, ahead of everything bob sent after it, and
        # alice has since received bob's packets: the new service knows the group.
        await alice.publish("room", SkMsg(2, "room-after"), ack=True)
        await wait_until(lambda: len(room) == 2, 5, "the group packet after the restart")
        await asyncio.sleep(0.1)
        assert room == [SkMsg(1, "room-before"), SkMsg(2, "room-after")]
    finally:
        await alice.close()
        await bob.close()


async def test_handler_running_across_service_kill_keeps_handling_after_reconnect(
    service_process: ServiceProcess,
) -> None:
    """bob is inside a request handler when the service dies; the reply cannot be sent.
    After the restart bob must still handle packets (its dispatcher must survive)."""
    service_process.start()
    await service_process.wait_listening()
    url = service_process.url
    alice = Client("alice", url, backoff_max=0.5)
    bob = Client("bob", url, backoff_max=0.5)
    started = asyncio.Event()
    release = asyncio.Event()
    handled: list[int] = []

    @bob.on(SkSlowAsk)
    async def slow(packet: SkSlowAsk, ctx: Context) -> SkSlowAsk:
        started.set()
        await release.wait()
        return SkSlowAsk(packet.n)

    @bob.on(SkAsk)
    async def quick(packet: SkAsk, ctx: Context) -> SkAsk:
        handled.append(packet.n)
        return SkAsk(packet.n * 10)

    try:
        await alice.connect()
        await bob.connect()
        pending = asyncio.create_task(alice.request("bob", SkSlowAsk(1), timeout=3))
        await asyncio.wait_for(started.wait(), 5)
        service_process.kill9()
        await wait_until(lambda: not bob.connected, 5, "bob to notice the kill")
        release.set()  # the handler returns while bob is disconnected
        await asyncio.sleep(0.2)
        with pytest.raises((ConnectionClosed, TimeoutError)):
            await asyncio.wait_for(pending, 10)

        service_process.start()
        await service_process.wait_listening()
        await alice.wait_connected(timeout=15)
        await bob.wait_connected(timeout=15)
        reply = await alice.request("bob", SkAsk(7), timeout=5)
        assert reply == SkAsk(70)
        assert handled == [7]
        await bob.close()  # closing must not raise either
    finally:
        with contextlib.suppress(Exception):
            await alice.close()
        with contextlib.suppress(Exception):
            await bob.close()
