"""Frame layout, frame kinds and the structs carried in frame headers.

Every frame is ``length:u32 | kind:u8 | header_length:u16 | header | payload`` (big-endian),
where ``length`` counts every byte after itself, ``header`` is msgpack and ``payload`` is
opaque bytes. docs/PROTOCOL.md is the normative description.
"""

from __future__ import annotations

import enum
import struct

import msgspec

from ..errors import InvalidName

PROTOCOL_VERSION = 1

PREFIX = struct.Struct(">IBH")
PREFIX_SIZE = PREFIX.size  # 7
# A DELIVER frame carries the delivery's sequence number between its prefix and header.
DELIVER_PREFIX = struct.Struct(">IBHQ")
DELIVER_PREFIX_SIZE = DELIVER_PREFIX.size  # 15
SEQ = struct.Struct(">Q")
LENGTH = struct.Struct(">I")
# Bytes counted by `length` that are not header or payload: kind + header_length.
KIND_AND_HLEN = PREFIX_SIZE - LENGTH.size

MAX_HEADER = 0xFFFF
DEFAULT_MAX_FRAME = 1024 * 1024
DEFAULT_CHUNK_SIZE = 256 * 1024
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
MAX_NAME = 255

SERVICE_NAME = "service"


class FrameKind(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    PACKET = 3
    CHUNK = 4
    ACK = 5
    ERROR = 6
    PING = 7
    CLOSE = 8
    JOIN = 9
    LEAVE = 10
    DELIVER = 11  # service -> client: a PACKET with its per-ending sequence number


class Target(enum.IntEnum):
    """What a PACKET's ``dst`` names."""

    ENDING = 0
    GROUP = 1
    ALL = 2
    SERVICE = 3


class Flag(enum.IntFlag):
    NONE = 0
    REQUEST = 1  # the sender waits for a reply carrying corr = this id
    REPLY = 2  # answers the request whose id is in corr
    ERROR = 4  # a reply that carries an ErrorBody instead of a packet
    ACK = 8  # the sender wants an ACK frame once the service has routed it
    CHUNKED = 16  # the payload follows in CHUNK frames; `size` is its total length
    NOTIFY = 32  # tell the sender if the packet expires or is dropped undelivered
    RESENT = 64  # sent again after a reconnect: the service drops it if it has it already


class Hello(msgspec.Struct, omit_defaults=True):
    """Client -> service, first frame."""

    v: int
    name: str
    token: str | None = None
    caps: list[str] = []


class Welcome(msgspec.Struct, omit_defaults=True):
    """Service -> client, answer to HELLO: the limits both sides then keep."""

    v: int
    session: str
    heartbeat: float
    timeout: float
    max_frame: int
    max_payload: int
    chunk_size: int
    caps: list[str] = []
    # Identifies the service's store: sequence numbers only compare within one epoch.
    epoch: str = ""
    # The highest sequence number this ending has acknowledged (handled) so far.
    acked: int = 0
    # The sequence number the service gives this ending's next delivery.
    next: int = 0
    # The data grid's partition count (keys map to partitions by crc32 % partitions).
    partitions: int = 0
    # A random id of this run of the service process: a client that sees another one knows
    # the service restarted and forgot which requests it answered.
    boot: str = ""
    # Grid maps read through from a database on a miss: an owner's miss is not an answer.
    lazy: list[str] = []


class PacketHeader(msgspec.Struct, array_like=True, gc=False):
    """The envelope of a PACKET frame: everything the service reads to route it."""

    id: int
    target: int
    dst: str
    src: str
    tag: str
    flags: int = 0
    corr: int = 0
    size: int = 0
    stream: int = 0
    ttl: int = 0  # milliseconds a mailbox keeps it; 0: the service's default


class ChunkHeader(msgspec.Struct, array_like=True, gc=False):
    stream: int


class AckHeader(msgspec.Struct, array_like=True, gc=False):
    id: int


class ErrorHeader(msgspec.Struct, array_like=True, gc=False):
    ref: int
    code: int
    message: str


class CloseHeader(msgspec.Struct, array_like=True, gc=False):
    code: int
    reason: str = ""


class GroupHeader(msgspec.Struct, array_like=True, gc=False):
    id: int
    group: str


class ErrorBody(msgspec.Struct, array_like=True):
    """Payload of a reply flagged ERROR: the far side's failure."""

    code: int
    type: str
    message: str


EMPTY_HEADER = b"\x90"  # msgpack for []


def validate_name(name: object, what: str = "ending name") -> str | None:
    """Return why ``name`` cannot be an ending or group name, or None when it can."""
    if not isinstance(name, str) or not name:
        return f"{what} must be a non-empty string"
    if len(name.encode()) > MAX_NAME:
        return f"{what} is longer than {MAX_NAME} bytes"
    if name == SERVICE_NAME or name.startswith("$") or name == "*":
        return f"{what} {name!r} is reserved"
    if not name.isprintable():
        return f"{what} {name!r} has unprintable characters"
    return None


def check_name(name: object, what: str = "ending name") -> None:
    """Raise InvalidName unless ``name`` can name an ending (or a group); TypeError when it
    is not even a string."""
    if not isinstance(name, str):
        raise TypeError(f"a {what} is a str, not {type(name).__name__}")
    problem = validate_name(name, what)
    if problem is not None:
        raise InvalidName(problem)
