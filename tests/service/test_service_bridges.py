"""Database bridges with write-behind, against each SQL database: PostgreSQL and MariaDB
(the machine's servers: skipped locally, failed under CI=true when one is not listening)
and SQLite (a file in tmp_path). What users rely on: nothing reaches the database until a
flush; a flush leaves exactly the grid's entries in the table (typed: a column per field;
document: one JSON column), each key written once with its last value, deletes and clears
as DELETEs; changes made while a flush runs are not lost; close() flushes; an eager map is
loaded at start without overwriting what the journal holds and has not flushed yet; the
interval flush writes without being asked. Every table is named for its test and dropped
at the end, whatever happened; the tests read it directly with SQLAlchemy."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import (
    PLAYER_COLUMNS,
    BridgedServices,
    Player,
    SqlDatabase,
    bridge_config,
    bridge_service,
    delete_five_and_a_fleeting_key,
    figures,
    flush_while_changing,
    flush_writes,
    grid_items,
    player_rows,
    players,
    typed,
    until,
    wait_until,
)

from packetstack import Client, ConfigError
from packetstack.grid.writebehind import FlushReport
from packetstack.service.admin import Status, StatusReport
from packetstack.storage import BridgeSettings, MapBridge

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ basic flush


async def test_nothing_is_written_before_a_flush_then_exactly_the_grid(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    table = db.name("players")
    service = await bridged.start({table: typed()})
    assert await db.exists(table)  # created at start
    grid = service.grid.map(table, Player)
    expected = players(500)
    await grid.put_all(expected)
    for key, player in players(20, "q").items():
        await grid.put(key, player)
        expected[key] = player
    # Folding the journal marks them dirty; still nothing reaches the database.
    assert await service.grid.bridges.journal.dirty_counts() == {table: (520, 0)}
    assert await db.count(table) == 0

    report = await service.flush()

    assert figures(report) == [(table, 520, 0, 0, 0)]
    assert report.ok
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(expected)
    assert await service.grid.bridges.journal.dirty_counts() == {}
    again = await service.flush()
    assert figures(again) == [(table, 0, 0, 0, 0)]


async def test_document_mode_stores_each_value_as_json(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    loose, structs = db.name("docs"), db.name("docplayers")
    service = await bridged.start(
        {
            loose: MapBridge(bridge="db", key_column="id", value_column="doc"),
            structs: MapBridge(bridge="db", type=Player),
        }
    )
    documents: dict[str, Any] = {
        "nested": {"a": [1, 2, {"b": None}], "c": "ü → ✓"},
        "list": [1, "two", 3.5, True],
        "text": "hello",
        "number": 42,
        "float": 2.5,
        "flag": False,
    }
    docs = service.grid.map(loose, Any)  # an untyped map: any value
    await docs.put_all(documents)
    await service.grid.map(structs, Player).put_all(players(10))

    report = await service.flush()

    assert report.written == 16 and report.ok
    assert await db.rows(loose, "id", "doc", json=("doc",)) == sorted(documents.items())
    assert await db.rows(structs, "key", "value", json=("value",)) == sorted(
        (k, {"name": p.name, "score": p.score, "level": p.level}) for k, p in players(10).items()
    )


async def test_a_key_put_a_hundred_times_is_written_once_with_its_last_value(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    table = db.name("scores")
    service = await bridged.start({table: typed(key="int")})
    grid = service.grid.map(table, Player, int)

    async def keep_writing(key: int) -> None:
        for n in range(100):
            await grid.put(key, Player(f"round-{n}", key * 1000 + n))

    await asyncio.gather(*(keep_writing(key) for key in range(10)))
    report = await service.flush()

    # One upsert per distinct key: ten rows written, not a thousand.
    assert figures(report) == [(table, 10, 0, 0, 0)]
    assert await db.rows(table, *PLAYER_COLUMNS) == [
        (key, "round-99", key * 1000 + 99, None) for key in range(10)
    ]


async def test_deletes_become_deletes_and_a_never_flushed_delete_is_harmless(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    table, service, grid = await bridged.start_typed("deletes")
    expected = players(20)
    await grid.put_all(expected)
    assert (await service.flush()).written == 20

    await delete_five_and_a_fleeting_key(grid, expected)

    report = await service.flush()

    # Five deletes of flushed rows and one of a key the database never had.
    assert figures(report) == [(table, 0, 6, 0, 0)]
    assert report.ok
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(expected)


async def test_clear_deletes_the_maps_flushed_rows_on_the_next_flush(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    table, other = db.name("cleared"), db.name("kept")
    service = await bridged.start({table: typed(), other: typed()})
    grid = service.grid.map(table, Player)
    await grid.put_all(players(30))
    await service.grid.map(other, Player).put_all(players(4))
    assert (await service.flush()).written == 34
    await grid.put_all(players(5, "late"))  # never flushed
    await service.grid.bridges.journal.dirty_counts()  # folded before the clear: in the grid

    await grid.clear()
    assert await db.count(table) == 30  # until the flush

    report = await service.flush()
    assert figures(report) == [
        (table, 0, 35, 0, 0),  # a DELETE of each cleared key
        (other, 0, 0, 0, 0),
    ]
    assert await db.count(table) == 0
    assert await db.rows(other, *PLAYER_COLUMNS) == player_rows(players(4))

    await grid.put_all(players(3, "again"))
    assert (await service.flush()).written == 3
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(players(3, "again"))


async def test_an_expired_entry_is_deleted_from_the_database(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    table, service, grid = await bridged.start_typed("expiring")
    await grid.put("brief", Player("brief", 1), ttl=0.3)
    await grid.put("lasting", Player("lasting", 2))
    assert (await service.flush()).written == 2
    assert await db.count(table) == 2

    async def expired() -> bool:
        dirty = await service.grid.bridges.journal.dirty_counts()
        return await grid.get("brief") is None and dirty == {table: (1, 0)}

    await until(expired, 10, "the entry to expire")
    assert figures(await service.flush()) == [(table, 0, 1, 0, 0)]
    assert await db.rows(table, *PLAYER_COLUMNS) == [("lasting", "lasting", 2, None)]


async def test_writes_owned_by_a_holding_client_are_flushed(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    """A client holds the grid's data (every partition moves to it); another writes. The
    service journals every acknowledged write all the same, and flushes it."""
    table = db.name("held")
    service = await bridged.start({table: typed()})
    holder = Client("holder", service.url, holds_data=True, connect_timeout=10)
    client = Client("client", service.url, connect_timeout=10)
    try:
        await holder.connect()
        await wait_until(
            lambda: service.grid.coordinator.snapshot()["service_owned"] == 0,
            20,
            "the holder to own every partition",
        )
        await client.connect()
        expected = players(700)
        await client.grid.map(table, Player).put_all(expected)
        report = await service.flush()
    finally:
        await client.close()
        await holder.close()
    assert figures(report) == [(table, 700, 0, 0, 0)]
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(expected)


# ------------------------------------------------------------------ while it runs


async def test_changes_made_during_a_flush_are_not_lost(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    """A writer keeps putting and deleting (keys early and late in the flush's order, new
    keys too) while a flush of 6,000 entries runs batch by batch. After a second flush the
    table holds exactly what the grid holds."""
    table, service, grid = await bridged.start_typed("busy", bridge={"batch": 250})
    await grid.put_all(players(6000))
    first, changes = await flush_while_changing(service, grid, 7000)
    assert first.ok and first.written >= 6000 - changes

    second = await service.flush()
    assert second.ok
    expected = await grid_items(service, table)
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(expected)
    assert await service.grid.bridges.journal.dirty_counts() == {}
    print(f"{changes} changes during the flush; first {first}, second {second}")


# ------------------------------------------------------------------ flush options


async def test_a_flush_of_one_map_writes_only_that_map(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    first, second = db.name("first"), db.name("second")
    service = await bridged.start({first: typed(), second: MapBridge(bridge="db", type=Player)})
    await service.grid.map(first, Player).put_all(players(7))
    await service.grid.map(second, Player).put_all(players(9))

    report = await service.flush(map=second)

    assert figures(report) == [(second, 9, 0, 0, 0)]
    assert await db.count(first) == 0 and await db.count(second) == 9
    report = await service.flush()
    assert figures(report) == [
        (first, 7, 0, 0, 0),
        (second, 0, 0, 0, 0),
    ]
    assert await db.rows(first, *PLAYER_COLUMNS) == player_rows(players(7))


async def test_a_flush_of_a_map_without_a_bridge_is_a_config_error(
    make_service: Any, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'unknown.sqlite'}"
    service = await make_service(
        bridges={"db": BridgeSettings(url=url)}, maps={"bridged": MapBridge(bridge="db")}
    )
    await service.grid.map("plain", int).put("k", 1)  # a map of the grid, without a bridge
    for name in ("plain", "nowhere"):
        with pytest.raises(ConfigError, match=f"map '{name}' has no bridge.*'bridged'"):
            await service.flush(map=name)
    assert figures(await service.flush()) == [("bridged", 0, 0, 0, 0)]

    bare = await make_service(data_dir=tmp_path / "bare")
    with pytest.raises(ConfigError, match="map 'bridged' has no bridge: no \\[maps\\]"):
        await bare.flush(map="bridged")
    assert await bare.flush() == FlushReport(maps=[], seconds=0.0)


async def test_progress_is_reported_up_to_the_total(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    table = db.name("progress")
    service = await bridged.start({table: typed()}, bridge={"batch": 1000})
    await service.grid.map(table, Player).put_all(players(2500))
    calls: list[tuple[str, int, int]] = []
    flushing: list[Any] = []

    def progress(name: str, done: int, total: int) -> None:
        calls.append((name, done, total))
        flushing.append(service.snapshot()["bridges"]["maps"][name]["flushing"])

    report = await service.flush(progress=progress)

    assert report.written == 2500
    # One call per batch as it completes (two are written at once: the batch of 500 may
    # finish before the second of 1,000), each adding its batch, up to the total.
    done = [0] + [count for _, count, _ in calls]
    assert sorted(b - a for a, b in itertools.pairwise(done)) == [500, 1000, 1000]
    assert calls[-1] == (table, 2500, 2500)
    assert {(name, total) for name, _, total in calls} == {(table, 2500)}
    assert flushing == [[count, 2500] for _, count, _ in calls]
    assert service.snapshot()["bridges"]["maps"][table]["flushing"] is None


# ------------------------------------------------------------------ close


async def test_close_flushes_and_returns_the_report(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    table = db.name("closing")
    service = await bridged.start({table: typed()})
    expected = players(1500)
    await service.grid.map(table, Player).put_all(expected)
    assert await db.count(table) == 0

    report = await bridged.close(service)

    assert report is not None and report is service.last_flush
    assert figures(report) == [(table, 1500, 0, 0, 0)]
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(expected)


async def test_closing_a_bridged_service_twice_is_harmless(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    table = db.name("twice")
    service = await bridged.start({table: typed()})
    await service.grid.map(table, Player).put("k", Player("k", 1))
    first = await bridged.close(service)
    assert first is not None and first.written == 1
    second = await service.close()
    assert second is None or second.written == 0


# ------------------------------------------------------------------ eager load


async def test_an_eager_map_is_loaded_at_start(
    db: SqlDatabase, bridged: BridgedServices, tmp_path: Path
) -> None:
    table = db.name("eager")
    expected = players(2345)
    writer = await bridged.start({table: typed()})
    await writer.grid.map(table, Player).put_all(expected)
    assert (await bridged.close(writer)) is not None

    # Another data directory: an empty journal, filled from the database.
    service = await bridged.start(
        {table: typed(load="eager")}, bridge={"batch": 500}, data_dir=tmp_path / "fresh"
    )
    grid = service.grid.map(table, Player)
    assert await grid.size() == 2345
    assert await grid_items(service, table) == expected
    assert await grid.get("p00003") == Player("p-3", 3, 30)
    # What was loaded is clean: the database has it.
    assert await service.grid.bridges.journal.dirty_counts() == {}
    assert figures(await service.flush()) == [(table, 0, 0, 0, 0)]

    none = await bridged.start({table: typed()}, data_dir=tmp_path / "none")
    assert await none.grid.map(table, Player).size() == 0  # load = "none": nothing


async def test_eager_load_keeps_what_the_journal_holds_unflushed_at_a_kill(
    db: SqlDatabase,
    bridged: BridgedServices,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """The database has k0-k49 (flushed). A `packetstack serve` process on the same data
    directory changes k0-k9, deletes k10-k14 and adds n50-n59, acknowledged, and is killed
    with kill -9 before any flush; rows x0-x9 appear in the database meanwhile. At the next
    start the eager load brings x0-x9 in, but the journal's unflushed versions win over
    the database's stale rows; the flush then writes them."""
    table = db.name("eagerkill")
    flushed = {f"k{n}": Player("db", n) for n in range(50)}
    first = await bridged.start({table: typed(load="eager")})
    await first.grid.map(table, Player).put_all(flushed)
    assert (await bridged.close(first)) is not None

    config = bridge_config(
        tmp_path / "service.toml",
        {"db": {"url": db.url, "retries": 2, "retry_delay": 0.05}},
        {table: {"bridge": "db", "mode": "typed", "type": "bridge_types:Player", "load": "eager"}},
    )
    serve = bridge_service(tmp_path, config)
    processes.append(serve.start())
    await serve.wait_listening()
    client = Client("writer", serve.url, connect_timeout=30, request_timeout=30)
    await client.connect()
    grid = client.grid.map(table, Player)
    assert await grid.get("k7") == Player("db", 7)  # loaded (already in its journal)
    changed = {f"k{n}": Player("journal", -n) for n in range(10)}
    added = {f"n{n}": Player("new", n) for n in range(50, 60)}
    await grid.put_all({**changed, **added})
    for n in range(10, 15):
        assert await grid.delete(f"k{n}")
    await client.close()
    serve.kill9()
    outside = {f"x{n}": Player("outside", n, n) for n in range(10)}
    await db.execute(
        sa.insert(sa.table(table, *(sa.column(c) for c in PLAYER_COLUMNS))),
        [
            {"key": k, "name": p.name, "score": p.score, "level": p.level}
            for k, p in outside.items()
        ],
    )
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows({**flushed, **outside})

    service = await bridged.start({table: typed(load="eager")})

    expected = {k: v for k, v in flushed.items() if k not in {f"k{n}" for n in range(10, 15)}}
    expected.update(changed)
    expected.update(added)
    expected.update(outside)
    assert await grid_items(service, table) == expected
    await flush_writes(service, db, table, (20, 5, 0, 0), expected)


