"""Lazily loaded maps (``load = "lazy"``): a key the grid does not know is read through
from the map's database before the operations that need it run, in their order."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from conftest import ServiceFactory

from packetstack import BridgeSettings, Client, EntryEvent, GridError, MapBridge, Service
from packetstack.codec import encode


def bridge(database: Path, load: str = "lazy") -> dict[str, object]:
    return {
        "bridges": {"lite": BridgeSettings(url=f"sqlite+aiosqlite:///{database}", retries=1)},
        "maps": {"scores": MapBridge(bridge="lite", load=load)},  # type: ignore[arg-type]
    }


def seed(database: Path, rows: dict[str, int]) -> None:
    """Rows in the map's table, as the bridge lays it out (the bridge created it)."""
    with sqlite3.connect(database) as db:
        db.executemany("INSERT INTO scores VALUES (?, ?)", [(k, str(v)) for k, v in rows.items()])


def table(database: Path) -> dict[str, int]:
    with sqlite3.connect(database) as db:
        return {k: int(v) for k, v in db.execute("SELECT key, value FROM scores")}


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "app.db"


async def lazy_service(make_service: ServiceFactory, database: Path) -> Service:
    service = await make_service(**bridge(database))
    seed(database, {f"k{i}": i for i in range(10)})
    return service


async def test_operations_read_through_what_the_grid_does_not_hold(
    make_service: ServiceFactory, database: Path
) -> None:
    service = await lazy_service(make_service, database)
    scores = service.grid.map("scores", int)
    assert await scores.size() == 0  # nothing loaded at start

    assert await scores.get("k1") == 1
    assert await scores.get("missing") is None
    assert await scores.contains("k2")
    assert await scores.get_all(["k3", "k4", "nope"]) == {"k3": 3, "k4": 4}
    assert await scores.increment("k5", 10) == 15  # from the database's 5
    assert not await scores.put_if_absent("k6", 60)  # the database has it
    assert await scores.get("k6") == 6
    assert await scores.replace("k7", 70)
    assert await scores.delete("k8")
    assert await scores.get("k8") is None
    assert service.grid.coordinator.loads == 8  # k1..k8, each once

    report = await service.flush()
    # Loads are not changes: only the increment, the replace and the delete are written.
    assert (report.written, report.deleted) == (2, 1)
    assert table(database) == {**{f"k{i}": i for i in range(10) if i != 8}, "k5": 15, "k7": 70}


async def test_a_put_waits_behind_earlier_operations_on_a_key_being_loaded(
    make_service: ServiceFactory, database: Path
) -> None:
    """delete (which waits for the load) then put of the same key: the put comes last."""
    service = await lazy_service(make_service, database)
    scores = service.grid.map("scores", int)

    deleted, _ = await asyncio.gather(scores.delete("k1"), scores.put("k1", 100))

    assert deleted
    assert await scores.get("k1") == 100
    await service.flush()
    assert table(database)["k1"] == 100


async def test_a_clear_right_after_a_load_deletes_the_row_on_flush(
    make_service: ServiceFactory, database: Path
) -> None:
    """A load, or a put of a key the database has, undone by a clear before the journal
    folded it: the database's row is deleted at the next flush all the same."""
    service = await lazy_service(make_service, database)
    scores = service.grid.map("scores", int)
    assert await scores.get("k1") == 1  # loaded
    await scores.put("k2", 20)  # never loaded: the grid did not know the database had it

    await scores.clear()

    report = await service.flush()
    assert report.deleted >= 2
    assert "k1" not in table(database) and "k2" not in table(database)
    assert await scores.get("k1") is None  # the grid knows it is gone: not loaded again


async def test_a_holder_asks_the_service_about_a_key_it_owns_and_does_not_hold(
    make_service: ServiceFactory, database: Path
) -> None:
    service = await lazy_service(make_service, database)
    async with Client("holder", service.url, holds_data=True) as holder:
        owned = service.grid.coordinator.holders["holder"]
        for _ in range(100):  # the partitions move to the only holder
            if service.grid.coordinator.snapshot()["service_owned"] == 0:
                break
            await asyncio.sleep(0.05)
        assert owned.name == "holder"
        scores = holder.grid.map("scores", int)
        assert {await scores.get(f"k{i}") for i in range(10)} == set(range(10))
        assert await scores.get("missing") is None


async def test_a_loaded_entry_fires_no_entry_event(
    make_service: ServiceFactory, database: Path
) -> None:
    service = await lazy_service(make_service, database)
    scores = service.grid.map("scores", int)
    events: list[EntryEvent[object, int]] = []
    await scores.listen(events.append)

    assert await scores.get("k1") == 1
    await scores.put("k1", 2)

    for _ in range(50):
        if events:
            break
        await asyncio.sleep(0.02)
    assert [(e.kind, e.value) for e in events] == [("updated", 2)]


async def test_a_key_deleted_and_not_flushed_is_not_loaded_back(
    make_service: ServiceFactory, database: Path
) -> None:
    service = await lazy_service(make_service, database)
    scores = service.grid.map("scores", int)
    assert await scores.delete("k1")  # loaded, then deleted: dirty, the row still there

    found = await service.grid.bridges.load_through("scores", [encode("k1")])

    assert found == {}
    assert "k1" in table(database)


async def test_a_database_that_cannot_be_reached_fails_the_reads_with_grid_error(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "not-yet"  # SQLite cannot open a file in a folder that is not there
    service = await make_service(**bridge(folder / "app.db"))
    scores = service.grid.map("scores", int)

    with pytest.raises(GridError, match="reads through from its database"):
        await scores.get("k1")
    await scores.put("k2", 2)  # a put needs no load: it goes on

    folder.mkdir()
    assert await scores.get("k1") is None  # reachable now: the bridge opens, no such row
    assert await scores.get("k2") == 2
