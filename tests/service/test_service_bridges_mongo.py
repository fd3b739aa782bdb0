"""The MongoDB bridge with write-behind, at the service level: in-process services (and a
`packetstack serve` process) whose maps reach the MongoDB stand-in of tests/mongo_standin.py
(a real mongod when PACKETSTACK_MONGO_URL is set), the counterpart of test_service_bridges.py
and test_service_bridge_faults.py for the SQL databases.

What users rely on: nothing reaches MongoDB until a flush; a flush leaves exactly the grid's
entries in the map's collection (a typed map: a Struct's fields as the document, the key in
_id; a document map: a dict's fields, any other value as ``{"_id": key, "value": v}``), each
key written once with its last value, deletes and clears as deletes; the server down before
or during a flush, or at start, loses nothing (the entries stay dirty and the next flush
writes them); a document the server refuses is set aside with its error while the rest are
written, and is not tried again until it changes; a service killed with kill -9 before any
flush writes every acknowledged entry once restarted. Each test has its own database on the
server, dropped at the end; the documents are read beside the service, from the server
itself. The fault tests need the stand-in (they are skipped against a real mongod). One
test checks that a failed attempt to reach the server leaves no client open."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import pytest
from mongo_standin import (
    MongoServer,
    MongoStandin,
    OwnDatabase,
    mongo_server,
    require_faults,
)
from pymongo import AsyncMongoClient
from support import (
    BridgedServices,
    Player,
    bridge_config,
    bridge_service,
    closing_figures,
    delete_five_and_a_fleeting_key,
    figures,
    grid_items,
    players,
    sigterm,
    typed,
    write_acknowledged,
)

import packetstack.storage.mongo
from packetstack import Client, Service
from packetstack.errors import BridgeUnavailable
from packetstack.storage import MapBridge

pytestmark = pytest.mark.timeout(120)

WRITES = ("insert", "update", "delete")  # the commands that change a collection


def player_documents(players: Mapping[Any, Player]) -> dict[Any, dict[str, Any]]:
    """The documents a collection of Players holds, by _id: the key, then the fields."""
    return {
        key: {"_id": key, "name": p.name, "score": p.score, "level": p.level}
        for key, p in players.items()
    }


def database_url(server_url: str, database: str) -> str:
    """``server_url`` (``mongodb://127.0.0.1:PORT/``, or PACKETSTACK_MONGO_URL's) with
    ``database`` as its path: ``mongodb://127.0.0.1:PORT/DATABASE``."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{database}"))


class MongoDatabase(OwnDatabase):
    """The test's own database on the MongoDB server: the bridge URL that names it, and
    direct reads through the server (the stand-in's data, or pymongo on a real mongod),
    independent of the code under test. ``name(prefix)`` names a map (and its collection),
    as SqlDatabase.name does, so BridgedServices can start services on it."""

    def __init__(self, server: MongoServer) -> None:
        super().__init__(server, "packetstack_service")
        self.url = database_url(server.url, self.database)

    @property
    def standin(self) -> MongoStandin | None:
        return self.server if isinstance(self.server, MongoStandin) else None

    def name(self, prefix: str) -> str:
        return prefix  # the database is the test's own: any name is unique in it

    def collections(self) -> list[str]:
        """The collections the database has (none until something is written)."""
        return sorted(self.collection("any").database.list_collection_names())

    def writes(self) -> int:
        """Write commands the stand-in has received (0 against a real mongod: not counted)."""
        standin = self.standin
        return 0 if standin is None else sum(standin.command_counts[c] for c in WRITES)


@pytest.fixture
def server() -> Iterator[MongoServer]:
    """The stand-in (one per test) or PACKETSTACK_MONGO_URL's mongod."""
    with mongo_server() as running:
        yield running


@pytest.fixture
async def mongo(server: MongoServer) -> AsyncIterator[MongoDatabase]:
    """The test's database; dropped at the end (the stand-in brought back up first if the
    test left it down, so nothing waits for a server that is gone)."""
    database = MongoDatabase(server)
    try:
        yield database
    finally:
        if isinstance(server, MongoStandin) and not server.is_up:
            server.come_back()
        await database.drop()


@pytest.fixture
async def bridged_mongo(mongo: MongoDatabase, tmp_path: Path) -> AsyncIterator[BridgedServices]:
    """In-process services with bridge "db" on the test's database (two attempts per batch,
    0.05 s apart, 2 s to reach the server); those still running are closed after the test,
    with the server up, before the database is dropped."""
    started = BridgedServices(mongo, tmp_path)  # type: ignore[arg-type]  # url and name()
    yield started
    if mongo.standin is not None and not mongo.standin.is_up:
        mongo.standin.come_back()
    for service in list(started.running):
        await started.close(service)


async def start(bridged: BridgedServices, maps: dict[str, MapBridge], **bridge: object) -> Service:
    """A started service with ``maps`` on the test's MongoDB database."""
    return await bridged.start(maps, bridge={"connect_timeout": 2, **bridge})


# ------------------------------------------------------------------ basic flush


async def test_nothing_is_written_before_a_flush_then_exactly_the_grid(
    mongo: MongoDatabase, bridged_mongo: BridgedServices
) -> None:
    service = await start(bridged_mongo, {"players": typed()}, batch=100)
    grid = service.grid.map("players", Player)
    expected = players(500)
    await grid.put_all(expected)
    for key, player in players(20, "q").items():
        await grid.put(key, player)
        expected[key] = player
    # Folding the journal marks them dirty; still nothing reaches the database.
    assert await service.grid.bridges.journal.dirty_counts() == {"players": (520, 0)}
    assert mongo.collections() == [] and mongo.writes() == 0

    report = await service.flush()

    assert figures(report) == [("players", 520, 0, 0, 0)]
    assert report.ok
    assert mongo.documents("players") == player_documents(expected)
    assert await service.grid.bridges.journal.dirty_counts() == {}
    writes = mongo.writes()
    again = await service.flush()
    assert figures(again) == [("players", 0, 0, 0, 0)]
    assert mongo.writes() == writes  # nothing dirty: nothing sent


async def test_document_maps_store_a_dicts_fields_and_wrap_other_values(
    mongo: MongoDatabase, bridged_mongo: BridgedServices
) -> None:
    service = await start(
        bridged_mongo,
        {
            "loose": MapBridge(bridge="db"),  # untyped: any value
            "docplayers": MapBridge(bridge="db", type=Player),  # document mode, a Struct
        },
    )
    values: dict[str, Any] = {
        "nested": {"a": [1, 2, {"b": None}], "c": "ü → ✓"},
        "list": [1, "two", 3.5, True],
        "text": "hello",
        "number": 42,
        "float": 2.5,
        "flag": False,
        "none": None,
        "bytes": b"\x00bin",
        "only-value": {"value": 1},  # a dict whose only field is "value": wrapped too
    }
    await service.grid.map("loose", Any).put_all(values)
    await service.grid.map("docplayers", Player).put_all(players(10))
    assert mongo.collections() == [] and mongo.writes() == 0

    report = await service.flush()

    assert figures(report) == [("loose", 9, 0, 0, 0), ("docplayers", 10, 0, 0, 0)]
    assert mongo.documents("loose") == {
        "nested": {"_id": "nested", "a": [1, 2, {"b": None}], "c": "ü → ✓"},
        "list": {"_id": "list", "value": [1, "two", 3.5, True]},
        "text": {"_id": "text", "value": "hello"},
        "number": {"_id": "number", "value": 42},
        "float": {"_id": "float", "value": 2.5},
        "flag": {"_id": "flag", "value": False},
        "none": {"_id": "none", "value": None},
        "bytes": {"_id": "bytes", "value": b"\x00bin"},
        "only-value": {"_id": "only-value", "value": {"value": 1}},
    }
    assert mongo.documents("docplayers") == player_documents(players(10))


async def test_a_key_put_a_hundred_times_is_written_once_with_its_last_value(
    mongo: MongoDatabase, bridged_mongo: BridgedServices
) -> None:
    service = await start(bridged_mongo, {"scores": typed(key="int")})
    grid = service.grid.map("scores", Player, int)

    async def keep_writing(key: int) -> None:
        for n in range(100):
            await grid.put(key, Player(f"round-{n}", key * 1000 + n))

    await asyncio.gather(*(keep_writing(key) for key in range(10)))
    report = await service.flush()

    # One upsert per distinct key: ten documents written, not a thousand.
    assert figures(report) == [("scores", 10, 0, 0, 0)]
    assert report.written == 10
    assert mongo.documents("scores") == player_documents(
        {key: Player("round-99", key * 1000 + 99) for key in range(10)}
    )


async def test_deletes_and_clears_become_deletes(
    mongo: MongoDatabase, bridged_mongo: BridgedServices
) -> None:
    service = await start(bridged_mongo, {"deletes": typed(), "kept": MapBridge(bridge="db")})
    grid = service.grid.map("deletes", Player)
    expected = players(20)
    await grid.put_all(expected)
    await service.grid.map("kept", Any).put_all({"a": 1, "b": {"x": 2}})
    assert (await service.flush()).written == 22

    await delete_five_and_a_fleeting_key(grid, expected)
    assert mongo.documents("deletes") == player_documents(players(20))  # until the flush

    report = await service.flush()

    # Five deletes of flushed documents and one of a key the database never had.
    assert figures(report) == [("deletes", 0, 6, 0, 0), ("kept", 0, 0, 0, 0)]
    assert report.ok
    assert mongo.documents("deletes") == player_documents(expected)

    await grid.put_all(players(3, "late"))  # never flushed
    await service.grid.bridges.journal.dirty_counts()  # folded before the clear: in the grid
    await grid.clear()
    assert len(mongo.documents("deletes")) == 15  # until the flush

    report = await service.flush()
    assert figures(report) == [("deletes", 0, 18, 0, 0), ("kept", 0, 0, 0, 0)]
    assert mongo.documents("deletes") == {}
    assert mongo.documents("kept") == {
        "a": {"_id": "a", "value": 1},
        "b": {"_id": "b", "x": 2},
    }


# ------------------------------------------------------------------ a poisoned entry


async def test_a_poisoned_entry_is_set_aside_and_the_rest_written(
    server: MongoServer, mongo: MongoDatabase, bridged_mongo: BridgedServices
) -> None:
    standin = require_faults(server)
    standin.reject_documents_where(lambda document: document.get("name") == "poison")
    service = await start(bridged_mongo, {"poison": typed()})
    grid = service.grid.map("poison", Player)
    good = players(300)
    await grid.put_all(good)
    await grid.put("p0010x", Player("poison", 1))  # among the others, in the same batch

    report = await service.flush()

    assert figures(report) == [("poison", 300, 0, 1, 0)]
    assert report.maps[0].still_set_aside == 1 and not report.ok
    assert mongo.documents("poison") == player_documents(good)
    ((map_name, key, error, _),) = await service.grid.bridges.rejected(10)
    assert (map_name, msgspec.msgpack.decode(key)) == ("poison", "p0010x")
    assert "writing map 'poison' to bridge 'db'" in error
    assert "the database refused 1 of 1 documents" in error
    assert "refused by the stand-in" in error
    journal = service.grid.bridges.journal
    assert await journal.dirty_counts() == {"poison": (1, 1)}  # still dirty, set aside
    shown = service.snapshot()["bridges"]
    assert (shown["maps"]["poison"]["dirty"], shown["maps"]["poison"]["set_aside"]) == (1, 1)
    assert shown["retries"] == 0  # a refusal is not retried

    # Not tried again by the next flushes, even once the server would take it.
    updates = standin.command_counts["update"]
    again = await service.flush()
    assert figures(again) == [("poison", 0, 0, 0, 0)]
    assert again.maps[0].still_set_aside == 1 and not again.ok
    standin.accept_all_documents()
    again = await service.flush()
    assert figures(again) == [("poison", 0, 0, 0, 0)]
    assert standin.command_counts["update"] == updates  # nothing sent
    assert len(await service.grid.bridges.rejected(10)) == 1
    assert "p0010x" not in mongo.documents("poison")

    # Changed: the next flush writes it.
    good["p0010x"] = Player("fixed", 2)
    await grid.put("p0010x", good["p0010x"])
    report = await service.flush()
    assert figures(report) == [("poison", 1, 0, 0, 0)]
    assert report.maps[0].still_set_aside == 0 and report.ok
    assert await service.grid.bridges.rejected(10) == []
    assert await journal.dirty_counts() == {}
    assert mongo.documents("poison") == player_documents(good)


# ------------------------------------------------------------------ the server unreachable


async def test_the_database_down_before_a_flush_loses_nothing(
    server: MongoServer, mongo: MongoDatabase, bridged_mongo: BridgedServices
) -> None:
    standin = require_faults(server)
    service = await start(bridged_mongo, {"lostbefore": typed()}, batch=100)
    grid = service.grid.map("lostbefore", Player)
    first = players(1000)
    await grid.put_all(first)
    assert (await service.flush()).written == 1000  # its connections are up and pooled

    changed = {**players(500, "q"), **{k: Player("new", -1) for k in list(first)[:100]}}
    await grid.put_all(changed)
    for key in list(first)[-20:]:
        assert await grid.delete(key)
    standin.go_down()

    report = await service.flush()

    (flushed,) = report.maps
    assert (flushed.written, flushed.deleted, flushed.set_aside, flushed.failed) == (0, 0, 0, 620)
    assert report.failed == 620 and not report.ok
    assert "writing map 'lostbefore' to bridge 'db'" in flushed.error
    assert "gave up after 2 attempts" in flushed.error
    retries = service.snapshot()["bridges"]["retries"]
    print(f"{retries} retries in {report.seconds:.1f} s before giving up")
    assert retries >= 1  # retried before giving up
    assert mongo.documents("lostbefore") == player_documents(first)  # untouched
    assert await service.grid.bridges.journal.dirty_counts() == {"lostbefore": (620, 0)}

    standin.come_back()
    report = await service.flush()
    assert figures(report) == [("lostbefore", 600, 20, 0, 0)] and report.ok
    expected = await grid_items(service, "lostbefore")
    assert len(expected) == 1000 + 500 - 20
    assert mongo.documents("lostbefore") == player_documents(expected)
    assert await service.grid.bridges.journal.dirty_counts() == {}


async def test_the_database_down_during_a_flush_loses_nothing(
    server: MongoServer, mongo: MongoDatabase, bridged_mongo: BridgedServices
) -> None:
    standin = require_faults(server)
    service = await start(bridged_mongo, {"lostduring": typed()}, batch=100)
    expected = players(1000)
    await service.grid.map("lostduring", Player).put_all(expected)

    def down_after_the_first_batch(name: str, done: int, total: int) -> None:
        if standin.is_up:
            standin.go_down()

    report = await service.flush(progress=down_after_the_first_batch)

    # Two batches are written at once: the second may have been answered before the
    # server went down (written), or taken without an answer (counted as failed, and in
    # the collection already); every later batch failed.
    (flushed,) = report.maps
    assert flushed.written in (100, 200), flushed
    assert (flushed.deleted, flushed.set_aside, flushed.failed) == (0, 0, 1000 - flushed.written)
    assert "writing map 'lostduring' to bridge 'db'" in flushed.error
    assert "gave up after 2 attempts" in flushed.error
    assert not report.ok
    in_order = list(expected)
    found = mongo.documents("lostduring")
    # The two batches in flight may finish in either order.
    assert flushed.written <= len(found) and set(found) <= set(in_order[:200])
    assert found == player_documents({k: expected[k] for k in found})  # each one exact
    dirty = 1000 - flushed.written
    assert await service.grid.bridges.journal.dirty_counts() == {"lostduring": (dirty, 0)}

    standin.come_back()
    report = await service.flush()
    assert figures(report) == [("lostduring", dirty, 0, 0, 0)] and report.ok
    assert mongo.documents("lostduring") == player_documents(expected)


async def test_a_service_started_without_its_database_flushes_once_it_is_back(
    server: MongoServer, mongo: MongoDatabase, bridged_mongo: BridgedServices
) -> None:
    standin = require_faults(server)
    standin.go_down()
    with pytest.raises(BridgeUnavailable, match="maps \\['eager'\\] load from it at start"):
        await start(bridged_mongo, {"startdown": typed(), "eager": typed(load="eager")})

    service = await start(bridged_mongo, {"startdown": typed()})  # retries at the flush
    expected = players(50)
    await service.grid.map("startdown", Player).put_all(expected)
    report = await service.flush()
    (flushed,) = report.maps
    assert (flushed.written, flushed.failed) == (0, 50) and not report.ok
    assert "bridge 'db'" in flushed.error and "gave up after 2 attempts" in flushed.error
    assert mongo.collections() == []

    standin.come_back()
    report = await service.flush()
    assert figures(report) == [("startdown", 50, 0, 0, 0)] and report.ok
    assert mongo.documents("startdown") == player_documents(expected)


async def test_failed_attempts_to_reach_the_database_leave_no_client_open(
    server: MongoServer, bridged_mongo: BridgedServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every MongoDB client the bridge makes is closed by the time the service is."""
    standin = require_faults(server)
    made: list[AsyncMongoClient[dict[str, Any]]] = []
    closed: set[int] = set()  # ids (clients compare equal by their address)

    class Recorded(AsyncMongoClient[dict[str, Any]]):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

        async def close(self) -> None:
            closed.add(id(self))
            await super().close()

    monkeypatch.setattr(packetstack.storage.mongo, "AsyncMongoClient", Recorded)
    standin.go_down()
    service = await start(bridged_mongo, {"leaky": typed()})  # one failed attempt
    await service.grid.map("leaky", Player).put("k", Player("k", 1))
    assert (await service.flush()).failed == 1  # two more
    standin.come_back()
    assert (await service.flush()).written == 1
    await bridged_mongo.close(service)

    assert len(made) >= 2
    unclosed = [client for client in made if id(client) not in closed]
    assert unclosed == [], f"{len(unclosed)} of {len(made)} MongoDB clients were never closed"


# ------------------------------------------------------------------ the service process killed


async def test_acknowledged_entries_reach_mongodb_after_a_kill9_before_any_flush(
    mongo: MongoDatabase, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """`packetstack serve` with a typed and a document map on MongoDB takes acknowledged
    puts, updates and deletes and is killed with kill -9 before any flush. Restarted on the
    same data directory and stopped with SIGTERM (which flushes on close), it writes every
    one of them: each collection then holds exactly what was acknowledged."""
    config = bridge_config(
        tmp_path / "service.toml",
        {"db": {"url": mongo.url, "retries": 2, "retry_delay": 0.05, "connect_timeout": 2}},
        {
            "players": {"bridge": "db", "mode": "typed", "type": "bridge_types:Player"},
            "docs": {"bridge": "db"},
        },
        heartbeat=1,
        heartbeat_timeout=3,
    )
    serve = bridge_service(tmp_path, config)
    processes.append(serve.start())
    await serve.wait_listening()

    client = Client("writer", serve.url, connect_timeout=30, request_timeout=30)
    await client.connect()
    try:
        expected = players(3000)
        await write_acknowledged(client.grid.map("players", Player), expected)
        docs = client.grid.map("docs", Any)
        values: dict[str, Any] = {f"d{n}": {"n": n, "tags": ["x"] * (n % 3)} for n in range(40)}
        values.update({f"v{n}": n if n % 2 else f"text-{n}" for n in range(10)})
        await docs.put_all(values)
        for n in range(5):
            assert await docs.delete(f"d{n}")
            del values[f"d{n}"]
    finally:
        await client.close()
    serve.kill9()
    assert mongo.collections() == [] and mongo.writes() == 0  # never flushed

    processes.append(serve.start())  # same data directory
    await serve.wait_listening()
    log = await sigterm(serve)

    # The deletes of keys the database never had are deletes too (harmless).
    assert closing_figures(log) == (2900 + 45, 100 + 5, 0, 0)
    assert mongo.documents("players") == player_documents(expected)
    assert mongo.documents("docs") == {
        key: {"_id": key, **value} if isinstance(value, dict) else {"_id": key, "value": value}
        for key, value in values.items()
    }
