"""The service's administrative requests, answered by its own handlers.

``$status`` returns :meth:`Service.snapshot` (what ``packetstack status`` shows). Only an
ending whose principal has ``admin`` may ask; any other gets a ``PERMISSION_DENIED`` error
reply (``PermissionDenied`` on the client), and the denial is counted like every other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ..codec import Packet
from ..dispatch import Context
from ..errors import PermissionDenied

if TYPE_CHECKING:
    from .service import Service


class Status(Packet):
    """Request: everything an operator looks at."""

    packet_tag: ClassVar[str] = "$status"


class StatusReport(Packet):
    """Reply to :class:`Status`: the service's snapshot as plain data."""

    packet_tag: ClassVar[str] = "$status.report"
    snapshot: dict[str, Any]


def install_admin(service: Service) -> None:
    """Register the administrative handlers on ``service``."""

    @service.on(Status)
    async def status(_: Status, ctx: Context) -> StatusReport:
        require_admin(service, ctx.sender, "ask for the service's status")
        return StatusReport(service.snapshot())


def require_admin(service: Service, sender: str, what: str) -> None:
    """Raise PermissionDenied (and count it) unless ``sender``'s principal has ``admin``."""
    session = service.endings.get(sender)
    if session is not None and session.principal.admin:
        return
    principal = session.principal.name if session is not None else "?"
    why = f"principal {principal!r} may not {what}"
    service._denied(why)
    raise PermissionDenied(f"{why}: that takes a principal with admin = true")
