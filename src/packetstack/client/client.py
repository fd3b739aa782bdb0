"""Client: one long-lived ending of the fleet, known to the service by its name."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections import deque
from collections.abc import Awaitable

import msgspec

from ..codec import Packet, encode
from ..dispatch import HANDLERS, REPEAT_TAG, Dispatcher, service_error
from ..errors import (
    AuthenticationFailed,
    CloseCode,
    ConfigError,
    ConnectionClosed,
    ConnectionFailed,
    HandshakeRefused,
    OutboxFull,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
)
from ..grid.remote import HOLDER_TAGS, ClientGrid
from ..peer import DEFAULT_REQUEST_TIMEOUT, Peer
from ..protocol import (
    PROTOCOL_VERSION,
    SERVICE_NAME,
    AckReceived,
    CloseReceived,
    Connection,
    ErrorBody,
    ErrorReceived,
    Event,
    Flag,
    Hello,
    PacketHeader,
    PacketReceived,
    Role,
    Welcome,
    WelcomeReceived,
    check_name,
)
from ..protocol.frames import DEFAULT_MAX_PAYLOAD
from ..transport import Link, client_ssl_context, connect, parse_url

log = logging.getLogger("packetstack.client")

_REPLY = int(Flag.REPLY)
_RESENT = int(Flag.RESENT)
_ACK = int(Flag.ACK)
_ACK_OR_RESENT = int(Flag.ACK | Flag.RESENT)
DEFAULT_OUTBOX_LIMIT = 10_000
# ack=True deliveries remembered by (sender, id), so a copy the sender resent after a service
# restart (under a new sequence number) is recognised.
RECENT_ACKED = 65_536
# Seconds an acknowledgement of handled deliveries may wait to share its frame with later ones.
ACK_DELAY = 0.002

# TLS 1.3 finishes the client's side of the handshake before the service checks for a
# certificate: one that requires them just closes the connection.
_NO_CERTIFICATE = (
    " (a service with tls_client_cert_required closes TLS connections without a client "
    "certificate like this: give certfile=)"
)

# Close codes after which reconnecting cannot help.
_FINAL = {
    CloseCode.AUTH_FAILED,
    CloseCode.REPLACED,
    CloseCode.UNSUPPORTED_VERSION,
    CloseCode.BAD_NAME,
    CloseCode.FORBIDDEN,
}


class Client(Peer):
    """An ending: ``async with Client("worker-1", "ps://127.0.0.1:7400") as client: ...``.

    It reconnects by itself after a lost connection (exponential backoff with full jitter,
    between ``backoff_initial`` and ``backoff_max`` seconds) and rejoins its groups. While
    it is reconnecting, sends wait in an outbox of at most ``outbox_limit`` packets and go
    out, in order, once it is back; ``ack=True`` sends not yet acknowledged when the
    connection broke are sent again (the service drops any it already has).

    Deliveries carry the service's sequence number for this ending: the client handles
    each once, in order, and acknowledges them after their handlers ran, so the service
    redelivers exactly what was not handled when a connection breaks.

    For ``pss://`` it trusts the system's CAs or only ``cafile``; with ``certfile`` (and
    ``keyfile`` unless the key is in that file) it presents a client certificate to a
    service that asks for one (mutual TLS). ``ssl_context`` replaces all of them.
    """

    def __init__(
        self,
        name: str,
        url: str = "ps://127.0.0.1:7400",
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        reconnect: bool = True,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        connect_timeout: float = 10.0,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        outbox_limit: int = DEFAULT_OUTBOX_LIMIT,
        holds_data: bool = False,
    ) -> None:
        check_name(name)
        super().__init__(name, request_timeout)
        self.endpoint = parse_url(url)
        if ssl_context is not None and (certfile or keyfile):
            raise ConfigError("give either ssl_context or certfile/keyfile, not both")
        if keyfile is not None and certfile is None:
            raise ConfigError("keyfile needs certfile: the client certificate it belongs to")
        # Whether a client certificate may be offered (a caller's context may hold one).
        self._certificate = certfile is not None or ssl_context is not None
        if self.endpoint.tls and ssl_context is None:
            ssl_context = client_ssl_context(cafile, certfile, keyfile)
        self._ssl = ssl_context
        self._token = token
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.welcome: Welcome | None = None
        self._link: Link | None = None
        self._handshake: asyncio.Future[Welcome] | None = None
        self._dispatcher = Dispatcher(
            self._handlers, self._send_reply, self._hold_reading, self._acknowledge
        )
        self._groups: set[str] = set()
        self.outbox_limit = outbox_limit
        # Packets sent while reconnecting, in order: (header, payload).
        self._outbox: deque[tuple[PacketHeader, bytes]] = deque()
        # ack=True packets sent and not yet acknowledged, by id (in id order).
        self._unacked: dict[int, tuple[PacketHeader, bytes]] = {}
        self._epoch = ""  # the service store whose sequence numbers _delivered counts
        self._delivered = 0  # the highest sequence number taken for handling
        self.repeats_dropped = 0
        self._ack_due = 0
        self._last_ack = 0.0
        self._ack_timer: asyncio.TimerHandle | None = None
        self._recent: set[tuple[str, int]] = set()
        self._recent_order: deque[tuple[str, int]] = deque()
        self._closing = False
        self._reconnector: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self.reconnects = 0
        self.holds_data = holds_data
        self.grid = ClientGrid(self, holds_data)

    # ------------------------------------------------------------ lifecycle

    @property
    def connected(self) -> bool:
        return self._link is not None and not self._link.closed and self.welcome is not None

    async def _enter(self) -> None:
        await self.connect()

    async def connect(self) -> None:
        """Connect and shake hands, retrying with backoff for up to ``connect_timeout``.

        Raises AuthenticationFailed / HandshakeRefused at once, ConnectionFailed when the
        service stays unreachable."""
        self._closing = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        attempt = 0
        while True:
            try:
                await self._open(max(0.1, deadline - loop.time()))
                return
            except (HandshakeRefused, PermissionDenied):
                raise
            except ssl.SSLError as exc:
                # A certificate that does not verify will not verify on the next try either.
                raise ConnectionFailed(
                    f"TLS handshake with {self.endpoint} failed: {exc}; check the CA file "
                    "(cafile=...) and that the certificate names this host"
                ) from exc
            except (TimeoutError, OSError, ConnectionFailed) as exc:
                delay = self._backoff(attempt)
                attempt += 1
                if loop.time() + delay >= deadline:
                    raise ConnectionFailed(
                        f"cannot reach the service at {self.endpoint}: {exc}; is it running "
                        "(packetstack serve) and is the URL right?"
                    ) from exc
                await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_max, self.backoff_initial * 2**attempt))

    async def _open(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        link = Link(Connection(Role.CLIENT), self)
        handshake: asyncio.Future[Welcome] = loop.create_future()
        self._handshake = handshake
        async with asyncio.timeout(timeout):
            await connect(self.endpoint, lambda: link, self._ssl)
            link.write(
                link.connection.hello_frame(
                    Hello(
                        PROTOCOL_VERSION,
                        self.name,
                        self._token,
                        caps=["chunks", "holder"] if self.holds_data else ["chunks"],
                    )
                )
            )
            try:
                welcome = await handshake
            except BaseException:
                link.abort()
                raise
        self._link = link
        self.welcome = welcome
        link.start_heartbeat(welcome.heartbeat, welcome.timeout)
        self._resume_deliveries(welcome)
        for group in sorted(self._groups):
            link.write(link.connection.group_frame(next(self._ids), group, True))
        self.grid.connected(link, welcome)  # its unanswered requests before newer ones
        self._send_held(link)
        self._connected.set()
        log.info("%s connected to %s", self.name, self.endpoint)

    def _adopt(self, welcome: Welcome) -> None:
        """Before any delivery that came with this WELCOME is looked at: sequence numbers
        of a store we have not seen (or a fresh one) count from what that store knows."""
        if welcome.epoch != self._epoch:
            self._epoch = welcome.epoch
            self._delivered = welcome.acked
        elif welcome.next and self._delivered >= welcome.next:
            # The service died before it stored where this ending's numbering stood, so
            # it numbers from there again (and stored nothing numbered after it).
            log.warning(
                "%s: the service numbers deliveries from %d again; it had reached %d",
                self.name,
                welcome.next,
                self._delivered,
            )
            self._delivered = welcome.acked

    def _resume_deliveries(self, welcome: Welcome) -> None:
        done = self._dispatcher.done_seq
        if welcome.acked < done <= self._delivered:
            self._acknowledge(done, urgent=True)  # acks the old connection lost

    def _send_held(self, link: Link) -> None:
        """After a reconnect: unacknowledged sends again, then the outbox, in order."""
        connection = link.connection
        for header, payload in list(self._unacked.values()):
            resent = msgspec.structs.replace(header, flags=header.flags | _RESENT)
            link.write(connection.send_packet(resent, payload))
        outbox = self._outbox
        while outbox:
            header, payload = outbox.popleft()
            if header.flags & _ACK and header.id in self._pending:
                self._unacked[header.id] = (header, payload)  # sent now: kept until acked
            link.write(connection.send_packet(header, payload))

    async def close(self) -> None:
        """Say goodbye and close; pending requests fail with ConnectionClosed."""
        if not self._closing:
            await self.grid.leave()  # a holder hands its partitions over first
        self._closing = True
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._send_ack()  # handled deliveries are not redelivered to the next process
        if self._reconnector is not None:
            self._reconnector.cancel()
            self._reconnector = None
        link = self._link
        if link is not None and not link.closed:
            link.close(CloseCode.NORMAL, "client closed")
            try:
                await asyncio.wait_for(asyncio.shield(link.closed_future), 2.0)
            except TimeoutError:
                link.abort()
        self._link = None
        self._connected.clear()
        await self._dispatcher.stop()
        self._pending.fail_all(ConnectionClosed("client closed"))

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the client is connected (for example after a reconnect)."""
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    # ---------------------------------------------------------------- groups

    async def join(self, group: str) -> None:
        """Join a group; returns once the service confirmed. Rejoined after reconnects."""
        await self._group(group, True)
        self._groups.add(group)

    async def leave(self, group: str) -> None:
        await self._group(group, False)
        self._groups.discard(group)

    async def _group(self, group: str, join: bool) -> None:
        check_name(group, "group name")
        link = self._require_link()
        request_id = next(self._ids)
        what = f"{'joining' if join else 'leaving'} {group!r}"
        future = self._pending.expect(request_id, self.request_timeout, what)
        link.write(link.connection.group_frame(request_id, group, join))
        await future

    # --------------------------------------------------------------- sending

    def _require_link(self) -> Link:
        link = self._link
        if link is None or link.closed:
            raise ConnectionClosed(
                f"{self.name} is not connected to {self.endpoint}"
                + ("; reconnecting" if self._reconnector is not None else "")
            )
        return link

    def _transmit(
        self, header: PacketHeader, body: Packet | ErrorBody, ack: bool
    ) -> Awaitable[None] | None:
        link = self._link
        if link is None or link.closed:
            if self._reconnector is None:
                self._require_link()  # raises: not connected and not reconnecting
            return self._queue(header, body, ack)
        if ack:
            payload = encode(body)
            future = self._expect_ack(header, payload)
            try:
                link.write(link.connection.send_packet(header, payload))
            except BaseException:
                self._pending.forget(header.id)
                self._unacked.pop(header.id, None)
                raise
            return future
        if link.write_packet(header, body):
            return None
        return link.drain()

    def _expect_ack(
        self, header: PacketHeader, payload: bytes, sent: bool = True
    ) -> asyncio.Future[None]:
        """Wait for the service's ACK of an ack=True packet, keeping the packet to send
        again after a reconnect once it has been ``sent`` (see ``_send_held``)."""
        packet_id = header.id
        future: asyncio.Future[None] = self._pending.expect(
            packet_id, self.request_timeout, "acknowledgement"
        )
        if sent:
            self._unacked[packet_id] = (header, payload)
        future.add_done_callback(lambda _: self._unacked.pop(packet_id, None))
        return future

    def _queue(
        self, header: PacketHeader, body: Packet | ErrorBody, ack: bool
    ) -> Awaitable[None] | None:
        """Disconnected, reconnecting: keep the packet for the next connection."""
        if len(self._outbox) >= self.outbox_limit:
            raise OutboxFull(
                f"{self.name} is reconnecting to {self.endpoint} and its outbox already "
                f"holds {self.outbox_limit} packets; wait_connected() or raise outbox_limit"
            )
        payload = encode(body)
        if len(payload) > self.max_payload:
            raise PayloadTooLarge(
                f"payload of {len(payload)} bytes is over the maximum of {self.max_payload}"
            )
        self._outbox.append((header, payload))
        return self._expect_ack(header, payload, sent=False) if ack else None

    @property
    def max_payload(self) -> int:
        return self.welcome.max_payload if self.welcome is not None else DEFAULT_MAX_PAYLOAD

    @property
    def outbox_size(self) -> int:
        """Packets waiting for the connection to come back."""
        return len(self._outbox)

    def _send_reply(
        self, request: PacketHeader, packet: Packet | None, error: ErrorBody | None
    ) -> None:
        link = self._link
        if link is None or link.closed:
            link = self._require_link()
        link.write_packet(*self._reply(request, packet, error))

    # ------------------------------------------------------- link callbacks

    def _acknowledge(self, seq: int, urgent: bool) -> None:
        """Handlers are done with every delivery up to ``seq``: tell the service at once,
        or, within ACK_DELAY of the last ACK frame, in one frame when it is over (a flood
        of deliveries would otherwise cost a write per read). ``urgent``: now anyway."""
        self._ack_due = seq
        loop = asyncio.get_running_loop()
        if urgent:
            if self._ack_timer is not None:
                self._ack_timer.cancel()
            self._send_ack()
            return
        if self._ack_timer is not None:
            return
        wait = self._last_ack + ACK_DELAY - loop.time()
        if wait <= 0:
            self._send_ack()
        else:
            self._ack_timer = loop.call_later(wait, self._send_ack)

    def _send_ack(self) -> None:
        self._ack_timer = None
        self._last_ack = asyncio.get_running_loop().time()
        seq = self._ack_due
        link = self._link
        if link is not None and not link.closed and seq <= self._delivered:
            link.write(link.connection.ack_frame(seq))

    def _hold_reading(self, hold: bool) -> None:
        # The dispatcher outlives links (reconnects): hold whichever link is current.
        if self._link is not None:
            self._link.hold_reading(hold, HANDLERS)

    def link_made(self, link: Link) -> None:
        pass  # the handshake starts in _open(), which waits for WELCOME itself

    def link_events(self, link: Link, events: list[Event]) -> None:
        pending = self._pending
        dispatcher = self._dispatcher
        queued = len(dispatcher.queue)
        enqueue = dispatcher.queue.append
        for event in events:
            if type(event) is PacketReceived:
                header = event.header
                if header.flags & _REPLY:
                    if not pending.resolve_reply(event):
                        log.debug("late reply to %d from %s", header.corr, header.src)
                    continue
                seq = event.seq
                if not seq and header.tag in HOLDER_TAGS and header.src == SERVICE_NAME:
                    self.grid.receive(link, header, event.payload)
                    continue
                if seq:
                    if seq <= self._delivered:
                        self._repeated()
                        continue
                    self._delivered = seq
                    if header.flags & _ACK_OR_RESENT and self._seen(header):
                        event = PacketReceived(
                            msgspec.structs.replace(header, tag=REPEAT_TAG), b"", 0, seq
                        )
                enqueue(event)
            elif type(event) is AckReceived:
                pending.resolve(event.id, None)
            elif type(event) is ErrorReceived:
                if not pending.fail(event.ref, service_error(event.code, event.message)):
                    log.warning("service reported on packet %d: %s", event.ref, event.message)
            elif type(event) is WelcomeReceived:
                if self._handshake is not None and not self._handshake.done():
                    self._adopt(event.welcome)
                    self._handshake.set_result(event.welcome)
            elif type(event) is CloseReceived:
                link.close_code = _close_code(event.code)
                link.close_reason = event.reason
                self._refuse_handshake(event.code, event.reason)
        if len(dispatcher.queue) > queued:
            dispatcher.wake()  # once per read, not once per packet

    def _seen(self, header: PacketHeader) -> bool:
        """Whether this ack=True packet was taken before under another sequence number (the
        sender resent it after the service lost track of it); remember it otherwise."""
        key = (header.src, header.id)
        if key in self._recent:
            self.repeats_dropped += 1
            return True
        self._recent.add(key)
        self._recent_order.append(key)
        if len(self._recent_order) > RECENT_ACKED:
            self._recent.discard(self._recent_order.popleft())
        return False

    def _repeated(self) -> None:
        """A delivery we took already (its ack was lost with a connection): drop it, and
        tell the service again how far handling got."""
        self.repeats_dropped += 1
        done = self._dispatcher.done_seq
        if done:
            self._acknowledge(done, urgent=False)

    def _refuse_handshake(self, code: int, reason: str) -> None:
        handshake = self._handshake
        if handshake is None or handshake.done():
            return
        message = f"the service refused {self.name!r}: {reason}"
        if code == CloseCode.AUTH_FAILED:
            handshake.set_exception(AuthenticationFailed(message, CloseCode.AUTH_FAILED))
        elif code == CloseCode.FORBIDDEN:
            handshake.set_exception(PermissionDenied(message))
        else:
            handshake.set_exception(HandshakeRefused(message, _close_code(code)))

    def link_lost(self, link: Link, error: BaseException | None) -> None:
        handshake = self._handshake
        if handshake is not None and not handshake.done():
            handshake.set_exception(
                ConnectionFailed(
                    f"connection lost during handshake: {error or 'closed'}"
                    + (_NO_CERTIFICATE if self.endpoint.tls and not self._certificate else "")
                )
            )
        if link is not self._link:
            return
        self._link = None
        self._connected.clear()
        self.grid.lost()
        code = link.close_code or CloseCode.GOING_AWAY
        lost = ConnectionClosed(
            f"connection to {self.endpoint} lost ({link.close_reason or error or 'closed'})",
            code,
            link.close_reason,
        )
        # Group changes are redone on reconnect and sends kept for it; replies can still
        # arrive after a reconnect under our name.
        self._pending.fail_all(lost, acks_only=True, keep=self._unacked)
        if self._closing:
            return
        if not self.reconnect or code in _FINAL:
            log.error("%s disconnected for good: %s", self.name, lost)
            self._pending.fail_all(lost)  # no reply can reach a client that stays away
            return
        log.warning("%s lost its connection (%s); reconnecting", self.name, lost)
        self._reconnector = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        attempt = 0
        while not self._closing:
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1
            try:
                await self._open(self.connect_timeout)
            except PermissionDenied as exc:
                log.error("%s cannot reconnect: %s", self.name, exc)
                self._pending.fail_all(ConnectionClosed(str(exc), CloseCode.FORBIDDEN))
                break
            except HandshakeRefused as exc:
                if exc.code in _FINAL:
                    log.error("%s cannot reconnect: %s", self.name, exc)
                    self._pending.fail_all(ConnectionClosed(str(exc), exc.code))
                    break
                log.info("%s reconnect attempt %d refused: %s", self.name, attempt, exc)
                continue
            except (TimeoutError, OSError, ConnectionFailed, ProtocolError) as exc:
                log.info("%s reconnect attempt %d failed: %s", self.name, attempt, exc)
                continue
            self.reconnects += 1
            break
        self._reconnector = None


def _close_code(code: int) -> CloseCode:
    try:
        return CloseCode(code)
    except ValueError:
        return CloseCode.PROTOCOL_ERROR
