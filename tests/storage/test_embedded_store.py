"""The embedded store: SQLite written by one thread, group commits, reads that see every
earlier write, completion callbacks on the event loop, and failures reported as StoreError."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from packetstack import StoreError
from packetstack.storage import EmbeddedStore, Statement
from packetstack.storage.embedded import MAX_BATCH

SCHEMA = "CREATE TABLE IF NOT EXISTS items (k INTEGER PRIMARY KEY, v TEXT NOT NULL);"
INSERT = "INSERT INTO items VALUES (?, ?)"
WAIT = 10.0

Done = BaseException | None


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EmbeddedStore]:
    opened = EmbeddedStore(tmp_path / "store" / "test.db")
    await opened.open(SCHEMA)
    yield opened
    await opened.close()


def count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COUNT(*) FROM items").fetchone()[0])


def keys(db: sqlite3.Connection) -> list[int]:
    return [k for (k,) in db.execute("SELECT k FROM items ORDER BY k")]


class Outcomes:
    """Collects what the done callbacks of some writes were called with, and where."""

    def __init__(self) -> None:
        self.results: dict[int, Done] = {}
        self.threads: set[int] = set()
        self._all = asyncio.Event()
        self.expected = 0

    def done(self, key: int) -> Callable[[Done], None]:
        self.expected += 1

        def record(error: Done) -> None:
            self.results[key] = error
            self.threads.add(threading.get_ident())
            if len(self.results) == self.expected:
                self._all.set()

        return record

    async def wait(self) -> dict[int, Done]:
        await asyncio.wait_for(self._all.wait(), WAIT)
        return self.results


def blocker(store: EmbeddedStore) -> threading.Event:
    """Queue a write whose transaction waits until the returned event is set: what is
    written meanwhile queues up behind one commit in progress."""
    release = threading.Event()
    entered = threading.Event()

    def hold(db: sqlite3.Connection) -> None:
        entered.set()
        release.wait(WAIT)

    store.write([hold])
    assert entered.wait(WAIT), "the writer thread never started the blocking write"
    return release


# ------------------------------------------------------------- group commit


async def test_writes_queued_while_one_commits_go_in_together(store: EmbeddedStore) -> None:
    release = blocker(store)
    commits_before = store.commits
    outcomes = Outcomes()
    burst = 5_000
    for k in range(burst):
        store.write([(INSERT, (k, f"v{k}"))], outcomes.done(k))
    release.set()
    results = await outcomes.wait()

    assert set(results) == set(range(burst))
    assert all(error is None for error in results.values())
    commits = store.commits - commits_before
    # The blocking write's commit, then the burst in as few as MAX_BATCH allows.
    assert commits <= 1 + -(-burst // MAX_BATCH), commits
    assert commits < burst
    assert store.writes >= burst + 1
    assert await store.read(count) == burst


async def test_a_burst_from_the_loop_costs_fewer_commits_than_writes(
    store: EmbeddedStore,
) -> None:
    outcomes = Outcomes()
    burst = 2_000
    for k in range(burst):
        store.write([(INSERT, (k, "x"))], outcomes.done(k))
    await outcomes.wait()
    assert store.commits < burst
    assert await store.read(count) == burst


# -------------------------------------------------------------------- reads


async def test_a_read_sees_every_write_queued_before_it(store: EmbeddedStore) -> None:
    for k in range(300):
        store.write([(INSERT, (k, "a"))])  # no callback, nothing awaited
    assert await store.read(keys) == list(range(300))
    store.write([("DELETE FROM items WHERE k < ?", (100,))])
    assert await store.read(count) == 200


async def test_a_failing_read_raises_store_error_and_other_errors_pass_through(
    store: EmbeddedStore,
) -> None:
    with pytest.raises(StoreError):
        await store.read(lambda db: db.execute("SELECT * FROM missing").fetchall())

    def broken(db: sqlite3.Connection) -> None:
        raise KeyError("mine")

    with pytest.raises(KeyError):
        await store.read(broken)
    assert await store.read(count) == 0  # still working


# ---------------------------------------------------------------- callbacks


async def test_done_callbacks_run_on_the_loop_thread_with_none(store: EmbeddedStore) -> None:
    outcomes = Outcomes()
    for k in range(50):
        store.write([(INSERT, (k, "x"))], outcomes.done(k))
    results = await outcomes.wait()
    assert results == dict.fromkeys(range(50))
    assert outcomes.threads == {threading.get_ident()}


async def test_a_failing_statement_fails_its_whole_batch_and_the_store_goes_on(
    store: EmbeddedStore,
) -> None:
    release = blocker(store)
    outcomes = Outcomes()
    store.write([(INSERT, (1, "before"))], outcomes.done(1))
    store.write([("INSERT INTO missing VALUES (?)", (2,))], outcomes.done(2))
    store.write([(INSERT, (3, "after"))], outcomes.done(3))
    release.set()
    results = await outcomes.wait()

    assert set(results) == {1, 2, 3}
    for error in results.values():
        assert isinstance(error, StoreError)
    assert "missing" in str(results[2])
    assert await store.read(count) == 0  # the batch was one transaction: rolled back

    later = Outcomes()
    store.write([(INSERT, (4, "later"))], later.done(4))
    assert await later.wait() == {4: None}
    assert await store.read(keys) == [4]


async def test_a_raising_callback_does_not_starve_the_others(store: EmbeddedStore) -> None:
    release = blocker(store)
    outcomes = Outcomes()

    def explode(error: Done) -> None:
        raise RuntimeError("callback bug")

    store.write([(INSERT, (1, "x"))], explode)
    store.write([(INSERT, (2, "y"))], outcomes.done(2))
    release.set()
    assert await outcomes.wait() == {2: None}


# ------------------------------------------------------------- statements


async def test_callable_and_executemany_statements(store: EmbeddedStore) -> None:
    seen: list[int] = []

    def read_back(db: sqlite3.Connection) -> None:
        # Runs inside the transaction: it sees the rows inserted before it.
        seen.append(count(db))

    statements: list[Statement] = [
        (INSERT, [(k, "many") for k in range(10)]),
        read_back,
        lambda db: db.execute("UPDATE items SET v = 'changed' WHERE k < 5"),
    ]
    outcomes = Outcomes()
    store.write(statements, outcomes.done(0))
    assert await outcomes.wait() == {0: None}
    assert seen == [10]
    rows = await store.read(lambda db: db.execute("SELECT k, v FROM items ORDER BY k").fetchall())
    assert rows == [(k, "changed" if k < 5 else "many") for k in range(10)]


# -------------------------------------------------------------- lifecycle


async def test_close_commits_what_was_queued(tmp_path: Path) -> None:
    path = tmp_path / "closing.db"
    first = EmbeddedStore(path)
    await first.open(SCHEMA)
    for k in range(1_000):
        first.write([(INSERT, (k, "queued"))])
    await first.close()
    with pytest.raises(StoreError):
        first.write([(INSERT, (5_000, "late"))])
    with pytest.raises(StoreError):
        await first.read(count)

    again = EmbeddedStore(path)
    await again.open(SCHEMA)
    try:
        assert await again.read(count) == 1_000
    finally:
        await again.close()


async def test_close_twice_and_close_unopened_are_harmless(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "x.db")
    await store.close()  # never opened
    opened = EmbeddedStore(tmp_path / "y.db")
    await opened.open(SCHEMA)
    await opened.close()
    await opened.close()


@pytest.mark.parametrize("synchronous", ["normal", "EXTRA", "", "FULL; DROP TABLE x"])
def test_a_bad_synchronous_setting_is_a_value_error(tmp_path: Path, synchronous: str) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        EmbeddedStore(tmp_path / "x.db", synchronous)  # type: ignore[arg-type]


async def test_an_unopenable_path_raises_store_error_from_open(tmp_path: Path) -> None:
    path = tmp_path / "data" / "packetstack.db"
    path.mkdir(parents=True)  # a directory where the database file should be
    store = EmbeddedStore(path)
    with pytest.raises(StoreError, match="cannot open"):
        await asyncio.wait_for(store.open(SCHEMA), WAIT)


async def test_a_bad_schema_raises_store_error_from_open(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "x.db")
    with pytest.raises(StoreError):
        await asyncio.wait_for(store.open("CREATE TABLE broken ("), WAIT)


@pytest.mark.parametrize(("synchronous", "value"), [("OFF", 0), ("NORMAL", 1), ("FULL", 2)])
async def test_the_synchronous_setting_is_applied(
    tmp_path: Path, synchronous: str, value: int
) -> None:
    store = EmbeddedStore(tmp_path / "sync.db", synchronous)  # type: ignore[arg-type]
    await store.open(SCHEMA)
    try:
        assert await store.read(lambda db: db.execute("PRAGMA synchronous").fetchone()[0]) == value
        mode = await store.read(lambda db: db.execute("PRAGMA journal_mode").fetchone()[0])
        assert mode == "wal"
    finally:
        await store.close()


def test_the_default_is_normal(tmp_path: Path) -> None:
    assert EmbeddedStore(tmp_path / "x.db").synchronous == "NORMAL"
