"""The flush worker: a map's flush with at least ``flush_worker_at`` dirty entries runs in a
process of its own (``python -m packetstack.grid.flush_process``), against each SQL database:
PostgreSQL and MariaDB (the machine's servers: skipped locally, failed under CI=true when one
is not listening) and SQLite (a file in tmp_path). What users rely on: the rows it writes are
exactly those the service would write itself (upserts, coalesced changes, deletes), and the
reports count them; one worker serves flush after flush and goes with the service; changes
made while it flushes stay dirty for the next flush; what the database refuses is set aside;
the database going away, the worker killed with kill -9 or the service killed with kill -9
lose nothing (and leave no worker behind); a value type another process cannot import is
flushed in the service. ``flush_worker_at = 1`` sends every flush with anything dirty to the
worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path

import msgspec
import pytest
from support import (
    PLAYER_COLUMNS,
    BridgedServices,
    DatabaseProxy,
    Player,
    SqlDatabase,
    bridge_service,
    closing_figures,
    figures,
    flush_while_changing,
    flush_writes,
    grid_items,
    player_rows,
    sigterm,
    typed,
    until,
    wait_until,
)
from test_service_bridge_faults import (
    ALL,
    REFUSALS,
    SERVERS,
    narrow_table,
    players,
    serve_config,
    start,
    writer,
)

from packetstack import ConfigError, Service
from packetstack.grid.flush_worker import FlushWorker
from packetstack.service.admin import Flush
from packetstack.service.config import load
from packetstack.service.configcheck import check_text
from packetstack.storage import MapBridge

pytestmark = pytest.mark.timeout(60)

WORKER_MODULE = b"packetstack.grid.flush_process"


def worker_of(service: Service) -> FlushWorker:
    worker = service.grid.bridges.write_behind.worker
    assert worker is not None
    return worker


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command (state, ppid, ...); None once the
    process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def flush_workers_of(parent: int) -> list[int]:
    """The running flush worker processes whose parent is ``parent`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
        if fields is None or int(fields[1]) != parent or not running(int(entry.name)):
            continue
        with contextlib.suppress(OSError):
            if WORKER_MODULE in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def assert_worker_process(pid: int | None) -> int:
    """``pid`` is a running flush worker, a child of this process."""
    assert pid is not None and pid != os.getpid()
    assert running(pid)
    assert pid in flush_workers_of(os.getpid())
    return pid


# ------------------------------------------------------------------ the same rows


async def test_a_flush_through_the_worker_writes_exact_rows_and_keeps_the_worker(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    table, service, grid = await bridged.start_typed("worker", flush_worker_at=1)
    worker = worker_of(service)
    assert (worker.started, worker.pid) == (0, None)  # started by the first flush
    expected = players(500)
    await grid.put_all(expected)
    for n in range(50):  # put fifty times: written once, with its last value
        expected["p00007"] = Player("last", n, n)
        await grid.put("p00007", expected["p00007"])

    await flush_writes(service, db, table, (500, 0, 0, 0), expected)

    assert worker.started == 1
    pid = assert_worker_process(worker.pid)

    changed = {f"p{n:05d}": Player("upd", -n, n) for n in range(0, 100, 2)}
    changed.update(players(10, "q"))  # new keys
    await grid.put_all(changed)
    expected.update(changed)
    for n in range(400, 430):
        assert await grid.delete(f"p{n:05d}")
        del expected[f"p{n:05d}"]
    await grid.put("fleeting", Player("gone", 1))
    assert await grid.delete("fleeting")  # a delete of a key the database never had
    assert not await grid.delete("never-there")  # nothing to write

    await flush_writes(service, db, table, (60, 31, 0, 0), expected)

    assert (worker.started, worker.pid) == (1, pid)  # the same worker
    assert await service.grid.bridges.journal.dirty_counts() == {}
    await flush_writes(service, db, table, (0, 0, 0, 0), expected)  # nothing dirty

    closing = await bridged.close(service)

    assert closing is not None and figures(closing) == [(table, 0, 0, 0, 0)]
    assert worker.pid is None and worker.started == 1
    assert not running(pid), "the flush worker outlived its service"


async def test_changes_made_during_a_worker_flush_are_written_by_the_next(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    """While the worker writes 20,000 entries batch by batch, a writer keeps putting and
    deleting in the service (keys early and late in the flush's order, new keys too). After
    a second flush the table holds exactly what the grid holds."""
    table, service, grid = await bridged.start_typed(
        "busyworker", bridge={"batch": 250}, flush_worker_at=1
    )
    await grid.put_all(players(20_000))
    first, changes = await flush_while_changing(service, grid, 22_000)
    assert first.ok and first.written >= 20_000 - changes

    second = await service.flush()
    assert second.ok
    assert worker_of(service).started == 1
    expected = await grid_items(service, table)
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(expected)
    assert await service.grid.bridges.journal.dirty_counts() == {}


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
async def test_flushes_in_quick_succession_all_go_through_one_worker(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    """A change and a flush, two hundred times in a row (an operator's flushes, or a short
    flush_interval, on a busy service): each flush writes its entry, and the one worker
    takes them all (the next request may reach it a moment after it finished the last)."""
    table, service, grid = await bridged.start_typed("quick", flush_worker_at=1)
    expected: dict[str, Player] = {}
    failed = []
    for n in range(200):
        expected[f"p{n:05d}"] = Player(f"{n}", n)
        await grid.put(f"p{n:05d}", expected[f"p{n:05d}"])
        report = await service.flush()
        if not report.ok:
            failed.append((n, report.maps[0].error))
    assert failed == [], f"{len(failed)} of 200 flushes failed, the first: {failed[0]}"
    assert worker_of(service).started == 1
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(expected)


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("db", ALL, indirect=True)
async def test_the_worker_sets_a_poisoned_entry_aside_and_writes_the_rest(
    db: SqlDatabase, bridged: BridgedServices, caplog: pytest.LogCaptureFixture
) -> None:
    table = db.name("workerpoison")
    await narrow_table(db, table)
    service = await bridged.start({table: typed()}, bridge={"batch": 1000}, flush_worker_at=1)
    grid = service.grid.map(table, Player)
    good = players(1000)
    await grid.put_all(good)
    await grid.put("p0050x", Player("far too long for five", 1))  # in the first batch

    with caplog.at_level(logging.WARNING, "packetstack.bridge"):
        report = await service.flush()

    assert figures(report) == [(table, 1000, 0, 1, 0)]
    assert report.maps[0].still_set_aside == 1 and not report.ok
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(good)
    ((map_name, key, error, _),) = await service.grid.bridges.rejected(10)
    assert (map_name, msgspec.msgpack.decode(key)) == (table, "p0050x")
    assert "the database refused the data" in error and REFUSALS[db.kind] in error
    journal = service.grid.bridges.journal
    assert await journal.dirty_counts() == {table: (1, 1)}
    # The worker's log line comes out of the service's packetstack.bridge logger.
    assert any(
        r.name == "packetstack.bridge"
        and r.levelno == logging.WARNING
        and r.getMessage().startswith("flush worker: ")
        and f"flush of map {table}: entry set aside" in r.getMessage()
        for r in caplog.records
    ), caplog.text
    worker = worker_of(service)
    assert worker.started == 1

    # Skipped by the next flush; retried (and refused again) when asked to.
    again = await service.flush()
    assert figures(again) == [(table, 0, 0, 0, 0)] and again.maps[0].still_set_aside == 1
    retried = await service.flush(retry_rejected=True)
    assert figures(retried) == [(table, 0, 0, 1, 0)]
    assert len(await service.grid.bridges.rejected(10)) == 1

    # Fixed: the next flush writes it and forgets the refusal.
    good["p0050x"] = Player("fixed", 2)
    await grid.put("p0050x", good["p0050x"])
    report = await service.flush()
    assert figures(report) == [(table, 1, 0, 0, 0)] and report.ok
    assert await service.grid.bridges.rejected(10) == []
    assert await journal.dirty_counts() == {}
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(good)
    assert worker.started == 1


# ------------------------------------------------------------------ the database lost


@pytest.mark.parametrize("db", SERVERS, indirect=True)
async def test_a_database_lost_during_a_worker_flush_loses_nothing(
    db: SqlDatabase,
    bridged: BridgedServices,
    proxy: DatabaseProxy,
) -> None:
    """The proxy in front of the database goes down at the worker's first progress report;
    the worker gives up on the map, the service reports it, and what was not written stays
    dirty. Once the database is back, the next flush (the same worker) writes the rest."""
    table = db.name("workerlost")
    service = await bridged.start(
        {table: typed()}, db.through(proxy.port), {"batch": 100}, flush_worker_at=1
    )
    expected = players(20_000)
    await service.grid.map(table, Player).put_all(expected)

    def cut_at_the_first_report(name: str, done: int, total: int) -> None:
        proxy.down()  # again at a later report: nothing more to cut

    report = await service.flush(progress=cut_at_the_first_report)

    (flushed,) = report.maps
    written = flushed.written
    assert 100 <= written < 20_000, "the cut came after the flush"
    assert (flushed.deleted, flushed.set_aside, flushed.failed) == (0, 0, 20_000 - written)
    assert f"writing map '{table}' to bridge 'db'" in flushed.error
    assert "gave up after 2 attempts" in flushed.error
    assert not report.ok
    stored = await db.rows(table, *PLAYER_COLUMNS)
    assert written <= len(stored) and set(stored) <= set(player_rows(expected))
    assert await service.grid.bridges.journal.dirty_counts() == {table: (20_000 - written, 0)}
    assert service.snapshot()["bridges"]["retries"] >= 1  # the worker's retries count

    await proxy.up()
    await flush_writes(service, db, table, (20_000 - written, 0, 0, 0), expected)
    assert worker_of(service).started == 1  # the worker lived on


# ------------------------------------------------------------------ kill -9


async def test_a_worker_killed_mid_flush_leaves_the_rest_dirty_for_a_new_worker(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    table, service, grid = await bridged.start_typed("workerkill", flush_worker_at=1)
    expected = players(30_000)
    await grid.put_all(expected)
    worker = worker_of(service)
    killed: list[int] = []

    def kill_at_the_first_report(name: str, done: int, total: int) -> None:
        if not killed and done > 0:
            assert worker.pid is not None
            killed.append(worker.pid)
            os.kill(worker.pid, signal.SIGKILL)

    report = await service.flush(progress=kill_at_the_first_report)

    (flushed,) = report.maps
    assert killed, "the worker reported no progress"
    assert f"the flush worker of map '{table}' stopped (it exited with code -9)" in flushed.error
    assert not report.ok and 0 < flushed.failed < 30_000
    # What it wrote and cleaned before it died is counted; the rest is still dirty.
    assert flushed.written + flushed.failed == 30_000
    assert await service.grid.bridges.journal.dirty_counts() == {table: (flushed.failed, 0)}
    stored = await db.rows(table, *PLAYER_COLUMNS)
    assert set(stored) <= set(player_rows(expected))
    assert len(stored) + flushed.failed >= 30_000  # each entry written, or still dirty
    assert worker.pid is None and not running(killed[0])

    await flush_writes(service, db, table, (flushed.failed, 0, 0, 0), expected)

    assert worker.started == 2
    assert assert_worker_process(worker.pid) != killed[0]
    assert await service.grid.bridges.journal.dirty_counts() == {}


async def test_a_worker_killed_in_one_map_does_not_stop_the_other_maps_of_its_bridge(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    """The worker dying is not the database failing: a small map flushed after it in the
    same flush (in the service: below flush_worker_at) is written."""
    big, small = db.name("bigmap"), db.name("smallmap")
    service = await bridged.start({big: typed(), small: typed()}, flush_worker_at=100)
    await service.grid.map(big, Player).put_all(players(20_000))
    few = players(10)
    await service.grid.map(small, Player).put_all(few)
    worker = worker_of(service)

    def kill_at_the_first_report(name: str, done: int, total: int) -> None:
        if name == big and done > 0 and worker.pid is not None:
            os.kill(worker.pid, signal.SIGKILL)

    report = await service.flush(progress=kill_at_the_first_report)

    first, second = report.maps
    assert (first.map, second.map) == (big, small)
    assert "the flush worker" in first.error and first.failed > 0
    assert (second.written, second.failed, second.error) == (10, 0, "")
    assert await db.rows(small, *PLAYER_COLUMNS) == player_rows(few)


@pytest.mark.parametrize("db", ALL, indirect=True)
async def test_a_service_killed_mid_flush_leaves_no_worker_and_loses_nothing(
    db: SqlDatabase, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """`packetstack serve` (flush_worker_at = 1) takes 30,000 acknowledged puts; a client asks
    for a flush, and once rows reach the database the service is killed with kill -9. Its
    worker, cut off from the service, stops by itself within seconds. Restarted on the same
    data directory, the service writes every entry on SIGTERM: the table equals what was
    acknowledged."""
    table = db.name("servicekill")
    serve = bridge_service(tmp_path, serve_config(tmp_path, db.url, table, flush_worker_at=1))
    await start(serve, processes)
    assert serve.proc is not None
    service_pid = serve.proc.pid
    client = await writer(serve)
    expected = players(30_000)
    await client.grid.map(table, Player).put_all(expected)
    flushing = asyncio.create_task(client.request("service", Flush(), timeout=60))
    workers: list[int] = []
    try:

        async def rows_arrive() -> bool:
            workers[:] = flush_workers_of(service_pid)
            return bool(workers) and await db.count(table) > 0

        await until(rows_arrive, 20, "the flush worker to write rows")
        (orphan,) = workers
        serve.kill9()
        assert await db.count(table) < 30_000, "the flush ended before the kill"

        # At once, but for the write in flight (an SQLite bridge's second connection may
        # wait out its 5 s busy timeout behind the first, cut short).
        await wait_until(lambda: not running(orphan), 10, "the orphaned flush worker to exit")
        assert await db.count(table) < 30_000  # it stopped midway
    finally:
        for pid in workers:  # never leave one behind, whatever happened
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        flushing.cancel()
        with contextlib.suppress(BaseException):
            await flushing
        await client.close()

    await start(serve, processes)
    log = await sigterm(serve)

    written, deleted, set_aside, dirty = closing_figures(log)
    # The rows the worker wrote before the kill but the service had not cleaned yet are
    # written again (an upsert: the same row).
    assert (deleted, set_aside, dirty) == (0, 0, 0) and 0 < written <= 30_000
    assert "flush worker started" in log
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(expected)


# ------------------------------------------------------------------ in the service


async def test_a_type_defined_in_a_function_is_flushed_in_the_service(
    db: SqlDatabase, bridged: BridgedServices
) -> None:
    class Local(msgspec.Struct):  # no other process can import it by name
        name: str
        score: int

    local, shared = db.name("local"), db.name("shared")
    service = await bridged.start(
        {local: MapBridge(bridge="db", mode="typed", type=Local), shared: typed()},
        flush_worker_at=1,
    )
    worker = worker_of(service)
    assert set(worker.maps) == {shared}
    locals_ = {f"k{n}": Local(f"n{n}", n) for n in range(300)}
    await service.grid.map(local, Local).put_all(locals_)
    await service.grid.map(shared, Player).put_all(players(20))

    report = await service.flush(map=local)

    assert figures(report) == [(local, 300, 0, 0, 0)] and report.ok
    assert (worker.started, worker.pid) == (0, None)  # no worker was needed
    assert await db.rows(local, "key", "name", "score") == sorted(
        (k, v.name, v.score) for k, v in locals_.items()
    )
    report = await service.flush()  # the other map still goes to the worker
    assert figures(report) == [(local, 0, 0, 0, 0), (shared, 20, 0, 0, 0)]
    assert worker.started == 1
    assert await db.rows(shared, *PLAYER_COLUMNS) == player_rows(players(20))


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
async def test_flush_worker_at_is_the_dirty_count_from_which_the_worker_flushes(
    db: SqlDatabase, bridged: BridgedServices, tmp_path: Path
) -> None:
    table, service, grid = await bridged.start_typed("threshold", flush_worker_at=100)
    worker = worker_of(service)
    await grid.put_all(players(99))
    await flush_writes(service, db, table, (99, 0, 0, 0), players(99))
    assert worker.started == 0  # 99 dirty: in the service
    await grid.put_all(players(100, "q"))
    await flush_writes(service, db, table, (100, 0, 0, 0), {**players(99), **players(100, "q")})
    assert worker.started == 1  # 100 dirty: in the worker

    _, never, grid = await bridged.start_typed(
        "never", flush_worker_at=0, data_dir=tmp_path / "never"
    )
    assert never.grid.bridges.write_behind.worker is None  # 0: no worker at all
    await grid.put_all(players(500))
    assert (await never.flush()).written == 500


async def test_a_negative_flush_worker_at_is_a_config_error(tmp_path: Path) -> None:
    expected = "flush_worker_at must be >= 0"
    with pytest.raises(ConfigError, match=expected):
        Service("127.0.0.1", 0, data_dir=tmp_path / "data", flush_worker_at=-1)
    with pytest.raises(ConfigError, match=expected):
        load(environ={"PACKETSTACK_FLUSH_WORKER_AT": "-1"})
    (problem,) = check_text("heartbeat = 1\nflush_worker_at = -1\n")
    assert problem.line == 2 and expected in problem.message
    assert load(overrides={"flush_worker_at": 0}, environ={}).flush_worker_at == 0
    assert load(environ={}).flush_worker_at == 10_000  # the default
