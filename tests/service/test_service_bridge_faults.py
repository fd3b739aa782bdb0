"""Database bridges under faults, against each SQL database: an entry the database refuses
(set aside with its error, the rest written), the database unreachable before or during a
flush (a TCP proxy in front of PostgreSQL / MariaDB cut and refusing connections), and the
`packetstack serve` process killed with kill -9 before any flush, with the database up or
down. What users rely on: every acknowledged write ends up in the database exactly, once a
flush can reach it; nothing is lost meanwhile, and what could not be written stays dirty.
SIGTERM of `packetstack serve` waits for the flush before it exits."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import msgspec
import pytest
import sqlalchemy as sa
from support import (
    PLAYER_COLUMNS,
    BridgedServices,
    DatabaseProxy,
    Player,
    ServiceProcess,
    SqlDatabase,
    bridge_config,
    bridge_service,
    closing_figures,
    exited,
    figures,
    flush_writes,
    grid_items,
    player_rows,
    sigterm,
    spawn_script,
    typed,
    until,
    wait_until,
    write_acknowledged,
)

from packetstack import Client
from packetstack.errors import BridgeUnavailable

pytestmark = pytest.mark.timeout(90)

ALL = ["postgresql", "mariadb", "sqlite"]
SERVERS = ["postgresql", "mariadb"]  # those a proxy can stand in front of


def players(count: int, name: str = "p", start: int = 0) -> dict[str, Player]:
    """Entries whose names (four digits) fit the narrowed columns of the poisoning tests."""
    return {f"{name}{n:05d}": Player(f"{n:04d}", n) for n in range(start, start + count)}


# ------------------------------------------------------------ a poisoned entry

REFUSALS = {  # what each database says about a name too long for its column
    "postgresql": "value too long for type character varying(5)",
    "mariadb": "Data too long for column 'name'",
    "sqlite": "CHECK constraint failed",
}


async def narrow_table(db: SqlDatabase, table: str) -> None:
    """The map's table made beforehand with a name column of at most 5 characters
    (VARCHAR(5); SQLite, which does not enforce lengths, gets a CHECK)."""
    if db.kind == "sqlite":
        name = sa.Column("name", sa.Text, sa.CheckConstraint("length(name) <= 5"))
    else:
        name = sa.Column("name", sa.String(5))
    metadata = sa.MetaData()
    narrow = sa.Table(
        table,
        metadata,
        sa.Column("key", sa.String(255), primary_key=True),
        name,
        sa.Column("score", sa.BigInteger, nullable=False),
        sa.Column("level", sa.BigInteger),
    )
    async with db.engine.begin() as conn:
        await conn.run_sync(narrow.create)


@pytest.mark.parametrize("db", ALL, indirect=True)
async def test_a_poisoned_entry_is_set_aside_and_the_good_ones_written(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    table = db.name("poison")
    await narrow_table(db, table)
    service = await bridged.start({table: typed()}, bridge={"batch": 1000})
    grid = service.grid.map(table, Player)
    good = players(1000)
    await grid.put_all(good)
    # Among the first batch's keys (encoded keys sort by length, then p00509 < p0050x <
    # p00510): the batch is narrowed down to it.
    await grid.put("p0050x", Player("far too long for five", 1))

    report = await service.flush()

    assert figures(report) == [(table, 1000, 0, 1, 0)]
    assert report.maps[0].still_set_aside == 1 and not report.ok
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(good)
    journal = service.grid.bridges.journal
    ((map_name, key, error, _),) = await journal.rejected()
    assert (map_name, msgspec.msgpack.decode(key)) == (table, "p0050x")
    assert "the database refused the data" in error and REFUSALS[db.kind] in error
    assert await journal.dirty_counts() == {table: (1, 1)}  # still dirty, set aside
    shown = service.snapshot()["bridges"]["maps"][table]
    assert (shown["dirty"], shown["set_aside"]) == (1, 1)
    assert service.snapshot()["bridges"]["retries"] == 0  # a refusal is not retried

    # Not retried by the next flush; retried (and refused again) when asked to.
    again = await service.flush()
    assert figures(again) == [(table, 0, 0, 0, 0)]
    assert again.maps[0].still_set_aside == 1 and not again.ok  # set aside still
    retried = await service.flush(retry_rejected=True)
    assert figures(retried) == [(table, 0, 0, 1, 0)]

    # Fixed: the next flush writes it.
    await grid.put("p0050x", Player("fixed", 2))
    report = await service.flush()
    assert figures(report) == [(table, 1, 0, 0, 0)]
    assert report.maps[0].still_set_aside == 0 and report.ok
    assert await journal.rejected() == []
    assert await journal.dirty_counts() == {}
    good["p0050x"] = Player("fixed", 2)
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(good)


UNSTORABLE = {  # values a Player holds that a database cannot take into its columns
    "int beyond BIGINT": Player("big", 2**63),  # msgspec ints go up to 2**64 - 1
    "NUL in a str": Player("a\x00b", 1),  # PostgreSQL text cannot hold NUL
}
CLASSIFIED = "bug: storage/sql.py _classified() sets aside only sa_exc.DataError/IntegrityError: "


@pytest.mark.parametrize(
    ("db", "bad"),
    [
        ("postgresql", "int beyond BIGINT"),  # refused by asyncpg itself (SQLSTATE 22000)
        ("mariadb", "int beyond BIGINT"),  # 1264 out of range
        ("sqlite", "int beyond BIGINT"),  # sqlite3 OverflowError
        ("postgresql", "NUL in a str"),  # 22021
    ],
    indirect=["db"],
)
async def test_a_value_the_database_cannot_store_is_set_aside(
    db: SqlDatabase, bridged: BridgedServices, bad: str
) -> None:
    table, service, grid = await bridged.start_typed("unstorable")  # the table the bridge makes
    good = players(300)
    await grid.put_all(good)
    await grid.put("p0010x", UNSTORABLE[bad])  # among the others, in the same batch

    await flush_writes(service, db, table, (300, 0, 1, 0), good)
    ((_, key, error, _),) = await service.grid.bridges.journal.rejected()
    assert msgspec.msgpack.decode(key) == "p0010x"
    assert "the database refused the data" in error


# ------------------------------------------------------------ the database unreachable


@pytest.mark.parametrize("db", SERVERS, indirect=True)
async def test_a_database_lost_before_a_flush_loses_nothing(
    db: SqlDatabase, bridged: BridgedServices, proxy: DatabaseProxy
) -> None:
    table, service, grid = await bridged.start_typed(
        "lostbefore", db.through(proxy.port), {"batch": 100}
    )
    first = players(1000)
    await grid.put_all(first)
    assert (await service.flush()).written == 1000  # its connections are up and pooled

    changed = {**players(500, "q"), **{k: Player("new", -1) for k in list(first)[:100]}}
    await grid.put_all(changed)
    for key in list(first)[-20:]:
        await grid.delete(key)
    proxy.down()

    report = await service.flush()

    (flushed,) = report.maps
    assert (flushed.written, flushed.deleted, flushed.set_aside, flushed.failed) == (0, 0, 0, 620)
    assert f"writing map '{table}' to bridge 'db'" in flushed.error
    assert "gave up after 2 attempts" in flushed.error
    assert not report.ok
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(first)  # untouched
    assert await service.grid.bridges.journal.dirty_counts() == {table: (620, 0)}
    # Both batches (500 + 120 entries) were being written at once: each retried once.
    assert service.snapshot()["bridges"]["retries"] == 2

    await proxy.up()
    await flush_writes(service, db, table, (600, 20, 0, 0), await grid_items(service, table))
    assert await db.count(table) == 1000 + 500 - 20


@pytest.mark.parametrize("db", SERVERS, indirect=True)
async def test_a_database_lost_during_a_flush_loses_nothing(
    db: SqlDatabase, bridged: BridgedServices, proxy: DatabaseProxy
) -> None:
    table = db.name("lostduring")
    service = await bridged.start({table: typed()}, db.through(proxy.port), {"batch": 100})
    expected = players(1000)
    await service.grid.map(table, Player).put_all(expected)

    def cut_after_the_first_batch(name: str, done: int, total: int) -> None:
        if done == 100:
            proxy.down()

    report = await service.flush(progress=cut_after_the_first_batch)

    (flushed,) = report.maps
    # Two batches are written at once: the one beside the first may have gone in too.
    written = flushed.written
    assert written in (100, 200)
    assert (flushed.set_aside, flushed.failed) == (0, 1000 - written)
    assert "gave up after 2 attempts" in flushed.error
    stored = await db.rows(table, *PLAYER_COLUMNS)
    # A batch whose commit went through but whose answer the cut lost is not counted as
    # written: it stays dirty and is written again (an upsert: the same row).
    assert written <= len(stored) <= 200
    assert set(stored) <= set(player_rows(expected))  # each one exactly as put
    assert await service.grid.bridges.journal.dirty_counts() == {table: (1000 - written, 0)}

    await proxy.up()
    await flush_writes(service, db, table, (1000 - written, 0, 0, 0), expected)


@pytest.mark.parametrize("db", SERVERS, indirect=True)
async def test_a_service_starts_without_its_database_and_flushes_once_it_is_back(
    db: SqlDatabase, bridged: BridgedServices, proxy: DatabaseProxy
) -> None:
    table, eager = db.name("startdown"), db.name("eagerdown")
    url = db.through(proxy.port)
    proxy.down()
    with pytest.raises(BridgeUnavailable, match=f"maps \\['{eager}'\\] load from it at start"):
        await bridged.start({table: typed(), eager: typed(load="eager")}, url)

    service = await bridged.start({table: typed()}, url)
    expected = players(50)
    await service.grid.map(table, Player).put_all(expected)
    report = await service.flush()
    (flushed,) = report.maps
    assert (flushed.written, flushed.failed) == (0, 50) and flushed.error
    assert not await db.exists(table)

    await proxy.up()
    await flush_writes(service, db, table, (50, 0, 0, 0), expected)


@pytest.mark.parametrize("db", SERVERS, indirect=True)
async def test_a_table_found_not_to_fit_at_a_flush_leaves_the_entries_dirty(
    db: SqlDatabase, bridged: BridgedServices, proxy: DatabaseProxy
) -> None:
    """The database is down at start, so the table is checked at the first flush, and it
    does not fit: that flush and the one on close report it, the entries stay dirty, and
    close() still closes the service."""
    table = db.name("misfit")
    await db.execute(  # name and score swapped: no column fits
        f"CREATE TABLE {table} (k VARCHAR(255) PRIMARY KEY, name BIGINT, score TEXT)"
    )
    proxy.down()
    service = await bridged.start({table: typed(key_column="k")}, db.through(proxy.port))
    await service.grid.map(table, Player).put("p", Player("p", 1))
    await proxy.up()

    report = await service.flush()
    assert figures(report) == [(table, 0, 0, 0, 1)]
    assert f"table '{table}' does not fit map '{table}'" in report.maps[0].error
    assert await service.grid.bridges.journal.dirty_counts() == {table: (1, 0)}
    closing = await bridged.close(service)
    assert closing is not None and figures(closing) == [(table, 0, 0, 0, 1)]
    assert service.mailboxes.store.closed
    assert await db.count(table) == 0


# ------------------------------------------------------------ the service process killed

# Opens the service's data directory with the Service API (as `packetstack serve` would,
# from the same config file), flushes, closes, and prints both reports as one JSON line.
FLUSHER = textwrap.dedent(
    """
    import asyncio, json, sys
    sys.path.insert(0, sys.argv[3])  # bridge_types
    from packetstack import Service
    from packetstack.service.config import load

    def figures(report):
        return [report.written, report.deleted, report.set_aside, report.failed]

    async def main(config: str, data_dir: str) -> None:
        service = Service(port=0, data_dir=data_dir, config=load(config))
        await service.start()
        flushed = await service.flush()
        closed = await service.close()
        print(json.dumps({"flush": figures(flushed), "close": figures(closed)}), flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def serve_config(tmp_path: Path, url: str, table: str, **settings: object) -> Path:
    return bridge_config(
        tmp_path / "service.toml",
        {"db": {"url": url, "retries": 2, "retry_delay": 0.05, "connect_timeout": 5}},
        {table: {"bridge": "db", "mode": "typed", "type": "bridge_types:Player"}},
        heartbeat=1,
        heartbeat_timeout=3,
        **settings,
    )


async def start(serve: ServiceProcess, processes: list[subprocess.Popen[bytes]]) -> None:
    processes.append(serve.start())
    await serve.wait_listening()


async def writer(serve: ServiceProcess) -> Client:
    client = Client("writer", serve.url, connect_timeout=30, request_timeout=30)
    await client.connect()
    return client


async def acknowledged(serve: ServiceProcess, table: str) -> dict[str, Player]:
    """3,000 puts, 200 updates and 100 deletes, each acknowledged; what the map holds."""
    client = await writer(serve)
    try:
        expected = players(3000)
        await write_acknowledged(client.grid.map(table, Player), expected)
    finally:
        await client.close()
    return expected


@pytest.mark.parametrize("db", ALL, indirect=True)
@pytest.mark.parametrize("flush_by", ["sigterm", "script"])
async def test_acknowledged_entries_reach_the_database_after_a_kill9_before_any_flush(
    db: SqlDatabase, tmp_path: Path, processes: list[subprocess.Popen[bytes]], flush_by: str
) -> None:
    table = db.name("killed")
    config = serve_config(tmp_path, db.url, table)
    serve = bridge_service(tmp_path, config)
    await start(serve, processes)
    expected = await acknowledged(serve, table)
    serve.kill9()
    assert await db.exists(table) and await db.count(table) == 0  # never flushed

    if flush_by == "sigterm":
        await start(serve, processes)  # same data directory
        log = await sigterm(serve)
        # The deletes of keys the database never had are DELETEs too (harmless).
        assert closing_figures(log) == (2900, 100, 0, 0)
    else:
        script = spawn_script(
            tmp_path, FLUSHER, [str(config), str(serve.data_dir), str(tmp_path)], processes
        )
        log_path = tmp_path / f"worker-{len(processes) - 1}.log"
        assert await exited(script, 60, "the flushing script") == 0, log_path.read_text()
        last = log_path.read_text().strip().splitlines()[-1]
        assert json.loads(last) == {"flush": [2900, 100, 0, 0], "close": [0, 0, 0, 0]}

    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(expected)


@pytest.mark.parametrize("db", SERVERS, indirect=True)
@pytest.mark.parametrize("stop", ["kill9", "sigterm"])
async def test_a_service_stopped_while_its_database_is_down_writes_everything_after(
    db: SqlDatabase,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    proxy: DatabaseProxy,
    stop: str,
) -> None:
    """`packetstack serve` flushes every 0.2 s through a proxy. The proxy goes down; the
    service takes more writes, fails to flush them, and is killed with kill -9 (or stopped
    with SIGTERM: its flush on close fails too, and it exits). Restarted with the database
    back, it writes all of them: the table equals what was acknowledged."""
    table = db.name("stoppeddown")
    config = serve_config(tmp_path, db.through(proxy.port), table, flush_interval=0.2)
    serve = bridge_service(tmp_path, config)
    await start(serve, processes)
    client = await writer(serve)
    grid = client.grid.map(table, Player)
    expected = players(500)
    await grid.put_all(expected)

    async def database_has(players: dict[str, Player]) -> bool:
        return await db.rows(table, *PLAYER_COLUMNS) == player_rows(players)

    await until(lambda: database_has(expected), 20, "the interval flush of 500 entries")
    flushed = dict(expected)

    proxy.down()
    later = {**players(500, "q"), **{f"p{n:05d}": Player("upd", n, n) for n in range(50)}}
    await grid.put_all(later)
    expected.update(later)
    for n in range(450, 500):
        assert await grid.delete(f"p{n:05d}")
        del expected[f"p{n:05d}"]
    await client.close()
    stopped = f"flush of map {table} stopped"
    await wait_until(lambda: stopped in serve.log(), 20, "an interval flush to fail")
    if stop == "kill9":
        serve.kill9()
    else:
        log = await sigterm(serve)
        assert closing_figures(log) == (0, 0, 0, 600)
    assert await database_has(flushed)

    await proxy.up()
    await start(serve, processes)
    await until(lambda: database_has(expected), 20, "the restarted service's flush")
    log = await sigterm(serve)
    assert closing_figures(log) == (0, 0, 0, 0)
    assert await database_has(expected)


@pytest.mark.parametrize("db", ALL, indirect=True)
async def test_sigterm_waits_for_the_flush_before_exiting(
    db: SqlDatabase, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    table = db.name("sigterm")
    config = serve_config(tmp_path, db.url, table)
    serve = bridge_service(tmp_path, config)
    await start(serve, processes)
    client = await writer(serve)
    expected = players(20_000)
    await client.grid.map(table, Player).put_all(expected)
    await client.close()

    log = await sigterm(serve)

    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(expected)
    shutting = log.index("packetstack.service: shutting down")
    flushing = log.index("packetstack.bridge: flushing 1 bridged maps before closing")
    assert closing_figures(log) == (20000, 0, 0, 0)
    flushed = log.index("flush on close: 20000 written")
    assert shutting < flushing < flushed < log.index("packetstack.service: stopped")
