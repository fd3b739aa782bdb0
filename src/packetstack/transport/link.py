"""An asyncio.Protocol that moves frames for one sans-I/O Connection.

It coalesces the frames written during one loop iteration into one socket write, pulls
CHUNK frames of large packets between small frames, applies backpressure through
pause_writing/resume_writing, and keeps the heartbeat timers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Callable
from time import perf_counter_ns
from typing import Any, Protocol, cast

from ..codec import ENCODE_ERRORS, encode_body_into, encode_failed
from ..errors import CloseCode, ConnectionClosed, ProtocolError
from ..protocol import Connection, Event, PacketHeader

log = logging.getLogger("packetstack.transport")

DEFAULT_HIGH_WATER = 1024 * 1024
DEFAULT_LOW_WATER = 256 * 1024
# Writes closer together than this are a burst, coalesced per loop iteration.
BURST_GAP_NS = 20_000


class LinkOwner(Protocol):
    """What a Link reports to: the client or the service session above it."""

    def link_made(self, link: Link) -> None: ...

    def link_events(self, link: Link, events: list[Event]) -> None: ...

    def link_lost(self, link: Link, error: BaseException | None) -> None: ...


class Link(asyncio.Protocol):
    """Frames in, frames out, for one connection."""

    def __init__(
        self,
        connection: Connection,
        owner: LinkOwner,
        *,
        high_water: int = DEFAULT_HIGH_WATER,
        low_water: int = DEFAULT_LOW_WATER,
    ) -> None:
        self.connection = connection
        self.owner = owner
        self.high_water = high_water
        self.low_water = low_water
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.close_code: CloseCode | None = None
        self.close_reason = ""
        self._loop = asyncio.get_running_loop()
        # Frames queued during this loop iteration, built in place: one write per flush.
        self._out = bytearray()
        self._flush_scheduled = False
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._resume_callbacks: list[Callable[[], None]] = []
        self._received = False
        self._read_holds: set[object] = set()  # reasons reading is paused, if any
        self._sent = False
        self._last_direct = 0
        self._direct_now = False  # a write went out directly in this loop iteration
        self._idle_beats = 0
        self._beat_handle: asyncio.TimerHandle | None = None
        self._beat_interval = 0.0
        self._beat_limit = 0
        self.closed_future: asyncio.Future[None] = self._loop.create_future()

    # --------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave as one.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=self.high_water, low=self.low_water)
        self.owner.link_made(self)

    def data_received(self, data: bytes) -> None:
        self._received = True
        try:
            events = self.connection.receive_data(data)
        except ProtocolError as exc:
            parsed: list[Event] = getattr(exc, "events", [])
            if parsed:
                self.owner.link_events(self, parsed)
            log.warning("closing connection to %s: %s", self.peer, exc)
            self.close(exc.close_code, str(exc))
            return
        if events:
            self.owner.link_events(self, events)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self._beat_handle is not None:
            self._beat_handle.cancel()
        self._out = bytearray()
        self._wake_drainers(
            ConnectionClosed("connection lost", self.close_code or CloseCode.GOING_AWAY)
        )
        self._resume_all()
        if not self.closed_future.done():
            self.closed_future.set_result(None)
        self.owner.link_lost(self, exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self.connection.has_chunks:
            self._schedule_flush()
        if len(self._out) < self.high_water:
            self._wake_drainers(None)
            self._resume_all()

    # ------------------------------------------------------------------ writing

    @property
    def peer(self) -> str:
        if self.transport is None:
            return "?"
        return str(self.transport.get_extra_info("peername") or "local socket")

    @property
    def peercert(self) -> Any:
        """The peer's TLS certificate as ``SSLSocket.getpeercert()`` gives it: None without
        TLS or without a certificate, an empty dict when it was not verified."""
        return None if self.transport is None else self.transport.get_extra_info("peercert")

    @property
    def pending_bytes(self) -> int:
        """Bytes queued in this loop iteration, not yet handed to the socket."""
        return len(self._out)

    def write(self, frame: bytes | bytearray) -> bool:
        """Send a frame: a lone one at once, a burst coalesced into one write when the loop
        iteration ends (see ``_write_through``). Return whether the link is still
        writable: False while the peer is not keeping up, and the caller should hold back."""
        if not self.closed:
            self._sent = True
            self._out += frame
            if not self._flush_scheduled:
                self._write_through()
        return not self._paused and len(self._out) < self.high_water

    def write_packet(self, header: PacketHeader, body: Any) -> bool:
        """Queue a packet, encoding it straight into the outgoing buffer. Return whether
        the link is still writable (False: the caller should ``await drain()``)."""
        if self.closed:
            raise ConnectionClosed("connection is closed", self.close_code or CloseCode.NORMAL)
        out = self._out
        try:
            self.connection.append_packet(out, header, body, encode_body_into)
        except ENCODE_ERRORS as exc:
            raise encode_failed(body, exc) from exc
        self._sent = True
        if not self._flush_scheduled:
            self._write_through()
        return not self._paused and len(out) < self.high_water

    def write_delivery(self, seq: int, packet: bytes) -> bool:
        """Queue a DELIVER frame carrying ``seq`` for ``packet`` (a whole PACKET frame).
        Return whether the link is still writable, as ``write`` does."""
        if not self.closed:
            self._sent = True
            self.connection.append_delivery(self._out, seq, packet)
            if not self._flush_scheduled:
                self._write_through()
        return not self._paused and len(self._out) < self.high_water

    def _write_through(self) -> None:
        """Nothing is waiting for a flush. A write that comes BURST_GAP after the last
        direct one is alone: send it now, costing no loop iteration (a request, its reply,
        a forwarded packet). One that follows closely starts a burst: it and whatever comes
        until this loop iteration ends go out in one write from ``_flush``."""
        transport = self.transport
        if (
            self._direct_now
            or perf_counter_ns() - self._last_direct < BURST_GAP_NS
            or transport is None
            or self._paused
            or self.connection.has_chunks
        ):
            self._schedule_flush()
            return
        out, self._out = self._out, bytearray()
        transport.write(out)
        # Counted from the end of the write, and never twice in one loop iteration: on a
        # busy machine a write can take longer than the gap, and every write of a burst
        # (replies resuming many tasks at once) would count as alone and cost a syscall.
        self._last_direct = perf_counter_ns()
        self._direct_now = True
        self._loop.call_soon(self._end_direct)

    def _end_direct(self) -> None:
        self._direct_now = False

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self.transport
        if transport is None:
            return
        if self._out:
            # A fresh buffer rather than clear(): the transport may keep a reference.
            out, self._out = self._out, bytearray()
            transport.write(out)
        connection = self.connection
        if connection.has_chunks and not self._paused:
            # About one chunk, then yield: small frames queued meanwhile go first.
            for chunk in connection.next_chunks(connection.chunk_size):
                transport.write(chunk)
            self._sent = True
            if connection.has_chunks:
                self._schedule_flush()
        if not self._paused:
            self._wake_drainers(None)
            self._resume_all()

    async def drain(self) -> None:
        """Wait until the peer keeps up again (or raise ConnectionClosed)."""
        if self.closed:
            raise ConnectionClosed("connection is closed", self.close_code or CloseCode.NORMAL)
        if self._paused or len(self._out) >= self.high_water:
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _wake_drainers(self, error: BaseException | None) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)

    def on_writable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once this link is writable again (or closed)."""
        self._resume_callbacks.append(callback)

    def _resume_all(self) -> None:
        if self._resume_callbacks:
            callbacks, self._resume_callbacks = self._resume_callbacks, []
            for callback in callbacks:
                callback()

    def pause_reading(self, reason: object = None) -> None:
        """Stop reading until every reason given here has been resumed: the service's
        routing and a dispatcher falling behind may both hold the same connection."""
        if self.transport is not None and not self._read_holds:
            self.transport.pause_reading()
        self._read_holds.add(reason)

    def resume_reading(self, reason: object = None) -> None:
        holds = self._read_holds
        if reason in holds:
            holds.discard(reason)
            if not holds and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def hold_reading(self, hold: bool, reason: object = None) -> None:
        if hold:
            self.pause_reading(reason)
        else:
            self.resume_reading(reason)

    # ---------------------------------------------------------------- closing

    def close(self, code: CloseCode = CloseCode.NORMAL, reason: str = "") -> None:
        """Send CLOSE with a reason code, flush, and close the socket."""
        if self.closed or self.transport is None:
            return
        self.close_code = code
        self.close_reason = reason
        self.write(self.connection.close_frame(code, reason))
        self._flush()
        self.closed = True
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -------------------------------------------------------------- heartbeat

    def start_heartbeat(self, interval: float, timeout: float) -> None:
        """PING when idle for ``interval``; close when nothing arrived for ``timeout``."""
        self._beat_interval = interval
        # That many consecutive beats without a byte from the peer: the silence then lasts
        # at least `timeout` (and at most one interval more than a whole number of them).
        self._beat_limit = max(2, math.ceil(timeout / interval - 1e-9))
        self._beat_handle = self._loop.call_later(interval, self._beat)

    def _beat(self) -> None:
        if self.closed:
            return
        if self._received or self._read_holds:
            # While we hold reading back, the peer's silence is ours, not a leak.
            self._received = False
            self._idle_beats = 0
        else:
            self._idle_beats += 1
            if self._idle_beats >= self._beat_limit:
                log.warning("no traffic from %s within the heartbeat timeout", self.peer)
                self.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
                return
        if not self._sent:
            # Not through write(): a PING must not count as traffic that makes the next
            # PING unnecessary.
            self._out += self.connection.ping_frame()
            self._schedule_flush()
        self._sent = False
        self._beat_handle = self._loop.call_later(self._beat_interval, self._beat)
