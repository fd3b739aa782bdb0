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
    GridError,
    HandshakeRefused,
    InvalidName,
    MailboxFull,
    OutboxFull,
    PacketStackError,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    StoreError,
    UnknownDestination,
    UnknownPacketType,
)
from .grid import EntryEvent, Map
from .notices import Expired
from .service import Principal, Service, ServiceConfig

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
    "EntryEvent",
    "Expired",
    "GridError",
    "HandshakeRefused",
    "InvalidName",
    "MailboxFull",
    "Map",
    "OutboxFull",
    "Packet",
    "PacketStackError",
    "PayloadTooLarge",
    "PermissionDenied",
    "Principal",
    "ProtocolError",
    "RemoteError",
    "RequestTimeout",
    "Service",
    "ServiceConfig",
    "StoreError",
    "UnknownDestination",
    "UnknownPacketType",
    "__version__",
    "errors",
    "register_type",
]
