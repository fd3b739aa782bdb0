"""The grid as a client sees it: ``client.grid``.

Operations go to the service as GridOps requests. A client made with ``holds_data=True``
also holds partitions: it applies the operations the service sends it, keeps backups, and
serves reads of keys it owns without the network.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import msgspec
from msgspec.structs import replace

from ..dispatch import Context
from ..errors import GridError, PermissionDenied
from ..peer import ttl_ms
from ..protocol import SERVICE_NAME, Flag, PacketHeader, Welcome
from .holding import Holding
from .maps import GridFront, Map
from .messages import (
    Backup,
    GridDone,
    GridEvent,
    GridOps,
    GridOutcomes,
    Leave,
    Listen,
    Promote,
    Release,
    Take,
    send_outcomes,
)
from .ops import Op, Outcome, PartitionData, repeatable
from .partitions import DEFAULT_PARTITIONS

if TYPE_CHECKING:
    from ..client import Client
    from ..transport import Link

log = logging.getLogger("packetstack.grid")

LEAVE_TIMEOUT = 30.0

_DECODERS: dict[str, msgspec.msgpack.Decoder[Any]] = {
    cls.packet_tag: msgspec.msgpack.Decoder(cls)
    for cls in (GridOps, Backup, Take, Promote, Release)
}
HOLDER_TAGS = frozenset(_DECODERS)
_REQUEST = int(Flag.REQUEST)
_RESENT = int(Flag.RESENT)


class ClientGrid(GridFront):
    def __init__(self, client: Client, holds_data: bool) -> None:
        super().__init__()
        self._client = client
        self.holding = Holding() if holds_data else None
        self.partitions = DEFAULT_PARTITIONS
        # GridOps requests awaiting their answer: (header, packet, the link it went out on).
        self._inflight: dict[int, tuple[PacketHeader, GridOps, Link | None]] = {}
        self._boot: str | None = None  # the run of the service this client last talked to
        self._tasks: set[asyncio.Task[None]] = set()
        client.on(GridEvent)(self._event)

    # ----------------------------------------------------------- GridFront

    def local(self, part: int) -> PartitionData | None:
        holding = self.holding
        return holding.owned.get(part) if holding is not None else None

    async def run(self, ops: list[Op]) -> list[Outcome]:
        """A GridOps request. One whose connection breaks before its answer came is sent
        again on the next connection (the service answers a repeat without applying it
        twice); see ``connected``."""
        client = self._client
        packet = GridOps(ops)
        header = client._addressed(SERVICE_NAME, packet, _REQUEST)
        timeout = client.request_timeout
        header.ttl = ttl_ms(timeout)
        future = client._pending.expect(header.id, timeout, header.tag, SERVICE_NAME)
        link = client._link
        self._inflight[header.id] = (header, packet, link if client.connected else None)
        try:
            waiter = client._transmit(header, packet, False)
            if waiter is not None:
                await waiter
            reply: GridOutcomes | BaseException = await future
        except BaseException:
            client._pending.forget(header.id)
            raise
        finally:
            del self._inflight[header.id]
        if isinstance(reply, BaseException):
            raise reply
        return reply.outcomes

    async def listen(self, map_name: str, on: bool) -> None:
        await self._client.request(SERVICE_NAME, Listen(map_name, on))

    async def subscribe(self, grid_map: Map[Any, Any]) -> None:
        """As GridFront's; before the client connects, only noted (and asked for once it
        is): the events waiting in its mailbox then reach ``grid_map`` too."""
        if self._client.connected:
            await super().subscribe(grid_map)
            return
        self._subscribed.add(grid_map.name)
        self.watch(grid_map, True)

    async def _event(self, event: GridEvent, ctx: Context) -> None:
        if ctx.sender != SERVICE_NAME:
            raise PermissionDenied(f"entry events come from the service, not {ctx.sender!r}")
        await self._watchers.event(event.map, event.change, event.key, event.value)

    # ------------------------------------------------------ the connection

    def receive(self, link: Link, header: PacketHeader, payload: bytes | memoryview) -> None:
        """A grid packet from the service (only holders get them)."""
        holding = self.holding
        if holding is None:
            log.warning("grid packet %r for a client that holds no data", header.tag)
            return
        message = _DECODERS[header.tag].decode(payload)
        kind = type(message)
        if kind is GridOps:
            send_outcomes(link, self._client._reply, header, holding.apply(message))
        elif kind is Backup:
            holding.backup(message)
        elif kind is Take:
            holding.take(message)
        elif kind is Promote:
            holding.promote(message)
        else:
            holding.release(message)
            link.write_packet(*self._client._reply(header, GridDone(), None))

    def connected(self, link: Link, welcome: Welcome) -> None:
        """A new connection, before the outbox goes out on it: requests sent on an
        earlier one and not answered go again, marked RESENT. After a service restart the
        service cannot tell a repeat, so those that must not run twice (put_if_absent,
        compare_and_set, increment) fail with GridError instead: their outcome is unknown."""
        restarted = self._boot is not None and welcome.boot != self._boot
        self._boot = welcome.boot
        if welcome.partitions:
            self.partitions = welcome.partitions
        self.lazy = frozenset(welcome.lazy)
        for request_id, (header, packet, sent_on) in list(self._inflight.items()):
            if sent_on is None or sent_on is link:
                self._inflight[request_id] = (header, packet, link)  # from the outbox
                continue
            if restarted and not repeatable(packet.ops):
                self._client._pending.fail(
                    request_id,
                    GridError(
                        "the service restarted while this grid operation was in flight: it "
                        "may or may not have been applied; read the entry to find out"
                    ),
                )
                continue
            link.write_packet(replace(header, flags=header.flags | _RESENT), packet)
            self._inflight[request_id] = (header, packet, link)
        for grid_map in self._watchers.all():
            grid_map.reconnected()
        if self._subscribed:
            task = asyncio.get_running_loop().create_task(self._renew(set(self._subscribed)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _renew(self, names: set[str]) -> None:
        for name in sorted(names):
            try:
                await self.listen(name, True)
            except Exception as exc:  # the next reconnect tries again
                log.warning("could not renew the entry events of map %r: %s", name, exc)

    def lost(self) -> None:
        """The connection is gone: the service hands our partitions to others."""
        if self.holding is not None:
            self.holding.reset()

    async def leave(self) -> None:
        """Before a holder closes: wait until the service moved its partitions away."""
        if self.holding is None or not self._client.connected:
            return
        try:
            await self._client.request(SERVICE_NAME, Leave(), timeout=LEAVE_TIMEOUT)
        except Exception as exc:
            log.warning("%s left the grid without handing over: %s", self._client.name, exc)
