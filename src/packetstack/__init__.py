"""PacketStack: a central service and a fleet of long-lived clients exchanging typed packets."""

from . import errors
from .client import Client
from .codec import Packet, register_type
from .dispatch import Context
from .errors import (
    AuthenticationFailed,
    CodecError,
    ConfigError,
    ConnectionClosed,
    ConnectionFailed,
    DeliveryError,
    HandshakeRefused,
    InvalidName,
    PacketStackError,
    PayloadTooLarge,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    UnknownDestination,
    UnknownPacketType,
)
from .service import Service, ServiceConfig

__version__ = "0.1.0"

__all__ = [
    "AuthenticationFailed",
    "Client",
    "CodecError",
    "ConfigError",
    "ConnectionClosed",
    "ConnectionFailed",
    "Context",
    "DeliveryError",
    "HandshakeRefused",
    "InvalidName",
    "Packet",
    "PacketStackError",
    "PayloadTooLarge",
    "ProtocolError",
    "RemoteError",
    "RequestTimeout",
    "Service",
    "ServiceConfig",
    "UnknownDestination",
    "UnknownPacketType",
    "__version__",
    "errors",
    "register_type",
]
