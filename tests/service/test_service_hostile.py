"""Hostile input against a running service (in-process, and a ``packetstack serve`` child):
random bytes, truncated frames, huge length prefixes, garbage after a valid HELLO, slowloris
handshakes, a flood of connections, unknown frame kinds, DELIVER frames from a client,
oversized payload announcements and wrong tokens, all at once, while two legitimate endings
exchange acknowledged packets. Afterwards nothing legitimate was lost, every attacker was
closed with the right code, the service still serves and its stats show the refusals."""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import msgspec
import pytest
from conftest import ServiceFactory
from support import (
    RawPeer,
    ServiceProcess,
    close_raw,
    closed_by_service,
    free_port,
    open_raw,
    raw_deliver,
    raw_frame,
    raw_handshake,
    send_acked,
    service_env,
    wait_until,
)

from packetstack import Client, Context, Packet, Service
from packetstack.errors import CloseCode, ErrorCode
from packetstack.protocol import (
    ErrorReceived,
    Flag,
    FrameKind,
    Hello,
    PacketHeader,
    Target,
)

pytestmark = pytest.mark.timeout(30)

TOKEN = "hostile-test-token"
HANDSHAKE_TIMEOUT = 1.0
MAX_FRAME = 64 * 1024
CHUNK_SIZE = 16 * 1024
MAX_PAYLOAD = 256 * 1024
SETTINGS = {
    "tokens": [TOKEN],
    "handshake_timeout": HANDSHAKE_TIMEOUT,
    "heartbeat": 0.5,
    "heartbeat_timeout": 2.0,
    "max_frame": MAX_FRAME,
    "chunk_size": CHUNK_SIZE,
    "max_payload": MAX_PAYLOAD,
}
# How long any attacker may stay connected: the heartbeat timeout, and some slack.
CLOSE_WITHIN = 5.0

SLOWLORIS = 5
FLOOD = 250
OVERSIZED = 2
WRONG_TOKENS = 3


class HsMsg(Packet):
    packet_tag: ClassVar[str] = "tests.service.hostile.Msg"
    n: int


# ---------------------------------------------------------------- attackers


@dataclass
class Refusals:
    """What the attackers saw, checked against the service's stats afterwards."""

    handshake_timeouts: int = 0


