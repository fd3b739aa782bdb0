"""Principals and their ACLs: every kind of action allowed and denied, denials that leave
nothing partial, tokens kept out of logs, connection limits (per principal and service-wide),
the open-service guard, principals from a TOML file, and the per-connection rate limit."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest
from conftest import ServiceFactory
from support import (
    RawPeer,
    TcpProxy,
    close_raw,
    closed_by_service,
    eventually,
    open_raw,
    raw_handshake,
    send_acked,
    wait_until,
)

from packetstack import (
    AuthenticationFailed,
    Client,
    ConfigError,
    Context,
    HandshakeRefused,
    Packet,
    Service,
)
from packetstack.errors import CloseCode, PermissionDenied
from packetstack.protocol import Connection, Flag, PacketHeader, Role, Target
from packetstack.service.auth import Principal
from packetstack.service.config import load

pytestmark = pytest.mark.timeout(60)

WAIT = 5.0
# Distinctive, so a leak into any log line is unmistakable.
BOSS_TOKEN = "tok-boss-5f0c1e9a"
WORKER_TOKEN = "tok-worker-7d2b44c3"
SOLO_TOKEN = "tok-solo-91aa03be"
TOKENS = (BOSS_TOKEN, WORKER_TOKEN, SOLO_TOKEN)

PRINCIPALS = [
    # The boss may command workers, publish jobs, join "control" and broadcast.
    Principal(
        name="boss",
        token=BOSS_TOKEN,
        endings=["boss"],
        send=["worker-*"],
        publish=["jobs"],
        join=["control"],
    ),
    # Workers may talk among themselves and join "jobs"; they may not send to the boss,
    # publish jobs, join "control" or broadcast. They may still answer the boss's requests.
    Principal(
        name="worker",
        token=WORKER_TOKEN,
        endings=["worker-*"],
        send=["worker-*"],
        publish=["results"],
        join=["jobs"],
        broadcast=False,
    ),
    Principal(name="solo", token=SOLO_TOKEN, endings=["solo-*"], max_connections=1),
]


class AclMsg(Packet):
    packet_tag: ClassVar[str] = "tests.service.acl.Msg"
    n: int


class AclAsk(Packet):
    packet_tag: ClassVar[str] = "tests.service.acl.Ask"
    n: int


class AclAnswer(Packet):
    packet_tag: ClassVar[str] = "tests.service.acl.Answer"
    n: int
    by: str


# ------------------------------------------------------------------ fixtures


@pytest.fixture
async def acl(make_service: ServiceFactory) -> Service:
    return await make_service(principals=PRINCIPALS)


Got = dict[str, list[AclMsg]]
Connect = Callable[..., Awaitable[Client]]


@pytest.fixture
def got() -> Got:
    """AclMsg packets each ending handled, by ending name."""
    return {}


@pytest.fixture
async def connect(acl: Service, got: Got) -> AsyncIterator[Connect]:
    """``await connect(name, token, **options)``: a connected client of ``acl`` that
    records the AclMsg packets it handles in ``got[name]`` and answers AclAsk; closed
    after the test."""
    clients: list[Client] = []

    async def make(name: str, token: str, **options: Any) -> Client:
        client = Client(name, acl.url, token=token, **options)
        clients.append(client)
        got.setdefault(name, [])

        @client.on(AclMsg)
        async def on_msg(packet: AclMsg, ctx: Context) -> None:
            got[name].append(packet)

        @client.on(AclAsk)
        async def on_ask(packet: AclAsk, ctx: Context) -> AclAnswer:
            return AclAnswer(packet.n, name)

        await client.connect()
        return client

    yield make
    for client in clients:
        await client.close()


async def denials(service: Service, count: int) -> None:
    """Until the service has counted ``count`` permission denials."""
    await wait_until(lambda: service.stats["permission_denied"] >= count, WAIT, f"{count} denials")
    assert service.stats["permission_denied"] == count


# --------------------------------------------------------------- claim names


@pytest.mark.parametrize(
    ("token", "name"),
    [(WORKER_TOKEN, "worker-1"), (WORKER_TOKEN, "worker-abc"), (BOSS_TOKEN, "boss")],
)
async def test_a_principal_claims_a_name_its_patterns_match(
    acl: Service, connect: Connect, token: str, name: str
) -> None:
    client = await connect(name, token)
    assert client.connected
    assert acl.endings[name].principal.name == ("boss" if token == BOSS_TOKEN else "worker")
    assert acl.stats["permission_denied"] == 0


@pytest.mark.parametrize(
    ("token", "name"),
    [
        (WORKER_TOKEN, "boss"),
        (WORKER_TOKEN, "worker"),  # the pattern is worker-*, not worker*
        (WORKER_TOKEN, "Worker-1"),  # patterns are case-sensitive
        (BOSS_TOKEN, "worker-1"),
    ],
)
async def test_claiming_a_name_outside_the_patterns_raises_permission_denied_once(
    acl: Service, token: str, name: str
) -> None:
    client = Client(name, acl.url, token=token, backoff_initial=0.01, backoff_max=0.05)
    started = time.monotonic()
    with pytest.raises(PermissionDenied) as caught:
        await client.connect()
    assert time.monotonic() - started < 1.0  # refused on the first attempt
    assert name in str(caught.value)
    assert not client.connected
    assert name not in acl.endings
    await asyncio.sleep(0.5)  # a reconnect loop would have tried again by now
    assert acl.stats["permission_denied"] == 1
    assert acl.stats["connections"] == 0
    await client.close()


# --------------------------------------------------------------------- sends


async def test_send_to_an_allowed_ending_is_delivered(
    acl: Service, connect: Connect, got: Got
) -> None:
    boss = await connect("boss", BOSS_TOKEN)
    await connect("worker-1", WORKER_TOKEN)
    worker2 = await connect("worker-2", WORKER_TOKEN)
    await boss.send("worker-1", AclMsg(1), ack=True)
    await worker2.send("worker-1", AclMsg(2), ack=True)
    await boss.send("worker-9", AclMsg(3), ack=True)  # offline: waits in its mailbox
    await eventually(lambda: len(got["worker-1"]) == 2, WAIT)
    assert got["worker-1"] == [AclMsg(1), AclMsg(2)]
    assert acl.mailbox_depth("worker-9") == 1
    assert acl.stats["permission_denied"] == 0


async def test_send_with_ack_to_a_forbidden_ending_raises_permission_denied(
    acl: Service, connect: Connect, got: Got
) -> None:
    await connect("boss", BOSS_TOKEN)
    worker = await connect("worker-1", WORKER_TOKEN)
    with pytest.raises(PermissionDenied) as caught:
        await worker.send("boss", AclMsg(1), ack=True)
    assert "boss" in str(caught.value)
    with pytest.raises(PermissionDenied):
        await worker.send("archive", AclMsg(2), ack=True)  # offline, never seen
    await denials(acl, 2)
    await asyncio.sleep(0.2)
    assert got["boss"] == []
    assert acl.mailbox_depth("boss") == 0
    assert acl.mailbox_depth("archive") == 0
    assert worker.connected  # a denial is an answer, not a disconnect


async def test_a_plain_send_to_a_forbidden_ending_is_dropped_and_counted(
    acl: Service, connect: Connect, got: Got
) -> None:
    await connect("boss", BOSS_TOKEN)
    worker = await connect("worker-1", WORKER_TOKEN)
    await connect("worker-2", WORKER_TOKEN)
    for n in range(5):
        await worker.send("boss", AclMsg(n))
        await worker.send("archive", AclMsg(n))
    await denials(acl, 10)
    # An allowed packet sent after them arrives: the denied ones went nowhere before it.
    await worker.send("worker-2", AclMsg(99), ack=True)
    await eventually(lambda: got["worker-2"] == [AclMsg(99)], WAIT)
    await asyncio.sleep(0.1)
    assert got["boss"] == []
    assert acl.mailbox_depth("boss") == 0
    assert acl.mailbox_depth("archive") == 0
    assert "archive" not in acl.snapshot()["groups"]
    assert acl.stats["permission_denied"] == 10
    assert worker.connected


# ------------------------------------------------------------------ requests


async def test_request_to_a_forbidden_ending_raises_permission_denied_at_once(
    acl: Service, connect: Connect
) -> None:
    await connect("boss", BOSS_TOKEN)
    worker = await connect("worker-1", WORKER_TOKEN)
    started = time.monotonic()
    with pytest.raises(PermissionDenied):
        await worker.request("boss", AclAsk(1), timeout=WAIT)
    assert time.monotonic() - started < 1.0  # the denial, not a timeout
    await denials(acl, 1)
    assert acl.mailbox_depth("boss") == 0


async def test_replies_reach_a_requester_the_replier_may_not_send_to(
    acl: Service, connect: Connect
) -> None:
    boss = await connect("boss", BOSS_TOKEN)
    await connect("worker-1", WORKER_TOKEN)
    replies = await asyncio.gather(
        *(boss.request("worker-1", AclAsk(n), timeout=WAIT) for n in range(20))
    )
    assert replies == [AclAnswer(n, "worker-1") for n in range(20)]
    assert acl.stats["permission_denied"] == 0


async def test_requests_to_the_service_are_always_allowed(acl: Service, connect: Connect) -> None:
    @acl.on(AclAsk)
    async def ask(packet: AclAsk, ctx: Context) -> AclAnswer:
        return AclAnswer(packet.n, "service")

    worker = await connect("worker-1", WORKER_TOKEN)
    assert await worker.request("service", AclAsk(7), timeout=WAIT) == AclAnswer(7, "service")
    assert acl.stats["permission_denied"] == 0


# ------------------------------------------------------- groups and broadcast


async def test_publish_to_an_allowed_group_reaches_every_member(
    acl: Service, connect: Connect, got: Got
) -> None:
    boss = await connect("boss", BOSS_TOKEN)
    w1 = await connect("worker-1", WORKER_TOKEN)
    w2 = await connect("worker-2", WORKER_TOKEN)
    await w1.join("jobs")
    await w2.join("jobs")
    await boss.publish("jobs", AclMsg(1), ack=True)
    await eventually(lambda: got["worker-1"] == got["worker-2"] == [AclMsg(1)], WAIT)
    assert acl.stats["permission_denied"] == 0


async def test_a_denied_publish_delivers_to_no_member(
    acl: Service, connect: Connect, got: Got
) -> None:
    w1 = await connect("worker-1", WORKER_TOKEN)
    w2 = await connect("worker-2", WORKER_TOKEN)
    w3 = await connect("worker-3", WORKER_TOKEN)
    for member in (w1, w2, w3):
        await member.join("jobs")
    await w3.close()  # an offline member: its mailbox would keep a delivery
    with pytest.raises(PermissionDenied):
        await w2.publish("jobs", AclMsg(1), ack=True)
    await w2.publish("jobs", AclMsg(2))
    await denials(acl, 2)
    await w2.send("worker-1", AclMsg(99), ack=True)  # ordered after the denied ones
    await eventually(lambda: got["worker-1"] == [AclMsg(99)], WAIT)
    assert got["worker-3"] == []
    assert acl.mailbox_depth("worker-3") == 0
    assert acl.mailbox_depth("worker-1") == 0


async def test_joining_a_forbidden_group_raises_and_joins_nothing(
    acl: Service, connect: Connect, got: Got
) -> None:
    boss = await connect("boss", BOSS_TOKEN)
    worker = await connect("worker-1", WORKER_TOKEN)
    await boss.join("control")  # allowed for the boss
    with pytest.raises(PermissionDenied) as caught:
        await worker.join("control")
    assert "control" in str(caught.value)
    await denials(acl, 1)
    assert acl.group_members("control") == ["boss"]
    await worker.join("jobs")  # allowed
    assert acl.group_members("jobs") == ["worker-1"]
    await worker.leave("jobs")  # leaving is always allowed
    assert acl.group_members("jobs") == []
    assert worker.connected


async def test_broadcast_allowed_and_denied(acl: Service, connect: Connect, got: Got) -> None:
    boss = await connect("boss", BOSS_TOKEN)
    w1 = await connect("worker-1", WORKER_TOKEN)
    await connect("worker-2", WORKER_TOKEN)
    await boss.broadcast(AclMsg(1), ack=True)
    await eventually(lambda: got["worker-1"] == got["worker-2"] == [AclMsg(1)], WAIT)

    with pytest.raises(PermissionDenied):
        await w1.broadcast(AclMsg(2), ack=True)
    await w1.broadcast(AclMsg(3))
    await denials(acl, 2)
    await w1.send("worker-2", AclMsg(99), ack=True)
    await eventually(lambda: got["worker-2"] == [AclMsg(1), AclMsg(99)], WAIT)
    assert got["boss"] == []
    assert got["worker-1"] == [AclMsg(1)]
    assert acl.mailbox_depth("boss") == 0


@pytest.mark.parametrize(
    ("target", "dst"), [(Target.GROUP, "control"), (Target.ALL, "*")], ids=["group", "all"]
)
async def test_a_packet_flagged_reply_to_a_group_or_everyone_is_still_checked(
    acl: Service, connect: Connect, got: Got, target: Target, dst: str
) -> None:
    """Only a reply to one ending is exempt from the ACL (the requester asked for it); the
    REPLY flag on a group or broadcast packet must not let a worker publish where it may
    not, nor fill the mailboxes of offline members. (A forged "reply" is never handled
    by a client: it is left in flight, so the mailbox depth shows it was delivered.)"""
    boss = await connect("boss", BOSS_TOKEN)
    if target == Target.GROUP:
        await boss.join("control")
        await boss.close()  # offline: anything delivered waits in its mailbox
    peer: RawPeer = await open_raw(acl.port)
    try:
        await raw_handshake(peer, "worker-1", WORKER_TOKEN)
        forged = PacketHeader(1, int(target), dst, "worker-1", AclMsg.packet_tag, int(Flag.REPLY))
        peer.send(Connection(Role.CLIENT).send_packet(forged, msgspec.msgpack.encode(AclMsg(1))))
        await asyncio.sleep(0.3)
    finally:
        close_raw(peer)
    assert acl.stats["permission_denied"] == 1
    assert acl.mailbox_depth("boss") == 0
    assert got["boss"] == []


# ----------------------------------------------------------- tokens and logs


async def test_a_wrong_token_is_refused_with_authentication_failed(acl: Service) -> None:
    for token in ("nope", None, WORKER_TOKEN + "x", BOSS_TOKEN[:-1]):
        client = Client("worker-1", acl.url, token=token)
        with pytest.raises(AuthenticationFailed) as caught:
            await client.connect()
        assert caught.value.code == CloseCode.AUTH_FAILED
        await client.close()
    assert acl.stats["auth_failures"] == 4
    assert acl.endings == {}


async def test_tokens_never_appear_in_logs(
    make_service: ServiceFactory, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    operator = "tok-operator-c0ffee42"
    service = await make_service(principals=PRINCIPALS, tokens=[operator])
    clients = [
        Client("boss", service.url, token=BOSS_TOKEN),
        Client("worker-1", service.url, token=WORKER_TOKEN),
        Client("operator", service.url, token=operator),
    ]
    boss, worker, _ = clients

    @worker.on(AclAsk)
    async def on_ask(packet: AclAsk, ctx: Context) -> AclAnswer:
        return AclAnswer(packet.n, "worker-1")

    try:
        for client in clients:
            await client.connect()
        assert await boss.request("worker-1", AclAsk(1), timeout=WAIT) == AclAnswer(1, "worker-1")
        with pytest.raises(PermissionDenied):
            await worker.send("boss", AclMsg(1), ack=True)
        await worker.send("boss", AclMsg(2))
        with pytest.raises(PermissionDenied):
            await worker.join("control")
        with pytest.raises(PermissionDenied):
            await Client("boss", service.url, token=WORKER_TOKEN).connect()
        for wrong in (WORKER_TOKEN[:-2], "wrong", BOSS_TOKEN.upper()):
            with pytest.raises(AuthenticationFailed):
                await Client("worker-2", service.url, token=wrong).connect()
        await denials(service, 4)
    finally:
        for client in clients:
            await client.close()
    await service.close()

    texts = [record.getMessage() for record in caplog.records]
    texts += [caplog.text, repr(PRINCIPALS), str(service.snapshot())]
    assert len(caplog.records) > 10  # the session did log: the check below means something
    for secret in (*TOKENS, operator):
        leaks = [text for text in texts if secret in text]
        assert not leaks, f"token {secret!r} leaked: {leaks[:3]}"
        # Not even a recognisable part of it (e.g. a wrong token that differs by one char).
        assert not any(secret[:-2] in text for text in texts)


# --------------------------------------------------------- connection limits


async def test_a_principal_over_its_connection_limit_is_refused_then_admitted(
    acl: Service,
) -> None:
    first = Client("solo-1", acl.url, token=SOLO_TOKEN)
    second = Client("solo-2", acl.url, token=SOLO_TOKEN)
    try:
        await first.connect()
        with pytest.raises(HandshakeRefused) as caught:
            await second.connect()
        assert caught.value.code == CloseCode.TOO_MANY_CONNECTIONS
        assert not isinstance(caught.value, AuthenticationFailed)
        assert "solo" in str(caught.value)
        assert acl.stats["connections_refused"] == 1
        assert sorted(acl.endings) == ["solo-1"]
        # Other principals are not limited by solo's limit.
        async with Client("worker-1", acl.url, token=WORKER_TOKEN) as other:
            assert other.connected
        await first.close()
        await eventually(lambda: "solo-1" not in acl.endings, WAIT)
        await second.connect()
        assert second.connected
    finally:
        await first.close()
        await second.close()


async def test_a_reconnect_under_the_same_name_replaces_even_at_the_principal_limit(
    acl: Service,
) -> None:
    """A restarted process takes over its name at once, before the service noticed the
    old connection is dead: the old session is replaced, not counted against the limit."""
    stale: RawPeer = await open_raw(acl.port)  # a connection the service still believes alive
    try:
        await raw_handshake(stale, "solo-1", SOLO_TOKEN)
        async with Client("solo-1", acl.url, token=SOLO_TOKEN) as restarted:
            assert restarted.connected
            assert await closed_by_service(stale, WAIT) == [CloseCode.REPLACED]
        assert acl.stats["connections_refused"] == 0
    finally:
        close_raw(stale)


class GatedProxy(TcpProxy):
    """A TcpProxy that, while ``refusing``, drops new connections at once."""

    refusing = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        await super()._accept(reader, writer)


async def test_too_many_connections_is_not_final_the_client_keeps_retrying(
    acl: Service, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="packetstack.client")
    proxy = GatedProxy(acl.port)
    await proxy.start()
    retrier = Client("solo-1", proxy.url, token=SOLO_TOKEN, backoff_initial=0.02, backoff_max=0.1)
    holder = Client("solo-2", acl.url, token=SOLO_TOKEN)
    try:
        await retrier.connect()
        proxy.refusing = True
        proxy.cut()  # the retrier loses its connection and starts reconnecting
        await eventually(lambda: "solo-1" not in acl.endings, WAIT)
        await holder.connect()  # takes the principal's only slot meanwhile
        proxy.refusing = False
        await wait_until(
            lambda: acl.stats["connections_refused"] >= 2, WAIT, "refused reconnect attempts"
        )
        assert not retrier.connected
        await holder.close()
        await retrier.wait_connected(WAIT)
        assert "solo-1" in acl.endings
        assert "refused" in caplog.text and "cannot reconnect" not in caplog.text
    finally:
        await retrier.close()
        await holder.close()
        await proxy.close()


async def test_the_service_wide_connection_limit(make_service: ServiceFactory) -> None:
    service = await make_service(principals=PRINCIPALS, max_connections=2)
    a = Client("worker-1", service.url, token=WORKER_TOKEN)
    b = Client("boss", service.url, token=BOSS_TOKEN)
    c = Client("worker-3", service.url, token=WORKER_TOKEN)
    try:
        await a.connect()
        await b.connect()
        with pytest.raises(HandshakeRefused) as caught:
            await c.connect()
        assert caught.value.code == CloseCode.TOO_MANY_CONNECTIONS
        assert service.stats["connections_refused"] == 1
        # A bare TCP connection counts too: it is refused before it says anything.
        peer: RawPeer = await open_raw(service.port)
        try:
            assert await closed_by_service(peer, WAIT) == [CloseCode.TOO_MANY_CONNECTIONS]
        finally:
            close_raw(peer)
        assert a.connected and b.connected
        await a.close()
        await eventually(lambda: service.snapshot()["connections"] == 1, WAIT)
        await c.connect()
        assert c.connected
    finally:
        for client in (a, b, c):
            await client.close()


# --------------------------------------------------------- open and config


async def test_an_open_service_beyond_loopback_refuses_to_start(tmp_path: Path) -> None:
    service = Service("0.0.0.0", 0, data_dir=tmp_path / "data")
    with pytest.raises(ConfigError) as caught:
        await service.start()
    assert "allow_open" in str(caught.value)
    assert service.port == 0  # never listened: the port is only learnt from the socket
    assert not (tmp_path / "data").exists()
    await service.close()


@pytest.mark.parametrize(
    "settings", [{"allow_open": True}, {"tokens": ["t0k-x"]}, {"principals": PRINCIPALS}]
)
async def test_beyond_loopback_starts_when_open_is_allowed_or_tokens_are_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, settings: dict[str, Any]
) -> None:
    caplog.set_level(logging.INFO, logger="packetstack.service")
    service = Service("0.0.0.0", 0, data_dir=tmp_path / "data", **settings)
    await service.start()
    try:
        assert service.port != 0
        open_warnings = [
            r for r in caplog.records if "open service" in r.getMessage() and r.levelno >= 30
        ]
        assert bool(open_warnings) == ("allow_open" in settings)
    finally:
        await service.close()


async def test_an_open_loopback_service_says_so_at_start(
    make_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="packetstack.service")
    await make_service()
    assert any("open service" in r.getMessage() for r in caplog.records)


CONFIG_TOML = f"""
[service]
port = 0
max_connections = 50

