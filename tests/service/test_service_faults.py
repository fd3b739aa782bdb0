"""Faults at the service: ending processes killed or frozen, and hostile bytes on the wire,
while legitimate endings keep exchanging packets without loss."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import struct
import subprocess
import textwrap
from pathlib import Path
from typing import ClassVar

import msgspec
import pytest
from conftest import ServiceFactory
from support import RawPeer, close_raw, open_raw, spawn_script, wait_until

from packetstack import Client, Context, Packet, RequestTimeout, Service
from packetstack.errors import CloseCode
from packetstack.protocol import (
    CloseReceived,
    Connection,
    FrameKind,
    Hello,
    PacketHeader,
    PacketReceived,
    Role,
    Target,
)
from packetstack.protocol.connection import frame

pytestmark = pytest.mark.timeout(90)


class SfWork(Packet):
    packet_tag: ClassVar[str] = "tests.service.faults.Work"
    n: int


class SfDone(Packet):
    packet_tag: ClassVar[str] = "tests.service.faults.Done"
    n: int
    pid: int


class SfMsg(Packet):
    packet_tag: ClassVar[str] = "tests.service.faults.Msg"
    n: int
    note: str = ""


WORKER = textwrap.dedent(
    """
    import asyncio, os, sys
    from typing import ClassVar
    from packetstack import Client, Context, Packet

    class SfWork(Packet):
        packet_tag: ClassVar[str] = "tests.service.faults.Work"
        n: int

    class SfDone(Packet):
        packet_tag: ClassVar[str] = "tests.service.faults.Done"
        n: int
        pid: int

    async def main(url: str, name: str) -> None:
        client = Client(name, url, backoff_max=0.2)

        @client.on(SfWork)
        async def work(packet: SfWork, ctx: Context) -> SfDone:
            print("work", packet.n, flush=True)
            return SfDone(packet.n * 2, os.getpid())

        await client.connect()
        await client.join("workers")
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


# ----------------------------------------------------------------- helpers


@pytest.fixture
async def fault_service(make_service: ServiceFactory) -> Service:
    return await make_service(handshake_timeout=1.0)


def spawn_worker(
    tmp_path: Path, url: str, processes: list[subprocess.Popen[bytes]], name: str = "worker"
) -> subprocess.Popen[bytes]:
    return spawn_script(tmp_path, WORKER, [url, name], processes)


def worker_log(tmp_path: Path, index: int) -> str:
    """What the ``index``-th worker process spawned by this test printed."""
    return (tmp_path / f"worker-{index}.log").read_text(errors="replace")


async def wait_worker(service: Service, boss: Client, proc: subprocess.Popen[bytes]) -> None:
    """Until the worker process ``proc`` answers as "worker" and is in its group."""
    await wait_until(
        lambda: "worker" in service.endings and "workers" in service.groups,
        20,
        f"worker process {proc.pid} to connect",
    )
    while True:
        reply = await boss.request("worker", SfWork(1), timeout=5)
        if reply.pid == proc.pid and service.group_members("workers") == ["worker"]:
            return
        await asyncio.sleep(0.05)


# ------------------------------------------------------ killed endings


async def test_killed_worker_is_dropped_and_its_restart_gets_what_waited_in_its_mailbox(
    fault_service: Service, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    service = fault_service
    boss = Client("boss", service.url, reconnect=False)
    await boss.connect()
    try:
        first = spawn_worker(tmp_path, service.url, processes)
        await asyncio.wait_for(wait_worker(service, boss, first), 25)
        assert await boss.request("worker", SfWork(21), timeout=5) == SfDone(42, first.pid)

        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        # The kernel closes the socket: the session goes at once, well within the
        # heartbeat timeout (2 s).
        took = await wait_until(
            lambda: "worker" not in service.endings, 2.0, "the killed worker's session to go"
        )
        assert took < 1.0, took
        # Group membership belongs to the name: it outlives the process.
        assert service.group_members("workers") == ["worker"]
        # A request to the dead worker times out, and expires from its mailbox with it.
        with pytest.raises(RequestTimeout):
            await boss.request("worker", SfWork(2), timeout=0.3)
        await wait_until(lambda: service.stats["mailbox_expired"] == 1, 5, "the request to expire")
        # An acknowledged send returns once stored in the mailbox.
        await asyncio.wait_for(boss.send("worker", SfWork(3), ack=True), 5)
        assert service.mailbox_depth("worker") >= 1
        assert service.stats["unknown_destination"] == 0

        second = spawn_worker(tmp_path, service.url, processes)
        await asyncio.wait_for(wait_worker(service, boss, second), 25)
        assert await boss.request("worker", SfWork(5), timeout=5) == SfDone(10, second.pid)
        assert service.stats["replaced"] == 0
        await wait_until(
            lambda: service.mailbox_depth("worker") == 0, 5, "the mailbox to be handled"
        )
        # The restarted process handled the stored send first, never the expired request.
        handled = [
            line for line in worker_log(tmp_path, 1).splitlines() if line.startswith("work ")
        ]
        assert handled[0] == "work 3"
        assert "work 2" not in handled
    finally:
        await boss.close()


async def test_restarted_worker_replaces_a_frozen_one_at_once(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], make_service: ServiceFactory
) -> None:
    """A new process under the name of a frozen (not yet timed out) one takes over at once;
    the old one, thawed, is told REPLACED and does not steal the name back."""
    service = await make_service(heartbeat=1.0, heartbeat_timeout=60.0)
    await _replace_frozen(service, tmp_path, processes)


