"""Every exception PacketStack raises, in one tree.

::

    PacketStackError
    ├── ConfigError                     bad settings, named with the fix
    │   └── InvalidName                 a name no ending or group can have
    ├── ProtocolError                   the peer broke the wire protocol
    │   └── FrameTooLarge               a frame over the negotiated maximum
    ├── CodecError                      a packet body could not be (de)serialised
    │   ├── UnknownPacketType           no class is registered under the tag
    │   ├── DuplicatePacketTag          two classes claim the same tag
    │   ├── PacketEncodeError           a value the codec cannot encode (register_type it)
    │   └── PacketDecodeError           the body does not validate against its class
    ├── PayloadTooLarge                 refused before anything was sent
    ├── StoreError                      the embedded store could not read or write
    │   └── BridgeError                 a database bridge failed
    │       ├── BridgeUnavailable       it cannot be reached now (retried with backoff)
    │       ├── BridgeRejected          it refused entries (each one is set aside)
    │       └── BridgeSchemaError       its table does not fit the map (at start-up)
    ├── PermissionDenied                the principal's ACL does not allow the action
    ├── GridError                       a grid operation was refused (malformed, wrong type)
    ├── ConnectionFailed                could not reach or keep the service
    │   ├── HandshakeRefused            the service said no at handshake
    │   │   └── AuthenticationFailed    wrong or missing token
    │   └── ConnectionClosed            the connection is gone (or was never up)
    └── DeliveryError                   a packet or request could not be delivered
        ├── UnknownDestination          no ending or group of that name
        ├── MailboxFull                 the offline ending's mailbox is at its limit
        ├── OutboxFull                  the client's outbox is full while disconnected
        ├── RequestTimeout              no reply in time (also a TimeoutError)
        └── RemoteError                 the far side's handler raised

Errors that travel over the wire carry an :class:`ErrorCode`.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Codes carried by ERROR frames and error replies (see docs/PROTOCOL.md)."""

    PROTOCOL = 1
    UNKNOWN_DESTINATION = 2
    PAYLOAD_TOO_LARGE = 3
    UNKNOWN_PACKET_TYPE = 4
    DECODE_FAILED = 5
    HANDLER_FAILED = 6
    NO_HANDLER = 7
    INTERNAL = 8
    MAILBOX_FULL = 9
    PERMISSION_DENIED = 10
    GRID = 11


class CloseCode(enum.IntEnum):
    """Reason codes carried by CLOSE frames."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    FRAME_TOO_LARGE = 1003
    HEARTBEAT_TIMEOUT = 1004
    REPLACED = 1005
    AUTH_FAILED = 1006
    UNSUPPORTED_VERSION = 1007
    BAD_NAME = 1008
    HANDSHAKE_TIMEOUT = 1009
    FORBIDDEN = 1010  # the token's principal may not claim this ending name
    TOO_MANY_CONNECTIONS = 1011  # the service's or the principal's connection limit


class PacketStackError(Exception):
    """Base of every PacketStack error."""


class ConfigError(PacketStackError, ValueError):
    """A setting is missing or wrong; the message names the setting and the fix."""


class InvalidName(ConfigError):
    """A name no ending or group can have: empty, over 255 bytes, reserved or unprintable."""


class ProtocolError(PacketStackError):
    """The peer sent bytes that break the wire protocol."""

    close_code: CloseCode = CloseCode.PROTOCOL_ERROR


class FrameTooLarge(ProtocolError):
    """A frame's length prefix is over the maximum frame size."""

    close_code = CloseCode.FRAME_TOO_LARGE


class CodecError(PacketStackError):
    """A packet body could not be encoded or decoded."""


class UnknownPacketType(CodecError):
    """No packet class is registered under the received tag."""


class DuplicatePacketTag(CodecError, TypeError):
    """Two different packet classes were registered under one tag."""


class PacketEncodeError(CodecError, TypeError):
    """A packet holds a value the codec cannot encode; nothing was sent."""


class PacketDecodeError(CodecError):
    """A packet body does not validate against its registered class."""


class PayloadTooLarge(PacketStackError):
    """An encoded packet is over the maximum payload size; nothing was sent."""


class StoreError(PacketStackError):
    """The embedded store could not open, read or write its database."""


class BridgeError(StoreError):
    """A database bridge (SQL or MongoDB) could not do what was asked."""


class BridgeUnavailable(BridgeError):
    """The bridge's database cannot be reached or failed in a way that is worth retrying;
    what was being written stays dirty in the journal."""


class FlushWorkerStopped(BridgeUnavailable):
    """The flush worker process died in the middle of a map (killed, crashed): what it
    had not written stays dirty. The database itself may be fine: the flush goes on with
    the other maps of its bridge."""


class BridgeRejected(BridgeError):
    """The database refused the data itself (too long for its column, a constraint, a
    document it cannot store): retrying the same entry would fail again."""


class BridgeSchemaError(BridgeError, ConfigError):
    """A bridge's table or collection does not fit its map's settings (a missing or
    mistyped column), found at start-up before anything is written."""


class PermissionDenied(PacketStackError):
    """The principal of this connection's token may not do that: claim this ending name,
    send to this ending, publish to or join this group, broadcast, flush or administer.
    Nothing of the action happened; the service counts each denial."""


class ConnectionFailed(PacketStackError, ConnectionError):
    """The service could not be reached, or the connection could not be kept."""


class HandshakeRefused(ConnectionFailed):
    """The service refused the handshake; ``code`` says why."""

    def __init__(self, message: str, code: CloseCode = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class AuthenticationFailed(HandshakeRefused):
    """The token was wrong or missing."""


class ConnectionClosed(ConnectionFailed):
    """The connection is closed (or not yet open); ``code`` and ``reason`` say why."""

    def __init__(self, message: str, code: CloseCode = CloseCode.NORMAL, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class DeliveryError(PacketStackError):
    """A packet or request could not be delivered or answered."""


class UnknownDestination(DeliveryError, LookupError):
    """No ending (or group) of that name is known to the service."""


class MailboxFull(DeliveryError):
    """The destination's mailbox holds its limit of packets or bytes and its overflow
    policy is ``reject``: the packet was not stored."""


class GridError(PacketStackError):
    """A grid operation was refused: a malformed operation, ``increment`` on an entry
    that is not an integer, a map name that is not allowed, ..."""


class OutboxFull(DeliveryError):
    """The client is disconnected and its outbox already holds ``outbox_limit`` packets."""


class RequestTimeout(DeliveryError, TimeoutError):
    """No reply arrived within the request's timeout."""


class RemoteError(DeliveryError):
    """The far side could not answer: its handler raised, or it could not read the packet.

    ``remote_type`` is the far side's exception class name (for example ``"ValueError"``),
    ``code`` the :class:`ErrorCode`.
    """

    def __init__(self, message: str, remote_type: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.code = code
