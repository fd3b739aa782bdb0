"""The grid's journal over a real embedded store: effects become SQL in order, loads give
the live entries of a partition, writers hear back only after the commit, and a failed
commit is retried until it succeeds."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from packetstack import ConfigError, StoreError
from packetstack.grid import journal as journal_module
from packetstack.grid.journal import Journal, statements
from packetstack.grid.ops import Kind, Op, PartitionData, apply, effect, live, partition_data
from packetstack.storage import EmbeddedStore, Statement

enc = msgspec.msgpack.encode
WAIT = 10.0
NOW = 1_000.0


def put(part: int, key: bytes, value: object, map: str = "m", expires: float = 0.0) -> Op:
    return Op(map, part, Kind.PUT, key, enc(value), None, expires)


def delete(part: int, key: bytes, map: str = "m") -> Op:
    return Op(map, part, Kind.DELETE, key)


def clear(part: int, map: str = "m") -> Op:
    return Op(map, part, Kind.CLEAR)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EmbeddedStore]:
    opened = EmbeddedStore(tmp_path / "grid.db")
    await opened.open("")
    yield opened
    await opened.close()


@pytest.fixture
async def journal(store: EmbeddedStore) -> Journal:
    opened = Journal(store)
    await opened.open(271)
    return opened


async def write(journal: Journal, effects: list[Op]) -> None:
    """Journal ``effects`` and wait for their done()."""
    done = asyncio.Event()
    journal.write(effects, done.set)
    await asyncio.wait_for(done.wait(), WAIT)


def blocker(store: EmbeddedStore) -> threading.Event:
    """Hold the store's writer thread in a transaction until the returned event is set:
    what is written meanwhile goes into the next commit, together."""
    release = threading.Event()
    entered = threading.Event()

    def hold(db: sqlite3.Connection) -> None:
        entered.set()
        release.wait(WAIT)

    store.write([hold])
    assert entered.wait(WAIT), "the writer thread never started the blocking write"
    return release


def on_disk(path: Path) -> list[tuple[Any, ...]]:
    """The committed entries, read through a connection of our own: ``grid`` with the
    logged batches folded in (in a transaction rolled back, leaving the file as it was)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN")
        journal_module.fold(db)
        return db.execute(
            "SELECT part, map, key, value, expires FROM grid ORDER BY 1, 2, 3"
        ).fetchall()
    finally:
        db.execute("ROLLBACK")
        db.close()


# ------------------------------------------------------------------ statements


def sql_and_rows(out: list[Statement]) -> list[tuple[str, list[Any]]]:
    """The statements as (sql, rows): every one a list of rows, for one executemany."""
    pairs = []
    for statement in out:
        assert isinstance(statement, tuple)
        sql, rows = statement
        assert isinstance(rows, list) and rows
        pairs.append((sql, rows))
    return pairs


def test_statements_group_runs_of_one_kind_in_order() -> None:
    effects = [
        put(1, b"a", 1),
        put(1, b"b", 2, expires=5.0),
        delete(1, b"a"),
        put(2, b"c", 3),
        clear(1),
        clear(2, "n"),
        delete(2, b"c"),
    ]
    out = sql_and_rows(statements(effects))
    assert [sql.split()[0] for sql, _ in out] == ["INSERT", "DELETE", "INSERT", "DELETE", "DELETE"]
    assert [rows for _, rows in out] == [
        [(1, "m", b"a", enc(1), 0.0), (1, "m", b"b", enc(2), 5.0)],
        [(1, "m", b"a")],
        [(2, "m", b"c", enc(3), 0.0)],
        [(1, "m"), (2, "n")],
        [(2, "m", b"c")],
    ]
    # The delete of a key and the clear of a map are different statements.
    assert out[1][0] != out[3][0]


def test_statements_of_nothing() -> None:
    assert statements([]) == []


def test_one_statement_per_kind_when_not_interleaved() -> None:
    out = sql_and_rows(statements([put(p, b"k", p) for p in range(100)]))
    assert len(out) == 1
    assert len(out[0][1]) == 100


# ------------------------------------------------------------ write and load


async def test_open_is_idempotent(store: EmbeddedStore) -> None:
    first = Journal(store)
    await first.open(271)
    await write(first, [put(1, b"k", 1)])
    second = Journal(store)
    await second.open(271)  # CREATE ... IF NOT EXISTS: the rows stay
    assert await second.load(1, NOW) == [("m", b"k", enc(1), 0.0)]