[[service.principals]]
name = "boss"
token = "{BOSS_TOKEN}"
endings = ["boss"]
send = ["worker-*"]
publish = ["jobs"]
join = ["control"]

[[service.principals]]
name = "worker"
token = "{WORKER_TOKEN}"
endings = ["worker-*"]
send = ["worker-*"]
publish = []
join = ["jobs"]
broadcast = false
max_connections = 3
"""


async def test_principals_load_from_a_toml_file_and_are_enforced(tmp_path: Path) -> None:
    path = tmp_path / "packetstack.toml"
    path.write_text(CONFIG_TOML)
    config = load(path, overrides={"data_dir": str(tmp_path / "data")}, environ={})
    boss, worker = config.principals
    assert (boss.name, worker.name) == ("boss", "worker")
    assert worker.max_connections == 3 and not worker.broadcast and worker.publish == []
    assert boss.read == ["*"] and not boss.admin  # unset fields keep their defaults
    assert worker.allows("claim", "worker-7") and not worker.allows("claim", "boss")
    assert config.max_connections == 50

    async with Service(config=config) as service:
        async with Client("worker-1", service.url, token=WORKER_TOKEN) as client:
            with pytest.raises(PermissionDenied):
                await client.publish("jobs", AclMsg(1), ack=True)
            with pytest.raises(PermissionDenied):
                await Client("boss", service.url, token=WORKER_TOKEN).connect()
        assert service.stats["permission_denied"] == 2


def test_a_principal_with_an_unknown_field_in_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[service.principals]]\nname = "p"\ntoken = "t"\nsned = ["x"]\n')
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    assert "sned" in str(caught.value)


# ------------------------------------------------------------------ rate limit


RATE = 2000


async def test_a_rate_limited_sender_is_slowed_to_about_the_rate_and_loses_nothing(
    make_service: ServiceFactory,
) -> None:
    """The sender keeps 100 acknowledged sends in flight at all times (as fast as the
    service lets it); the service reads its connection at about ``rate_limit`` frames a
    second after the first second's burst, and loses or refuses nothing."""
    service = await make_service(rate_limit=RATE)
    total = 3 * RATE
    received: list[tuple[float, int]] = []
    sink = Client("sink", service.url)

    @sink.on(AclMsg)
    async def on_msg(packet: AclMsg, ctx: Context) -> None:
        received.append((time.monotonic(), packet.n))

    source = Client("source", service.url)
    try:
        await sink.connect()
        await source.connect()
        await asyncio.wait_for(send_acked(source, "sink", AclMsg, range(total), window=100), 20)
        await wait_until(lambda: len(received) >= total, 5, "every packet")
        # The first second's worth passes as a burst; measure the steady part after it.
        start, end = received[RATE][0], received[total - 1][0]
        rate = (total - 1 - RATE) / (end - start)
        assert 0.5 * RATE < rate < 1.5 * RATE, f"{rate:.0f} packets/s"
        assert [n for _, n in received] == list(range(total))
        assert service.stats["rate_limited"] > 0
        assert source.connected and sink.connected
    finally:
        await source.close()
        await sink.close()
