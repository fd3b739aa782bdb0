"""The grid's packets. Their tags start with ``$grid``: clients cannot register such tags,
and the service and clients handle them before any user handler.

Client -> service: GridOps (request; answered by GridOutcomes), Listen, Leave (requests,
answered by GridDone). Service -> holder, on the holder's connection and outside its
mailbox (a holder that is gone is replaced, not waited for): GridOps (the owner applies
them and answers GridOutcomes), Backup, Take, Promote (one-way, applied in order) and
Release (request). Service -> listener, through its mailbox: GridEvent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from ..codec import Packet
from ..errors import PayloadTooLarge
from ..protocol import ErrorBody, PacketHeader
from .ops import TOO_LARGE, Op, Outcome, without_values

if TYPE_CHECKING:
    from ..transport import Link


class GridOps(Packet, array_like=True, gc=False):
    packet_tag: ClassVar[str] = "$grid.ops"
    ops: list[Op]


class GridOutcomes(Packet, array_like=True, gc=False):
    packet_tag: ClassVar[str] = "$grid.outcomes"
    outcomes: list[Outcome]


Reply = Callable[
    [PacketHeader, Packet | None, ErrorBody | None], tuple[PacketHeader, Packet | ErrorBody]
]


def send_outcomes(link: Link, reply: Reply, request: PacketHeader, outcomes: list[Outcome]) -> None:
    """Answer a GridOps request. Reads whose values would take the answer over the
    connection's payload limit are answered with errors instead (they changed nothing)."""
    header, body = reply(request, GridOutcomes(outcomes), None)
    try:
        link.write_packet(header, body)
    except PayloadTooLarge as exc:
        why = f"{TOO_LARGE} ({exc}); read fewer keys at once"
        header, body = reply(request, GridOutcomes(without_values(outcomes, why)), None)
        link.write_packet(header, body)


class Backup(Packet, array_like=True, gc=False):
    """Effects (PUT, DELETE, CLEAR) for partitions the receiver backs up, in owner order."""

    packet_tag: ClassVar[str] = "$grid.backup"
    ops: list[Op]


class Take(Packet, array_like=True, gc=False):
    """One chunk of a partition's data: the receiver becomes its owner (or a backup) once it
    has the ``last`` chunk. The first chunk replaces whatever the receiver had of it."""

    packet_tag: ClassVar[str] = "$grid.take"
    part: int
    owner: bool
    first: bool
    last: bool
    entries: list[tuple[str, bytes, bytes, float]]  # (map, key, value, expires)


class Promote(Packet, array_like=True, gc=False):
    """The receiver's backups of these partitions become its own."""

    packet_tag: ClassVar[str] = "$grid.promote"
    parts: list[int]


class Release(Packet, array_like=True, gc=False):
    """Request: stop serving these partitions and drop their data."""

    packet_tag: ClassVar[str] = "$grid.release"
    parts: list[int]


class Listen(Packet, array_like=True, gc=False):
    """Request: deliver (``on``) or stop delivering this map's entry events to the sender."""

    packet_tag: ClassVar[str] = "$grid.listen"
    map: str
    on: bool


class Leave(Packet, gc=False):
    """Request from a holder about to close: move my partitions elsewhere first."""

    packet_tag: ClassVar[str] = "$grid.leave"


class GridDone(Packet, gc=False):
    packet_tag: ClassVar[str] = "$grid.done"


class GridEvent(Packet, array_like=True, gc=False):
    """An entry event: ``change`` is a Change (ADDED, UPDATED, REMOVED, EXPIRED)."""

    packet_tag: ClassVar[str] = "$grid.event"
    map: str
    change: int
    key: bytes
    value: bytes | None = None