async def test_write_then_load_a_partition(journal: Journal) -> None:
    await write(
        journal,
        [
            put(3, b"a", 1),
            put(3, b"b", 2, expires=NOW + 60),
            put(3, b"x", "other map", map="n"),
            put(5, b"a", "another partition"),
        ],
    )
    assert sorted(await journal.load(3, NOW)) == [
        ("m", b"a", enc(1), 0.0),
        ("m", b"b", enc(2), NOW + 60),
        ("n", b"x", enc("other map"), 0.0),
    ]
    assert await journal.load(5, NOW) == [("m", b"a", enc("another partition"), 0.0)]
    assert await journal.load(4, NOW) == []


async def test_put_overwrites_value_and_expiry(journal: Journal) -> None:
    await write(journal, [put(1, b"k", 1, expires=NOW + 5)])
    await write(journal, [put(1, b"k", 2)])
    assert await journal.load(1, NOW) == [("m", b"k", enc(2), 0.0)]
    await write(journal, [put(1, b"k", 3, expires=NOW + 9)])
    assert await journal.load(1, NOW) == [("m", b"k", enc(3), NOW + 9)]


async def test_mixed_effects_apply_in_order(journal: Journal) -> None:
    await write(
        journal,
        [
            put(1, b"a", 1),
            put(1, b"b", 2),
            put(1, b"c", 3, map="n"),
            put(2, b"a", "kept: other partition"),
            delete(1, b"a"),
            put(1, b"a", "again"),  # after its delete: present
            clear(1),  # map m of partition 1 only
            put(1, b"d", 4),  # after the clear: present
            delete(1, b"missing"),
            clear(9, "nothing"),
        ],
    )
    assert sorted(await journal.load(1, NOW)) == [
        ("m", b"d", enc(4), 0.0),
        ("n", b"c", enc(3), 0.0),
    ]
    assert await journal.load(2, NOW) == [("m", b"a", enc("kept: other partition"), 0.0)]


async def test_effects_of_separate_writes_keep_their_order(journal: Journal) -> None:
    dones: list[int] = []
    journal.write([put(1, b"k", 1)], lambda: dones.append(1))
    journal.write([delete(1, b"k")], lambda: dones.append(2))
    journal.write([put(1, b"k", 3)], lambda: dones.append(3))
    journal.write([clear(1, "n"), put(1, b"j", 4, map="n")], lambda: dones.append(4))
    # A read comes after every write queued before it.
    assert sorted(await journal.load(1, NOW)) == [
        ("m", b"k", enc(3), 0.0),
        ("n", b"j", enc(4), 0.0),
    ]
    await asyncio.sleep(0)
    assert dones == [1, 2, 3, 4]


async def test_load_leaves_out_expired_rows(journal: Journal) -> None:
    await write(
        journal,
        [
            put(1, b"never", 0),
            put(1, b"past", 1, expires=NOW - 1),
            put(1, b"now", 2, expires=NOW),  # due exactly now: expired, like ops.live
            put(1, b"later", 3, expires=NOW + 1),
        ],
    )
    assert sorted(k for _, k, _, _ in await journal.load(1, NOW)) == [b"later", b"never"]
    assert sorted(k for _, k, _, _ in await journal.load(1, NOW - 5)) == [
        b"later",
        b"never",
        b"now",
        b"past",
    ]
    assert [k for _, k, _, _ in await journal.load(1, NOW + 10)] == [b"never"]


async def test_load_all_gives_every_row_by_partition(journal: Journal) -> None:
    assert await journal.load_all() == {}
    await write(
        journal,
        [
            put(0, b"a", 1),
            put(7, b"b", 2, map="n"),
            put(7, b"c", 3, expires=NOW - 100),  # expired rows too: the service sweeps them
            put(270, b"d", 4),
        ],
    )
    everything = await journal.load_all()
    assert set(everything) == {0, 7, 270}
    assert everything[0] == [("m", b"a", enc(1), 0.0)]
    assert sorted(everything[7]) == [("m", b"c", enc(3), NOW - 100), ("n", b"b", enc(2), 0.0)]
    assert everything[270] == [("m", b"d", enc(4), 0.0)]
    assert all(isinstance(row, tuple) for rows in everything.values() for row in rows)


async def test_the_journal_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "restart.db"
    store = EmbeddedStore(path)
    await store.open("")
    first = Journal(store)
    await first.open(271)
    first.write([put(1, b"k", "v"), put(2, b"j", "w", expires=NOW + 1)], lambda: None)
    await store.close()  # commits what is queued

    store = EmbeddedStore(path)
    await store.open("")
    try:
        second = Journal(store)
        await second.open(271)
        assert await second.load_all() == {
            1: [("m", b"k", enc("v"), 0.0)],
            2: [("m", b"j", enc("w"), NOW + 1)],
        }
    finally:
        await store.close()


