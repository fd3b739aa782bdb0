"""The Store conformance suite (packetstack.testing) against every backend: the embedded
store (EmbeddedMaps over the grid journal), the SQL bridge on SQLite, PostgreSQL and
MariaDB, and the MongoDB bridge on the wire stand-in (or PACKETSTACK_MONGO_URL's mongod).

Each check makes its own uniquely named tables and drops them when it ends, failed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from bridge_servers import SQL_DATABASES, drop_tables, settings, sql_url, table_exists
from mongo_standin import mongo_server, unique_database_name

from packetstack.grid.embedded_maps import EmbeddedMaps
from packetstack.grid.journal import Journal
from packetstack.storage import EmbeddedStore, Entry, MapSpec, Store
from packetstack.storage.mongo import MongoStore
from packetstack.storage.sql import SQLStore
from packetstack.testing import CHECKS, Check, ConformanceFailure, StoreBackend, check_store

BACKENDS = ("embedded", *SQL_DATABASES, "mongodb")
PARTITIONS = 271


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreBackend]:
    kind: str = request.param
    if kind == "embedded":
        async with _embedded(tmp_path) as made:
            yield made
    elif kind == "mongodb":
        async with _mongo() as made:
            yield made
    else:
        yield _sql(kind, sql_url(kind, tmp_path))


@contextlib.asynccontextmanager
async def _embedded(tmp_path: Path) -> AsyncIterator[StoreBackend]:
    """The embedded store: every map is rows of the journal's one table; drop deletes
    them. It keeps any encoded key, so the key-kind check does not apply."""
    store = EmbeddedStore(tmp_path / "data" / "grid.db")
    await store.open()
    journal = Journal(store)
    await journal.open(PARTITIONS)

    async def make() -> Store:
        return EmbeddedMaps(journal, PARTITIONS)

    async def drop(maps: Sequence[MapSpec]) -> None:
        rows = [(spec.name,) for spec in maps]
        if rows:
            await journal.commit([("DELETE FROM grid WHERE map = ?", rows)])

    try:
        yield StoreBackend("embedded", make=make, drop=drop, checks_key_kinds=False)
    finally:
        journal.close()
        await store.close()


def _sql(kind: str, url: str) -> StoreBackend:
    async def make() -> Store:
        return SQLStore("conformance", settings(url))

    async def drop(maps: Sequence[MapSpec]) -> None:
        await drop_tables(url, [spec.table for spec in maps])

    async def exists(spec: MapSpec) -> bool:
        return await table_exists(url, spec.table)

    return StoreBackend(kind, make=make, drop=drop, exists=exists)


@contextlib.asynccontextmanager
async def _mongo() -> AsyncIterator[StoreBackend]:
    """MongoDB: one fresh database per test. MongoDB creates a collection on its first
    write, so there is no ``exists`` to check after open()."""
    with mongo_server() as server:
        database = unique_database_name()

        async def make() -> Store:
            return MongoStore("conformance", settings(server.url, database=database))

        async def drop(maps: Sequence[MapSpec]) -> None:
            for spec in maps:
                await asyncio.to_thread(server.collection(database, spec.table).drop)

        yield StoreBackend("mongodb", make=make, drop=drop)


@pytest.mark.parametrize("check", CHECKS, ids=str)
async def test_conformance(backend: StoreBackend, check: Check) -> None:
    reason = check.skip_reason(backend)
    if reason is not None:
        pytest.skip(reason)
    await check(backend)


async def test_check_store_runs_every_check_and_reports_skips(tmp_path: Path) -> None:
    """The runner-free entry point: every check on the embedded store, skips reported."""
    async with _embedded(tmp_path) as backend:
        skipped = await check_store(backend)
        assert set(skipped) == {"wrong_key_kind_is_rejected"}
        assert "checks_key_kinds" in skipped["wrong_key_kind_is_rejected"]


async def test_check_store_reports_failures_by_check(tmp_path: Path) -> None:
    """A store that loses what it is given fails, with messages naming the check."""
    async with _embedded(tmp_path) as embedded:
        made = await embedded.make()
        assert isinstance(made, EmbeddedMaps)

        class Forgetful(EmbeddedMaps):
            async def write(
                self, map_name: str, upserts: Sequence[Entry], deletes: Sequence[bytes]
            ) -> None:
                return None

        async def make() -> Store:
            return Forgetful(made.journal, PARTITIONS)

        dropped: list[str] = []

        async def drop(maps: Sequence[MapSpec]) -> None:
            dropped.extend(spec.name for spec in maps)
            await embedded.drop(maps)

        forgetful = StoreBackend("forgetful", make=make, drop=drop, prefix="forgetful_")
        only = [c for c in CHECKS if c.name == "write_then_read_back"]
        with pytest.raises(ExceptionGroup) as caught:
            await check_store(forgetful, only)
        (failure,) = caught.value.exceptions
        assert isinstance(failure, ConformanceFailure)
        assert "forgetful" in str(failure)
        assert "write_then_read_back" in caught.value.message
        # The failed check still dropped the map it made, named from the prefix.
        (name,) = dropped
        assert name.startswith("forgetful_") and name.endswith("_rw")


def test_every_check_is_documented() -> None:
    assert len(CHECKS) >= 15
    for check in CHECKS:
        assert check.description, f"{check.name} has no docstring"
    assert len({c.name for c in CHECKS}) == len(CHECKS)


def test_prefix_must_be_a_safe_table_name_start() -> None:
    async def make() -> Store:
        raise AssertionError

    async def drop(maps: Sequence[MapSpec]) -> None:
        raise AssertionError

    with pytest.raises(ValueError, match="prefix"):
        StoreBackend("x", make=make, drop=drop, prefix="Bad-Prefix")
