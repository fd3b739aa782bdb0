"""The service's administrative requests, answered by its own handlers.

``$status`` returns :meth:`Service.snapshot` (what ``packetstack status`` shows) with fresh
dirty counts and the entries set aside by flushes. Only an ending whose principal has
``admin`` may ask. ``$flush`` runs :meth:`Service.flush` (a principal with ``flush`` or
``admin``), telling the asker its progress with ``$flush.progress`` packets meanwhile. Any
other ending gets a ``PERMISSION_DENIED`` error reply (``PermissionDenied`` on the client),
and the denial is counted like every other.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

from ..codec import Packet
from ..dispatch import Context
from ..errors import PermissionDenied
from ..grid.writebehind import FlushReport

SET_ASIDE_SHOWN = 1000  # entries set aside that a status report lists at most
PROGRESS_EVERY = 0.2  # seconds between two progress packets of one map
PROGRESS_TTL = 5.0  # seconds a progress packet waits for an asker that went away

if TYPE_CHECKING:
    from .service import Service


class Status(Packet):
    """Request: everything an operator looks at."""

    packet_tag: ClassVar[str] = "$status"


class StatusReport(Packet):
    """Reply to :class:`Status`: the service's snapshot as plain data."""

    packet_tag: ClassVar[str] = "$status.report"
    snapshot: dict[str, Any]


class Flush(Packet):
    """Request: flush the bridged maps (or ``map``) now; answered with FlushDone."""

    packet_tag: ClassVar[str] = "$flush"
    map: str | None = None
    retry_rejected: bool = False


class FlushProgress(Packet):
    """Sent to the asker of a Flush while it runs: ``done`` of ``total`` entries of a map."""

    packet_tag: ClassVar[str] = "$flush.progress"
    map: str
    done: int
    total: int


class FlushDone(Packet):
    """Reply to :class:`Flush`."""

    packet_tag: ClassVar[str] = "$flush.report"
    report: FlushReport


def install_admin(service: Service) -> None:
    """Register the administrative handlers on ``service``."""

    @service.on(Status)
    async def status(_: Status, ctx: Context) -> StatusReport:
        require(service, ctx.sender, "admin", "ask for the service's status")
        bridges = service.grid.bridges
        await bridges.count_dirty()
        snapshot = service.snapshot()
        snapshot["set_aside"] = [
            {"map": map_name, "key": repr(key), "error": error, "at": at}
            for map_name, key, error, at in await bridges.rejected(SET_ASIDE_SHOWN)
        ]
        return StatusReport(snapshot)

    @service.on(Flush)
    async def flush(request: Flush, ctx: Context) -> FlushDone:
        require(service, ctx.sender, "flush", "flush the grid's bridged maps")
        sent: dict[str, float] = {}

        def progress(map_name: str, done: int, total: int) -> None:
            now = time.monotonic()
            if done < total and now - sent.get(map_name, 0.0) < PROGRESS_EVERY:
                return
            sent[map_name] = now
            # Worthless once the asker is gone: it must not wait in a mailbox for long.
            service.notify(ctx.sender, FlushProgress(map_name, done, total), ttl=PROGRESS_TTL)

        report = await service.flush(
            request.map, retry_rejected=request.retry_rejected, progress=progress
        )
        return FlushDone(report)


def require(service: Service, sender: str, right: str, what: str) -> None:
    """Raise PermissionDenied (and count it) unless ``sender``'s principal has ``right``
    (``admin`` or ``flush``; admin may do everything)."""
    session = service.endings.get(sender)
    if session is not None and (session.principal.admin or getattr(session.principal, right)):
        return
    principal = session.principal.name if session is not None else "?"
    why = f"principal {principal!r} may not {what}"
    service._denied(why)
    raise PermissionDenied(f"{why}: that takes a principal with {right} = true")
