"""Sans-I/O wire protocol: frames, handshake, envelopes, chunking. No asyncio, no sockets."""

from .connection import BodyEncoder, Connection, Role, State
from .events import (
    AckReceived,
    CloseReceived,
    ErrorReceived,
    Event,
    GroupChange,
    HelloReceived,
    OversizedPacket,
    PacketReceived,
    PingReceived,
    WelcomeReceived,
)
from .frames import (
    PROTOCOL_VERSION,
    SERVICE_NAME,
    ErrorBody,
    Flag,
    FrameKind,
    Hello,
    PacketHeader,
    Target,
    Welcome,
    validate_name,
)

__all__ = [
    "PROTOCOL_VERSION",
    "SERVICE_NAME",
    "AckReceived",
    "BodyEncoder",
    "CloseReceived",
    "Connection",
    "ErrorBody",
    "ErrorReceived",
    "Event",
    "Flag",
    "FrameKind",
    "GroupChange",
    "Hello",
    "HelloReceived",
    "OversizedPacket",
    "PacketHeader",
    "PacketReceived",
    "PingReceived",
    "Role",
    "State",
    "Target",
    "Welcome",
    "WelcomeReceived",
    "validate_name",
]
