"""Service: the hub. Accepts endings, routes their packets, answers its own handlers."""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Coroutine
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from ..codec import Packet, encode
from ..dispatch import HANDLERS, Dispatcher, ReplySender
from ..errors import (
    CloseCode,
    ConfigError,
    ConnectionClosed,
    ErrorCode,
    MailboxFull,
    PayloadTooLarge,
)
from ..grid.writebehind import FlushReport, Progress
from ..notices import Expired
from ..peer import Peer, ttl_ms
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
    check_name,
    packet_frame,
    validate_name,
)
from ..storage import EmbeddedStore
from ..transport import Link, server_ssl_context
from .admin import install_admin
from .auth import Gate, Permissions, Refused, common_name
from .config import LOOPBACK, ServiceConfig, exposure_problem, load
from .grid import OPS_TAG, OUTCOMES_TAG, ServiceGrid
from .mailboxes import Ending, Mailboxes
from .ratelimit import RateLimit
from .session import Session

if TYPE_CHECKING:
    from .metrics import MetricsServer

log = logging.getLogger("packetstack.service")

_REPLY = int(Flag.REPLY)
_ACK = int(Flag.ACK)
_RESENT = int(Flag.RESENT)
_ENDING = int(Target.ENDING)
_GROUP = int(Target.GROUP)
_ALL = int(Target.ALL)
_SERVICE = int(Target.SERVICE)
OTHER_TAG = "$other"  # packets_in_by_tag: every tag past the first MAX_TAGS


