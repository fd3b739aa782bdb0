"""The data grid inside the service: glue between the Coordinator and the sessions, and
``service.grid``, the service's own map API."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Literal

import msgspec

from ..codec import Packet
from ..dispatch import Context, error_body
from ..errors import CloseCode, ConnectionClosed, ErrorCode, GridError, PermissionDenied
from ..grid.coordinator import Coordinator, Holder, LazyMap, request_header
from ..grid.maps import GridFront
from ..grid.messages import (
    GridDone,
    GridEvent,
    GridOps,
    GridOutcomes,
    Leave,
    Listen,
    send_outcomes,
)
from ..grid.ops import READS, Op, Outcome, PartitionData, op_size, repeatable
from ..grid.writebehind import FlushReport
from ..protocol import SERVICE_NAME, Flag, PacketHeader, PacketReceived
from ..storage import EmbeddedStore
from .auth import ANYTHING, Principal
from .bridges import ServiceBridges

if TYPE_CHECKING:
    from ..transport import Link
    from .service import Service
    from .session import Session

REMEMBERED = 4096  # answers kept per ending (of requests that must not run twice)
REMEMBERED_ENDINGS = 10_000  # endings whose answers are kept
GRID_CONGESTION = "grid congestion"  # why a client's connection is not read
_RESENT = int(Flag.RESENT)
OPS_TAG = GridOps.packet_tag
OUTCOMES_TAG = GridOutcomes.packet_tag
_ops_decoder = msgspec.msgpack.Decoder(GridOps)


class ServiceGrid(GridFront):
    """``service.grid``: ``service.grid.map("players", Player)`` works as on a client."""

    def __init__(self, service: Service, store: EmbeddedStore) -> None:
        super().__init__()
        cfg = service.config
        self._service = service
        self.stats: Counter[str] = service.stats
        self.partitions = cfg.grid_partitions
        self.coordinator = Coordinator(
            self, store, cfg.grid_partitions, cfg.grid_backups, cfg.max_payload
        )
        self._congested: set[Holder] = set()  # holders whose connection is over high water
        self._held: set[Link] = set()  # clients not read meanwhile
        # Answers to requests that must not run twice, by ending and request id.
        self._answers: dict[str, OrderedDict[int, list[Outcome] | None]] = {}
        self.bridges = ServiceBridges(cfg, self.coordinator.journal, service.stats)
        self.lazy = frozenset(m for m, b in self.bridges.maps.items() if b.spec.load == "lazy")
        self.coordinator.lazy = {name: LazyMap() for name in self.lazy}
        self.coordinator.loader = self.bridges.load_through
        self._install()

    async def open(self) -> None:
        try:
            await self.bridges.open()
            await self.coordinator.open(self.bridges.preload)
        except BaseException:  # the bridges opened so far, an eager one failing after them
            await self.bridges.close_stores()
            raise

    async def close(self) -> FlushReport | None:
        """Stop the grid, then the last flush of the bridged maps; its report."""
        await self.coordinator.close()
        return await self.bridges.close()

    # ------------------------------------------------------------- sessions

    def holder_problem(self, principal: Principal) -> str | None:
        """Why this principal may not hold data, or None. A holder sees every map."""
        if principal.read == ANYTHING and principal.write == ANYTHING:
            return None
        return (
            f"principal {principal.name!r} may not hold grid data: a holder keeps entries of "
            "every map, so it needs read = ['*'] and write = ['*']"
        )

    def joined(self, session: Session) -> None:
        session.holder = self.coordinator.holder_joined(session.name, session.link)

    def left(self, session: Session) -> None:
        if session.holder is not None:
            self.coordinator.holder_lost(session.holder)

    def request(self, session: Session, event: PacketReceived) -> None:
        """A client's GridOps request: check, then run; answered when done.

        A request the client sent again after a reconnect (RESENT) is answered from memory
        if it has run here already; only requests that must not run twice are remembered
        (the last REMEMBERED per ending): the others may simply run again."""
        header = event.header
        name = session.name
        remembered = self._answers.get(name)
        if header.flags & _RESENT and remembered is not None and header.id in remembered:
            outcomes = remembered[header.id]
            if outcomes is not None:  # else still running: the answer goes to this session
                send_outcomes(session.link, self._service._reply, header, outcomes)
            return
        try:
            ops = _ops_decoder.decode(event.payload).ops
        except msgspec.DecodeError as exc:
            self._refuse(session, header, GridError(f"malformed grid request: {exc}"))
            return
        problem = self.coordinator.prepare(ops, time.time())
        if problem is not None:
            self._refuse(session, header, GridError(problem))
            return
        principal = session.principal
        if principal.read != ANYTHING or principal.write != ANYTHING:
            for op in ops:
                denied = self._denied(principal, "read" if op.kind in READS else "write", op.map)
                if denied is not None:
                    self._refuse(session, header, denied)
                    return
        once = not repeatable(ops)
        if once:
            if remembered is None:
                if len(self._answers) >= REMEMBERED_ENDINGS:
                    del self._answers[next(iter(self._answers))]  # the longest-known name
                remembered = self._answers[name] = OrderedDict()
            remembered[header.id] = None
            if len(remembered) > REMEMBERED:
                remembered.popitem(last=False)

        def finish(outcomes: list[Outcome]) -> None:
            if once and remembered is not None and header.id in remembered:
                remembered[header.id] = outcomes
            requester = self._service.endings.get(name)
            if requester is None or requester.link.closed:
                return  # gone: its request fails; what it wrote is written
            send_outcomes(requester.link, self._service._reply, header, outcomes)

        self.coordinator.submit(ops, finish, len(event.payload))
        if self._congested and session.holder is None:  # a holder must go on reading outcomes
            session.link.hold_reading(True, GRID_CONGESTION)
            self._held.add(session.link)

    def _denied(
        self, principal: Principal, action: Literal["read", "write"], map_name: str
    ) -> PermissionDenied | None:
        """The refusal (counted) if ``principal`` may not ``action`` the map, else None."""
        if principal.allows(action, map_name):
            return None
        why = f"principal {principal.name!r} may not {action} map {map_name!r}"
        self._service._denied(why)
        return PermissionDenied(why)

    def _refuse(self, session: Session, header: PacketHeader, exc: Exception) -> None:
        code = ErrorCode.PERMISSION_DENIED if isinstance(exc, PermissionDenied) else ErrorCode.GRID
        self.stats["grid_refused"] += 1
        reply, body = self._service._reply(header, None, error_body(code, exc))
        session.link.write_packet(reply, body)

    def outcomes(self, session: Session, event: PacketReceived) -> None:
        holder = session.holder
        if holder is None:
            session.link.close(CloseCode.PROTOCOL_ERROR, "grid outcomes from a non-holder")
            return
        self.coordinator.outcomes(holder, event.header.corr, event.payload)

    def _install(self) -> None:
        service = self._service

        @service.on(Listen)
        async def listen(request: Listen, ctx: Context) -> GridDone:
            session = service.endings.get(ctx.sender)
            if session is not None:
                denied = self._denied(session.principal, "read", request.map)
                if denied is not None:
                    raise denied
            await self.coordinator.listen(ctx.sender, request.map, request.on)
            return GridDone()

        @service.on(Leave)
        async def leave(_: Leave, ctx: Context) -> GridDone:
            session = service.endings.get(ctx.sender)
            if session is not None and session.holder is not None:
                await self.coordinator.leave(session.holder)
            return GridDone()

    # --------------------------------------------------------------- GridHost

    def send_to(self, holder: Holder, packet: Packet, request: bool) -> int:
        packet_id = next(self._service._ids)
        header = request_header(packet_id, holder.name, packet, request)
        try:
            writable = holder.link.write_packet(header, packet)
        except ConnectionClosed:
            return packet_id  # its loss is handled: its part goes elsewhere
        if not writable and holder not in self._congested:
            self._congested.add(holder)
            self._service.in_background(self._until_drained(holder))
        return packet_id

    async def _until_drained(self, holder: Holder) -> None:
        """A holder that reads more slowly than the grid writes to it (its backups above
        all, which nothing else waits for) holds back the clients' grid requests until it
        has caught up: the service's buffer for it stays bounded."""
        self.stats["grid_congestion"] += 1
        with contextlib.suppress(ConnectionClosed):
            await holder.link.drain()
        self._congested.discard(holder)
        if not self._congested:
            held, self._held = self._held, set()
            for link in held:
                link.hold_reading(False, GRID_CONGESTION)

    async def request_from(self, holder: Holder, packet: Packet, timeout: float) -> object:
        packet_id = next(self._service._ids)
        pending = self._service._pending
        future = pending.expect(packet_id, timeout, packet.packet_tag, holder.name)
        holder.requests.add(packet_id)
        try:
            holder.link.write_packet(request_header(packet_id, holder.name, packet, True), packet)
            reply = await future
        except ConnectionClosed:
            pending.forget(packet_id)
            raise
        finally:
            holder.requests.discard(packet_id)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def fail_request(self, request_id: int, error: BaseException) -> None:
        self._service._pending.fail(request_id, error)

    def deliver(self, name: str, packet: Packet) -> None:
        if name == SERVICE_NAME:
            assert isinstance(packet, GridEvent)
            event = self._watchers.event(packet.map, packet.change, packet.key, packet.value)
            self._service.in_background(event)
            return
        self._service.notify(name, packet)

    def expel(self, holder: Holder, reason: str) -> None:
        holder.link.close(CloseCode.PROTOCOL_ERROR, reason)

    # ------------------------------------------------------------ GridFront

    def local(self, part: int) -> PartitionData | None:
        partition = self.coordinator.parts[part]
        return partition.data if partition.owner is None else None

    async def run(self, ops: list[Op]) -> list[Outcome]:
        problem = self.coordinator.prepare(ops, time.time())
        if problem is not None:
            raise GridError(problem)
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()

        def finish(outcomes: list[Outcome]) -> None:
            if not future.done():
                future.set_result(outcomes)

        self.coordinator.submit(ops, finish, sum(op_size(op) for op in ops))
        return await future

    async def listen(self, map_name: str, on: bool) -> None:
        await self.coordinator.listen(SERVICE_NAME, map_name, on)
