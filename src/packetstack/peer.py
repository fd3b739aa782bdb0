"""The packet API that Client and Service share: on, send, publish, broadcast, request."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from .codec import Packet
from .dispatch import ERROR_TAG, Context, Handler, HandlerTable, Pending
from .protocol import SERVICE_NAME, ErrorBody, Flag, PacketHeader, Target, check_name

DEFAULT_REQUEST_TIMEOUT = 30.0

# Names this short fit the 255-byte limit whatever their characters (4 bytes at most each).
_SURELY_SHORT = 63
_ENDING = int(Target.ENDING)
_SERVICE = int(Target.SERVICE)
_ACK = int(Flag.ACK)
_REQUEST = int(Flag.REQUEST)
_REPLY = int(Flag.REPLY)
_REPLY_ERROR = int(Flag.REPLY | Flag.ERROR)
_NOTIFY = int(Flag.NOTIFY)


def first_packet_id() -> int:
    """Packet ids count up from a random start, so a restarted process does not reuse the
    ids of its previous life (the service's mailboxes drop a repeated (sender, id))."""
    return secrets.randbits(52) + 1


def ttl_ms(ttl: float | None) -> int:
    """A time to live in seconds as the header carries it (0: the service's default)."""
    if ttl is None:
        return 0
    if not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    return max(1, round(ttl * 1000))


def destination(to: str) -> tuple[int, str]:
    """(target, dst) for a send or request addressed to an ending name or ``"service"``."""
    if to == SERVICE_NAME:
        return Target.SERVICE, SERVICE_NAME
    if not isinstance(to, str):
        raise TypeError(f"a destination is an ending's name or 'service', not {to!r}")
    if not to or len(to) > _SURELY_SHORT:
        check_name(to)
    return Target.ENDING, to


class Peer:
    """Base of Client and Service. Subclasses say how a packet leaves (``_transmit``)."""

    def __init__(self, name: str, request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        self.name = name
        self.request_timeout = request_timeout
        self._handlers = HandlerTable()
        self._pending = Pending()
        self._ids = itertools.count(first_packet_id())

    # ------------------------------------------------------------- lifecycle

    async def _enter(self) -> None:
        raise NotImplementedError

    async def close(self) -> object:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self._enter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -------------------------------------------------------------- handlers

    def on(self, packet_type: type[Packet]) -> Callable[[Handler], Handler]:
        """Register ``async def handler(packet, ctx)`` for a packet class."""
        return self._handlers.on(packet_type)

    @property
    def on_unhandled(self) -> Callable[[BaseException, Context], None] | None:
        """Called with the error and context of each packet no handler could take."""
        return self._handlers.on_unhandled

    @on_unhandled.setter
    def on_unhandled(self, hook: Callable[[BaseException, Context], None] | None) -> None:
        self._handlers.on_unhandled = hook

    # --------------------------------------------------------------- sending

    def _header(self, target: int, dst: str, packet: Packet, flags: int) -> PacketHeader:
        if not isinstance(packet, Packet):
            raise TypeError(f"expected a packetstack.Packet, got {type(packet).__name__}")
        return PacketHeader(next(self._ids), target, dst, self.name, packet.packet_tag, flags)

    def _addressed(self, to: str, packet: Packet, flags: int) -> PacketHeader:
        """The header of a packet to the ending named ``to`` (or ``"service"``): the hot
        path of send and request, with destination() and _header() inlined."""
        if to == SERVICE_NAME:
            target = _SERVICE
        elif type(to) is str and 0 < len(to) <= _SURELY_SHORT:
            target = _ENDING
        else:
            target = destination(to)[0]  # checks the name; raises TypeError or InvalidName
        if not isinstance(packet, Packet):
            raise TypeError(f"expected a packetstack.Packet, got {type(packet).__name__}")
        return PacketHeader(next(self._ids), target, to, self.name, packet.packet_tag, flags)

    def _transmit(
        self, header: PacketHeader, body: Packet | ErrorBody, ack: bool
    ) -> Awaitable[None] | None:
        """Queue a packet. Return something to await when the caller must wait (for
        backpressure or an acknowledgement), None when it is on its way already: the
        common case then costs no extra coroutine."""
        raise NotImplementedError

    async def send(
        self,
        to: str,
        packet: Packet,
        *,
        ack: bool = False,
        ttl: float | None = None,
        notify_expired: bool = False,
    ) -> int:
        """Send a packet to the ending named ``to`` (or ``"service"``).

        Connected or not, the ending gets it: the service keeps it in the ending's mailbox
        for ``ttl`` seconds (default: the service's ``mailbox_ttl``, 3 hours) until it
        connects. Returns once the packet is on its way; with ``ack=True``, once it is
        durably stored at the service or handled by the ending, raising MailboxFull when
        the mailbox is full. With ``notify_expired=True`` the sender receives an
        :class:`~packetstack.notices.Expired` packet if it expires or is dropped. Returns
        the packet's id (the ``id`` such a notice names)."""
        flags = _ACK if ack else 0
        if notify_expired:
            flags |= _NOTIFY
        header = self._addressed(to, packet, flags)
        if ttl is not None:
            header.ttl = ttl_ms(ttl)
        waiter = self._transmit(header, packet, ack)
        if waiter is not None:
            await waiter
        return header.id

    async def publish(
        self,
        group: str,
        packet: Packet,
        *,
        ack: bool = False,
        ttl: float | None = None,
        notify_expired: bool = False,
    ) -> int:
        """Send a packet to every member of ``group`` except the sender; members that are
        offline find it in their mailboxes. Options as for ``send``."""
        check_name(group, "group name")
        flags = (_ACK if ack else 0) | (_NOTIFY if notify_expired else 0)
        header = self._header(Target.GROUP, group, packet, flags)
        header.ttl = ttl_ms(ttl)
        waiter = self._transmit(header, packet, ack)
        if waiter is not None:
            await waiter
        return header.id

    async def broadcast(self, packet: Packet, *, ack: bool = False) -> int:
        """Send a packet to every connected ending except the sender."""
        header = self._header(Target.ALL, "*", packet, _ACK if ack else 0)
        waiter = self._transmit(header, packet, ack)
        if waiter is not None:
            await waiter
        return header.id

    async def request(self, to: str, packet: Packet, *, timeout: float | None = None) -> Any:
        """Send a request and return the reply packet. A request to an ending that is not
        connected waits in its mailbox for at most ``timeout``.

        Raises RequestTimeout, MailboxFull, RemoteError (the far handler raised or could
        not read the packet) or ConnectionClosed."""
        header = self._addressed(to, packet, _REQUEST)
        limit = self.request_timeout if timeout is None else timeout
        header.ttl = ttl_ms(limit)  # nobody waits for an answer after that
        future = self._pending.expect(header.id, limit, header.tag, to)
        try:
            waiter = self._transmit(header, packet, False)
            if waiter is not None:
                await waiter
        except BaseException:
            self._pending.forget(header.id)
            raise
        reply = await future
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _reply(
        self, request: PacketHeader, packet: Packet | None, error: ErrorBody | None
    ) -> tuple[PacketHeader, Packet | ErrorBody]:
        """Header and body answering ``request`` with a packet or an error. ``packet`` is
        a Packet already: the dispatcher checked what its handler returned."""
        src = request.src
        target = _SERVICE if src == SERVICE_NAME else _ENDING
        body: Packet | ErrorBody
        if error is None:
            assert packet is not None
            body, tag, flags = packet, packet.packet_tag, _REPLY
        else:
            body, tag, flags = error, ERROR_TAG, _REPLY_ERROR
        return PacketHeader(next(self._ids), target, src, self.name, tag, flags, request.id), body
