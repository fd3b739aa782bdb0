"""The raw baseline's wire: PacketStack's framing built with ``struct`` alone.

Every frame is ``length:u32 | kind:u8 | header_length:u16 | header | payload`` like
PacketStack's; the raw header is a fixed 9 bytes ``flags:u8 | corr:u64`` instead of msgpack.
A client's first frame is HELLO (kind 1, no header); the relay answers WELCOME (kind 2).
"""

from __future__ import annotations

import struct

HELLO = 1
WELCOME = 2
PACKET = 3

REQUEST = 1
REPLY = 2

LENGTH = struct.Struct(">I")
PREFIX_SIZE = 7  # length + kind + header_length
HEADER_SIZE = 9  # flags + corr
# prefix and header of a PACKET frame in one struct: length, kind, header_length, flags, corr
PACKET_HEAD = struct.Struct(">IBHBQ")
CORR = struct.Struct(">Q")
FLAGS_AT = PREFIX_SIZE  # offset of flags inside a frame
CORR_AT = PREFIX_SIZE + 1  # offset of corr inside a frame


def packet_frame(flags: int, corr: int, payload: bytes) -> bytes:
    return (
        PACKET_HEAD.pack(3 + HEADER_SIZE + len(payload), PACKET, HEADER_SIZE, flags, corr) + payload
    )


def control_frame(kind: int) -> bytes:
    return struct.pack(">IBH", 3, kind, 0)