async def _replace_frozen(
    service: Service, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    boss = Client("boss", service.url, reconnect=False)
    await boss.connect()
    try:
        old = spawn_worker(tmp_path, service.url, processes)
        await asyncio.wait_for(wait_worker(service, boss, old), 25)
        old_session = service.endings["worker"]
        os.kill(old.pid, signal.SIGSTOP)

        new = spawn_worker(tmp_path, service.url, processes)
        await wait_until(
            lambda: service.endings.get("worker") not in (None, old_session),
            20,
            "the new worker to take over the name",
        )
        await asyncio.wait_for(wait_worker(service, boss, new), 25)
        assert service.stats["replaced"] == 1
        assert service.group_members("workers") == ["worker"]
        session = service.endings["worker"]

        os.kill(old.pid, signal.SIGCONT)
        await asyncio.sleep(1.5)
        assert service.endings.get("worker") is session
        assert service.stats["replaced"] == 1
        assert await boss.request("worker", SfWork(4), timeout=5) == SfDone(8, new.pid)
    finally:
        await boss.close()


# -------------------------------------------------------- hostile input


def header_bytes(header: object) -> bytes:
    return msgspec.msgpack.encode(header)


def spoofed_packet(src: str, dst: str) -> bytes:
    header = PacketHeader(1, int(Target.ENDING), dst, src, SfMsg.packet_tag)
    return Connection(Role.CLIENT).send_packet(header, msgspec.msgpack.encode(SfMsg(-1, "spoof")))


ANY_REFUSAL = {CloseCode.PROTOCOL_ERROR, CloseCode.FRAME_TOO_LARGE, CloseCode.HANDSHAKE_TIMEOUT}

# (name, handshake first as this ending (or None), bytes to send, allowed close codes)
HOSTILE: list[tuple[str, str | None, bytes, set[int]]] = [
    ("huge length prefix", None, b"\xff\xff\xff\xff\x03\x00\x00", {CloseCode.FRAME_TOO_LARGE}),
    (
        "huge length prefix after handshake",
        "hostile-huge",
        b"\xff\xff\xff\xff" + b"\x00" * 64,
        {CloseCode.FRAME_TOO_LARGE},
    ),
    ("frame shorter than its prefix", None, b"\x00\x00\x00\x01\x07\x00\x00", {1002}),
    ("PACKET before HELLO", None, spoofed_packet("alice", "bob"), {CloseCode.PROTOCOL_ERROR}),
    (
        "JOIN before HELLO",
        None,
        Connection(Role.CLIENT).group_frame(1, "room", True),
        {CloseCode.PROTOCOL_ERROR},
    ),
    ("unknown frame kind", None, frame(200, b"\x90"), {CloseCode.PROTOCOL_ERROR}),
    ("garbage HELLO header", None, frame(FrameKind.HELLO, b"\xc1\xc1\xc1"), {1002}),
    (
        "header length past the frame",
        None,
        struct.pack(">IBH", 3 + 2, FrameKind.HELLO, 500) + b"\x90\x90",
        {CloseCode.PROTOCOL_ERROR},
    ),
    ("second HELLO", "hostile-twice", frame(FrameKind.HELLO, header_bytes(Hello(1, "x"))), {1002}),
    (
        "PACKET with a forged src",
        "mallory",
        spoofed_packet("alice", "bob"),
        {CloseCode.PROTOCOL_ERROR},
    ),
    ("reserved name", None, frame(FrameKind.HELLO, header_bytes(Hello(1, "service"))), {1008}),
] + [
    (f"random bytes #{seed}", None, random.Random(seed).randbytes(4096), ANY_REFUSAL)
    for seed in range(6)
]


async def run_hostile(
    port: int, name: str, ending: str | None, data: bytes, allowed: set[int]
) -> RawPeer:
    peer = await open_raw(port)
    try:
        if ending is not None:
            await peer.handshake(ending)
        peer.send(data)
        try:
            await asyncio.wait_for(asyncio.shield(peer.lost), 5)
        except TimeoutError:
            pytest.fail(f"{name}: the service kept the connection open")
        codes = peer.close_codes()
        assert len(codes) == 1 and codes[0] in allowed, f"{name}: CLOSE codes {codes}"
        assert type(peer.events[-1]) is CloseReceived, f"{name}: {peer.events[-3:]}"
        assert peer.parse_error is None, f"{name}: {peer.parse_error}"
        return peer
    finally:
        close_raw(peer)


async def test_hostile_connections_are_closed_while_legitimate_traffic_is_not_lost(
    fault_service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    service = fault_service
    alice = Client("alice", service.url, reconnect=False)
    bob = Client("bob", service.url, reconnect=False)
    got: dict[str, list[SfMsg]] = {"alice": [], "bob": []}
    senders: dict[str, set[str]] = {"alice": set(), "bob": set()}

    def recorder(name: str):  # type: ignore[no-untyped-def]
        async def on_msg(packet: SfMsg, ctx: Context) -> None:
            got[name].append(packet)
            senders[name].add(ctx.sender)

        return on_msg

    alice.on(SfMsg)(recorder("alice"))
    bob.on(SfMsg)(recorder("bob"))
    per_side = 3000
    try:
        await alice.connect()
        await bob.connect()

        async def talk(me: Client, to: str) -> None:
            for n in range(per_side):
                await me.send(to, SfMsg(n))
                if n % 25 == 0:
                    await asyncio.sleep(0.001)  # interleave with the hostile peers

        traffic = asyncio.gather(talk(alice, "bob"), talk(bob, "alice"))
        results = await asyncio.gather(
            *(run_hostile(service.port, *case) for case in HOSTILE), return_exceptions=True
        )
        await asyncio.wait_for(traffic, 30)
        failures = [
            f"{case[0]}: {result!r}"
            for case, result in zip(HOSTILE, results, strict=True)
            if isinstance(result, BaseException)
        ]
        assert not failures, "\n".join(failures)

        await wait_until(
            lambda: len(got["alice"]) >= per_side and len(got["bob"]) >= per_side,
            10,
            "all legitimate packets",
        )
        await asyncio.sleep(0.2)
        # Exactly what was sent, in order: nothing lost, nothing forged got through.
        assert got["bob"] == [SfMsg(n) for n in range(per_side)]
        assert got["alice"] == [SfMsg(n) for n in range(per_side)]
        assert senders == {"alice": {"bob"}, "bob": {"alice"}}
        assert alice.connected and bob.connected
        assert sorted(service.endings) == ["alice", "bob"]
        # Every refusal went through the protocol path, not an unexpected exception.
        crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not crashes, [r.getMessage() for r in crashes]
    finally:
        await alice.close()
        await bob.close()


async def test_fuzzed_frames_before_hello_are_refused_cleanly(
    fault_service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """Well-delimited frames of random kind, header length and bytes: every connection ends
    with exactly one CLOSE (a protocol error or the handshake timeout), never a crash."""
    caplog.set_level(logging.WARNING)
    service = fault_service
    rng = random.Random(1234)
    cases = []
    for i in range(60):
        body = rng.randbytes(rng.randrange(0, 200))
        kind = rng.choice([*range(0, 12), rng.randrange(12, 256)])
        hlen = rng.choice([len(body), rng.randrange(0, 0x10000)])
        data = struct.pack(">IBH", len(body) + 3, kind, hlen) + body
        cases.append(
            (f"fuzz #{i} kind={kind}", None, data, {1002, int(CloseCode.HANDSHAKE_TIMEOUT)})
        )
    results = await asyncio.gather(
        *(run_hostile(service.port, *case) for case in cases), return_exceptions=True
    )
    failures = [
        f"{case[0]}: {result!r}"
        for case, result in zip(cases, results, strict=True)
        if isinstance(result, BaseException)
    ]
    assert not failures, "\n".join(failures)
    assert service.endings == {}
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not crashes, [r.getMessage() for r in crashes]


async def test_forged_src_never_reaches_the_named_victim(fault_service: Service) -> None:
    service = fault_service
    victim = Client("victim", service.url, reconnect=False)
    received: list[PacketReceived | SfMsg] = []

    @victim.on(SfMsg)
    async def on_msg(packet: SfMsg, ctx: Context) -> None:
        received.append(packet)

    await victim.connect()
    try:
        peer = await open_raw(service.port)
        await peer.handshake("mallory")
        assert "mallory" in service.endings
        peer.send(spoofed_packet("victim", "victim") + spoofed_packet("someone", "victim"))
        await asyncio.wait_for(asyncio.shield(peer.lost), 5)
        assert peer.close_codes() == [CloseCode.PROTOCOL_ERROR]
        assert "mallory" not in service.endings
        await asyncio.sleep(0.3)
        assert received == []
        assert victim.connected
    finally:
        await victim.close()