def test_partition_data() -> None:
    assert partition_data([]) == {}
    rows = [
        ("m", b"a", enc(1), 0.0),
        ("n", b"b", enc(2), 5.0),
        ("m", b"c", enc(3), 7.0),
    ]
    assert partition_data(rows) == {
        "m": {b"a": (enc(1), 0.0), b"c": (enc(3), 7.0)},
        "n": {b"b": (enc(2), 5.0)},
    }


async def test_the_journal_holds_what_the_owner_holds(journal: Journal) -> None:
    """Random operations on an owner's data; their effects journaled; a partition loaded
    back from the journal equals the owner's live data."""
    rng = random.Random(20240607)
    owners: dict[int, PartitionData] = {0: {}, 1: {}}
    kinds = [k for k in Kind if k != Kind.EXPIRE]
    keys = [b"a", b"b", b"c", b"d"]
    now = NOW
    for _ in range(20):
        effects = []
        for _ in range(rng.randint(1, 30)):
            part = rng.choice([0, 1])
            op = Op(
                rng.choice(["m", "n"]),
                part,
                rng.choice(kinds),
                rng.choice(keys),
                rng.choice([None, enc(1), enc(2), enc("s")]),
                rng.choice([None, enc(1), enc(2)]),
                rng.choice([0.0, now + 100, now + 0.5]),
                rng.randint(-2, 2),
            )
            change = effect(op, apply(owners[part], op, now))
            if change is not None:
                effects.append(change)
        await write(journal, effects)
        now += 0.3
        for part, data in owners.items():
            loaded = partition_data(await journal.load(part, now))
            expected = {
                name: {k: e for k, e in entries.items() if live(e, now)}
                for name, entries in data.items()
            }
            assert loaded == {name: e for name, e in expected.items() if e}


# ------------------------------------------------------------ done and retry


async def test_done_is_called_once_and_only_after_the_commit(
    store: EmbeddedStore, journal: Journal
) -> None:
    seen: list[list[tuple[Any, ...]]] = []
    done = asyncio.Event()

    def committed() -> None:
        seen.append(on_disk(store.path))
        done.set()

    release = blocker(store)
    journal.write([put(1, b"k", "v")], committed)
    await asyncio.sleep(0.1)
    assert seen == []  # the writer thread has not committed it yet
    release.set()
    await asyncio.wait_for(done.wait(), WAIT)
    await asyncio.sleep(0.05)
    # Called once, and by then another connection sees the row: it is committed.
    assert seen == [[(1, "m", b"k", enc("v"), 0.0)]]
    assert journal.retries == 0


async def test_a_failed_commit_is_retried_until_it_succeeds(
    store: EmbeddedStore, journal: Journal
) -> None:
    # Realistic failure: the journal's write shares a group commit with another writer's
    # broken statement, so the whole transaction rolls back.
    calls: list[float] = []
    done = asyncio.Event()

    def committed() -> None:
        calls.append(asyncio.get_running_loop().time())
        done.set()

    release = blocker(store)
    journal.write([put(1, b"k", "v"), delete(1, b"x")], committed)
    broken: list[Statement] = [("INSERT INTO missing VALUES (?)", (1,))]
    store.write(broken)
    release.set()
    await asyncio.wait_for(done.wait(), WAIT)
    await asyncio.sleep(0.1)
    assert journal.retries == 1
    assert len(calls) == 1
    assert on_disk(store.path) == [(1, "m", b"k", enc("v"), 0.0)]