class Service(Peer):
    """The PacketStack service.

    ``async with Service(port=0) as service: print(service.port)``. A second connection
    under a name that is already connected *replaces* the first: the old session is closed
    with CloseCode.REPLACED (a restarted process takes over at once, without waiting for the
    old connection's heartbeat timeout). Packets for endings that are not connected wait in
    their mailboxes in the embedded store under ``data_dir`` (see service/mailboxes.py).
    """

    MAX_TAGS = 256  # distinct tags counted in packets_in_by_tag; the rest as OTHER_TAG

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
            ssl_context = server_ssl_context(
                cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca, cfg.tls_client_cert_required
            )
        self._ssl = ssl_context
        self._gate = Gate(cfg.tokens, cfg.principals)
        self._principal_sessions: Counter[str] = Counter()
        self.endings: dict[str, Session] = {}
        # Rare events by name (auth_failures, replaced, ...); hot counters are plain ints.
        self.stats: Counter[str] = Counter()
        store = EmbeddedStore(Path(cfg.data_dir) / "packetstack.db", cfg.store_synchronous)
        self.mailboxes = Mailboxes(store, cfg, self.stats, self._safe, self._lost)
        self.grid = ServiceGrid(self, store)
        self._now = time.time()  # wall clock of the read being routed (expiry times)
        self.boot = secrets.token_hex(8)  # this run of the process (WELCOME boot)
        self.packets_in = 0
        self.packets_out = 0
        self.packets_in_by_tag: dict[str, int] = {}
        self._links: set[Link] = set()
        self._sessions_by_link: dict[Link, Session] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self.port: int = cfg.port
        self._background: set[asyncio.Task[None]] = set()
        self.metrics: MetricsServer | None = None  # while serving /metrics (metrics_port)
        self.last_flush: FlushReport | None = None  # of close()
        install_admin(self)

    # ------------------------------------------------------------ lifecycle

    async def _enter(self) -> None:
        await self.start()

    async def start(self) -> None:
        cfg = self.config
        loopback = cfg.host in LOOPBACK
        exposure = exposure_problem(cfg.host, cfg.allow_open, not self._gate.open)
        if exposure is not None:
            raise ConfigError(exposure)
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        await self.mailboxes.open()
        try:
            await self.grid.open()
        except BaseException:
            await self.mailboxes.close()  # the store's thread with it
            raise
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
        if self._gate.open:
            (log.info if loopback else log.warning)(
                "open service: no tokens or principals configured, any ending that reaches "
                "%s may connect and do anything",
                cfg.host,
            )
        else:
            log.info("%d principals may connect", len(self._gate.principals))
        if self._ssl is None or self._ssl.verify_mode == ssl.CERT_NONE:
            for principal in self._gate.principals:
                if principal.certificate:
                    log.warning(
                        "principal %r: its certificate pattern can match nothing: the "
                        "service asks for no client certificates (set tls_client_ca)",
                        principal.name,
                    )
        if cfg.metrics_port:
            from .metrics import MetricsServer  # prometheus_client: imported only when on

            self.metrics = MetricsServer(self)
            await self.metrics.start(cfg.metrics_host, cfg.metrics_port)
            if cfg.metrics_host not in LOOPBACK and not cfg.metrics_token:
                log.warning(
                    "metrics on %s answer anyone who reaches them (ending and group names): "
                    "set metrics_token, or keep metrics_host on loopback",
                    cfg.metrics_host,
                )

    @property
    def url(self) -> str:
        scheme = "pss" if self._ssl is not None else "ps"
        return f"{scheme}://{self.config.host}:{self.port}"

    async def flush(
        self,
        map: str | None = None,
        *,
        retry_rejected: bool = False,
        progress: Progress | None = None,
    ) -> FlushReport:
        """Write every dirty entry of the bridged maps (or of ``map``) to their databases,
        while traffic goes on; entries set aside earlier are tried again only with
        ``retry_rejected``. ``progress(map, done, total)`` is called after each batch.
        Returns what was written, set aside and left dirty (a database that could not be
        reached after its retries leaves its entries dirty for the next flush)."""
        return await self.grid.bridges.flush(map, retry_rejected=retry_rejected, progress=progress)

    async def close(self) -> FlushReport | None:
        """Stop listening, say goodbye to every ending (GOING_AWAY) and wait for them; then
        flush the bridged maps (the report is returned and kept in ``last_flush``)."""
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None
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
        # In-flight packets go to the store before the grid's last flush, which may take a
        # while (a database that cannot be reached is retried): a kill meanwhile loses none.
        await self.mailboxes.save()
        try:
            self.last_flush = await self.grid.close()
        finally:
            await self.mailboxes.close()  # commits what save() queued, closes the store
        if self.config.unix_path is not None:
            # Python 3.11's loop leaves the socket file behind; the next start would reuse it
            # anyway, but a stale file misleads anyone looking.
            Path(self.config.unix_path).unlink(missing_ok=True)
        self._pending.fail_all(_service_closed())
        return self.last_flush

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
        if len(self._links) > cfg.max_connections:
            self.stats["connections_refused"] += 1
            link.close(
                CloseCode.TOO_MANY_CONNECTIONS,
                f"the service is at its limit of {cfg.max_connections} connections",
            )
            return
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
        self._now = time.time()
        for event in events:
            if type(event) is PacketReceived:
                self._route(session, event)
            elif type(event) is AckReceived:
                self.mailboxes.acked(session.ending, event.id)
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
            elif type(event) is ErrorReceived:
                log.warning("%r reported an error: %s", session.name, event.message)
        if len(dispatcher.queue) > queued:
            dispatcher.wake()  # once per read, not once per packet
        self.mailboxes.hold_if_behind(link)
        limit = session.rate_limit
        if limit is not None and limit.spend(link, len(events)):
            self.stats["rate_limited"] += 1

    def link_lost(self, link: Link, error: BaseException | None) -> None:
        self._links.discard(link)
        if link.close_code in (CloseCode.PROTOCOL_ERROR, CloseCode.FRAME_TOO_LARGE):
            self.stats["protocol_errors"] += 1
        session = self._sessions_by_link.pop(link, None)
        if session is None:
            return
        self._principal_sessions[session.principal.name] -= 1
        if self.endings.get(session.name) is session:
            del self.endings[session.name]
            self.mailboxes.detach(session.ending)
            self.grid.left(session)
        self._stop_dispatcher(session)
        log.info("ending %r left (%s)", session.name, link.close_reason or error or "closed")

    def _stop_dispatcher(self, session: Session) -> None:
        self.in_background(session.dispatcher.stop())

    def notify(self, name: str, packet: Packet, ttl: float | None = None) -> None:
        """Send the service's own ``packet`` to the ending ``name`` without waiting (into
        its mailbox when it is not connected, for ``ttl`` seconds or mailbox_ttl)."""
        header = self._addressed(name, packet, 0)
        if ttl is not None:
            header.ttl = ttl_ms(ttl)
        self._transmit(header, packet, False)

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task that close() waits for. The loop keeps only weak
        references to tasks: this holds it until it is done."""
        task = asyncio.get_running_loop().create_task(work)
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
        try:
            principal = self._gate.principal(hello.token, common_name(link.peercert))
        except Refused as refused:
            self.stats["auth_failures"] += 1
            log.warning("refused %r from %s: %s", hello.name, link.peer, refused)
            link.close(CloseCode.AUTH_FAILED, str(refused))
            return None
        problem = validate_name(hello.name)
        if problem is not None:
            link.close(CloseCode.BAD_NAME, problem)
            return None
        forbidden = None
        if not principal.allows("claim", hello.name):
            forbidden = f"principal {principal.name!r} may not connect as {hello.name!r}"
        holds_data = "holder" in hello.caps
        if forbidden is None and holds_data:
            forbidden = self.grid.holder_problem(principal)
        if forbidden is not None:
            self._denied(forbidden)
            link.close(CloseCode.FORBIDDEN, forbidden)
            return None
        previous = self.endings.get(hello.name)
        # A reconnect replaces its previous session: that one does not count against the limit.
        replaces = previous is not None and previous.principal is principal
        limit = principal.max_connections
        if limit and self._principal_sessions[principal.name] - replaces >= limit:
            self.stats["connections_refused"] += 1
            link.close(
                CloseCode.TOO_MANY_CONNECTIONS,
                f"principal {principal.name!r} is at its limit of {limit} connections",
            )
            return None
        if previous is not None:
            self.stats["replaced"] += 1
            log.info("ending %r reconnected; replacing its previous session", hello.name)
            self._principal_sessions[previous.principal.name] -= 1
            self._sessions_by_link.pop(previous.link, None)
            previous.link.close(CloseCode.REPLACED, "replaced by a newer connection")
            self._stop_dispatcher(previous)
            self.grid.left(previous)
        dispatcher = Dispatcher(
            self._handlers, self._reply_sender(link), partial(link.hold_reading, reason=HANDLERS)
        )
        ending = self.mailboxes.ending(hello.name)
        permissions = None if principal.unrestricted else Permissions(principal)
        session = Session(hello.name, link, dispatcher, ending, principal, permissions)
        if cfg.rate_limit:
            session.rate_limit = RateLimit(cfg.rate_limit, cfg.rate_burst)
        self._principal_sessions[principal.name] += 1
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
                    caps=["chunks", "mailboxes"],
                    epoch=self.mailboxes.epoch,
                    acked=ending.acked,
                    next=ending.next_seq,
                    partitions=cfg.grid_partitions,
                    boot=self.boot,
                    lazy=sorted(self.grid.lazy),
                )
            )
        )
        self.mailboxes.attach(ending, link)  # replays its mailbox first
        if holds_data:
            self.grid.joined(session)
        link.start_heartbeat(cfg.heartbeat, cfg.heartbeat_timeout)
        self.stats["connections"] += 1
        log.info("ending %r joined from %s", hello.name, link.peer)
        return session

    def _denied(self, why: str) -> None:
        self.stats["permission_denied"] += 1
        log.warning("permission denied: %s", why)

    def _permitted(self, session: Session, header: PacketHeader) -> bool:
        """Whether the session's principal may send this packet where it goes; if not,
        the sender is told (PERMISSION_DENIED) and nothing is delivered."""
        permissions = session.permissions
        assert permissions is not None
        target = header.target
        if target == _ENDING:
            allowed = header.dst == SERVICE_NAME or permissions.allows("send", header.dst)
            what = f"send to {header.dst!r}"
        elif target == _GROUP:
            allowed = permissions.allows("publish", header.dst)
            what = f"publish to {header.dst!r}"
        elif target == _ALL:
            allowed = permissions.principal.broadcast
            what = "broadcast"
        else:
            return True
        if allowed:
            return True
        self._refuse(
            session.link, header.id, f"principal {permissions.principal.name!r} may not {what}"
        )
        return False

    def _refuse(self, link: Link, ref: int, why: str) -> None:
        """Tell the sender of packet (or group change) ``ref`` that it was denied."""
        self._denied(why)
        link.write(link.connection.error_frame(ref, ErrorCode.PERMISSION_DENIED, why))

    # -------------------------------------------------------------- routing

    def _route(self, session: Session, event: PacketReceived) -> None:
        header = event.header
        if header.src != session.name:
            session.link.close(
                CloseCode.PROTOCOL_ERROR,
                f"packet src {header.src!r} is not this session's name {session.name!r}",
            )
            return
        self.packets_in += 1
        try:
            self.packets_in_by_tag[header.tag] += 1
        except KeyError:
            self._new_tag(header.tag)
        if (
            session.permissions is not None
            and not (header.flags & _REPLY and header.target == _ENDING)  # replies go back
            and not self._permitted(session, header)
        ):
            return
        source = session.ending
        flags = header.flags
        if flags & _RESENT and header.id <= source.last_id and header.tag != OPS_TAG:
            self._duplicate(session, header)
            return
        source.last_id = header.id
        target = header.target
        if target == _ENDING and header.dst != SERVICE_NAME:
            if flags & _REPLY:
                self._forward_reply(event)
                return
            ending = self.mailboxes.endings.get(header.dst) or self._new_ending(session, header)
            if ending is None:
                return
            self._deliver(session, ending, self._frame_of(event), header)
        elif target == _GROUP:
            frame = self._frame_of(event)
            mailboxes = self.mailboxes
            for name in mailboxes.groups.get(header.dst, ()):
                if name != session.name:
                    self._deliver(session, mailboxes.ending(name), frame, header)
        elif target == _ALL:
            frame = self._frame_of(event)
            for member in list(self.endings.values()):
                if member is not session:
                    self._deliver(session, member.ending, frame, header)
        elif target in (_SERVICE, _ENDING):
            tag = header.tag
            if flags & _REPLY:
                if tag == OUTCOMES_TAG:
                    self.grid.outcomes(session, event)
                elif not self._pending.resolve_reply(event):
                    log.debug("late reply to %d from %s", header.corr, header.src)
            elif tag == OPS_TAG:
                self.grid.request(session, event)
            else:
                session.dispatcher.queue.append(event)  # woken at the end of the read
            if flags & _ACK:
                _acknowledge(session.link, header.id)
            return
        else:
            session.link.write(
                session.link.connection.error_frame(
                    header.id, ErrorCode.PROTOCOL, f"unknown target kind {target}"
                )
            )
            return
        self._ack_if_settled(session, header)

    def _ack_if_settled(self, session: Session, header: PacketHeader) -> None:
        """ACK an acked packet that waits for no delivery or store: it had nobody to go to
        (an empty group), was refused (answered already), or is a resend of one done."""
        if header.flags & _ACK and not self.mailboxes.is_outstanding(header.src, header.id):
            _acknowledge(session.link, header.id)

    def _new_tag(self, tag: str) -> None:
        counts = self.packets_in_by_tag
        if len(counts) < self.MAX_TAGS:
            counts[tag] = 1
        else:
            counts[OTHER_TAG] = counts.get(OTHER_TAG, 0) + 1

    def _new_ending(self, session: Session, header: PacketHeader) -> Ending | None:
        """The first packet for a name: a mailbox for it, if an ending can have the name."""
        problem = validate_name(header.dst)
        if problem is None:
            return self.mailboxes.ending(header.dst)
        self.stats["unknown_destination"] += 1
        link = session.link
        link.write(link.connection.error_frame(header.id, ErrorCode.UNKNOWN_DESTINATION, problem))
        return None

    def _expires(self, header: PacketHeader, now: float) -> float:
        """When a packet sent at ``now`` leaves a mailbox: its own ttl or mailbox_ttl."""
        ttl = header.ttl
        return now + (ttl / 1000.0 if ttl else self.config.mailbox_ttl)

    @staticmethod
    def _frame_of(event: PacketReceived) -> bytes:
        data = event.data
        return data if type(data) is bytes else packet_frame(event.header, event.payload)

    def _deliver(
        self, session: Session, ending: Ending, frame: bytes, header: PacketHeader
    ) -> None:
        refusal = self.mailboxes.deliver(ending, frame, header, self._expires(header, self._now))
        if refusal:
            link = session.link
            link.write(link.connection.error_frame(header.id, ErrorCode.MAILBOX_FULL, refusal))
            return
        self.packets_out += 1
        if ending.congested is not None:
            self.mailboxes.hold_sender(ending, session.link)

    def _duplicate(self, session: Session, header: PacketHeader) -> None:
        """A packet the sender resent after a reconnect, which this service took already."""
        self.stats["duplicates_dropped"] += 1
        self._ack_if_settled(session, header)

    def _forward_reply(self, event: PacketReceived) -> None:
        """Replies go to the requester directly: it is waiting now or never."""
        requester = self.endings.get(event.header.dst)
        if requester is None:
            self.stats["replies_dropped"] += 1
            return
        link = requester.link
        data = event.data
        if type(data) is bytes:
            link.write(data)
        else:
            link.write(link.connection.send_packet(event.header, event.payload))
        self.packets_out += 1

    def _group_change(self, session: Session, event: GroupChange) -> None:
        problem = validate_name(event.group, "group name")
        link = session.link
        if problem is not None:
            link.write(link.connection.error_frame(event.id, ErrorCode.PROTOCOL, problem))
            return
        if event.join and not session.principal.allows("join", event.group):
            self._refuse(
                link, event.id, f"principal {session.principal.name!r} may not join {event.group!r}"
            )
            return
        change = self.mailboxes.join if event.join else self.mailboxes.leave
        change(session.ending, event.group, partial(self._group_changed, link, event.id))

    def _group_changed(self, link: Link, request_id: int, error: BaseException | None) -> None:
        if link.closed:
            return
        if error is None:
            _acknowledge(link, request_id)
        else:
            message = f"the group change was not stored: {error}"
            link.write(link.connection.error_frame(request_id, ErrorCode.INTERNAL, message))

    @property
    def groups(self) -> dict[str, set[str]]:
        """Group name -> names of its members, connected or not (membership persists)."""
        return self.mailboxes.groups

    # ------------------------------------------------ answers to senders

    def _safe(self, src: str, packet_id: int) -> None:
        """``src``'s packet ``packet_id`` is stored or handled everywhere it was going."""
        if src == SERVICE_NAME:
            self._pending.resolve(packet_id, None)
            return
        session = self.endings.get(src)
        if session is not None:
            _acknowledge(session.link, packet_id)

    def _lost(self, src: str, packet_id: int, destination: str, tag: str, reason: str) -> None:
        """Tell ``src`` its packet will never be delivered (it asked to know)."""
        if src == SERVICE_NAME:
            log.warning("the service's packet %d to %r was %s", packet_id, destination, reason)
            return
        notice = Expired(packet_id, destination, tag, reason)  # type: ignore[arg-type]
        header = PacketHeader(next(self._ids), _ENDING, src, SERVICE_NAME, Expired.packet_tag)
        frame = packet_frame(header, encode(notice))
        self.mailboxes.deliver(
            self.mailboxes.ending(src), frame, header, self._expires(header, time.time())
        )

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
        mailboxes = self.mailboxes
        if target == _ENDING:
            if header.dst not in mailboxes.endings:
                check_name(header.dst)
            endings = [mailboxes.ending(header.dst)]
        elif target == _GROUP:
            endings = [mailboxes.ending(name) for name in mailboxes.groups.get(header.dst, ())]
        elif target == _ALL:
            endings = [session.ending for session in self.endings.values()]
        else:
            raise ValueError("the service cannot send packets to itself")
        payload = encode(body)  # once, however many members
        if len(payload) > self.config.max_payload:
            raise PayloadTooLarge(
                f"payload of {len(payload)} bytes is over the maximum of {self.config.max_payload}"
            )
        frame = packet_frame(header, payload)
        expires = self._expires(header, time.time())
        waiter = (
            self._pending.expect(header.id, self.request_timeout, "acknowledgement")
            if ack
            else None
        )
        refusals = []
        for ending in endings:
            refusal = mailboxes.deliver(ending, frame, header, expires)
            if refusal:
                refusals.append(refusal)
        if refusals and target == _ENDING:
            self._pending.forget(header.id)
            raise MailboxFull(refusals[0])
        for refusal in refusals:
            log.warning("the service's packet to group %r: %s", header.dst, refusal)
        if waiter is not None and not mailboxes.is_outstanding(SERVICE_NAME, header.id):
            self._pending.resolve(header.id, None)
        return waiter

    def snapshot(self) -> dict[str, Any]:
        """Everything an operator looks at, as plain data: what ``packetstack status`` shows
        and the metrics endpoint exports."""
        mailboxes = self.mailboxes
        endings = []
        for name, ending in sorted(mailboxes.endings.items()):
            session = self.endings.get(name)
            endings.append(
                {
                    "name": name,
                    "connected": session is not None,
                    "principal": session.principal.name if session is not None else None,
                    "peer": session.link.peer if session is not None else None,
                    "stored": ending.stored,
                    "stored_bytes": ending.stored_bytes,
                    "in_flight": len(ending.inflight),
                    "depth": mailboxes.depth(name),
                    "acked": ending.acked,
                    "groups": sorted(ending.groups),
                }
            )
        return {
            "url": self.url,
            "connections": len(self._links),
            "endings": endings,
            "groups": {group: sorted(names) for group, names in sorted(mailboxes.groups.items())},
            "packets_in": self.packets_in,
            "packets_out": self.packets_out,
            "packets_in_by_tag": dict(self.packets_in_by_tag),
            "stats": dict(self.stats),
            "grid": self.grid.coordinator.snapshot(),
            "bridges": self.grid.bridges.snapshot(),
            "store": {
                "path": str(mailboxes.store.path),
                "commits": mailboxes.store.commits,
                "writes": mailboxes.store.writes,
                "unsaved_rows": mailboxes.unsaved,
            },
        }

    def mailbox_depth(self, name: str) -> int:
        """Packets waiting for the ending ``name``, stored or sent and not yet handled."""
        return self.mailboxes.depth(name)

    def group_members(self, group: str) -> list[str]:
        return sorted(self.mailboxes.groups.get(group, ()))


def _service_closed() -> ConnectionClosed:
    return ConnectionClosed("service closed", CloseCode.GOING_AWAY)


def _acknowledge(link: Link, packet_id: int) -> None:
    link.write(link.connection.ack_frame(packet_id))
