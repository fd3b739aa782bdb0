"""PacketStack: a central service and a fleet of long-lived clients exchanging typed packets."""

from . import errors
from .client import Client
from .codec import Packet, register_type
from .dispatch import Context
from .errors import (
    AuthenticationFailed,
    BridgeError,
    BridgeRejected,
    BridgeSchemaError,
    BridgeUnavailable,
    CodecError,
    ConfigError,
    ConnectionClosed,
    ConnectionFailed,
    DeliveryError,
    FlushWorkerStopped,
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
from .grid.writebehind import FlushReport, MapFlush
from .notices import Expired
from .service import Principal, Service, ServiceConfig
from .storage import BridgeSettings, MapBridge

__version__ = "0.1.0"

__all__ = [
    "AuthenticationFailed",
    "BridgeError",
    "BridgeRejected",
    "BridgeSchemaError",
    "BridgeSettings",
    "BridgeUnavailable",
    "Client",
    "CodecError",
    "ConfigError",
    "ConnectionClosed",
    "ConnectionFailed",
    "Context",
    "DeliveryError",
    "EntryEvent",
    "Expired",
    "FlushReport",
    "FlushWorkerStopped",
    "GridError",
    "HandshakeRefused",
    "InvalidName",
    "MailboxFull",
    "Map",
    "MapBridge",
    "MapFlush",
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