# ------------------------------------------------------------------ interval, snapshot


async def test_the_interval_flush_writes_without_being_asked(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    table, service, grid = await bridged.start_typed("interval", flush_interval=0.2)
    expected = players(300)
    await grid.put_all(expected)

    async def written() -> bool:
        return await db.rows(table, *PLAYER_COLUMNS) == player_rows(expected)

    await until(written, 10, "the interval flush to write 300 rows")
    expected["p00001"] = Player("later", -1, -1)
    await grid.put("p00001", expected["p00001"])
    del expected["p00002"]
    await grid.delete("p00002")
    await until(written, 10, "the interval flush to write a change and a delete")

    # The rows are visible before the flush that wrote them has cleaned its batches and
    # counted itself, so the count is awaited rather than read at once.
    async def counted_twice() -> bool:
        return bool(service.snapshot()["bridges"]["flushes"] >= 2)

    await until(counted_twice, 10, "the second interval flush to be counted")
    assert service.stats["flushes"] == service.snapshot()["bridges"]["flushes"]


async def test_the_snapshot_shows_dirty_counts_and_the_last_flush(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    table = db.name("status")
    service = await bridged.start({table: typed()})
    await service.grid.map(table, Player).put_all(players(40))
    await service.grid.bridges.count_dirty()
    shown = service.snapshot()["bridges"]
    assert shown["maps"] == {
        table: {
            "bridge": "db",
            "table": table,
            "load": "none",
            "dirty": 40,
            "set_aside": 0,
            "flushing": None,
        }
    }
    assert (shown["flushes"], shown["retries"], shown["last_flush"]) == (0, 0, None)

    await service.flush()

    shown = service.snapshot()["bridges"]
    assert shown["maps"][table]["dirty"] == 0
    assert shown["flushes"] == 1
    last = dict(shown["last_flush"])
    assert last.pop("seconds") >= 0
    assert last == {"written": 40, "deleted": 0, "set_aside": 0, "failed": 0}


async def test_a_status_request_counts_dirty_entries_at_once(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    """`packetstack status` ($status) counts the dirty entries when asked: no flush needed
    (service.snapshot() and the metrics show them as last counted)."""
    table = db.name("status")
    service = await bridged.start({table: typed()})
    await service.grid.map(table, Player).put_all(players(40))
    client = Client("operator", service.url, connect_timeout=10, request_timeout=10)
    await client.connect()
    try:
        report: StatusReport = await client.request("service", Status(), timeout=10)
    finally:
        await client.close()
    shown = report.snapshot["bridges"]["maps"][table]
    assert (shown["dirty"], shown["set_aside"], shown["flushing"]) == (40, 0, None)
