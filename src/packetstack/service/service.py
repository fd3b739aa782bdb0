"""Service: the hub. Accepts endings, routes their packets, answers its own handlers."""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
from collections import Counter
from collections.abc import Awaitable
from functools import partial
from pathlib import Path
from typing import Any

import msgspec

from ..codec import Packet, encode
from ..dispatch import HANDLERS, Dispatcher, ReplySender
from ..errors import CloseCode, ConnectionClosed, ErrorCode, UnknownDestination
from ..peer import Peer
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
    GroupChange,
    HelloReceived,
    OversizedPacket,
    PacketHeader,
    PacketReceived,
    Role,
    Target,
    Welcome,
    validate_name,
)
from ..transport import Link, server_ssl_context
from .config import ServiceConfig, load
from .session import Session

log = logging.getLogger("packetstack.service")

_REPLY = int(Flag.REPLY)
_ACK = int(Flag.ACK)
_ENDING = int(Target.ENDING)
_GROUP = int(Target.GROUP)
_ALL = int(Target.ALL)
_SERVICE = int(Target.SERVICE)


class Service(Peer):
    """The PacketStack service.

    ``async with Service(port=0) as service: print(service.port)``. A second connection
    under a name that is already connected *replaces* the first: the old session is closed
    with CloseCode.REPLACED (a restarted process takes over at once, without waiting for the
    old connection's heartbeat timeout).
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        data_dir: str | Path | None = None,
        tokens: list[str] | None = None,
        unix_path: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        config: ServiceConfig | None = None,
        **settings: Any,
    ) -> None:
        overrides = dict(settings, host=host, port=port, tokens=tokens, unix_path=unix_path)
        if data_dir is not None:
            overrides["data_dir"] = str(data_dir)
        if config is not None:
            base = msgspec.structs.asdict(config)
            base.update({k: v for k, v in overrides.items() if v is not None})
            overrides = base
        self.config = load(overrides=overrides, environ={})
        super().__init__(SERVICE_NAME, self.config.request_timeout)
        cfg = self.config
        if ssl_context is None and cfg.tls_cert is not None:
            ssl_context = server_ssl_context(cfg.tls_cert, cfg.tls_key)
        self._ssl = ssl_context
        self._tokens = [t.encode() for t in cfg.tokens]
        self.endings: dict[str, Session] = {}
        self.groups: dict[str, set[Session]] = {}
        # Rare events by name (auth_failures, replaced, ...); hot counters are plain ints.
        self.stats: Counter[str] = Counter()
        self.packets_in = 0
        self.packets_out = 0
        self._links: set[Link] = set()
        self._sessions_by_link: dict[Link, Session] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self.port: int = cfg.port
        self._background: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ lifecycle

    async def _enter(self) -> None:
        await self.start()

    async def start(self) -> None:
        cfg = self.config
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._new_link,
            cfg.host,
            cfg.port,
            ssl=self._ssl,
            # A peer that never finishes TLS gets no longer than one that never says HELLO.
            ssl_handshake_timeout=cfg.handshake_timeout if self._ssl is not None else None,
        )
        self._servers.append(server)
        self.port = server.sockets[0].getsockname()[1]
        scheme = "pss" if self._ssl is not None else "ps"
        log.info("listening on %s://%s:%d", scheme, cfg.host, self.port)
        if cfg.unix_path is not None:
            # Plain on purpose: a local socket is guarded by its file permissions.
            unix = await loop.create_unix_server(self._new_link, cfg.unix_path)
            self._servers.append(unix)
            log.info("listening on unix://%s", cfg.unix_path)
        if not self._tokens:
            loopback = cfg.host in ("127.0.0.1", "::1", "localhost")
            (log.info if loopback else log.warning)(
                "no tokens configured: any ending that reaches %s may connect", cfg.host
            )

    @property
    def url(self) -> str:
        scheme = "pss" if self._ssl is not None else "ps"
        return f"{scheme}://{self.config.host}:{self.port}"

    async def close(self) -> None:
        """Stop listening, say goodbye to every ending (GOING_AWAY) and wait for them."""
        for server in self._servers:
            server.close()
        for link in list(self._links):
            link.close(CloseCode.GOING_AWAY, "service shutting down")
        waits = [link.closed_future for link in self._links]
        if waits:
            await asyncio.wait(waits, timeout=2.0)
        for link in list(self._links):
            link.abort()
        for session in list(self.endings.values()):
            await session.dispatcher.stop()
        await asyncio.gather(*self._background)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self.config.unix_path is not None:
            # Python 3.11's loop leaves the socket file behind; the next start would reuse it
            # anyway, but a stale file misleads anyone looking.
            Path(self.config.unix_path).unlink(missing_ok=True)
        self._pending.fail_all(_service_closed())

    def _new_link(self) -> Link:
        cfg = self.config
        connection = Connection(
            Role.SERVICE,
            max_frame=cfg.max_frame,
            max_payload=cfg.max_payload,
            chunk_size=cfg.chunk_size,
        )
        return Link(connection, self, high_water=cfg.high_water, low_water=cfg.low_water)

    def link_made(self, link: Link) -> None:
        # Counted from here, not from accept(): a TLS handshake that fails never gets here
        # and one that completes late still gets its full handshake timeout.
        self._links.add(link)
        cfg = self.config
        asyncio.get_running_loop().call_later(cfg.handshake_timeout, self._check_handshake, link)

    def _check_handshake(self, link: Link) -> None:
        if not link.closed and link not in self._sessions_by_link:
            self.stats["handshake_timeouts"] += 1
            link.close(CloseCode.HANDSHAKE_TIMEOUT, "no HELLO within the handshake timeout")

    # ------------------------------------------------------- link callbacks

    def link_events(self, link: Link, events: list[Event]) -> None:
        session = self._sessions_by_link.get(link)
        if session is None:
            for event in events:
                if type(event) is HelloReceived:
                    session = self._accept(link, event)
                    if session is None:
                        return
                elif type(event) is CloseReceived:
                    return
            return
        dispatcher = session.dispatcher
        queued = len(dispatcher.queue)
        for event in events:
            if type(event) is PacketReceived:
                self._route(session, event)
            elif type(event) is GroupChange:
                self._group_change(session, event)
            elif type(event) is OversizedPacket:
                self.stats["payload_too_large"] += 1
                link.write(
                    link.connection.error_frame(
                        event.header.id,
                        ErrorCode.PAYLOAD_TOO_LARGE,
                        f"payload of {event.header.size} bytes is over the maximum of "
                        f"{self.config.max_payload}",
                    )
                )
            elif type(event) is CloseReceived:
                link.close_code = CloseCode.NORMAL
            elif type(event) in (AckReceived, ErrorReceived):
                pass  # endings do not acknowledge the service's packets in protocol v1
        if len(dispatcher.queue) > queued:
            dispatcher.wake()  # once per read, not once per packet

    def link_lost(self, link: Link, error: BaseException | None) -> None:
        self._links.discard(link)
        session = self._sessions_by_link.pop(link, None)
        if session is None:
            return
        for source in session.held_sources:
            source.resume_reading(session)
        session.held_sources.clear()
        if self.endings.get(session.name) is session:
            del self.endings[session.name]
            self._leave_groups(session)
        self._stop_dispatcher(session)
        log.info("ending %r left (%s)", session.name, link.close_reason or error or "closed")

    def _stop_dispatcher(self, session: Session) -> None:
        # The loop keeps only weak references to tasks: hold this one until it is done.
        task = asyncio.get_running_loop().create_task(session.dispatcher.stop())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------ handshake

    def _accept(self, link: Link, event: HelloReceived) -> Session | None:
        hello = event.hello
        cfg = self.config
        if hello.v != PROTOCOL_VERSION:
            link.close(
                CloseCode.UNSUPPORTED_VERSION,
                f"protocol version {hello.v} is not supported; this service speaks "
                f"{PROTOCOL_VERSION}",
            )
            return None
        if self._tokens and not self._token_ok(hello.token):
            self.stats["auth_failures"] += 1
            log.warning("refused %r from %s: wrong or missing token", hello.name, link.peer)
            link.close(CloseCode.AUTH_FAILED, "wrong or missing token")
            return None
        problem = validate_name(hello.name)
        if problem is not None:
            link.close(CloseCode.BAD_NAME, problem)
            return None
        previous = self.endings.get(hello.name)
        if previous is not None:
            self.stats["replaced"] += 1
            log.info("ending %r reconnected; replacing its previous session", hello.name)
            self._sessions_by_link.pop(previous.link, None)
            previous.link.close(CloseCode.REPLACED, "replaced by a newer connection")
            self._stop_dispatcher(previous)
            self._leave_groups(previous)
        dispatcher = Dispatcher(
            self._handlers, self._reply_sender(link), partial(link.hold_reading, reason=HANDLERS)
        )
        session = Session(hello.name, link, dispatcher)
        self.endings[hello.name] = session
        self._sessions_by_link[link] = session
        link.write(
            link.connection.welcome_frame(
                Welcome(
                    PROTOCOL_VERSION,
                    session=hello.name,
                    heartbeat=cfg.heartbeat,
                    timeout=cfg.heartbeat_timeout,
                    max_frame=cfg.max_frame,
                    max_payload=cfg.max_payload,
                    chunk_size=cfg.chunk_size,
                    caps=["chunks"],
                )
            )
        )
        link.start_heartbeat(cfg.heartbeat, cfg.heartbeat_timeout)
        self.stats["connections"] += 1
        log.info("ending %r joined from %s", hello.name, link.peer)
        return session

    def _token_ok(self, token: str | None) -> bool:
        given = (token or "").encode()
        # Compare against every token so timing says nothing about which one is close.
        ok = False
        for expected in self._tokens:
            ok |= hmac.compare_digest(given, expected)
        return ok

    # -------------------------------------------------------------- routing

    def _route(self, session: Session, event: PacketReceived) -> None:
        header = event.header
        if header.src != session.name:
            session.link.close(
                CloseCode.PROTOCOL_ERROR,
                f"packet src {header.src!r} is not this session's name {session.name!r}",
            )
            return
        target = header.target
        self.packets_in += 1
        if target == _ENDING and header.dst != SERVICE_NAME:
            destination = self.endings.get(header.dst)
            if destination is None:
                self._unknown(session, header)
                return
            self._forward(session, destination, event)
        elif target == _GROUP:
            for member in self.groups.get(header.dst, ()):
                if member is not session:
                    self._forward(session, member, event)
        elif target == _ALL:
            for member in list(self.endings.values()):
                if member is not session:
                    self._forward(session, member, event)
        elif target in (_SERVICE, _ENDING):
            if header.flags & _REPLY:
                if not self._pending.resolve_reply(event):
                    log.debug("late reply to %d from %s", header.corr, header.src)
            else:
                session.dispatcher.queue.append(event)  # woken at the end of the read
        else:
            session.link.write(
                session.link.connection.error_frame(
                    header.id, ErrorCode.PROTOCOL, f"unknown target kind {target}"
                )
            )
            return
        if header.flags & _ACK:
            session.link.write(session.link.connection.ack_frame(header.id))

    def _unknown(self, session: Session, header: PacketHeader) -> None:
        self.stats["unknown_destination"] += 1
        if header.flags & _REPLY:
            return  # the requester left; nobody is waiting for this reply any more
        session.link.write(
            session.link.connection.error_frame(
                header.id,
                ErrorCode.UNKNOWN_DESTINATION,
                f"no ending named {header.dst!r} is connected",
            )
        )

    def _forward(self, source: Session, destination: Session, event: PacketReceived) -> None:
        link = destination.link
        data = event.data
        if type(data) is bytes:  # the exact frame: forward it untouched
            writable = link.write(data)
        else:
            writable = link.write(link.connection.send_packet(event.header, event.payload))
        self.packets_out += 1
        if not writable:
            self._hold(source.link, destination)

    def _hold(self, source: Link, destination: Session) -> None:
        """Stop reading from ``source`` until ``destination`` drains: TCP backpressure
        reaches the fast sender instead of the service buffering without bound."""
        if source in destination.held_sources:
            return
        destination.held_sources.add(source)
        source.pause_reading(destination)
        self.stats["backpressure_pauses"] += 1

        def release() -> None:
            for held in destination.held_sources:
                held.resume_reading(destination)
            destination.held_sources.clear()

        destination.link.on_writable(release)

    def _group_change(self, session: Session, event: GroupChange) -> None:
        problem = validate_name(event.group, "group name")
        link = session.link
        if problem is not None:
            link.write(link.connection.error_frame(event.id, ErrorCode.PROTOCOL, problem))
            return
        if event.join:
            session.groups.add(event.group)
            self.groups.setdefault(event.group, set()).add(session)
        else:
            session.groups.discard(event.group)
            self._remove_member(event.group, session)
        link.write(link.connection.ack_frame(event.id))

    def _leave_groups(self, session: Session) -> None:
        for group in session.groups:
            self._remove_member(group, session)

    def _remove_member(self, group: str, session: Session) -> None:
        members = self.groups.get(group)
        if members is not None:
            members.discard(session)
            if not members:
                del self.groups[group]

    # ------------------------------------------------- the service's own sends

    def _reply_sender(self, link: Link) -> ReplySender:
        def send_reply(
            request: PacketHeader, packet: Packet | None, error: ErrorBody | None
        ) -> None:
            header, body = self._reply(request, packet, error)
            link.write_packet(header, body)

        return send_reply

    def _transmit(
        self, header: PacketHeader, body: Packet | ErrorBody, ack: bool
    ) -> Awaitable[None] | None:
        target = header.target
        if target == _ENDING:
            session = self.endings.get(header.dst)
            if session is None:
                raise UnknownDestination(f"no ending named {header.dst!r} is connected")
            members: list[Session] = [session]
        elif target == _GROUP:
            members = list(self.groups.get(header.dst, ()))
        elif target == _ALL:
            members = list(self.endings.values())
        else:
            raise ValueError("the service cannot send packets to itself")
        payload = encode(body)  # once, however many members
        slow = []
        for member in members:
            link = member.link
            if not link.write(link.connection.send_packet(header, payload)):
                slow.append(link)
        return _drain_all(slow) if slow else None

    def group_members(self, group: str) -> list[str]:
        return sorted(session.name for session in self.groups.get(group, ()))


async def _drain_all(links: list[Link]) -> None:
    for link in links:
        await link.drain()


def _service_closed() -> ConnectionClosed:
    return ConnectionClosed("service closed", CloseCode.GOING_AWAY)