async def test_retries_back_off_up_to_a_limit(
    store: EmbeddedStore, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "RETRY_FIRST", 0.01)
    monkeypatch.setattr(journal_module, "RETRY_MAX", 0.03)
    failures = 5
    attempts: list[float] = []
    real_write = store.write
    loop = asyncio.get_running_loop()

    def flaky(sql: list[Statement], done: Callable[[BaseException | None], None]) -> None:
        attempts.append(loop.time())
        if len(attempts) <= failures:
            done(StoreError("disk I/O error (simulated)"))
        else:
            real_write(sql, done)

    monkeypatch.setattr(store, "write", flaky)
    delays: list[float] = []
    real_call_later = loop.call_later

    def spy(delay: float, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if callback == journal._write:
            delays.append(delay)
        return real_call_later(delay, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_later", spy)
    dones: list[None] = []
    finished = asyncio.Event()

    def committed() -> None:
        dones.append(None)
        finished.set()

    journal.write([put(1, b"k", "v")], committed)
    assert dones == []
    await asyncio.wait_for(finished.wait(), WAIT)
    await asyncio.sleep(0.05)
    assert journal.retries == failures
    assert dones == [None]  # once, after the successful attempt
    assert len(attempts) == failures + 1
    assert delays == pytest.approx([0.01, 0.02, 0.03, 0.03, 0.03])
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert all(gap >= delay * 0.9 for gap, delay in zip(gaps, delays, strict=True)), gaps
    assert await journal.load(1, NOW) == [("m", b"k", enc("v"), 0.0)]


async def test_no_retry_once_the_store_is_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = EmbeddedStore(tmp_path / "closing.db")
    await store.open("")
    journal = Journal(store)
    await journal.open(271)
    dones: list[None] = []
    release = blocker(store)
    journal.write([put(1, b"k", "v")], lambda: dones.append(None))
    store.write([("INSERT INTO missing VALUES (?)", (1,))])  # fails the shared commit
    with caplog.at_level(logging.ERROR, logger="packetstack.grid"):
        closing = asyncio.ensure_future(store.close())
        await asyncio.sleep(0.05)
        assert store.closed
        release.set()
        await asyncio.wait_for(closing, WAIT)
        await asyncio.sleep(0.2)  # longer than the first retry delay
    assert dones == []
    assert journal.retries == 0
    assert any("store closed" in r.getMessage() for r in caplog.records), caplog.records


async def test_a_retry_after_the_store_closed_does_not_raise_into_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = EmbeddedStore(tmp_path / "closing.db")
    await store.open("")
    journal = Journal(store)
    await journal.open(271)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        real_write = store.write
        attempts = 0

        def fail_once(sql: list[Statement], done: Callable[[BaseException | None], None]) -> None:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                done(StoreError("disk I/O error (simulated)"))
            else:
                real_write(sql, done)

        monkeypatch.setattr(store, "write", fail_once)
        journal.write([put(1, b"k", "v")], lambda: None)
        assert journal.retries == 1  # a retry is scheduled
        await store.close()
        await asyncio.sleep(journal_module.RETRY_FIRST * 4)
        assert attempts == 1  # the retry found the store closed and gave up, logging it
        assert errors == []
    finally:
        loop.set_exception_handler(None)


async def test_listeners_and_the_partition_count_are_kept(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "meta.db")
    await store.open("")
    journal = Journal(store)
    assert await journal.open(271) == {}
    await journal.listen("m", "a", True)
    await journal.listen("m", "b", True)
    await journal.listen("n", "a", True)
    await journal.listen("m", "b", False)
    assert await Journal(store).open(271) == {"m": {"a"}, "n": {"a"}}
    # No entries yet: another partition count is taken.
    assert await Journal(store).open(64) == {"m": {"a"}, "n": {"a"}}
    done = asyncio.Event()
    journal.write([put(3, b"k", "v")], done.set)
    await asyncio.wait_for(done.wait(), WAIT)
    with pytest.raises(ConfigError, match=r"grid_partitions is 271, but .* written with 64"):
        await Journal(store).open(271)
    await store.close()


async def test_the_log_is_folded_into_the_table_in_order(
    store: EmbeddedStore, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "FOLD_AT", 3)
    done = asyncio.Event()
    journal.write([put(1, b"a", "1"), put(1, b"b", "2")], lambda: None)
    journal.write([delete(1, b"a"), put(2, b"c", "3")], done.set)  # 4 effects: a fold
    await asyncio.wait_for(done.wait(), WAIT)
    await store.read(lambda db: None)  # after the fold
    assert journal.folds == 1

    def raw(db: sqlite3.Connection) -> tuple[int, list[tuple[Any, ...]]]:
        logged = db.execute("SELECT count(*) FROM grid_log").fetchone()[0]
        return logged, db.execute("SELECT part, key FROM grid ORDER BY 1, 2").fetchall()

    assert await store.read(raw) == (0, [(1, b"b"), (2, b"c")])


async def test_an_idle_log_is_folded(
    store: EmbeddedStore, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "FOLD_IDLE", 0.05)
    journal.write([put(1, b"a", "1")], lambda: None)
    await asyncio.sleep(0.3)
    assert journal.folds == 1
    assert (
        await store.read(lambda db: db.execute("SELECT count(*) FROM grid_log").fetchone()[0]) == 0
    )