def packed(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


def hello(name: str, token: str | None = TOKEN) -> bytes:
    return raw_frame(FrameKind.HELLO, packed(Hello(1, name, token)))


def packet(src: str, dst: str, n: int, flags: int = 0, size: int = 0, stream: int = 0) -> bytes:
    header = PacketHeader(n, int(Target.ENDING), dst, src, HsMsg.packet_tag, flags, 0, size, stream)
    return raw_frame(FrameKind.PACKET, packed(header), b"" if flags else packed(HsMsg(n)))


ANY_REFUSAL = {
    CloseCode.PROTOCOL_ERROR,
    CloseCode.FRAME_TOO_LARGE,
    CloseCode.HANDSHAKE_TIMEOUT,
    CloseCode.HEARTBEAT_TIMEOUT,
    CloseCode.AUTH_FAILED,
    CloseCode.BAD_NAME,
    CloseCode.UNSUPPORTED_VERSION,
}


async def one_shot(
    port: int, name: str | None, data: bytes, allowed: AbstractSet[int] | int
) -> list[int]:
    """Connect (and shake hands as ``name``, if given), send ``data``, and check the
    service closes the connection with one CLOSE frame whose code is ``allowed``."""
    allowed = {allowed} if isinstance(allowed, int) else allowed
    peer: RawPeer = await open_raw(port)
    try:
        if name is not None:
            await raw_handshake(peer, name, TOKEN)
        peer.send(data)
        codes = await closed_by_service(peer, CLOSE_WITHIN)
        assert len(codes) == 1 and codes[0] in allowed, f"CLOSE codes {codes}, want {allowed}"
        assert peer.parse_error is None, peer.parse_error
        return codes
    finally:
        close_raw(peer)


async def slowloris(port: int, index: int) -> None:
    """One byte of a (long) HELLO every 100 ms, never finishing: closed with
    HANDSHAKE_TIMEOUT after the handshake timeout, not before and not much after."""
    data = hello(f"slow-{index}-" + "x" * 200)
    loop = asyncio.get_running_loop()
    # Started before connecting: the service's clock starts at accept, which a busy
    # loop may report to us well after it happened.
    started = loop.time()
    peer: RawPeer = await open_raw(port)
    try:
        for byte in data:
            if peer.lost.done():
                break
            peer.send(bytes([byte]))
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the slowloris HELLO was sent whole: make it longer")
        codes = await closed_by_service(peer, CLOSE_WITHIN)
        elapsed = loop.time() - started
        assert codes == [CloseCode.HANDSHAKE_TIMEOUT]
        assert HANDSHAKE_TIMEOUT - 0.05 <= elapsed <= HANDSHAKE_TIMEOUT + 1.0, elapsed
    finally:
        close_raw(peer)


async def flood(port: int) -> None:
    """FLOOD connections opened 50 at a time and closed by us at once, some after a
    fragment of a HELLO."""
    fragment = hello("flood")[:9]
    for batch in range(FLOOD // 50):
        peers: list[RawPeer] = await asyncio.gather(*(open_raw(port) for _ in range(50)))
        for i, peer in enumerate(peers):
            if (batch + i) % 2:
                peer.send(fragment)
        await asyncio.sleep(0.01)
        for peer in peers:
            close_raw(peer)


async def oversized_announcement(port: int, index: int, size: int) -> None:
    """A chunked PACKET announcing ``size`` bytes (over max_payload) to a legitimate
    ending: refused with ERROR PAYLOAD_TOO_LARGE, its chunks are discarded, and the
    connection stays usable."""
    name = f"big-{index}"
    peer: RawPeer = await open_raw(port)
    try:
        await raw_handshake(peer, name, TOKEN)
        peer.send(packet(name, "bob", 7, int(Flag.CHUNKED), size, stream=1))
        chunk = raw_frame(FrameKind.CHUNK, packed([1]), b"\x00" * 1000)
        peer.send(chunk * 5)
        await peer.wait_for(
            lambda: any(type(e) is ErrorReceived for e in peer.events), CLOSE_WITHIN
        )
        errors = [e for e in peer.events if type(e) is ErrorReceived]
        assert [(e.ref, e.code) for e in errors] == [(7, ErrorCode.PAYLOAD_TOO_LARGE)]
        assert not peer.lost.done() and peer.close_codes() == []
    finally:
        close_raw(peer)


async def half_packet_then_silence(port: int) -> None:
    """A truncated PACKET after a good handshake: the service waits for the rest only as
    long as its heartbeat timeout."""
    data = packet("trunc-open", "bob", 1)
    await one_shot(port, "trunc-open", data[: len(data) // 2], CloseCode.HEARTBEAT_TIMEOUT)


def hostile_cases(port: int, refusals: Refusals) -> list[tuple[str, Awaitable[object]]]:
    """Every attack as (name, awaitable): each raises if the service answered wrongly."""
    rng = random.Random(20240606)
    deliver = raw_deliver(1, packed(PacketHeader(1, 0, "bob", "evil", HsMsg.packet_tag)))
    cases: list[tuple[str, Awaitable[object]]] = []

    def add(name: str, attack: Awaitable[object], handshake_timeout: bool = False) -> None:
        cases.append((name, attack))
        refusals.handshake_timeouts += handshake_timeout

    for seed in range(6):
        add(f"random bytes #{seed}", one_shot(port, None, rng.randbytes(4096), ANY_REFUSAL))
    for seed in range(3):
        garbage = rng.randbytes(512)
        add(
            f"HELLO + garbage #{seed}",
            one_shot(port, None, hello(f"g-{seed}") + garbage, ANY_REFUSAL),
        )
    truncated_hello = hello("trunc")[:-3]
    add("truncated HELLO", one_shot(port, None, truncated_hello, CloseCode.HANDSHAKE_TIMEOUT), True)
    add(
        "truncated prefix", one_shot(port, None, b"\x00\x00\x01", CloseCode.HANDSHAKE_TIMEOUT), True
    )
    add("truncated PACKET", half_packet_then_silence(port))
    huge = struct.pack(">IBH", 0xFFFFFFFF, FrameKind.PACKET, 0)
    add("huge length prefix", one_shot(port, None, huge, CloseCode.FRAME_TOO_LARGE))
    add("huge prefix after HELLO", one_shot(port, "huge", huge, CloseCode.FRAME_TOO_LARGE))
    just_over = struct.pack(">IBH", MAX_FRAME + 1, FrameKind.HELLO, 0)
    add("max_frame + 1", one_shot(port, None, just_over, CloseCode.FRAME_TOO_LARGE))
    add(
        "HELLO then an unknown kind",
        one_shot(port, None, hello("g-kind") + raw_frame(0xEE), CloseCode.PROTOCOL_ERROR),
    )
    add("garbage after WELCOME", one_shot(port, "g-late", b"\x00\x00\x00\x03\xc1\x00\x00", 1002))
    for kind in (0, 12, 200, 255):
        add(f"kind {kind}", one_shot(port, None, raw_frame(kind), CloseCode.PROTOCOL_ERROR))
        add(f"kind {kind} when open", one_shot(port, f"k-{kind}", raw_frame(kind), 1002))
    add("DELIVER before HELLO", one_shot(port, None, deliver, CloseCode.PROTOCOL_ERROR))
    add("DELIVER from a client", one_shot(port, "d-open", deliver, CloseCode.PROTOCOL_ERROR))
    add(
        "header past its frame",
        one_shot(port, None, struct.pack(">IBH", 5, FrameKind.HELLO, 900) + b"\x90\x90", 1002),
    )
    for i in range(WRONG_TOKENS):
        wrong = hello(f"intruder-{i}", token=None if i == 0 else f"guess-{i}")
        add(f"wrong token #{i}", one_shot(port, None, wrong, CloseCode.AUTH_FAILED))
    add("oversized payload", oversized_announcement(port, 0, MAX_PAYLOAD + 1))
    add("absurd payload", oversized_announcement(port, 1, 2**40))
    for i in range(SLOWLORIS):
        add(f"slowloris #{i}", slowloris(port, i), True)
    add("connection flood", flood(port))
    return cases


# ----------------------------------------------------------- the exchange


async def exchange_under_attack(url: str, port: int) -> Refusals:
    """alice and bob exchange acknowledged packets until every attack is over; check the
    attacks' outcomes and that each side handled exactly what the other sent, in order."""
    got: dict[str, list[int]] = {"alice": [], "bob": []}
    clients = {name: Client(name, url, token=TOKEN, reconnect=False) for name in got}
    for name, client in clients.items():

        def recorder(into: list[int]) -> Callable[[HsMsg, Context], Awaitable[None]]:
            async def on_msg(msg: HsMsg, ctx: Context) -> None:
                into.append(msg.n)

            return on_msg

        client.on(HsMsg)(recorder(got[name]))
    done = asyncio.Event()
    sent = {"alice": 0, "bob": 0}

    async def talk(me: str, to: str) -> None:
        while not done.is_set() or sent[me] < 500:
            start = sent[me]
            await send_acked(clients[me], to, HsMsg, range(start, start + 50), window=50)
            sent[me] = start + 50

    # The data grid under attack too: alice writes, carol holds the partitions.
    holder = Client("carol", url, token=TOKEN, reconnect=False, holds_data=True)
    written = [0]

    async def write_grid() -> None:
        entries = clients["alice"].grid.map("hostile", int)
        while not done.is_set() or written[0] < 200:
            start = written[0]
            await entries.put_all({f"k{i}": i for i in range(start, start + 20)})
            written[0] = start + 20

    refusals = Refusals()
    try:
        await holder.connect()
        holding = holder.grid.holding
        assert holding is not None
        # Its partitions move in before the attacks start: the timings they check stay those
        # of a service under attack, not of one also busy migrating.
        await wait_until(
            lambda: len(holding.owned) == holder.grid.partitions, CLOSE_WITHIN, "the takeover"
        )
        for client in clients.values():
            await client.connect()
        traffic = asyncio.gather(talk("alice", "bob"), talk("bob", "alice"), write_grid())
        cases = hostile_cases(port, refusals)
        results = await asyncio.wait_for(
            asyncio.gather(*(attack for _, attack in cases), return_exceptions=True), 20
        )
        done.set()
        await asyncio.wait_for(traffic, 10)
        failures = [
            f"{name}: {result!r}"
            for (name, _), result in zip(cases, results, strict=True)
            if isinstance(result, BaseException)
        ]
        assert not failures, "\n".join(failures)

        # Every acknowledged packet was handled once, in order, on both sides.
        assert got["bob"] == list(range(sent["alice"]))
        assert got["alice"] == list(range(sent["bob"]))
        # Every acknowledged grid write reads back, through another ending.
        keys = [f"k{i}" for i in range(written[0])]
        assert await clients["bob"].grid.map("hostile", int).get_all(keys) == {
            key: i for i, key in enumerate(keys)
        }
        assert all(client.connected for client in [*clients.values(), holder])
    finally:
        for client in [*clients.values(), holder]:
            await client.close()
    return refusals


async def still_serves(url: str) -> None:
    """A new pair of endings can connect and exchange a packet."""
    arrived = asyncio.Event()
    late = Client("late-comer", url, token=TOKEN)

    @late.on(HsMsg)
    async def on_msg(msg: HsMsg, ctx: Context) -> None:
        arrived.set()

    async with late, Client("late-sender", url, token=TOKEN) as sender:
        await sender.send("late-comer", HsMsg(1), ack=True)
        await asyncio.wait_for(arrived.wait(), 5)


# -------------------------------------------------------------------- tests


async def test_an_in_process_service_survives_hostile_input_and_loses_nothing(
    make_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    service: Service = await make_service(**SETTINGS)
    refusals = await exchange_under_attack(service.url, service.port)

    await wait_until(
        lambda: service.snapshot()["connections"] == 0, CLOSE_WITHIN, "every connection to close"
    )
    stats = service.stats
    assert stats["handshake_timeouts"] >= refusals.handshake_timeouts
    assert stats["auth_failures"] == WRONG_TOKENS
    assert stats["payload_too_large"] == OVERSIZED
    assert service.endings == {}
    await still_serves(service.url)
    # Every refusal went through the protocol path, not an unexpected exception.
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not crashes, [r.getMessage() for r in crashes]


async def test_a_packetstack_serve_process_survives_hostile_input_and_loses_nothing(
    tmp_path: Path,
) -> None:
    env = {k: ",".join(v) if isinstance(v, list) else v for k, v in SETTINGS.items()}
    running = ServiceProcess(free_port(), tmp_path, service_env(**env))
    running.start()
    try:
        await running.wait_listening()
        await exchange_under_attack(running.url, running.port)
        assert running.proc is not None and running.proc.poll() is None, running.log()
        await still_serves(running.url)
        assert running.proc.poll() is None
        log = running.log()
        assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
        assert TOKEN not in log
    finally:
        running.stop()
