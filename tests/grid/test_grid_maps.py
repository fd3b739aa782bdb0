"""The typed map API, end to end through a real service: every operation, with the
service as the owner and with a holding client as the owner, and the service's own API."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from typing import Any

import msgspec
import pytest
from support import eventually

from packetstack import (
    Client,
    ConfigError,
    GridError,
    PayloadTooLarge,
    PermissionDenied,
    Principal,
    Service,
)
from packetstack.codec import encode
from packetstack.grid import EntryEvent
from packetstack.grid.messages import GridEvent, GridOps
from packetstack.grid.ops import Op


class Player(msgspec.Struct):
    name: str
    score: int


async def owners_settled(service: Service, holders: int) -> None:
    """Until the partitions sit with ``holders`` holders (0: with the service)."""

    def settled() -> bool:
        grid = service.grid.coordinator.snapshot()
        owned = [h["owned"] for h in grid["holders"]]  # type: ignore[index]
        if holders == 0:
            return grid["service_owned"] == 271
        return len(owned) == holders and sum(owned) == 271 and grid["paused"] == 0

    await eventually(settled, timeout=10)


@pytest.fixture(params=["service-owned", "holder-owned"])
async def user(request: pytest.FixtureRequest, service: Service, make_client: Any) -> Client:
    """A non-holding client; the partitions are with the service or with a holder."""
    if request.param == "holder-owned":
        await make_client("holder", holds_data=True)
        await owners_settled(service, 1)
    return await make_client("user")  # type: ignore[no-any-return]


async def test_put_get_delete(user: Client) -> None:
    players = user.grid.map("players", Player)
    assert await players.get("ann") is None
    await players.put("ann", Player("ann", 3))
    assert await players.get("ann") == Player("ann", 3)
    assert await players.contains("ann")
    assert await players.delete("ann") is True
    assert await players.delete("ann") is False
    assert await players.get("ann") is None
    assert not await players.contains("ann")


async def test_conditional_writes(user: Client) -> None:
    m = user.grid.map("cond", str)
    assert await m.put_if_absent("k", "a") is True
    assert await m.put_if_absent("k", "b") is False
    assert await m.get("k") == "a"
    assert await m.replace("k", "c") is True
    assert await m.replace("missing", "x") is False
    assert await m.get("missing") is None
    assert await m.compare_and_set("k", "wrong", "d") is False
    assert await m.compare_and_set("k", "c", "d") is True
    assert await m.get("k") == "d"
    assert await m.compare_and_set("new", None, "n") is True  # expected None: absent
    assert await m.compare_and_set("new", "n", None) is True  # value None: delete
    assert await m.get("new") is None


async def test_increment_is_atomic(user: Client, make_client: Any) -> None:
    other = await make_client("other")
    counters = [user.grid.map("hits", int), other.grid.map("hits", int)]
    await asyncio.gather(*(counters[i % 2].increment("x") for i in range(200)))
    assert await counters[0].get("x") == 200
    assert await counters[1].increment("x", -50) == 150
    text = user.grid.map("hits-text", str)
    await text.put("t", "not a number")
    with pytest.raises(GridError, match="integer"):
        await user.grid.map("hits-text", int).increment("t")
    assert await text.get("t") == "not a number"


async def test_bulk_size_items_clear(user: Client) -> None:
    m = user.grid.map("bulk", int, int)
    await m.put_all({i: i * i for i in range(5000)})
    assert await m.size() == 5000
    got = await m.get_all(range(-10, 5010))
    assert got == {i: i * i for i in range(5000)}
    items = {k: v async for k, v in m.items()}
    assert items == {i: i * i for i in range(5000)}
    keys = [k async for k in m.keys()]  # noqa: SIM118 (an async iterator, not a dict)
    assert sorted(keys) == list(range(5000))
    await m.clear()
    assert await m.size() == 0
    assert await m.get(7) is None


async def test_key_types(user: Client) -> None:
    m = user.grid.map("keys", str)
    uid = uuid.uuid4()
    keys: list[Any] = ["s", 5, b"\x00b", uid, ("t", 1, (b"x", "y"))]
    for index, key in enumerate(keys):
        await m.put(key, str(index))
    for index, key in enumerate(keys):
        assert await m.get(key) == str(index)
    typed = user.grid.map("uuids", int, uuid.UUID)
    await typed.put(uid, 1)
    uuid_keys = [k async for k in typed.keys()]  # noqa: SIM118
    assert uuid_keys == [uid]
    for bad in (1.5, None, ["list"], True):
        with pytest.raises(TypeError, match="grid key"):
            await m.put(bad, "x")
    with pytest.raises(TypeError, match="holds str values"):
        await m.put("k", 7)  # type: ignore[arg-type]


async def test_ttl_expires_entries_and_tells_listeners(user: Client) -> None:
    m = user.grid.map("ttl", int)
    events: list[EntryEvent[Any, Any]] = []
    await m.listen(events.append)
    await m.put("short", 1, ttl=1.0)
    await m.put("long", 2)
    assert await m.get("short") == 1
    await asyncio.sleep(1.2)
    assert await m.get("short") is None
    assert await m.size() == 1
    await eventually(lambda: [e.kind for e in events] == ["added", "added", "expired"])
    assert events[-1].key == "short" and events[-1].value is None
    with pytest.raises(ValueError, match="ttl"):
        await m.put("bad", 1, ttl=0)


async def test_listeners_get_every_change_in_order(user: Client, make_client: Any) -> None:
    writer = await make_client("writer")
    seen: list[tuple[str, str, int | None]] = []

    async def listener(event: EntryEvent[str, int]) -> None:
        seen.append((event.kind, event.key, event.value))

    m = user.grid.map("watched", int, str)
    await m.listen(listener)
    w = writer.grid.map("watched", int, str)
    await w.put("a", 1)
    await w.put("a", 2)
    await w.increment("a", 3)
    await w.delete("a")
    await w.put_if_absent("a", 9)
    expected = [
        ("added", "a", 1),
        ("updated", "a", 2),
        ("updated", "a", 5),
        ("removed", "a", None),
        ("added", "a", 9),
    ]
    await eventually(lambda: seen == expected)
    await m.unlisten(listener)
    await w.put("b", 1)
    await asyncio.sleep(0.2)
    assert seen == expected


async def test_near_cache_is_invalidated_by_other_writers(user: Client, make_client: Any) -> None:
    writer = await make_client("writer")
    cached = user.grid.map("near", int, near_cache=True)
    w = writer.grid.map("near", int)
    await w.put("k", 1)
    assert await cached.get("k") == 1
    hits = cached.near_hits
    assert await cached.get("k") == 1
    assert cached.near_hits == hits + 1  # served without the network
    await w.put("k", 2)
    await eventually(lambda: encode("k") not in (cached.near_cache or {}), timeout=5)
    assert await cached.get("k") == 2
    await cached.put("k", 3)  # our own write: invalidated at once
    assert await cached.get("k") == 3


async def test_malformed_operations_get_grid_errors(user: Client, service: Service) -> None:
    with pytest.raises(GridError, match="unknown grid operation"):
        await user.request("service", GridOps([Op("m", 0, 99, b"k")]))
    with pytest.raises(GridError, match="non-empty name"):
        await user.request("service", GridOps([Op("", 0, 0, b"k")]))
    with pytest.raises(GridError, match="partition"):
        await user.request("service", GridOps([Op("m", 10_000, 8)]))
    assert service.stats["grid_refused"] == 3
    m = user.grid.map("still", int)
    await m.put("k", 1)  # the connection and the grid serve on
    assert await m.get("k") == 1


async def test_the_service_has_the_same_api(user: Client, service: Service) -> None:
    mine = service.grid.map("shared", Player)
    theirs = user.grid.map("shared", Player)
    await theirs.put("a", Player("a", 1))
    assert await mine.get("a") == Player("a", 1)
    await mine.put("b", Player("b", 2))
    assert await theirs.get("b") == Player("b", 2)
    assert await mine.size() == 2


async def test_a_holder_reads_its_own_partitions_without_the_network(
    service: Service, make_client: Any
) -> None:
    holder = await make_client("solo", holds_data=True)
    await owners_settled(service, 1)
    m = holder.grid.map("local", int)
    await m.put_all({f"k{i}": i for i in range(100)})
    ops = service.grid.coordinator.ops
    for i in range(100):
        assert await m.get(f"k{i}") == i
    assert await m.get_all([f"k{i}" for i in range(100)]) == {f"k{i}": i for i in range(100)}
    assert service.grid.coordinator.ops == ops  # not one operation reached the service


async def test_map_permissions(make_service: Any, tmp_path: Any) -> None:
    service = await make_service(
        data_dir=tmp_path / "acl",
        principals=[
            Principal(name="reader", token="r", read=["public*"], write=[]),
            Principal(name="writer", token="w", read=["*"], write=["public*"]),
        ],
    )
    async with (
        Client("r", service.url, token="r") as reader,
        Client("w", service.url, token="w") as writer,
    ):
        await writer.grid.map("public", int).put("k", 1)
        assert await reader.grid.map("public", int).get("k") == 1
        with pytest.raises(PermissionDenied, match="may not write map 'public'"):
            await reader.grid.map("public", int).put("k", 2)
        with pytest.raises(PermissionDenied, match="may not read map 'secret'"):
            await reader.grid.map("secret", int).get("k")
        with pytest.raises(PermissionDenied, match="may not write map 'secret'"):
            await writer.grid.map("secret", int).put("k", 2)
        with pytest.raises(PermissionDenied, match="may not read"):
            await reader.grid.map("secret", int).listen(lambda e: None)
        assert await writer.grid.map("public", int).get("k") == 1  # nothing partial
        assert service.stats["permission_denied"] == 4
        with pytest.raises(PermissionDenied, match="may not hold grid data"):
            await Client("h", service.url, token="w", holds_data=True).connect()


async def test_values_larger_than_a_chunk_travel_in_chunks(user: Client, service: Service) -> None:
    big = user.grid.map("big", bytes)
    value = bytes(range(256)) * (3 * service.config.chunk_size // 256 + 1)
    await big.put_all({"a": value, "b": value[::-1]})
    assert await big.get("a") == value
    assert await big.get_all(["a", "b"]) == {"a": value, "b": value[::-1]}


async def test_listeners_outlive_a_service_restart_and_a_disconnect(
    make_service: Any, tmp_path: Any
) -> None:
    data = tmp_path / "restart"
    service = await make_service(data_dir=data)
    async with Client("listener", service.url) as listener:
        await listener.grid.map("m", int).listen(lambda e: None)
    await service.close()
    service = await make_service(data_dir=data)
    async with Client("writer", service.url) as writer:
        await writer.grid.map("m", int).put("k", 1)
        await writer.grid.map("m", int).put("k", 2)
    seen: list[tuple[str, int | None]] = []
    listener = Client("listener", service.url)
    await listener.grid.map("m", int).listen(lambda e: seen.append((e.kind, e.value)))
    await listener.connect()  # the events waited in its mailbox
    try:
        await eventually(lambda: seen == [("added", 1), ("updated", 2)])
    finally:
        await listener.close()


async def test_a_journal_of_another_partition_count_refuses_to_start(
    make_service: Any, tmp_path: Any
) -> None:
    data = tmp_path / "parts"
    service = await make_service(data_dir=data)
    async with Client("w", service.url) as writer:
        await writer.grid.map("m", int).put("k", 1)
    await service.close()
    with pytest.raises(ConfigError, match=r"grid_partitions is 64, but .* written with 271"):
        await make_service(data_dir=data, grid_partitions=64)


async def test_random_grid_requests_get_answers_or_grid_errors(
    user: Client, service: Service
) -> None:
    """Hostile input: ops of every kind with random fields. Each request is answered (with
    outcomes or a GridError); the connection, the grid and its journal keep serving."""
    holders = service.grid.coordinator.snapshot()["holders"]
    rng = random.Random(4)
    values: list[bytes | None] = [None, b"", b"\xc1", encode(1), encode("x"), os.urandom(40)]
    floats = [0.0, -1.0, 1e-9, 0.5, float("nan"), float("inf"), 1e300]
    answered = refused = 0
    for _ in range(300):
        ops = [
            Op(
                rng.choice(["m", "", "x" * 300, "évé"]),
                rng.choice([0, -1, 5, 270, 271, 2**40]),
                rng.choice([*range(13), 99, -3]),
                rng.choice([b"", b"k", os.urandom(rng.randrange(1, 64))]),
                rng.choice(values),
                rng.choice(values),
                rng.choice(floats),
                rng.choice([0, 1, -(2**63), 2**63 - 1]),
            )
            for _ in range(rng.randrange(1, 3))
        ]
        try:
            reply = await user.request("service", GridOps(ops), timeout=10)
            assert len(reply.outcomes) == len(ops)
            answered += 1
        except GridError:
            refused += 1
    assert answered > 10 and refused > 10
    assert user.connected and user.reconnects == 0
    m = user.grid.map("after", int)
    await m.put("k", 1)
    assert await m.get("k") == 1
    assert service.grid.coordinator.snapshot()["paused"] == 0
    assert service.grid.coordinator.snapshot()["holders"] == holders  # none was expelled


async def test_entry_events_from_anyone_but_the_service_are_refused(
    user: Client, make_client: Any
) -> None:
    forger = await make_client("forger")
    seen: list[Any] = []
    await user.grid.map("m", int).listen(seen.append)
    with pytest.raises(PermissionDenied, match="entry events come from the service"):
        await forger.request(user.name, GridEvent("m", 1, encode("k"), encode(1)))
    await user.grid.map("m", int).put("real", 1)
    await eventually(lambda: len(seen) == 1)
    assert seen[0].key == "real"


async def test_answers_over_the_payload_limit(make_service: Any, tmp_path: Any) -> None:
    """items() asks for the partitions one by one when together they would not fit;
    get_all of too many large values is a GridError naming the fix, not a stall."""
    service = await make_service(
        data_dir=tmp_path / "small", max_payload=200_000, chunk_size=65_536
    )
    async with (
        Client("holder", service.url, holds_data=True),
        Client("user", service.url) as user,
    ):
        big = user.grid.map("big", bytes)
        values = {f"k{i}": bytes([i % 256]) * 20_000 for i in range(300)}
        for key, value in values.items():
            await big.put(key, value)
        assert {k: v async for k, v in big.items()} == values
        with pytest.raises(GridError, match=r"too large.*read fewer keys at once"):
            await big.get_all(list(values))
        assert await big.get_all(["k1", "k2"]) == {"k1": values["k1"], "k2": values["k2"]}
        with pytest.raises(PayloadTooLarge):
            await big.put("huge", b"x" * 300_000)
        assert service.grid.coordinator.snapshot()["paused"] == 0


async def test_a_holder_answering_nonsense_is_expelled_and_nothing_is_lost(
    service: Service, make_client: Any
) -> None:
    liar = await make_client("liar", holds_data=True, reconnect=False)
    await owners_settled(service, 1)
    assert liar.grid.holding is not None
    liar.grid.holding.apply = lambda request: []  # type: ignore[method-assign]
    user = await make_client("user")
    m = user.grid.map("m", int)
    await asyncio.wait_for(m.put("k", 1), 10)  # applied by the service after the rebuild
    assert await m.get("k") == 1
    assert not liar.connected
    assert service.stats["protocol_errors"] == 1
    assert service.grid.coordinator.snapshot()["service_owned"] == 271
