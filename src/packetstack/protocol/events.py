"""Events a Connection produces from received bytes."""

from __future__ import annotations

import msgspec

from .frames import Hello, PacketHeader, Welcome


class HelloReceived(msgspec.Struct, gc=False):
    hello: Hello


class WelcomeReceived(msgspec.Struct, gc=False):
    welcome: Welcome


class PacketReceived(msgspec.Struct, gc=False):
    """A whole packet: ``data[offset:]`` is its body.

    ``data`` is the exact frame (bytes) when the packet arrived in one piece, so the service
    can forward it without re-encoding, or the reassembled body (a bytearray, offset 0)."""

    header: PacketHeader
    data: bytes | bytearray
    offset: int
    seq: int = 0  # the service's sequence number for this ending (DELIVER); 0 for others

    @property
    def payload(self) -> memoryview:
        return memoryview(self.data)[self.offset :]

    @property
    def frame(self) -> bytes | None:
        """The frame as received, or None for a packet reassembled from chunks."""
        data = self.data
        return data if type(data) is bytes else None


class OversizedPacket(msgspec.Struct, gc=False):
    """A chunked packet announced a size over max_payload; its chunks will be discarded."""

    header: PacketHeader


class AckReceived(msgspec.Struct, gc=False):
    id: int


class ErrorReceived(msgspec.Struct, gc=False):
    ref: int
    code: int
    message: str


class PingReceived(msgspec.Struct, gc=False):
    pass


class CloseReceived(msgspec.Struct, gc=False):
    code: int
    reason: str


class GroupChange(msgspec.Struct, gc=False):
    id: int
    group: str
    join: bool


Event = (
    HelloReceived
    | WelcomeReceived
    | PacketReceived
    | OversizedPacket
    | AckReceived
    | ErrorReceived
    | PingReceived
    | CloseReceived
    | GroupChange
)
