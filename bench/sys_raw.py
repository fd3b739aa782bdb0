"""The raw baseline's clients: asyncio.Protocol, frames built with struct, counted by hand.

Writes are coalesced per loop iteration and held back above 1 MiB of pending bytes, the
policy PacketStack's Link uses, so the comparison measures framework work rather than a
different syscall pattern.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, cast

from .common import (
    BODY_SIZE,
    HIGH_WATER,
    LOW_WATER,
    CpuMeter,
    Plan,
    Receipts,
    drive_requests,
    one_way_result,
    produce,
)
from .rawwire import (
    CORR,
    CORR_AT,
    FLAGS_AT,
    HELLO,
    LENGTH,
    PACKET,
    PACKET_HEAD,
    PREFIX_SIZE,
    REPLY,
    REQUEST,
    WELCOME,
    control_frame,
)

PAYLOAD = b"r" * BODY_SIZE
_LENGTH = 3 + 9 + BODY_SIZE
_pack = PACKET_HEAD.pack


class RawPeer(asyncio.Protocol):
    """One raw client connection. ``on_packet(flags, corr)`` sees every PACKET frame."""

    def __init__(self, on_packet: Callable[[RawPeer, int, int], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.on_packet = on_packet
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.flush_scheduled = False
        self.paused = False
        self.waiters: list[asyncio.Future[None]] = []
        self.welcome: asyncio.Future[None] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()

    # ------------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        self.write(control_frame(HELLO))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("relay closed the connection"))
        self._wake(ConnectionError("connection lost"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.pending_bytes < HIGH_WATER:
            self._wake(None)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        if buffer:
            buffer += data
            source: bytes | bytearray = buffer
        else:
            source = data
        total = len(source)
        pos = 0
        unpack = LENGTH.unpack_from
        corr_of = CORR.unpack_from
        on_packet = self.on_packet
        while total - pos >= PREFIX_SIZE:
            (length,) = unpack(source, pos)
            end = pos + 4 + length
            if end > total:
                break
            kind = source[pos + 4]
            if kind == PACKET:
                on_packet(self, source[pos + FLAGS_AT], corr_of(source, pos + CORR_AT)[0])
            elif kind == WELCOME and not self.welcome.done():
                self.welcome.set_result(None)
            pos = end
        if buffer:
            del buffer[:pos]
        elif pos < total:
            self.buffer = bytearray(source[pos:])

    # ------------------------------------------------------------------- writing

    def write(self, frame: bytes) -> bool:
        """Queue a frame for this loop iteration's write; True when the caller should
        ``await drain()`` before writing more."""
        self.pending.append(frame)
        self.pending_bytes += len(frame)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)
        return self.paused or self.pending_bytes >= HIGH_WATER

    def _flush(self) -> None:
        self.flush_scheduled = False
        pending = self.pending
        if self.transport is not None and pending:
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        pending.clear()
        self.pending_bytes = 0
        if not self.paused:
            self._wake(None)

    async def drain(self) -> None:
        if self.transport is None:
            raise ConnectionError("connection lost")
        if self.paused or self.pending_bytes >= HIGH_WATER:
            waiter: asyncio.Future[None] = self.loop.create_future()
            self.waiters.append(waiter)
            await waiter

    def _wake(self, error: BaseException | None) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            await asyncio.wait_for(asyncio.shield(self.closed), 5)


async def connect(port: int, on_packet: Callable[[RawPeer, int, int], None]) -> RawPeer:
    loop = asyncio.get_running_loop()
    _, peer = await loop.create_connection(lambda: RawPeer(on_packet), "127.0.0.1", port)
    await asyncio.wait_for(peer.welcome, 10)
    return peer


# -------------------------------------------------------------------------- one-way


async def one_way(port: int, plan: Plan, count: int | None = None) -> dict[str, Any]:
    count = plan.one_way if count is None else count
    state: list[Receipts] = [Receipts(plan.one_way_warmup)]

    def counted(peer: RawPeer, flags: int, corr: int) -> None:
        state[0].hit()

    consumer = await connect(port, counted)
    producer = await connect(port, lambda *_: None)
    try:

        def send(i: int) -> bool:
            return producer.write(_pack(_LENGTH, PACKET, 9, 0, i) + PAYLOAD)

        sent, _ = await produce(None, plan.one_way_warmup, 60, send, producer.drain)
        await state[0].wait(30)
        receipts = state[0] = Receipts(count)
        meter = CpuMeter()
        sent, send_elapsed = await produce(None, count, plan.timebox, send, producer.drain)
        receipts.expect(sent)
        await receipts.wait(plan.timebox + 20)
        return one_way_result(receipts, sent, send_elapsed, meter)
    finally:
        await producer.close()
        await consumer.close()


# ---------------------------------------------------------------- request / reply


async def request_reply(port: int, plan: Plan, outstanding: int) -> dict[str, Any]:
    total = plan.rr1 if outstanding == 1 else plan.rr100
    waiting: dict[int, asyncio.Future[None]] = {}

    def answer(peer: RawPeer, flags: int, corr: int) -> None:
        if flags & REQUEST:
            peer.write(_pack(_LENGTH, PACKET, 9, REPLY, corr) + PAYLOAD)

    def resolve(peer: RawPeer, flags: int, corr: int) -> None:
        future = waiting.pop(corr, None)
        if future is not None and not future.done():
            future.set_result(None)

    responder = await connect(port, answer)
    requester = await connect(port, resolve)
    loop = asyncio.get_running_loop()
    ids = iter(range(1, 1 << 62))

    async def request() -> None:
        corr = next(ids)
        future = loop.create_future()
        waiting[corr] = future
        if requester.write(_pack(_LENGTH, PACKET, 9, REQUEST, corr) + PAYLOAD):
            await requester.drain()
        await future  # no per-request timer: the runner bounds the whole measurement

    try:
        await drive_requests(request, plan.rr_warmup, outstanding, 60)
        return await drive_requests(request, total, outstanding, plan.timebox)
    finally:
        await requester.close()
        await responder.close()
